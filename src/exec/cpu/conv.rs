//! Convolutions on the CPU: 1×1 as one GEMM over pixels, k×k and grouped ones as im2col +
//! GEMM per group, depthwise ones as direct loops over contiguous channels. A quantized
//! layer of a compressed graph keeps its integer weights and runs on the engine's integer
//! kernels: int8 weights with int8 inputs on the int8 dot-product kernels (1×1 directly,
//! dense k×k after im2col, depthwise on its own kernel), int4 weights unpacked inside the
//! GEMM a tile at a time (1×1) or for one run (the others).

use super::ops::{apply_unary, gemm_into, tap_range};
use super::{Value, checked_len, exec_err};
use crate::compress::ActivationParams;
use crate::error::Result;
use crate::graph::{Conv, Node, Op};
use crate::int4_cpu::Int4Weights;
use crate::int8_cpu::{DepthwiseGeometry, FusedEpilogue, Int8Depthwise, Int8Pointwise};
use crate::quant::{Granularity, QuantizedTensor};

/// A layer's weights as its kernel reads them.
pub(super) enum Weights {
    /// f32 in the kernel's layout.
    Float(Vec<f32>),
    /// int8 weights for int8 inputs: the int8 dot-product kernel.
    Int8(Int8Pointwise),
    /// int8 depthwise weights for int8 inputs: the int8 depthwise kernel.
    Int8Depthwise(Int8Depthwise),
    /// int4 weights kept packed, output channel major `[cout, rest]` as in the file.
    Int4(Int4Weights),
}

impl Weights {
    /// Bytes the weights hold while the layer is loaded.
    pub(super) fn bytes(&self) -> usize {
        match self {
            Weights::Float(w) => 4 * w.len(),
            Weights::Int8(k) => k.weight_bytes(),
            Weights::Int8Depthwise(k) => k.weight_bytes(),
            Weights::Int4(k) => k.weight_bytes(),
        }
    }
}

/// One step of what a layer applies to its output as it writes it.
#[derive(Debug, Clone)]
enum Stage {
    Unary(Op),
    /// `+` the epilogue's residual value.
    Residual,
}

/// The nodes after a layer that it absorbed (each then passes the value on): activations,
/// at most one residual Add, and the next layer's activation quantizer, applied while the
/// output is written instead of in passes of their own.
#[derive(Debug, Clone, Default)]
pub(super) struct Epilogue {
    stages: Vec<Stage>,
    /// The value the residual Add reads besides this layer's output.
    pub(super) residual: Option<String>,
}

impl Epilogue {
    pub(super) fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    pub(super) fn push_unary(&mut self, op: Op) {
        self.stages.push(Stage::Unary(op));
    }

    pub(super) fn push_residual(&mut self, value: String) {
        self.stages.push(Stage::Residual);
        self.residual = Some(value);
    }

    /// Applies the stages to `data`; `residual` is the same span of the residual value.
    fn apply(&self, data: &mut [f32], residual: Option<&[f32]>) {
        for stage in &self.stages {
            match (stage, residual) {
                (Stage::Unary(op), _) => apply_unary(op, data),
                (Stage::Residual, Some(r)) => data.iter_mut().zip(r).for_each(|(d, r)| *d += r),
                (Stage::Residual, None) => {}
            }
        }
    }

    /// The same stages as the int8 kernels' own epilogue (ReLU6, the residual, the next
    /// layer's grid), when they have that form; `residual` is the residual value's span.
    pub(super) fn as_int8<'a>(&'a self, residual: Option<&'a [f32]>) -> Option<FusedEpilogue<'a>> {
        let mut rest = self.stages.as_slice();
        let relu6 = matches!(rest.first(),
            Some(Stage::Unary(Op::Clip { min, max })) if *min == 0.0 && *max == 6.0);
        if relu6 {
            rest = &rest[1..];
        }
        let adds = matches!(rest.first(), Some(Stage::Residual));
        if adds {
            rest = &rest[1..];
        }
        let grid = match rest {
            [] => None,
            [Stage::Unary(Op::QuantizeDequantize(p))] if p.is_valid() => Some(p),
            _ => return None,
        };
        Some(FusedEpilogue {
            relu6,
            residual: residual.filter(|_| adds),
            grid,
        })
    }
}

/// Reorders a filter bank `[cout, cin/g, kh, kw]` for the kernels: depthwise `[kh·kw, C]`
/// (one row of channels per tap), otherwise `[cout, kh, kw, cin/g]` (the im2col rows'
/// order).
fn kernel_layout(data: &[f32], [cout, cin_g, taps]: [usize; 3], depthwise: bool) -> Vec<f32> {
    let mut weight = vec![0f32; data.len()];
    if depthwise {
        for c in 0..cout {
            for t in 0..taps {
                weight[t * cout + c] = data[c * taps + t];
            }
        }
    } else {
        for o in 0..cout {
            for ci in 0..cin_g {
                for t in 0..taps {
                    weight[(o * taps + t) * cin_g + ci] = data[(o * cin_g + ci) * taps + t];
                }
            }
        }
    }
    weight
}

/// A convolution with its weights laid out for the kernels.
pub(super) struct ConvKernel {
    conv: Conv,
    cin: usize,
    cout: usize,
    /// Per-group input channels and kernel taps (the filter bank is `[cout, cin_g, taps]`).
    cin_g: usize,
    taps: usize,
    pub(super) weights: Weights,
    pub(super) bias: Vec<f32>,
    depthwise: bool,
    pub(super) epilogue: Epilogue,
}

impl ConvKernel {
    /// A float layer from ONNX-layout weights `[cout, cin/g, kh, kw]`.
    pub(super) fn new(conv: &Conv, dims: &[usize], data: &[f32], bias: Option<&[f32]>) -> Self {
        let [cout, cin_g, kh, kw] = [dims[0], dims[1], dims[2], dims[3]];
        let cin = cin_g * conv.group;
        let depthwise = conv.group == cin && cout == cin && cin_g == 1;
        let taps = kh * kw;
        ConvKernel {
            conv: conv.clone(),
            cin,
            cout,
            cin_g,
            taps,
            weights: Weights::Float(kernel_layout(data, [cout, cin_g, taps], depthwise)),
            bias: bias.map_or_else(|| vec![0.0; cout], <[f32]>::to_vec),
            depthwise,
            epilogue: Epilogue::default(),
        }
    }

    /// Runs on integer weights where a kernel exists for them: int8 weights with int8
    /// inputs (`input_grid`) for 1×1, dense k×k and depthwise convolutions (a whole output
    /// channel per scale), int4 weights for every convolution. `false` leaves the float
    /// weights.
    pub(super) fn use_quantized(
        &mut self,
        q: &QuantizedTensor,
        input_grid: Option<&ActivationParams>,
    ) -> Result<bool> {
        let row = self.cin_g * self.taps;
        if q.values.len() != self.cout * row {
            return Ok(false);
        }
        if let (8, true, Some(grid)) = (q.scheme.bits, self.depthwise, input_grid)
            && let Some(k) = Int8Depthwise::new(q, grid, self.cout, self.conv.kernel)?
        {
            self.weights = Weights::Int8Depthwise(k);
            return Ok(true);
        }
        let dense = self.conv.group == 1 && !self.depthwise;
        let one_by_one = self.taps == 1;
        if let (8, true, Some(grid)) = (q.scheme.bits, dense, input_grid) {
            let whole_rows = !matches!(q.scheme.granularity, Granularity::PerBlock(_));
            let q = if one_by_one {
                Some(q.clone())
            } else if whole_rows {
                // The im2col rows' order (ky, kx, ci): a reordering inside each output
                // channel, so per-tensor and per-channel scales still apply.
                let mut values = vec![0i8; q.values.len()];
                for o in 0..self.cout {
                    for ci in 0..self.cin_g {
                        for t in 0..self.taps {
                            values[(o * self.taps + t) * self.cin_g + ci] =
                                q.values[(o * self.cin_g + ci) * self.taps + t];
                        }
                    }
                }
                QuantizedTensor::from_parts(
                    &[self.cout, row],
                    q.scheme,
                    values,
                    q.scales.clone(),
                    q.zero_points.clone(),
                )
            } else {
                None
            };
            if let Some(k) = q
                .as_ref()
                .map(|q| Int8Pointwise::new(q, grid, row, self.cout))
                .transpose()?
                .flatten()
            {
                self.weights = Weights::Int8(k);
                return Ok(true);
            }
        }
        let int4 = if self.taps == 1 && self.conv.group == 1 {
            Int4Weights::new(q, row, self.cout)
        } else {
            Int4Weights::unpacked_per_run(q, row, self.cout)
        };
        if let Some(k) = int4 {
            self.weights = Weights::Int4(k);
            return Ok(true);
        }
        Ok(false)
    }

    /// A 1×1 convolution with stride 1, one group and no padding: one matrix product over
    /// pixels.
    pub(super) fn is_plain_pointwise(&self) -> bool {
        let c = &self.conv;
        self.taps == 1
            && c.strides == [1, 1]
            && c.group == 1
            && c.padding.resolve(0, 1, 1, 1, 1) == (0, 0)
            && c.padding.resolve(1, 1, 1, 1, 1) == (0, 0)
    }

    /// Where a depthwise layer on an `input`-sized image reads and writes.
    pub(super) fn depthwise_geometry(
        &self,
        input: [usize; 2],
        output: [usize; 2],
    ) -> DepthwiseGeometry {
        let c = &self.conv;
        DepthwiseGeometry {
            input,
            output,
            kernel: c.kernel,
            strides: c.strides,
            dilations: c.dilations,
            leading_pads: c.padding.leading(input, c.kernel, c.strides, c.dilations),
        }
    }

    /// Bytes the weights and bias hold.
    pub(super) fn bytes(&self) -> usize {
        self.weights.bytes() + 4 * self.bias.len()
    }

    /// Reads `x` (and `residual`, when the epilogue adds one) in place: a value other nodes
    /// still need is not copied.
    pub(super) fn forward(
        &self,
        node: &Node,
        x: &Value,
        residual: Option<&Value>,
        out_dims: &[usize],
    ) -> Result<Value> {
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
        let len = checked_len(node, out_dims)?;
        let residual_converted;
        let residual = match residual {
            Some(r) if r.dims != out_dims => {
                return Err(exec_err(
                    node,
                    format!("adds a residual {:?} to its output {out_dims:?}", r.dims),
                ));
            }
            Some(r) if !r.nhwc && !r.layout_free() => {
                residual_converted = r.clone().into_nhwc();
                Some(&residual_converted.data[..])
            }
            Some(r) => Some(&r.data[..]),
            None => None,
        };
        let [n, _, h, w] = [x.dims[0], x.dims[1], x.dims[2], x.dims[3]];
        let c = &self.conv;
        let pointwise = self.taps == 1
            && c.strides == [1, 1]
            && c.group == 1
            && c.padding.resolve(0, h, 1, 1, 1) == (0, 0)
            && c.padding.resolve(1, w, 1, 1, 1) == (0, 0);
        let data = match &self.weights {
            Weights::Int8(k) if pointwise => self.int8(k, &x.data, n * h * w, residual),
            Weights::Int8(k) => {
                let mut out = Vec::with_capacity(len);
                let image = h * w * self.cin;
                let pixels = out_dims[2] * out_dims[3];
                let mut cols = vec![0f32; checked_len(node, &[pixels, self.cin * self.taps])?];
                for b in 0..n {
                    self.im2col(
                        &x.data[b * image..(b + 1) * image],
                        [h, w],
                        out_dims,
                        0,
                        &mut cols,
                    );
                    let at = b * pixels * self.cout;
                    let res = residual.map(|r| &r[at..at + pixels * self.cout]);
                    out.extend(self.int8(k, &cols, pixels, res));
                }
                out
            }
            Weights::Int8Depthwise(k) => {
                let geometry = self.depthwise_geometry([h, w], [out_dims[2], out_dims[3]]);
                match self.epilogue.as_int8(residual) {
                    Some(fused) => k.forward(&x.data, n, &geometry, &self.bias, fused)?,
                    None => {
                        let mut out =
                            k.forward(&x.data, n, &geometry, &self.bias, FusedEpilogue::default())?;
                        self.epilogue.apply(&mut out, residual);
                        out
                    }
                }
            }
            Weights::Int4(k) if pointwise => {
                let mut out = k.product(&x.data, n * h * w, &self.bias);
                self.epilogue.apply(&mut out, residual);
                out
            }
            Weights::Int4(k) => {
                let unpacked = kernel_layout(
                    &k.unpack_all(),
                    [self.cout, self.cin_g, self.taps],
                    self.depthwise,
                );
                self.float(node, &unpacked, x, residual, out_dims, pointwise)?
            }
            Weights::Float(weight) => self.float(node, weight, x, residual, out_dims, pointwise)?,
        };
        Ok(Value {
            dims: out_dims.to_vec(),
            data,
            nhwc: true,
        })
    }

    /// `len` outputs starting from the bias.
    fn bias_rows(&self, len: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(len);
        for _ in 0..len / self.cout.max(1) {
            out.extend_from_slice(&self.bias);
        }
        out
    }

    /// The int8 kernel on `pixels` rows of `cin·taps` inputs, with the epilogue fused into
    /// it when the kernel's own has the same form, else after it.
    fn int8(
        &self,
        k: &Int8Pointwise,
        input: &[f32],
        pixels: usize,
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        match self.epilogue.as_int8(residual) {
            Some(fused) => k.forward(input, pixels, &self.bias, fused),
            None => {
                let mut out = k.forward(input, pixels, &self.bias, FusedEpilogue::default());
                self.epilogue.apply(&mut out, residual);
                out
            }
        }
    }

    /// Fills `cols` (`[oh·ow, taps·cin_g]`, rows in (ky, kx, ci) order) with the input
    /// channels of group `g` under each output pixel's window; outside the input stays 0.
    fn im2col(
        &self,
        input: &[f32],
        [h, w]: [usize; 2],
        out_dims: &[usize],
        g: usize,
        cols: &mut [f32],
    ) {
        let c = &self.conv;
        let [oh, ow] = [out_dims[2], out_dims[3]];
        let [kh, kw] = c.kernel;
        let [pad_y, pad_x] = c.padding.leading([h, w], c.kernel, c.strides, c.dilations);
        let [dy, dx] = [c.dilations[0] as isize, c.dilations[1] as isize];
        let cin_g = self.cin_g;
        let row = self.taps * cin_g;
        cols.fill(0.0);
        for oy in 0..oh {
            let (ys, y0) = tap_range(oy, c.strides[0], c.dilations[0], pad_y, kh, h);
            for ox in 0..ow {
                let (xs, x0) = tap_range(ox, c.strides[1], c.dilations[1], pad_x, kw, w);
                let dst = &mut cols[(oy * ow + ox) * row..(oy * ow + ox + 1) * row];
                for ky in ys.clone() {
                    let iy = (y0 + ky as isize * dy) as usize;
                    for kx in xs.clone() {
                        let pixel = iy * w + (x0 + kx as isize * dx) as usize;
                        let tap = ky * kw + kx;
                        let at = pixel * self.cin + g * cin_g;
                        dst[tap * cin_g..(tap + 1) * cin_g].copy_from_slice(&input[at..at + cin_g]);
                    }
                }
            }
        }
    }

    /// A depthwise convolution, one output pixel's channels at a time: they start from the
    /// bias and get the epilogue while in cache.
    fn depthwise(
        &self,
        weight: &[f32],
        x: &Value,
        residual: Option<&[f32]>,
        out_dims: &[usize],
        len: usize,
    ) -> Vec<f32> {
        let c = &self.conv;
        let [n, _, h, w] = [x.dims[0], x.dims[1], x.dims[2], x.dims[3]];
        let [oh, ow] = [out_dims[2], out_dims[3]];
        let image = h * w * self.cin;
        let out_image = oh * ow * self.cout;
        let mut out = vec![0f32; len];
        let [pad_y, pad_x] = c.padding.leading([h, w], c.kernel, c.strides, c.dilations);
        let [kh, kw] = c.kernel;
        let [dy, dx] = [c.dilations[0] as isize, c.dilations[1] as isize];
        let columns: Vec<(std::ops::Range<usize>, isize)> = (0..ow)
            .map(|ox| tap_range(ox, c.strides[1], c.dilations[1], pad_x, kw, w))
            .collect();
        let ch = self.cout;
        for b in 0..n {
            let input = &x.data[b * image..(b + 1) * image];
            for oy in 0..oh {
                let (ys, y0) = tap_range(oy, c.strides[0], c.dilations[0], pad_y, kh, h);
                for (ox, (xs, x0)) in columns.iter().enumerate() {
                    let at = b * out_image + (oy * ow + ox) * ch;
                    let acc = &mut out[at..at + ch];
                    acc.copy_from_slice(&self.bias);
                    for ky in ys.clone() {
                        let iy = (y0 + ky as isize * dy) as usize;
                        for kx in xs.clone() {
                            let pixel = iy * w + (x0 + kx as isize * dx) as usize;
                            let tap = ky * kw + kx;
                            let s = &input[pixel * ch..(pixel + 1) * ch];
                            let wt = &weight[tap * ch..(tap + 1) * ch];
                            for ((a, s), w) in acc.iter_mut().zip(s).zip(wt) {
                                *a += s * w;
                            }
                        }
                    }
                    self.epilogue.apply(acc, residual.map(|r| &r[at..at + ch]));
                }
            }
        }
        out
    }

    /// The float kernels on weights in [`kernel_layout`].
    fn float(
        &self,
        node: &Node,
        weight: &[f32],
        x: &Value,
        residual: Option<&[f32]>,
        out_dims: &[usize],
        pointwise: bool,
    ) -> Result<Vec<f32>> {
        let [n, _, h, w] = [x.dims[0], x.dims[1], x.dims[2], x.dims[3]];
        let [oh, ow] = [out_dims[2], out_dims[3]];
        let len = checked_len(node, out_dims)?;
        let c = &self.conv;
        if self.depthwise && !pointwise {
            return Ok(self.depthwise(weight, x, residual, out_dims, len));
        }
        let mut out = self.bias_rows(len);
        if pointwise {
            gemm_into(
                n * h * w,
                self.cout,
                self.cin,
                &mut out,
                self.cout,
                &x.data,
                self.cin,
                weight,
                1,
                self.cin,
                1.0,
            )?;
            self.epilogue.apply(&mut out, residual);
            return Ok(out);
        }
        let image = h * w * self.cin;
        let out_image = oh * ow * self.cout;
        let groups = c.group;
        let cout_g = self.cout / groups;
        let row = self.taps * self.cin_g;
        let mut cols = vec![0f32; checked_len(node, &[oh, ow, row])?];
        for b in 0..n {
            let input = &x.data[b * image..(b + 1) * image];
            for g in 0..groups {
                self.im2col(input, [h, w], out_dims, g, &mut cols);
                let start = b * out_image + g * cout_g;
                gemm_into(
                    oh * ow,
                    cout_g,
                    row,
                    &mut out[start..],
                    self.cout,
                    &cols,
                    row,
                    &weight[g * cout_g * row..(g + 1) * cout_g * row],
                    1,
                    row,
                    1.0,
                )?;
            }
        }
        self.epilogue.apply(&mut out, residual);
        Ok(out)
    }
}
