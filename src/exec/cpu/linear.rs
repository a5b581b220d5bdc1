//! Gemm and MatMul with a constant weight matrix: `y = alpha·A·B + bias` as one GEMM, or on
//! the integer kernels when a compressed graph quantized B.

use super::conv::Weights;
use super::ops::gemm_into;
use super::{Value, checked_len, exec_err};
use crate::compress::ActivationParams;
use crate::error::Result;
use crate::graph::{Constant, Node, transpose};
use crate::int4_cpu::Int4Weights;
use crate::int8_cpu::{FusedEpilogue, Int8Pointwise};
use crate::quant::QuantizedTensor;

pub(super) struct LinearKernel {
    /// Float: `[K, N]`; integer: `[N, K]` (output major, as `transB` stores it).
    pub(super) weights: Weights,
    k: usize,
    n: usize,
    alpha: f32,
    /// `N` values (zeros when the node has none), already multiplied by `beta`.
    bias: Vec<f32>,
    trans_a: bool,
    /// Whether the file stores B as `[N, K]` (what the integer kernels need).
    trans_b: bool,
}

impl LinearKernel {
    pub(super) fn new(
        node: &Node,
        w: &Constant,
        bias: Option<&Constant>,
        [alpha, beta]: [f32; 2],
        [trans_a, trans_b]: [bool; 2],
    ) -> Result<Self> {
        if w.dims.len() != 2 {
            return Err(exec_err(node, "B must be 2-D"));
        }
        let (k, n) = if trans_b {
            (w.dims[1], w.dims[0])
        } else {
            (w.dims[0], w.dims[1])
        };
        let weight = if trans_b {
            transpose(&w.dims, &w.data, &[1, 0]).1
        } else {
            w.data.clone()
        };
        let bias = match bias.map(|c| c.data.as_slice()) {
            None => vec![0.0; n],
            Some([one]) => vec![beta * one; n],
            Some(d) if d.len() == n => d.iter().map(|v| beta * v).collect(),
            Some(d) => {
                return Err(exec_err(
                    node,
                    format!("a bias of {} values for {n} outputs", d.len()),
                ));
            }
        };
        Ok(Self {
            weights: Weights::Float(weight),
            k,
            n,
            alpha,
            bias,
            trans_a,
            trans_b,
        })
    }

    /// Runs on the int8 kernel (int8 weights and inputs) or from packed int4 weights when
    /// B is stored `[N, K]` and nothing scales the product; `false` keeps the floats.
    pub(super) fn use_quantized(
        &mut self,
        q: &QuantizedTensor,
        input_grid: Option<&ActivationParams>,
    ) -> Result<bool> {
        if !self.trans_b || self.trans_a || self.alpha != 1.0 || q.values.len() != self.k * self.n {
            return Ok(false);
        }
        if let Some(grid) = input_grid
            && let Some(kernel) = Int8Pointwise::new(q, grid, self.k, self.n)?
        {
            self.weights = Weights::Int8(kernel);
            return Ok(true);
        }
        if let Some(kernel) = Int4Weights::new(q, self.k, self.n) {
            self.weights = Weights::Int4(kernel);
            return Ok(true);
        }
        Ok(false)
    }

    pub(super) fn bytes(&self) -> usize {
        self.weights.bytes() + 4 * self.bias.len()
    }

    pub(super) fn forward(&self, node: &Node, x: Value, out_dims: &[usize]) -> Result<Value> {
        let mut x = x.into_plain();
        if self.trans_a {
            let (dims, data) = transpose(&x.dims, &x.data, &[1, 0]);
            x = Value::plain(dims, data);
        }
        let (k, n) = (self.k, self.n);
        let m = x.data.len() / k.max(1);
        let len = checked_len(node, out_dims)?;
        if m * k != x.data.len() || m * n != len {
            return Err(exec_err(
                node,
                format!("an input {:?} for a {k}×{n} weight", x.dims),
            ));
        }
        let from_bias = || -> Vec<f32> { self.bias.iter().copied().cycle().take(len).collect() };
        let out = match &self.weights {
            Weights::Float(w) => {
                let mut out = from_bias();
                gemm_into(m, n, k, &mut out, n, &x.data, k, w, n, 1, self.alpha)?;
                out
            }
            Weights::Int8(kernel) => {
                kernel.forward(&x.data, m, &self.bias, FusedEpilogue::default())
            }
            // `use_quantized` here never builds it.
            Weights::Int8Depthwise(_) => {
                return Err(exec_err(node, "a depthwise kernel on a matrix product"));
            }
            Weights::Int4(kernel) => kernel.product(&x.data, m, &self.bias),
        };
        Ok(Value::plain(out_dims.to_vec(), out))
    }
}
