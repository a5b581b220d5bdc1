//! The burn interpreter: a graph as burn tensor ops, so the one graph runs on every device
//! burn has (WebGPU in the browser, wgpu or Flex natively) and trains under autodiff. Its
//! constants are module parameters (weights, biases and BatchNorm affines train; the rest
//! stays fixed), so an optimizer steps it like any burn module.
//!
//! Values are rank-6 tensors padded with leading ones, their logical dims kept beside them:
//! ONNX's trailing-aligned broadcasting, Concat and Transpose then need no per-rank code.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::activation;
use burn::tensor::module::{avg_pool2d, conv2d, max_pool2d};
use burn::tensor::ops::{AvgPoolOptions, ConvOptions, MaxPoolOptions};

use super::{MAX_ACTIVATION_ELEMENTS, ShapeCache};
use crate::compress::ActivationParams;
use crate::distill::read_f32;
use crate::error::{EngineError, Result};
use crate::graph::{Constant, Graph, Node, Op, concrete_dims};
use crate::quant::{Granularity, QuantScheme, QuantizedTensor};

/// The highest rank a value may have.
const RANK: usize = 6;

/// What the interpreter knows about a graph besides its parameters.
#[derive(Debug)]
struct Plan {
    graph: Graph,
    /// Constant name → index into [`GraphModel::constants`].
    index: HashMap<String, usize>,
    /// Per constant: the quantization to train through (straight-through estimator).
    quant: Vec<Option<WeightQuant>>,
    /// For each node, the values whose last reader it is.
    frees: Vec<Vec<String>>,
    shapes: ShapeCache,
    /// Nodes (by index) computed by a kernel of their own instead of burn ops.
    kernels: HashMap<usize, Arc<dyn ChannelKernel>>,
    /// Activation quantizers read only by int8 kernels, which quantize their input
    /// themselves: these nodes pass their input on.
    passes: HashSet<usize>,
}

/// A 1×1 convolution or a Gemm computed by a kernel of its own (the WGSL integer kernels of
/// [`crate::gpu_int`]): `[channels, pixels]` in, `[outputs, pixels]` out, bias included.
pub trait ChannelKernel: std::fmt::Debug + Send + Sync {
    fn forward(&self, x: Tensor<2>) -> Result<Tensor<2>>;
    /// 8 for the int8 kernel (which quantizes its own input), 4 for int4 weight-only.
    fn weight_bits(&self) -> u8;
    /// Bytes of the buffers it holds.
    fn bytes(&self) -> usize;
}

/// A weight's quantization grid, element by element, on the model's device: fixed while
/// training, so a small step moves single weights across rounding edges instead of
/// re-scaling a whole channel when its largest weight moves.
#[derive(Debug, Clone)]
struct Grid {
    scale: Tensor<1>,
    zero_point: Tensor<1>,
    qmin: f32,
    qmax: f32,
}

/// How a weight is quantized in the forward pass while it trains.
#[derive(Debug)]
enum WeightQuant {
    /// On a fixed grid (a variant whose scales are part of it).
    Grid(Box<Grid>),
    /// With a scheme whose grids follow the weights, each pass (a student quantized again
    /// with its recipe after training).
    Live(QuantScheme),
}

/// A graph on a burn device: its constants as parameters, its nodes interpreted.
#[derive(Module, Debug)]
pub struct GraphModel {
    /// Every constant, flattened (reshaped to its dims where it is read).
    constants: Vec<Param<Tensor<1>>>,
    #[module(skip)]
    plan: Arc<Plan>,
}

/// A value while the graph runs.
#[derive(Clone)]
struct Value {
    t: Tensor<RANK>,
    dims: Vec<usize>,
}

/// x̂ = (clamp(round_half_even(x/s) + zp, qmin, qmax) − zp)·s, as the CPU interpreter
/// computes it.
fn fake_quantize_tensor<const D: usize>(x: Tensor<D>, q: &ActivationParams) -> Tensor<D> {
    x.div_scalar(q.scale)
        .round()
        .add_scalar(q.zero_point)
        .clamp(q.qmin, q.qmax)
        .sub_scalar(q.zero_point)
        .mul_scalar(q.scale)
}

fn exec_err(node: &Node, msg: impl std::fmt::Display) -> EngineError {
    EngineError::Execution(format!("{} node `{}`: {msg}", node.op.name(), node.name))
}

/// `dims` with leading ones up to rank 6.
fn padded(dims: &[usize]) -> Result<[usize; RANK]> {
    let Some(offset) = RANK.checked_sub(dims.len()) else {
        return Err(EngineError::Execution(format!(
            "a value of rank {} (the burn interpreter takes up to {RANK})",
            dims.len()
        )));
    };
    let mut out = [1; RANK];
    out[offset..].copy_from_slice(dims);
    Ok(out)
}

impl Value {
    fn new<const D: usize>(t: Tensor<D>) -> Result<Self> {
        let dims = t.dims().to_vec();
        Ok(Value {
            t: t.reshape(padded(&dims)?),
            dims,
        })
    }

    /// Where the logical axis 0 sits in the rank-6 tensor.
    fn offset(&self) -> usize {
        RANK - self.dims.len()
    }

    fn image(&self, node: &Node) -> Result<Tensor<4>> {
        match self.dims.as_slice() {
            &[n, c, h, w] => Ok(self.t.clone().reshape([n, c, h, w])),
            d => Err(exec_err(node, format!("needs an NCHW input, got {d:?}"))),
        }
    }

    fn matrix(&self, node: &Node) -> Result<Tensor<2>> {
        match self.dims.as_slice() {
            &[m, k] => Ok(self.t.clone().reshape([m, k])),
            d => Err(exec_err(node, format!("needs a 2-D input, got {d:?}"))),
        }
    }
}

/// The inputs a node trains (the others are shape data, statistics or fixed operands).
fn trains(op: &Op, input: usize) -> bool {
    match op {
        Op::Conv(_) | Op::Gemm { .. } | Op::MatMul => input >= 1,
        Op::BatchNorm { .. } => input == 1 || input == 2,
        _ => false,
    }
}

/// Checks the weights once, so no burn op is asked for shapes it would panic on.
fn validate(graph: &Graph, node: &Node) -> Result<()> {
    let constant = |i: usize| {
        node.inputs
            .get(i)
            .and_then(|n| graph.constant(n))
            .ok_or_else(|| exec_err(node, format!("input {i} must be a constant")))
    };
    match &node.op {
        Op::Conv(c) => {
            let w = constant(1)?;
            let fits = w.dims.len() == 4
                && c.group >= 1
                && w.dims[0] % c.group == 0
                && w.dims[2..] == c.kernel
                && c.strides.iter().chain(&c.dilations).all(|s| *s >= 1);
            let bias_fits = node.inputs.len() < 3 || constant(2)?.data.len() == w.dims[0];
            if !fits || !bias_fits {
                return Err(exec_err(
                    node,
                    format!("weight {:?} does not fit the convolution", w.dims),
                ));
            }
        }
        Op::BatchNorm { .. } => {
            let c = constant(1)?.data.len();
            for i in 2..5 {
                if constant(i)?.data.len() != c {
                    return Err(exec_err(node, "BatchNorm parameters differ in length"));
                }
            }
        }
        Op::Gemm { .. } | Op::MatMul if constant(1)?.dims.len() != 2 => {
            return Err(exec_err(node, "B must be 2-D"));
        }
        Op::AveragePool(p) | Op::MaxPool(p) => {
            let positive = p.kernel.iter().chain(&p.strides).chain(&p.dilations);
            if !positive.clone().all(|v| *v >= 1) {
                return Err(exec_err(node, "kernel, strides and dilations must be ≥ 1"));
            }
            if matches!(node.op, Op::AveragePool(_)) && p.dilations != [1, 1] {
                return Err(exec_err(node, "dilated average pooling is not supported"));
            }
        }
        _ => {}
    }
    Ok(())
}

impl GraphModel {
    /// The graph's constants as parameters on `device` (an autodiff device to train).
    pub fn new(graph: &Graph, device: &Device) -> Result<Self> {
        Self::with_kernels(graph, device, HashMap::new())
    }

    /// [`Self::new`] with some nodes (by index) computed by `kernels`: the constants only
    /// they read are not uploaded, and an activation quantizer read only by int8 kernels
    /// passes its input on (they quantize it themselves, on the same grid).
    pub fn with_kernels(
        graph: &Graph,
        device: &Device,
        kernels: HashMap<usize, Arc<dyn ChannelKernel>>,
    ) -> Result<Self> {
        let mut trainable: HashMap<&str, bool> = HashMap::new();
        // Constants some burn op reads (the others live in the kernels' own buffers).
        let mut read: HashSet<&str> = HashSet::new();
        for (n, node) in graph.nodes.iter().enumerate() {
            validate(graph, node)?;
            let by_kernel = kernels.contains_key(&n);
            for (i, input) in node.inputs.iter().enumerate() {
                if graph.constant(input).is_some() {
                    *trainable.entry(input).or_default() |= trains(&node.op, i);
                    if !by_kernel || i == 0 {
                        read.insert(input);
                    }
                }
            }
        }
        let mut index = HashMap::new();
        let mut constants = Vec::with_capacity(graph.constants.len());
        for (name, c) in &graph.constants {
            if crate::graph::element_count(&c.dims)? != c.data.len() {
                return Err(EngineError::Execution(format!(
                    "constant `{name}` holds {} values for dims {:?}",
                    c.data.len(),
                    c.dims
                )));
            }
            let t = if read.contains(name.as_str()) {
                Tensor::<1>::from_data(TensorData::new(c.data.clone(), [c.data.len()]), device)
            } else {
                // A stand-in: no node reads it (see `constant`'s length check).
                Tensor::<1>::zeros([1], device)
            };
            let train = trainable.get(name.as_str()).copied().unwrap_or(false);
            index.insert(name.clone(), constants.len());
            constants.push(Param::from_tensor(t).set_require_grad(train));
        }
        let frees = graph.last_readers();
        let quant = (0..constants.len()).map(|_| None).collect();
        let outputs: HashSet<&str> = graph.outputs.iter().map(|o| o.name.as_str()).collect();
        let consumers = graph.consumers();
        let passes = graph
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| {
                let out = node.outputs[0].as_str();
                let readers = consumers.get(out).map(Vec::as_slice).unwrap_or_default();
                matches!(node.op, Op::QuantizeDequantize(_))
                    && !outputs.contains(out)
                    && !readers.is_empty()
                    && readers.iter().all(|r| {
                        kernels.get(r).is_some_and(|k| k.weight_bits() == 8)
                            && graph.nodes[*r].inputs.first().is_some_and(|x| x == out)
                    })
            })
            .map(|(i, _)| i)
            .collect();
        Ok(GraphModel {
            constants,
            plan: Arc::new(Plan {
                // The weights live in `constants` (on the device) and in the kernels: the
                // plan keeps only their dims.
                graph: graph.without_weights(),
                index,
                quant,
                frees,
                shapes: ShapeCache::default(),
                kernels,
                passes,
            }),
        })
    }

    /// Bytes of the weights and other constants it holds on its device, kernels' buffers
    /// included.
    pub fn held_bytes(&self) -> usize {
        let constants: usize = self.constants.iter().map(|c| 4 * c.val().dims()[0]).sum();
        constants + self.plan.kernels.values().map(|k| k.bytes()).sum::<usize>()
    }

    /// How many nodes run on kernels of their own: `(int8, int4)`.
    pub fn kernel_layers(&self) -> (usize, usize) {
        let bits = |b: u8| {
            self.plan
                .kernels
                .values()
                .filter(|k| k.weight_bits() == b)
                .count()
        };
        (bits(8), bits(4))
    }

    /// Trains through the quantization of these weights (by constant name), on their grids:
    /// the forward pass sees the quantized values, gradients pass straight through.
    pub fn with_weight_quantization(self, grids: &BTreeMap<String, QuantizedTensor>) -> Self {
        let mut quant: Vec<Option<WeightQuant>> = (0..self.constants.len()).map(|_| None).collect();
        for (name, q) in grids {
            if let Some(&i) = self.plan.index.get(name)
                && q.values.len() == self.constants[i].val().dims()[0]
            {
                let device = self.constants[i].val().device();
                let (scale, zero_point) = q.element_grid();
                let (qmin, qmax) = q.scheme.qrange();
                let n = scale.len();
                quant[i] = Some(WeightQuant::Grid(Box::new(Grid {
                    scale: Tensor::from_data(TensorData::new(scale, [n]), &device),
                    zero_point: Tensor::from_data(TensorData::new(zero_point, [n]), &device),
                    qmin: qmin as f32,
                    qmax: qmax as f32,
                })));
            }
        }
        self.with_quant(quant)
    }

    /// Trains through the quantization of these weights (by constant name) with `scheme`,
    /// its grids computed from the weights as they stand in each forward pass (rows are
    /// output channels); gradients pass straight through.
    pub fn with_live_weight_quantization(self, weights: &[String], scheme: QuantScheme) -> Self {
        let mut quant: Vec<Option<WeightQuant>> = (0..self.constants.len()).map(|_| None).collect();
        for name in weights {
            if let Some(&i) = self.plan.index.get(name) {
                quant[i] = Some(WeightQuant::Live(scheme));
            }
        }
        self.with_quant(quant)
    }

    fn with_quant(mut self, quant: Vec<Option<WeightQuant>>) -> Self {
        let plan = &self.plan;
        self.plan = Arc::new(Plan {
            graph: plan.graph.clone(),
            index: plan.index.clone(),
            quant,
            frees: plan.frees.clone(),
            shapes: ShapeCache::default(),
            kernels: plan.kernels.clone(),
            passes: plan.passes.clone(),
        });
        self
    }

    /// Only the constants named in `trained` learn; the others keep their values.
    pub fn freeze_except(mut self, trained: &HashSet<String>) -> Self {
        let mut frozen = vec![false; self.constants.len()];
        for (name, &i) in &self.plan.index {
            frozen[i] = !trained.contains(name);
        }
        self.constants = std::mem::take(&mut self.constants)
            .into_iter()
            .zip(frozen)
            .map(|(p, frozen)| if frozen { p.set_require_grad(false) } else { p })
            .collect();
        self
    }

    pub fn graph(&self) -> &Graph {
        &self.plan.graph
    }

    /// A constant at its dims, fake-quantized when it trains through quantization.
    fn constant<const D: usize>(&self, node: &Node, input: usize) -> Result<Tensor<D>> {
        let name = node
            .inputs
            .get(input)
            .ok_or_else(|| exec_err(node, format!("missing input {input}")))?;
        let (Some(&i), Some(c)) = (self.plan.index.get(name), self.plan.graph.constant(name))
        else {
            return Err(exec_err(node, format!("input {input} must be a constant")));
        };
        let mut flat = self.constants[i].val();
        if flat.dims()[0] != crate::graph::element_count(&c.dims)? {
            return Err(exec_err(node, format!("input {input} is held by a kernel")));
        }
        match &self.plan.quant[i] {
            Some(WeightQuant::Grid(grid)) => {
                let q = flat
                    .clone()
                    .div(grid.scale.clone())
                    .round()
                    .add(grid.zero_point.clone())
                    .clamp(grid.qmin, grid.qmax)
                    .sub(grid.zero_point.clone())
                    .mul(grid.scale.clone());
                flat = flat.clone() + (q - flat).detach();
            }
            Some(WeightQuant::Live(scheme)) => {
                // Rows are output channels: a Gemm or MatMul that reads B as [in, out] is
                // quantized transposed.
                let (rows, cols) = match c.dims.as_slice() {
                    [] => (1, 1),
                    [first, rest @ ..] => (*first, rest.iter().product()),
                };
                let columns_out = match node.op {
                    Op::Gemm { trans_b, .. } => !trans_b,
                    Op::MatMul => true,
                    _ => false,
                };
                let w: Tensor<2> = flat.reshape([rows, cols]);
                let q = if columns_out {
                    ste_fake_quant(w.transpose(), scheme).transpose()
                } else {
                    ste_fake_quant(w, scheme)
                };
                flat = q.reshape([rows * cols]);
            }
            None => {}
        }
        let dims: [usize; D] = c.dims.clone().try_into().map_err(|_| {
            exec_err(
                node,
                format!("input {input} has dims {:?}, not rank {D}", c.dims),
            )
        })?;
        Ok(flat.reshape(dims))
    }

    /// A node's input: a computed value or a constant (at rank 6).
    fn input(&self, node: &Node, values: &HashMap<&str, Value>, i: usize) -> Result<Value> {
        let name = node
            .inputs
            .get(i)
            .ok_or_else(|| exec_err(node, format!("missing input {i}")))?;
        if let Some(v) = values.get(name.as_str()) {
            return Ok(v.clone());
        }
        let c = self
            .plan
            .graph
            .constant(name)
            .ok_or_else(|| exec_err(node, format!("`{name}` is not computed")))?;
        let i = self.plan.index[name.as_str()];
        let flat = self.constants[i].val();
        if flat.dims()[0] != crate::graph::element_count(&c.dims)? {
            return Err(exec_err(node, format!("`{name}` is held by a kernel")));
        }
        Ok(Value {
            t: flat.reshape(padded(&c.dims)?),
            dims: c.dims.clone(),
        })
    }

    /// Runs the graph on an NCHW batch; returns the outputs in the graph's order.
    pub fn forward(&self, x: Tensor<4>) -> Result<Vec<Output>> {
        Ok(self.forward_tapped(x, &[])?.0)
    }

    /// [`Self::forward`], also returning the values named in `taps` (intermediate results,
    /// e.g. for feature matching), in that order.
    pub fn forward_tapped(
        &self,
        x: Tensor<4>,
        taps: &[String],
    ) -> Result<(Vec<Output>, Vec<Output>)> {
        let mut tapped: Vec<Option<Output>> = (0..taps.len()).map(|_| None).collect();
        let graph = &self.plan.graph;
        let info = graph.input()?;
        let dims = x.dims();
        super::check_input_dims(graph, &dims)?;
        if info.dims.len() != 4 {
            return Err(EngineError::Execution(format!(
                "the model takes a rank-{} input; the burn interpreter takes NCHW images",
                info.dims.len()
            )));
        }
        let shapes = self.plan.shapes.get(&self.plan.graph, &dims)?;
        let mut values: HashMap<&str, Value> = HashMap::new();
        values.insert(info.name.as_str(), Value::new(x)?);
        for (n, (node, frees)) in graph.nodes.iter().zip(&self.plan.frees).enumerate() {
            let out_dims = shapes
                .get(&node.outputs[0])
                .and_then(|d| concrete_dims(d))
                .ok_or_else(|| exec_err(node, "output shape unknown"))?;
            if crate::graph::element_count(&out_dims)? > MAX_ACTIVATION_ELEMENTS {
                return Err(exec_err(
                    node,
                    format!("its output {out_dims:?} is too large"),
                ));
            }
            let t = match self.plan.kernels.get(&n) {
                Some(kernel) => self.on_kernel(kernel.as_ref(), node, &values)?,
                None if self.plan.passes.contains(&n) => self.input(node, &values, 0)?.t,
                None => self.step(node, &values, &out_dims)?,
            };
            if t.dims() != padded(&out_dims)? {
                return Err(exec_err(
                    node,
                    format!("computed {:?}, expected {out_dims:?}", t.dims()),
                ));
            }
            for f in frees {
                values.remove(f.as_str());
            }
            for (slot, _) in tapped
                .iter_mut()
                .zip(taps)
                .filter(|(_, tap)| **tap == node.outputs[0])
            {
                *slot = Some(Output {
                    t: t.clone(),
                    dims: out_dims.clone(),
                });
            }
            values.insert(node.outputs[0].as_str(), Value { t, dims: out_dims });
        }
        let outputs = graph
            .outputs
            .iter()
            .map(|o| {
                let v = values.remove(o.name.as_str()).ok_or_else(|| {
                    EngineError::Execution(format!("output `{}` was not computed", o.name))
                })?;
                Ok(Output {
                    t: v.t,
                    dims: v.dims,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let tapped = tapped
            .into_iter()
            .zip(taps)
            .map(|(t, name)| {
                t.ok_or_else(|| EngineError::Execution(format!("no node computes `{name}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((outputs, tapped))
    }

    /// The first output as `[batch, rest]`: a classifier's logits.
    pub fn logits(&self, x: Tensor<4>) -> Result<Tensor<2>> {
        Ok(self.logits_tapped(x, &[])?.0)
    }

    /// [`Self::logits`] and the values named in `taps` (see [`Self::forward_tapped`]).
    pub fn logits_tapped(&self, x: Tensor<4>, taps: &[String]) -> Result<(Tensor<2>, Vec<Output>)> {
        let (outputs, tapped) = self.forward_tapped(x, taps)?;
        let out = outputs
            .into_iter()
            .next()
            .ok_or_else(|| EngineError::Execution("the model has no outputs".into()))?;
        Ok((out.matrix()?, tapped))
    }

    /// [`Self::forward`] on a host tensor, read back: what the CPU interpreter's `run` does.
    pub async fn run(&self, input: &super::Tensor, device: &Device) -> Result<Vec<super::Tensor>> {
        let &[n, c, h, w] = input.dims.as_slice() else {
            return Err(EngineError::Execution(format!(
                "the burn interpreter takes an NCHW input, got {:?}",
                input.dims
            )));
        };
        if crate::graph::element_count(&input.dims)? != input.data.len() {
            return Err(EngineError::Execution(
                "input data does not match its dims".into(),
            ));
        }
        let x = Tensor::<4>::from_data(TensorData::new(input.data.clone(), [n, c, h, w]), device);
        let mut out = Vec::new();
        for v in self.forward(x)? {
            let len: usize = v.t.dims().iter().product();
            out.push(super::Tensor {
                data: read_f32(v.t.reshape([len])).await?,
                dims: v.dims,
            });
        }
        Ok(out)
    }

    /// The constants as they stand (after training), by name.
    pub async fn constants(&self) -> Result<BTreeMap<String, Constant>> {
        let mut out = BTreeMap::new();
        for (name, &i) in &self.plan.index {
            let dims = self.plan.graph.constants[name].dims.clone();
            let data = read_f32(self.constants[i].val()).await?;
            out.insert(name.clone(), Constant { dims, data });
        }
        Ok(out)
    }

    /// Keeps each named weight's zeros at zero (pruned weights stay pruned while training).
    pub fn mask_zeros(mut self, masks: &HashMap<String, Tensor<1>>) -> Self {
        let mut by_index: HashMap<usize, &Tensor<1>> = HashMap::new();
        for (name, mask) in masks {
            if let Some(&i) = self.plan.index.get(name) {
                by_index.insert(i, mask);
            }
        }
        self.constants = std::mem::take(&mut self.constants)
            .into_iter()
            .enumerate()
            .map(|(i, p)| match by_index.get(&i) {
                Some(mask) => p.map(|w| {
                    let trains = w.is_require_grad();
                    w.mul((*mask).clone()).detach().set_require_grad(trains)
                }),
                None => p,
            })
            .collect();
        self
    }

    /// 1 where a constant is non-zero, for [`Self::mask_zeros`].
    pub fn zero_masks(
        graph: &Graph,
        names: &[String],
        device: &Device,
    ) -> HashMap<String, Tensor<1>> {
        names
            .iter()
            .filter_map(|n| {
                let c = graph.constant(n)?;
                let mask: Vec<f32> = c
                    .data
                    .iter()
                    .map(|v| f32::from(u8::from(*v != 0.0)))
                    .collect();
                Some((
                    n.clone(),
                    Tensor::from_data(TensorData::new(mask, [c.data.len()]), device),
                ))
            })
            .collect()
    }

    /// A Conv (1×1) or Gemm node on its kernel: the channels become rows, every pixel of
    /// the batch a column.
    fn on_kernel(
        &self,
        kernel: &dyn ChannelKernel,
        node: &Node,
        values: &HashMap<&str, Value>,
    ) -> Result<Tensor<RANK>> {
        let x = self.input(node, values, 0)?;
        match x.dims.as_slice() {
            &[n, c, h, w] => {
                let rows: Tensor<2> = x.image(node)?.swap_dims(0, 1).reshape([c, n * h * w]);
                let y = kernel.forward(rows)?;
                let outputs = y.dims()[0];
                Ok(Value::new(y.reshape([outputs, n, h, w]).swap_dims(0, 1))?.t)
            }
            &[_, _] => {
                let y = kernel.forward(x.matrix(node)?.transpose())?;
                Ok(Value::new(y.transpose())?.t)
            }
            d => Err(exec_err(
                node,
                format!("a kernel takes NCHW or 2-D, got {d:?}"),
            )),
        }
    }

    fn step(
        &self,
        node: &Node,
        values: &HashMap<&str, Value>,
        out_dims: &[usize],
    ) -> Result<Tensor<RANK>> {
        let out6 = padded(out_dims)?;
        let input = |i: usize| self.input(node, values, i);
        let t = match &node.op {
            Op::Conv(c) => {
                let x = input(0)?.image(node)?;
                let w: Tensor<4> = self.constant(node, 1)?;
                let [_, cin, h, wd] = x.dims();
                let [_, per_group, kh, kw] = w.dims();
                if per_group.checked_mul(c.group) != Some(cin) {
                    return Err(exec_err(
                        node,
                        format!("{cin} input channels for weight {:?}", w.dims()),
                    ));
                }
                let bias = if node.inputs.len() > 2 {
                    Some(self.constant::<1>(node, 2)?)
                } else {
                    None
                };
                let pad = |axis: usize, size: usize, k: usize| {
                    c.padding
                        .resolve(axis, size, k, c.strides[axis], c.dilations[axis])
                };
                let options = ConvOptions::new_with_padding(
                    c.strides,
                    [pad(0, h, kh), pad(1, wd, kw)],
                    c.dilations,
                    c.group,
                );
                Value::new(conv2d(x, w, bias, options))?.t
            }
            Op::BatchNorm { epsilon } => {
                let x = input(0)?;
                let [g, b, m, v]: [Tensor<1>; 4] = [
                    self.constant(node, 1)?,
                    self.constant(node, 2)?,
                    self.constant(node, 3)?,
                    self.constant(node, 4)?,
                ];
                let channels = g.dims()[0];
                if x.dims.get(1) != Some(&channels) {
                    return Err(exec_err(
                        node,
                        format!("{channels} channels for an input {:?}", x.dims),
                    ));
                }
                let scale = g.div(v.add_scalar(*epsilon).sqrt());
                let shift = b.sub(m.mul(scale.clone()));
                let mut shape = vec![1; x.dims.len()];
                shape[1] = channels;
                let at = padded(&shape)?;
                x.t.mul(scale.reshape(at).expand(out6))
                    .add(shift.reshape(at).expand(out6))
            }
            Op::Relu => activation::relu(input(0)?.t),
            Op::Clip { min, max } => input(0)?.t.clamp(*min, *max),
            Op::LeakyRelu { alpha } => activation::leaky_relu(input(0)?.t, f64::from(*alpha)),
            Op::Sigmoid => activation::sigmoid(input(0)?.t),
            Op::HardSigmoid { alpha, beta } => {
                activation::hard_sigmoid(input(0)?.t, f64::from(*alpha), f64::from(*beta))
            }
            Op::HardSwish => {
                let x = input(0)?.t;
                x.clone()
                    .mul(x.div_scalar(6.0).add_scalar(0.5).clamp(0.0, 1.0))
            }
            Op::QuantizeDequantize(p) => {
                // Straight through: the forward pass quantizes, gradients pass unchanged.
                let x = input(0)?.t;
                let q = fake_quantize_tensor(x.clone(), p);
                x.clone() + (q - x).detach()
            }
            Op::Identity => input(0)?.t,
            Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Sum => {
                let mut acc = input(0)?.t.expand(out6);
                for i in 1..node.inputs.len() {
                    let b = input(i)?.t.expand(out6);
                    acc = match node.op {
                        Op::Sub => acc.sub(b),
                        Op::Mul => acc.mul(b),
                        Op::Div => acc.div(b),
                        _ => acc.add(b),
                    };
                }
                acc
            }
            Op::Concat { axis } => {
                let parts = (0..node.inputs.len())
                    .map(|i| input(i).map(|v| v.t))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(parts, axis + RANK - out_dims.len())
            }
            Op::GlobalAveragePool => {
                let x = input(0)?.image(node)?;
                Value::new(x.mean_dim(3).mean_dim(2))?.t
            }
            Op::AveragePool(p) | Op::MaxPool(p) => {
                let x = input(0)?.image(node)?;
                let [_, _, h, w] = x.dims();
                let pads = [0, 1].map(|axis| {
                    p.padding.resolve(
                        axis,
                        [h, w][axis],
                        p.kernel[axis],
                        p.strides[axis],
                        p.dilations[axis],
                    )
                });
                let y = if matches!(node.op, Op::MaxPool(_)) {
                    let options = MaxPoolOptions::new(p.kernel)
                        .with_stride(p.strides)
                        .with_padding_pairs(pads)
                        .with_dilation(p.dilations)
                        .with_ceil_mode(p.ceil_mode);
                    max_pool2d(x, options)
                } else {
                    let options = AvgPoolOptions::new(p.kernel)
                        .with_stride(p.strides)
                        .with_padding_pairs(pads)
                        .with_count_include_pad(p.count_include_pad)
                        .with_ceil_mode(p.ceil_mode);
                    avg_pool2d(x, options)
                };
                Value::new(y)?.t
            }
            Op::Flatten { .. } | Op::Reshape { .. } => input(0)?.t.reshape(out6),
            Op::Transpose { perm } => {
                let x = input(0)?;
                let offset = x.offset();
                if perm.len() != x.dims.len() || perm.iter().any(|p| *p >= perm.len()) {
                    return Err(exec_err(node, format!("perm {perm:?} for {:?}", x.dims)));
                }
                let mut full: [usize; RANK] = std::array::from_fn(|i| i);
                for (i, p) in perm.iter().enumerate() {
                    full[offset + i] = offset + p;
                }
                x.t.permute(full)
            }
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => {
                let mut a = input(0)?.matrix(node)?;
                if *trans_a {
                    a = a.transpose();
                }
                let mut b: Tensor<2> = self.constant(node, 1)?;
                if *trans_b {
                    b = b.transpose();
                }
                if a.dims()[1] != b.dims()[0] {
                    return Err(exec_err(
                        node,
                        format!("A {:?} and B {:?} do not chain", a.dims(), b.dims()),
                    ));
                }
                let mut y = a.matmul(b).mul_scalar(*alpha);
                if node.inputs.len() > 2 {
                    // C holds N values or one, in whatever shape (as the CPU interpreter
                    // reads it): a row, or a scalar.
                    let c = input(2)?;
                    let [m, n] = y.dims();
                    let row = if crate::graph::element_count(&c.dims)? == n {
                        n
                    } else {
                        1
                    };
                    let c2: Tensor<2> = c.t.reshape([1, row]);
                    y = y.add(c2.mul_scalar(*beta).expand([m, n]));
                }
                Value::new(y)?.t
            }
            Op::MatMul => {
                let a = input(0)?;
                let b: Tensor<2> = self.constant(node, 1)?;
                let k = b.dims()[0];
                let len = crate::graph::element_count(&a.dims)?;
                if a.dims.last() != Some(&k) {
                    return Err(exec_err(
                        node,
                        format!("A {:?} and B {:?} do not chain", a.dims, b.dims()),
                    ));
                }
                let a2: Tensor<2> = a.t.reshape([len / k.max(1), k]);
                a2.matmul(b).reshape(out6)
            }
            Op::Softmax { axis, legacy } => {
                let x = input(0)?;
                if *legacy {
                    let outer: usize = x.dims[..*axis].iter().product();
                    let inner: usize = x.dims[*axis..].iter().product();
                    let flat: Tensor<2> = x.t.reshape([outer, inner]);
                    activation::softmax(flat, 1).reshape(out6)
                } else {
                    let at = axis + x.offset();
                    activation::softmax(x.t, at)
                }
            }
        };
        Ok(t)
    }
}

/// An output of [`GraphModel::forward`]: the tensor (rank 6, leading ones) and its dims.
pub struct Output {
    pub t: Tensor<RANK>,
    pub dims: Vec<usize>,
}

impl Output {
    /// As `[batch, rest]` (a batch of one for a scalar).
    pub fn matrix(self) -> Result<Tensor<2>> {
        let batch = self.dims.first().copied().unwrap_or(1).max(1);
        let len = crate::graph::element_count(&self.dims)?;
        Ok(self.t.reshape([batch, len / batch]))
    }

    /// Only these positions along axis 1 (channels of an image, features of a row), in order.
    pub fn select_channels(self, positions: &[usize]) -> Result<Self> {
        let axis = RANK
            .checked_sub(self.dims.len())
            .map(|offset| offset + 1)
            .filter(|_| self.dims.len() >= 2)
            .ok_or_else(|| {
                EngineError::Execution(format!("a value {:?} has no axis 1", self.dims))
            })?;
        let indices: Vec<i64> = positions.iter().map(|&i| i as i64).collect();
        let positions = Tensor::<1, Int>::from_data(
            TensorData::new(indices, [positions.len()]),
            &self.t.device(),
        );
        let mut dims = self.dims;
        dims[1] = positions.dims()[0];
        Ok(Self {
            t: self.t.select(axis, positions),
            dims,
        })
    }

    /// Every value in one row.
    pub fn flat(self) -> Result<Tensor<1>> {
        Ok(self.t.reshape([crate::graph::element_count(&self.dims)?]))
    }
}

/// Fake quantization of an `[outputs, inputs]` weight matrix with `scheme`, with a
/// straight-through gradient: the forward pass sees the quantized values, the backward
/// pass the identity. A row's last block may be shorter, as in [`crate::quant`]. (The
/// deployed model quantizes BatchNorm-folded weights; per-channel symmetric grids are the
/// same either way, since folding scales each row by a positive factor.)
pub fn ste_fake_quant(w: Tensor<2>, scheme: &QuantScheme) -> Tensor<2> {
    let [rows, cols] = w.dims();
    let (qmin, qmax) = scheme.qrange();
    let (qmin, qmax) = (qmin as f64, qmax as f64);
    // Zero padding completes a ragged last block without moving its range (the grids
    // below always include 0).
    let padded_cols = match scheme.granularity {
        Granularity::PerBlock(b) if b > 0 => cols.div_ceil(b) * b,
        _ => cols,
    };
    let padded = if padded_cols > cols {
        let zeros = Tensor::<2>::zeros([rows, padded_cols - cols], &w.device());
        Tensor::cat(vec![w.clone(), zeros], 1)
    } else {
        w.clone()
    };
    let groups: Tensor<2> = match scheme.granularity {
        Granularity::PerTensor => padded.reshape([1, rows * cols]),
        Granularity::PerBlock(b) if b > 0 => padded.reshape([rows * padded_cols / b, b]),
        _ => padded,
    };
    let q = if scheme.symmetric {
        let scale = groups
            .clone()
            .abs()
            .max_dim(1)
            .div_scalar(qmax)
            .clamp_min(1e-12);
        groups
            .div(scale.clone())
            .round()
            .clamp(qmin, qmax)
            .mul(scale)
    } else {
        let lo = groups.clone().min_dim(1).clamp_max(0.0);
        let hi = groups.clone().max_dim(1).clamp_min(0.0);
        let scale = (hi - lo.clone()).div_scalar(qmax - qmin).clamp_min(1e-12);
        let zp = lo.div(scale.clone()).neg().add_scalar(qmin).round();
        (groups.div(scale.clone()).round() + zp.clone())
            .clamp(qmin, qmax)
            .sub(zp)
            .mul(scale)
    };
    let q: Tensor<2> = q.reshape([rows, padded_cols]);
    let q = if padded_cols > cols {
        q.slice([0..rows, 0..cols])
    } else {
        q
    };
    w.clone() + (q - w).detach()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::read_f32;
    use crate::quant::{Granularity, fake_quantize};

    // The straight-through forward pass must be the deployed quantization, ragged blocks
    // included (rows of 40 in blocks of 32).
    #[test]
    fn fake_quant_matches_the_deployed_grid() {
        let device = Device::flex();
        let (rows, cols) = (3, 40);
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        for granularity in [
            Granularity::PerTensor,
            Granularity::PerChannel,
            Granularity::PerBlock(32),
            Granularity::PerBlock(8),
        ] {
            for symmetric in [true, false] {
                let scheme = QuantScheme {
                    bits: 4,
                    symmetric,
                    granularity,
                };
                let w =
                    Tensor::<2>::from_data(TensorData::new(data.clone(), [rows, cols]), &device);
                let ours =
                    futures_lite::future::block_on(read_f32(ste_fake_quant(w, &scheme))).unwrap();
                let deployed = fake_quantize(&data, &[rows, cols], scheme);
                let worst = ours
                    .iter()
                    .zip(&deployed)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(worst < 1e-4, "{scheme:?}: off by {worst}");
            }
        }
    }
}
