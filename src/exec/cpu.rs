//! The CPU interpreter: runs any imported graph, channels-last (NHWC) for images so a 1×1
//! convolution is one GEMM over pixels (the `gemm` crate, SIMD128 on wasm), k×k and grouped
//! convolutions are im2col + GEMM per group, and depthwise ones are direct loops over
//! contiguous channels. Ops defined on NCHW positions (Reshape, Transpose, Flatten, Gemm,
//! Softmax, Concat off the channel axis) see their input in plain row-major order; the
//! interpreter converts only when a layout differs (free when H = W = 1).

use std::collections::HashMap;

use super::{MAX_ACTIVATION_ELEMENTS, ShapeCache, Tensor};
use crate::error::{EngineError, Result};
use crate::graph::{Conv, Graph, Node, Op, Pool, batch_norm_affine, transpose};

/// A value while the graph runs: logical dims (NCHW for 4-D) and its physical layout.
#[derive(Debug, Clone)]
struct Value {
    dims: Vec<usize>,
    data: Vec<f32>,
    /// 4-D data stored as NHWC.
    nhwc: bool,
}

impl Value {
    fn plain(dims: Vec<usize>, data: Vec<f32>) -> Self {
        Value {
            dims,
            data,
            nhwc: false,
        }
    }

    /// Whether NHWC and NCHW orders coincide (one pixel or one channel).
    fn layout_free(&self) -> bool {
        self.dims.len() != 4 || self.dims[2] * self.dims[3] == 1 || self.dims[1] == 1
    }

    fn into_plain(self) -> Value {
        if !self.nhwc || self.layout_free() {
            return Value {
                nhwc: false,
                ..self
            };
        }
        let [n, c, h, w] = [self.dims[0], self.dims[1], self.dims[2], self.dims[3]];
        let (_, data) = transpose(&[n, h, w, c], &self.data, &[0, 3, 1, 2]);
        Value::plain(self.dims, data)
    }

    fn into_nhwc(self) -> Value {
        if self.dims.len() != 4 || self.nhwc {
            return self;
        }
        if self.layout_free() {
            return Value { nhwc: true, ..self };
        }
        let [n, c, h, w] = [self.dims[0], self.dims[1], self.dims[2], self.dims[3]];
        let (_, data) = transpose(&[n, c, h, w], &self.data, &[0, 2, 3, 1]);
        Value {
            dims: self.dims,
            data,
            nhwc: true,
        }
    }

    /// Strides of each logical axis in the physical buffer.
    fn strides(&self) -> Vec<usize> {
        if self.nhwc && self.dims.len() == 4 {
            let [_, c, _, w] = [self.dims[0], self.dims[1], self.dims[2], self.dims[3]];
            return vec![self.dims[2] * w * c, 1, w * c, c];
        }
        let mut s = vec![1usize; self.dims.len()];
        for i in (0..self.dims.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * self.dims[i + 1];
        }
        s
    }
}

/// The taps `k` of a window (0..kernel) that land inside an axis of `size` for output `o`
/// (`o·stride + k·dilation − pad ∈ [0, size)`), and the input index of tap 0.
pub(crate) fn tap_range(
    o: usize,
    stride: usize,
    dilation: usize,
    pad: usize,
    kernel: usize,
    size: usize,
) -> (std::ops::Range<usize>, isize) {
    let origin = (o * stride) as isize - pad as isize;
    let d = dilation.max(1) as isize;
    let first = if origin >= 0 {
        0
    } else {
        ((-origin + d - 1) / d) as usize
    };
    let room = size as isize - origin;
    let last = if room <= 0 {
        0
    } else {
        (((room + d - 1) / d) as usize).min(kernel)
    };
    (first..last.max(first), origin)
}

fn exec_err(node: &Node, msg: impl std::fmt::Display) -> EngineError {
    EngineError::Execution(format!("{} node `{}`: {msg}", node.op.name(), node.name))
}

fn checked_len(node: &Node, dims: &[usize]) -> Result<usize> {
    let n = crate::graph::element_count(dims)?;
    if n > MAX_ACTIVATION_ELEMENTS {
        return Err(exec_err(
            node,
            format!(
                "its output {dims:?} has {n} elements, more than the {MAX_ACTIVATION_ELEMENTS} allowed"
            ),
        ));
    }
    Ok(n)
}

/// `dst[m×n] (row stride ldd) += scale · lhs[m×k] (row-major, row stride lda) · rhs`, where
/// `rhs[i][j]` is at `rhs[i·rs + j·cs]`. Bounds are checked here, not assumed.
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ldd: usize,
    lhs: &[f32],
    lda: usize,
    rhs: &[f32],
    rs: usize,
    cs: usize,
    scale: f32,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let last = |rows: usize, row_stride: usize, cols: usize, col_stride: usize| {
        (rows - 1) * row_stride + (cols.max(1) - 1) * col_stride
    };
    let fits = last(m, ldd, n, 1) < dst.len()
        && (k == 0 || (last(m, lda, k, 1) < lhs.len() && last(k, rs, n, cs) < rhs.len()));
    if !fits || ldd < n {
        return Err(EngineError::Execution(
            "matrix product out of bounds".into(),
        ));
    }
    if k == 0 {
        return Ok(());
    }
    // SAFETY: every element the GEMM touches is inside the slices (checked above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            true,
            lhs.as_ptr(),
            1,
            lda as isize,
            rhs.as_ptr(),
            cs as isize,
            rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

/// A convolution with its weights laid out for the kernels.
struct ConvKernel {
    conv: Conv,
    cin: usize,
    cout: usize,
    /// Depthwise: `[kh·kw, C]`; otherwise per group `[cout/g, kh·kw·cin/g]` with the inner
    /// order (ky, kx, ci) of the im2col rows.
    weight: Vec<f32>,
    bias: Vec<f32>,
    depthwise: bool,
    /// The activation of the node after it, applied as the output is written (that node
    /// then passes the value on).
    epilogue: Option<Op>,
}

impl ConvKernel {
    fn new(conv: &Conv, w: &crate::graph::Constant, bias: Option<&crate::graph::Constant>) -> Self {
        let [cout, cin_g, kh, kw] = [w.dims[0], w.dims[1], w.dims[2], w.dims[3]];
        let cin = cin_g * conv.group;
        let depthwise = conv.group == cin && cout == cin && cin_g == 1;
        let taps = kh * kw;
        let mut weight = vec![0f32; w.data.len()];
        if depthwise {
            for c in 0..cout {
                for t in 0..taps {
                    weight[t * cout + c] = w.data[c * taps + t];
                }
            }
        } else {
            // [cout, ci, ky, kx] → [cout, ky, kx, ci]
            for o in 0..cout {
                for ci in 0..cin_g {
                    for t in 0..taps {
                        weight[(o * taps + t) * cin_g + ci] = w.data[(o * cin_g + ci) * taps + t];
                    }
                }
            }
        }
        ConvKernel {
            conv: conv.clone(),
            cin,
            cout,
            weight,
            bias: bias.map_or_else(|| vec![0.0; cout], |b| b.data.clone()),
            depthwise,
            epilogue: None,
        }
    }

    /// Reads `x` in place (a value other nodes still need is not copied).
    fn forward(&self, node: &Node, x: &Value, out_dims: &[usize]) -> Result<Value> {
        let converted;
        let x = if x.nhwc || x.layout_free() || x.dims.len() != 4 {
            x
        } else {
            converted = x.clone().into_nhwc();
            &converted
        };
        if x.dims.len() != 4 {
            return Err(exec_err(node, format!("a {}-D input", x.dims.len())));
        }
        let activate = |data: &mut [f32]| {
            if let Some(op) = &self.epilogue {
                apply_unary(op, data);
            }
        };
        let [n, _, h, w] = [x.dims[0], x.dims[1], x.dims[2], x.dims[3]];
        let [oh, ow] = [out_dims[2], out_dims[3]];
        let len = checked_len(node, out_dims)?;
        let c = &self.conv;
        let mut out = Vec::with_capacity(len);
        for _ in 0..len / self.cout.max(1) {
            out.extend_from_slice(&self.bias);
        }
        let pointwise = c.kernel == [1, 1]
            && c.strides == [1, 1]
            && c.group == 1
            && c.padding.resolve(0, h, 1, 1, 1) == (0, 0)
            && c.padding.resolve(1, w, 1, 1, 1) == (0, 0);
        if pointwise {
            let pixels = n * h * w;
            gemm_into(
                pixels,
                self.cout,
                self.cin,
                &mut out,
                self.cout,
                &x.data,
                self.cin,
                &self.weight,
                1,
                self.cin,
                1.0,
            )?;
            activate(&mut out);
            return Ok(Value {
                dims: out_dims.to_vec(),
                data: out,
                nhwc: true,
            });
        }
        let [pad_y, pad_x] = c.padding.leading([h, w], c.kernel, c.strides, c.dilations);
        let [kh, kw] = c.kernel;
        // Per output column / row: the taps inside the input, and the input index of tap 0.
        let columns: Vec<(std::ops::Range<usize>, isize)> = (0..ow)
            .map(|ox| tap_range(ox, c.strides[1], c.dilations[1], pad_x, kw, w))
            .collect();
        let rows: Vec<(std::ops::Range<usize>, isize)> = (0..oh)
            .map(|oy| tap_range(oy, c.strides[0], c.dilations[0], pad_y, kh, h))
            .collect();
        let [dy, dx] = [c.dilations[0] as isize, c.dilations[1] as isize];
        // (tap index ky·kw + kx, input pixel y·w + x) of the taps inside the input.
        let taps = |oy: usize, ox: usize| {
            let (ys, y0) = rows[oy].clone();
            let (xs, x0) = columns[ox].clone();
            ys.flat_map(move |ky| {
                let iy = (y0 + ky as isize * dy) as usize;
                xs.clone()
                    .map(move |kx| (ky * kw + kx, iy * w + (x0 + kx as isize * dx) as usize))
            })
        };
        let image = h * w * self.cin;
        let out_image = oh * ow * self.cout;
        if self.depthwise {
            let ch = self.cout;
            for b in 0..n {
                let input = &x.data[b * image..(b + 1) * image];
                for (oy, (ys, y0)) in rows.iter().enumerate() {
                    for (ox, (xs, x0)) in columns.iter().enumerate() {
                        let at = b * out_image + (oy * ow + ox) * ch;
                        let acc = &mut out[at..at + ch];
                        for ky in ys.clone() {
                            let iy = (y0 + ky as isize * dy) as usize;
                            for kx in xs.clone() {
                                let pixel = iy * w + (x0 + kx as isize * dx) as usize;
                                let tap = ky * kw + kx;
                                let s = &input[pixel * ch..(pixel + 1) * ch];
                                let wt = &self.weight[tap * ch..(tap + 1) * ch];
                                for ((a, s), w) in acc.iter_mut().zip(s).zip(wt) {
                                    *a += s * w;
                                }
                            }
                        }
                        activate(acc);
                    }
                }
            }
            return Ok(Value {
                dims: out_dims.to_vec(),
                data: out,
                nhwc: true,
            });
        }
        let groups = c.group;
        let (cin_g, cout_g) = (self.cin / groups, self.cout / groups);
        let row = kh * kw * cin_g;
        let mut cols = vec![0f32; checked_len(node, &[oh, ow, row])?];
        for b in 0..n {
            let input = &x.data[b * image..(b + 1) * image];
            for g in 0..groups {
                cols.fill(0.0);
                for oy in 0..oh {
                    for ox in 0..ow {
                        let dst = &mut cols[(oy * ow + ox) * row..(oy * ow + ox + 1) * row];
                        for (tap, pixel) in taps(oy, ox) {
                            let at = pixel * self.cin + g * cin_g;
                            dst[tap * cin_g..(tap + 1) * cin_g]
                                .copy_from_slice(&input[at..at + cin_g]);
                        }
                    }
                }
                let weight = &self.weight[g * cout_g * row..(g + 1) * cout_g * row];
                let start = b * out_image + g * cout_g;
                gemm_into(
                    oh * ow,
                    cout_g,
                    row,
                    &mut out[start..],
                    self.cout,
                    &cols,
                    row,
                    weight,
                    1,
                    row,
                    1.0,
                )?;
            }
        }
        activate(&mut out);
        Ok(Value {
            dims: out_dims.to_vec(),
            data: out,
            nhwc: true,
        })
    }
}

enum Kernel {
    Conv(Box<ConvKernel>),
    /// `y = x·scale + shift` per channel (inference BatchNorm).
    Affine {
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    /// Gemm / MatMul: `y = alpha·A·B + bias`, B stored `[K, N]`.
    Linear {
        weight: Vec<f32>,
        k: usize,
        n: usize,
        alpha: f32,
        bias: Option<Vec<f32>>,
        trans_a: bool,
    },
    /// An activation folded into the convolution before it: passes the value on.
    Fused,
    Other,
}

fn unary(op: &Op, v: f32) -> f32 {
    match *op {
        Op::Relu => v.max(0.0),
        Op::Clip { min, max } => v.max(min).min(max),
        Op::LeakyRelu { alpha } => {
            if v < 0.0 {
                alpha * v
            } else {
                v
            }
        }
        Op::Sigmoid => 1.0 / (1.0 + (-v).exp()),
        Op::HardSigmoid { alpha, beta } => (alpha * v + beta).clamp(0.0, 1.0),
        Op::HardSwish => v * (v / 6.0 + 0.5).clamp(0.0, 1.0),
        Op::QuantizeDequantize(p) => p.fake_quantize(v),
        _ => v,
    }
}

/// [`unary`] over a buffer, with the operator matched once (the common activations then
/// vectorise).
fn apply_unary(op: &Op, data: &mut [f32]) {
    match *op {
        Op::Relu => data.iter_mut().for_each(|v| *v = v.max(0.0)),
        Op::Clip { min, max } => data.iter_mut().for_each(|v| *v = v.max(min).min(max)),
        Op::Identity => {}
        ref other => data.iter_mut().for_each(|v| *v = unary(other, *v)),
    }
}

fn binary(op: &Op, a: f32, b: f32) -> f32 {
    match op {
        Op::Sub => a - b,
        Op::Mul => a * b,
        Op::Div => a / b,
        _ => a + b,
    }
}

/// Elementwise `a op b` with NumPy broadcasting, in whatever layouts the operands have.
fn broadcast_op(node: &Node, op: &Op, a: &Value, b: &Value) -> Result<Value> {
    if a.dims == b.dims && a.nhwc == b.nhwc {
        let data = a
            .data
            .iter()
            .zip(&b.data)
            .map(|(&x, &y)| binary(op, x, y))
            .collect();
        return Ok(Value {
            dims: a.dims.clone(),
            data,
            nhwc: a.nhwc,
        });
    }
    let rank = a.dims.len().max(b.dims.len());
    let mut out_dims = vec![1usize; rank];
    let pad = |v: &Value| -> (Vec<usize>, Vec<usize>) {
        let extra = rank - v.dims.len();
        let mut dims = vec![1; extra];
        dims.extend_from_slice(&v.dims);
        let mut strides = vec![0; extra];
        strides.extend(v.strides());
        // Broadcast axes read the same element.
        let strides = dims
            .iter()
            .zip(strides)
            .map(|(&d, s)| if d == 1 { 0 } else { s })
            .collect();
        (dims, strides)
    };
    let (ad, as_) = pad(a);
    let (bd, bs) = pad(b);
    for i in 0..rank {
        out_dims[i] = match (ad[i], bd[i]) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            (x, y) => return Err(exec_err(node, format!("{x} and {y} do not broadcast"))),
        };
    }
    let len = checked_len(node, &out_dims)?;
    let nhwc = rank == 4 && ((a.nhwc && a.dims.len() == 4) || (b.nhwc && b.dims.len() == 4));
    // Iterate the output in its physical order: logical axes permuted for NHWC.
    let order: Vec<usize> = if nhwc {
        vec![0, 2, 3, 1]
    } else {
        (0..rank).collect()
    };
    let mut data = Vec::with_capacity(len);
    let mut index = vec![0usize; rank];
    let (mut ia, mut ib) = (0usize, 0usize);
    for _ in 0..len {
        data.push(binary(op, a.data[ia], b.data[ib]));
        for &axis in order.iter().rev() {
            index[axis] += 1;
            ia += as_[axis];
            ib += bs[axis];
            if index[axis] < out_dims[axis] {
                break;
            }
            ia -= as_[axis] * out_dims[axis];
            ib -= bs[axis] * out_dims[axis];
            index[axis] = 0;
        }
    }
    Ok(Value {
        dims: out_dims,
        data,
        nhwc,
    })
}

fn pool(node: &Node, p: &Pool, max: bool, x: Value, out_dims: &[usize]) -> Result<Value> {
    let x = x.into_nhwc();
    let [n, c, h, w] = [x.dims[0], x.dims[1], x.dims[2], x.dims[3]];
    let [oh, ow] = [out_dims[2], out_dims[3]];
    let len = checked_len(node, out_dims)?;
    let [pad_y, pad_x] = p.padding.leading([h, w], p.kernel, p.strides, p.dilations);
    let mut out = Vec::with_capacity(len);
    let mut acc = vec![0f32; c];
    for b in 0..n {
        for oy in 0..oh {
            for ox in 0..ow {
                acc.fill(if max { f32::NEG_INFINITY } else { 0.0 });
                let mut inside = 0usize;
                let mut window = 0usize;
                for ky in 0..p.kernel[0] {
                    let y = (oy * p.strides[0] + ky * p.dilations[0]) as isize - pad_y as isize;
                    for kx in 0..p.kernel[1] {
                        let xx =
                            (ox * p.strides[1] + kx * p.dilations[1]) as isize - pad_x as isize;
                        // Padded positions (not past the padded edge in ceil mode) count for
                        // count_include_pad.
                        let in_padded = y < (h + pad_y) as isize && xx < (w + pad_x) as isize;
                        if in_padded {
                            window += 1;
                        }
                        if y < 0 || xx < 0 || y >= h as isize || xx >= w as isize {
                            continue;
                        }
                        inside += 1;
                        let at = ((b * h + y as usize) * w + xx as usize) * c;
                        for (a, &v) in acc.iter_mut().zip(&x.data[at..at + c]) {
                            *a = if max { a.max(v) } else { *a + v };
                        }
                    }
                }
                if !max {
                    let count = if p.count_include_pad { window } else { inside };
                    let scale = 1.0 / count.max(1) as f32;
                    acc.iter_mut().for_each(|a| *a *= scale);
                }
                out.extend_from_slice(&acc);
            }
        }
    }
    Ok(Value {
        dims: out_dims.to_vec(),
        data: out,
        nhwc: true,
    })
}

fn concat(node: &Node, axis: usize, values: Vec<Value>, out_dims: &[usize]) -> Result<Value> {
    let len = checked_len(node, out_dims)?;
    let channels_last = axis == 1 && out_dims.len() == 4;
    let values: Vec<Value> = values
        .into_iter()
        .map(|v| {
            if channels_last {
                v.into_nhwc()
            } else {
                v.into_plain()
            }
        })
        .collect();
    // Copy blocks of `inner` for each of `outer` positions.
    let (outer, inner): (usize, Vec<usize>) = if channels_last {
        (
            out_dims[0] * out_dims[2] * out_dims[3],
            values.iter().map(|v| v.dims[1]).collect(),
        )
    } else {
        (
            out_dims[..axis].iter().product(),
            values
                .iter()
                .map(|v| v.dims[axis..].iter().product())
                .collect(),
        )
    };
    let mut out = Vec::with_capacity(len);
    for o in 0..outer {
        for (v, &block) in values.iter().zip(&inner) {
            out.extend_from_slice(&v.data[o * block..(o + 1) * block]);
        }
    }
    Ok(Value {
        dims: out_dims.to_vec(),
        data: out,
        nhwc: channels_last,
    })
}

fn softmax(x: Value, axis: usize, legacy: bool) -> Value {
    let x = x.into_plain();
    let dims = x.dims.clone();
    let (outer, size, inner) = if legacy {
        (
            dims[..axis].iter().product::<usize>(),
            dims[axis..].iter().product::<usize>(),
            1,
        )
    } else {
        (
            dims[..axis].iter().product::<usize>(),
            dims[axis],
            dims[axis + 1..].iter().product::<usize>(),
        )
    };
    let mut data = x.data;
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| (o * size + j) * inner + i;
            let max = (0..size)
                .map(|j| data[at(j)])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for j in 0..size {
                let e = (data[at(j)] - max).exp();
                data[at(j)] = e;
                sum += e;
            }
            for j in 0..size {
                data[at(j)] /= sum;
            }
        }
    }
    Value::plain(dims, data)
}

/// A graph prepared for the CPU: weights rearranged once, values freed after their last use.
pub struct CpuExecutor {
    graph: Graph,
    kernels: Vec<Kernel>,
    /// For each node, the values whose last reader it is.
    frees: Vec<Vec<String>>,
    shapes: ShapeCache,
}

impl CpuExecutor {
    pub fn new(graph: &Graph) -> Result<Self> {
        let graph = graph.clone();
        let constant = |node: &Node, i: usize| {
            node.inputs
                .get(i)
                .and_then(|n| graph.constant(n))
                .ok_or_else(|| exec_err(node, format!("input {i} must be a constant")))
        };
        let mut kernels = Vec::with_capacity(graph.nodes.len());
        for node in &graph.nodes {
            kernels.push(match &node.op {
                Op::Conv(c) => {
                    let bias = if node.inputs.len() > 2 {
                        Some(constant(node, 2)?)
                    } else {
                        None
                    };
                    let w = constant(node, 1)?;
                    let groups_fit = w.dims.len() == 4
                        && c.group >= 1
                        && w.dims[0] % c.group == 0
                        && bias.is_none_or(|b| b.data.len() == w.dims[0]);
                    if !groups_fit {
                        return Err(exec_err(
                            node,
                            format!("weight {:?} does not fit the convolution", w.dims),
                        ));
                    }
                    Kernel::Conv(Box::new(ConvKernel::new(c, w, bias)))
                }
                Op::BatchNorm { epsilon } => {
                    let [g, b, m, v] = [1, 2, 3, 4].map(|i| constant(node, i));
                    let (g, b, m, v) = (g?, b?, m?, v?);
                    if [b, m, v].iter().any(|p| p.data.len() != g.data.len()) {
                        return Err(exec_err(node, "BatchNorm parameters differ in length"));
                    }
                    let (scale, shift) = batch_norm_affine(g, b, m, v, *epsilon);
                    Kernel::Affine { scale, shift }
                }
                Op::Gemm {
                    alpha,
                    beta,
                    trans_a,
                    trans_b,
                } => {
                    let w = constant(node, 1)?;
                    if w.dims.len() != 2 {
                        return Err(exec_err(node, "B must be 2-D"));
                    }
                    let (k, n) = if *trans_b {
                        (w.dims[1], w.dims[0])
                    } else {
                        (w.dims[0], w.dims[1])
                    };
                    let weight = if *trans_b {
                        transpose(&w.dims, &w.data, &[1, 0]).1
                    } else {
                        w.data.clone()
                    };
                    let bias = if node.inputs.len() > 2 {
                        let c = constant(node, 2)?;
                        Some(match c.data.as_slice() {
                            [one] => vec![beta * one; n],
                            d => d.iter().map(|v| beta * v).collect(),
                        })
                    } else {
                        None
                    };
                    Kernel::Linear {
                        weight,
                        k,
                        n,
                        alpha: *alpha,
                        bias,
                        trans_a: *trans_a,
                    }
                }
                Op::MatMul => {
                    let w = constant(node, 1)?;
                    if w.dims.len() != 2 {
                        return Err(exec_err(node, "B must be 2-D"));
                    }
                    Kernel::Linear {
                        weight: w.data.clone(),
                        k: w.dims[0],
                        n: w.dims[1],
                        alpha: 1.0,
                        bias: None,
                        trans_a: false,
                    }
                }
                _ => Kernel::Other,
            });
        }
        let outputs: Vec<&str> = graph.outputs.iter().map(|o| o.name.as_str()).collect();
        // A convolution whose only reader is an activation applies it as it writes.
        let consumers = graph.consumers();
        for (i, node) in graph.nodes.iter().enumerate() {
            let out = node.outputs[0].as_str();
            let Some(&[j]) = consumers.get(out).map(Vec::as_slice) else {
                continue;
            };
            let activation = &graph.nodes[j].op;
            let fusable = activation.is_activation();
            if let Kernel::Conv(k) = &mut kernels[i]
                && fusable
                && !outputs.contains(&out)
            {
                k.epilogue = Some(activation.clone());
                kernels[j] = Kernel::Fused;
            }
        }
        let frees = graph.last_readers();
        Ok(Self {
            graph,
            kernels,
            frees,
            shapes: ShapeCache::default(),
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Runs the graph on one NCHW input; returns the outputs in the graph's order.
    pub fn run(&self, input: &Tensor) -> Result<Vec<Tensor>> {
        self.run_observed(input, &mut |_, _| {})
    }

    /// [`Self::run`], showing `observe` every value as it is computed (the input too), by
    /// name, in whatever element order the interpreter keeps it (calibration only needs the
    /// values).
    pub fn run_observed(
        &self,
        input: &Tensor,
        observe: &mut dyn FnMut(&str, &[f32]),
    ) -> Result<Vec<Tensor>> {
        let info = self.graph.input()?;
        super::check_input_dims(&self.graph, &input.dims)?;
        if crate::graph::element_count(&input.dims)? != input.data.len() {
            return Err(EngineError::Execution(
                "input data does not match its dims".into(),
            ));
        }
        let shapes = self.shapes.get(&self.graph, &input.dims)?;
        let mut values: HashMap<&str, Value> = HashMap::new();
        observe(&info.name, &input.data);
        values.insert(
            info.name.as_str(),
            Value::plain(input.dims.clone(), input.data.clone()).into_nhwc(),
        );
        for ((node, kernel), frees) in self.graph.nodes.iter().zip(&self.kernels).zip(&self.frees) {
            let out_dims = shapes
                .get(&node.outputs[0])
                .and_then(|d| crate::graph::concrete_dims(d))
                .ok_or_else(|| exec_err(node, "output shape unknown"))?;
            let out = self.step(node, kernel, &mut values, frees, &out_dims)?;
            if out.dims != out_dims {
                return Err(exec_err(
                    node,
                    format!("computed {:?}, expected {out_dims:?}", out.dims),
                ));
            }
            // A convolution with a fused activation never holds its raw output.
            let fused = matches!(kernel, Kernel::Conv(k) if k.epilogue.is_some());
            if !fused {
                observe(&node.outputs[0], &out.data);
            }
            values.insert(node.outputs[0].as_str(), out);
        }
        self.graph
            .outputs
            .iter()
            .map(|o| {
                let v = values
                    .remove(o.name.as_str())
                    .ok_or_else(|| {
                        EngineError::Execution(format!("output `{}` was not computed", o.name))
                    })?
                    .into_plain();
                Ok(Tensor {
                    dims: v.dims,
                    data: v.data,
                })
            })
            .collect()
    }

    fn step<'g>(
        &'g self,
        node: &'g Node,
        kernel: &Kernel,
        values: &mut HashMap<&'g str, Value>,
        frees: &[String],
        out_dims: &[usize],
    ) -> Result<Value> {
        // A convolution reads its input in place.
        if let (Op::Conv(_), Kernel::Conv(k)) = (&node.op, kernel)
            && let Some(name) = node.inputs.first()
            && let Some(x) = values.get(name.as_str())
        {
            let out = k.forward(node, x, out_dims)?;
            if frees.iter().any(|f| f == name) {
                values.remove(name.as_str());
            }
            return Ok(out);
        }
        // The first input is taken (moved) when this node is its last reader.
        let mut take = |i: usize| -> Result<Value> {
            let name = node
                .inputs
                .get(i)
                .ok_or_else(|| exec_err(node, "missing input"))?;
            if let Some(c) = self.graph.constant(name) {
                return Ok(Value::plain(c.dims.clone(), c.data.clone()));
            }
            let last = frees.iter().any(|f| f == name) && !node.inputs[i + 1..].contains(name);
            let v = if last {
                values.remove(name.as_str())
            } else {
                values.get(name.as_str()).cloned()
            };
            v.ok_or_else(|| exec_err(node, format!("`{name}` is not computed")))
        };
        let out = match (&node.op, kernel) {
            (Op::Conv(_), Kernel::Conv(k)) => k.forward(node, &take(0)?, out_dims)?,
            (_, Kernel::Fused) => take(0)?,
            (Op::BatchNorm { .. }, Kernel::Affine { scale, shift }) => {
                let mut x = take(0)?.into_nhwc();
                let c = scale.len();
                if x.dims.get(1) != Some(&c) {
                    return Err(exec_err(
                        node,
                        format!("{c} BatchNorm channels for an input {:?}", x.dims),
                    ));
                }
                if x.nhwc || x.dims.len() == 2 {
                    for px in x.data.chunks_mut(c) {
                        for ((v, s), b) in px.iter_mut().zip(scale).zip(shift) {
                            *v = *v * s + b;
                        }
                    }
                } else {
                    let inner: usize = x.dims[2..].iter().product();
                    for (i, block) in x.data.chunks_mut(inner.max(1)).enumerate() {
                        let ch = i % c;
                        block
                            .iter_mut()
                            .for_each(|v| *v = *v * scale[ch] + shift[ch]);
                    }
                }
                x
            }
            (op, _) if op.is_unary() => {
                let mut x = take(0)?;
                apply_unary(&node.op, &mut x.data);
                x
            }
            (Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Sum, _) => {
                let mut acc = take(0)?;
                for i in 1..node.inputs.len() {
                    let b = take(i)?;
                    acc = broadcast_op(node, &node.op, &acc, &b)?;
                }
                acc
            }
            (Op::Concat { axis }, _) => {
                let parts = (0..node.inputs.len())
                    .map(&mut take)
                    .collect::<Result<Vec<_>>>()?;
                concat(node, *axis, parts, out_dims)?
            }
            (Op::GlobalAveragePool, _) => {
                let x = take(0)?.into_nhwc();
                let [n, c, h, w] = [x.dims[0], x.dims[1], x.dims[2], x.dims[3]];
                let mut out = vec![0f32; n * c];
                for b in 0..n {
                    let acc = &mut out[b * c..(b + 1) * c];
                    for px in x.data[b * h * w * c..(b + 1) * h * w * c].chunks(c) {
                        acc.iter_mut().zip(px).for_each(|(a, v)| *a += v);
                    }
                    let scale = 1.0 / (h * w).max(1) as f32;
                    acc.iter_mut().for_each(|a| *a *= scale);
                }
                Value {
                    dims: out_dims.to_vec(),
                    data: out,
                    nhwc: true,
                }
            }
            (Op::AveragePool(p), _) => pool(node, p, false, take(0)?, out_dims)?,
            (Op::MaxPool(p), _) => pool(node, p, true, take(0)?, out_dims)?,
            (Op::Flatten { .. } | Op::Reshape { .. }, _) => {
                let x = take(0)?.into_plain();
                Value::plain(out_dims.to_vec(), x.data)
            }
            (Op::Transpose { perm }, _) => {
                let x = take(0)?.into_plain();
                let (dims, data) = transpose(&x.dims, &x.data, perm);
                Value::plain(dims, data)
            }
            (
                Op::Gemm { .. } | Op::MatMul,
                Kernel::Linear {
                    weight,
                    k,
                    n,
                    alpha,
                    bias,
                    trans_a,
                },
            ) => {
                let mut x = take(0)?.into_plain();
                if *trans_a {
                    let (dims, data) = transpose(&x.dims, &x.data, &[1, 0]);
                    x = Value::plain(dims, data);
                }
                let m = x.data.len() / (*k).max(1);
                let len = checked_len(node, out_dims)?;
                let mut out = match bias {
                    Some(b) => b.iter().copied().cycle().take(len).collect(),
                    None => vec![0f32; len],
                };
                gemm_into(m, *n, *k, &mut out, *n, &x.data, *k, weight, *n, 1, *alpha)?;
                Value::plain(out_dims.to_vec(), out)
            }
            (Op::Softmax { axis, legacy }, _) => softmax(take(0)?, *axis, *legacy),
            _ => return Err(exec_err(node, "has no CPU kernel")),
        };
        for f in frees {
            values.remove(f.as_str());
        }
        Ok(out)
    }
}
