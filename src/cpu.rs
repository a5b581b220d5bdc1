//! A dedicated CPU inference path for EfficientNet-Lite (the browser's CPU fallback).
//!
//! burn's generic CPU backend runs this network at ~2.4× ONNX Runtime Web's wasm time,
//! mostly in layout changes and grouped (depthwise) convolutions. Here the activations stay
//! channels-last (NHWC) from start to end, so every 1×1 convolution is one GEMM (the `gemm`
//! crate, SIMD128 on wasm), depthwise convolutions are direct loops over contiguous channels
//! (which the compiler vectorises), and bias, ReLU6 and residual adds are fused into the
//! passes that already touch the data (in a quantized network an expansion layer also writes
//! its output on the depthwise layer's input grid). BatchNorm is folded into the weights at load time.
//! The result matches the burn model to float tolerance (tested).

use crate::compress::{ActivationParams, CompressedLayer, CompressedModel};
use crate::efficientnet::{block_strides, folded_conv};
use crate::error::{EngineError, Result};
use crate::int4_cpu::Int4Weights;
use crate::int8_cpu::{DepthwiseGeometry, FusedEpilogue, Int8Depthwise, Int8Pointwise};
use crate::weights::TensorStore;

/// TF "SAME" padding before the first element, and the output size.
fn same_padding(size: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(size);
    (total / 2, out)
}

/// The kernel taps of output position `o` that land inside the input (the rest read
/// SAME padding, i.e. zeros), and the input index of tap 0 (`o·stride − pad`).
fn valid_taps(
    o: usize,
    stride: usize,
    pad: usize,
    kernel: usize,
    size: usize,
) -> (std::ops::Range<usize>, isize) {
    crate::exec::tap_range(o, stride, 1, pad, kernel, size)
}

/// `out[p][j] += Σ_k input[p][k] · weights[j][k]` for `pixels` rows of `cin` inputs and
/// `weights.len() / cin` outputs, the rows of `out` `out_stride` apart (a tile of output
/// columns writes into the whole layer's output).
pub(crate) fn gemm_accumulate(
    out: &mut [f32],
    out_stride: usize,
    input: &[f32],
    weights: &[f32],
    pixels: usize,
    cin: usize,
) {
    let n = weights.len() / cin.max(1);
    assert_eq!(input.len(), pixels * cin);
    assert_eq!(weights.len(), n * cin);
    assert!(n <= out_stride && out.len() >= pixels.saturating_sub(1) * out_stride + n);
    if pixels == 0 || n == 0 {
        return;
    }
    // SAFETY: `input` holds `pixels × cin` and `weights` `n × cin` elements, and `out` holds
    // `pixels` rows of `n` values `out_stride` apart, as the asserts check.
    unsafe {
        gemm::gemm(
            pixels,
            n,
            cin,
            out.as_mut_ptr(),
            1,
            out_stride as isize,
            true,
            input.as_ptr(),
            1,
            cin as isize,
            weights.as_ptr(),
            cin as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A 1×1 convolution as a GEMM: `[pixels, cin] · [cin, cout]` (also a linear layer, and
/// a k×k convolution after im2col).
pub(crate) struct Pointwise {
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    /// PyTorch layout `[cout, cin]`, read transposed by the GEMM.
    weight: Vec<f32>,
    bias: Vec<f32>,
    relu6: bool,
    /// Static quantization of the input (fake-quant on the float path).
    input_quant: Option<ActivationParams>,
    /// The next layer's input quantization, applied to the output here (that layer then
    /// skips its own pass over the data).
    output_grid: Option<ActivationParams>,
    /// Integer weights: when present the layer runs on [`Int8Pointwise`].
    int8: Option<Int8Pointwise>,
    /// Packed int4 weights (weight-only): when present `weight` is empty and the GEMM
    /// unpacks a tile at a time.
    int4: Option<Int4Weights>,
}

impl Pointwise {
    /// A float layer from PyTorch-layout weights `[cout, cin]`.
    pub(crate) fn new(
        cin: usize,
        cout: usize,
        weight: Vec<f32>,
        bias: Vec<f32>,
        relu6: bool,
    ) -> Self {
        Self {
            cin,
            cout,
            weight,
            bias,
            relu6,
            input_quant: None,
            output_grid: None,
            int8: None,
            int4: None,
        }
    }

    /// Takes the layer's input quantization, and its integer kernel: int8 where both
    /// weights and inputs are int8, packed int4 weights where the weights are 4-bit (unless
    /// `integer_kernels` is false: then it stays the float fake-quant reference).
    pub(crate) fn attach(&mut self, layer: &CompressedLayer, integer_kernels: bool) -> Result<()> {
        self.input_quant = layer.activation;
        if let (true, Some(q), Some(a)) = (integer_kernels, &layer.weights, &layer.activation) {
            self.int8 = Int8Pointwise::new(q, a, self.cin, self.cout)?;
        }
        if let (true, None, Some(q)) = (integer_kernels, &self.int8, &layer.weights) {
            self.int4 = Int4Weights::new(q, self.cin, self.cout);
        }
        if self.int8.is_some() || self.int4.is_some() {
            // The integer weights replace the float copy (a variant must not hold both).
            self.weight = Vec::new();
        }
        Ok(())
    }

    /// Whether this layer runs on the int8 kernel.
    pub(crate) fn is_integer(&self) -> bool {
        self.int8.is_some()
    }

    /// Whether this layer computes from packed int4 weights.
    pub(crate) fn is_int4(&self) -> bool {
        self.int4.is_some()
    }

    /// Bytes this layer's weights and bias hold while it runs.
    pub(crate) fn weight_bytes(&self) -> usize {
        4 * (self.weight.len() + self.bias.len())
            + self.int8.as_ref().map_or(0, Int8Pointwise::weight_bytes)
            + self.int4.as_ref().map_or(0, Int4Weights::weight_bytes)
    }

    pub(crate) fn forward(
        &self,
        input: &[f32],
        pixels: usize,
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        if let Some(int8) = &self.int8 {
            let epilogue = FusedEpilogue {
                relu6: self.relu6,
                residual,
                grid: self.output_grid.as_ref(),
            };
            return int8.forward(input, pixels, &self.bias, epilogue);
        }
        let quantized;
        let input = match &self.input_quant {
            Some(q) => {
                quantized = fake_quantize_all(input, q);
                &quantized[..]
            }
            None => input,
        };
        if let Some(int4) = &self.int4 {
            let out = int4.product(input, pixels, &self.bias);
            return self.epilogue(out, residual);
        }
        let mut out = Vec::with_capacity(pixels * self.cout);
        for _ in 0..pixels {
            out.extend_from_slice(&self.bias);
        }
        gemm_accumulate(&mut out, self.cout, input, &self.weight, pixels, self.cin);
        self.epilogue(out, residual)
    }

    /// ReLU6 (where the layer has it), then the residual, then the next layer's input
    /// quantization.
    fn epilogue(&self, mut out: Vec<f32>, residual: Option<&[f32]>) -> Vec<f32> {
        if self.relu6 {
            out.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
        }
        if let Some(res) = residual {
            out.iter_mut().zip(res).for_each(|(o, r)| *o += r);
        }
        if let Some(grid) = &self.output_grid {
            out.iter_mut().for_each(|v| *v = grid.fake_quantize(*v));
        }
        out
    }
}

/// A k×k depthwise convolution with ReLU6, channels-last.
struct Depthwise {
    channels: usize,
    kernel: usize,
    stride: usize,
    /// `[k·k, channels]`: one contiguous row of channel weights per tap (empty when the
    /// weights are packed int4).
    weight: Vec<f32>,
    /// Packed int4 weights `[channels, k·k]` (weight-only): unpacked for the length of one
    /// run of this layer.
    int4: Option<Int4Weights>,
    /// int8 weights for int8 inputs: the layer runs on [`Int8Depthwise`] (which quantizes
    /// its input itself).
    int8: Option<Int8Depthwise>,
    bias: Vec<f32>,
    input_quant: Option<ActivationParams>,
    /// Whether the layer before already put the input on `input_quant`'s grid.
    input_on_grid: bool,
}

impl Depthwise {
    fn geometry(&self, h: usize, w: usize) -> DepthwiseGeometry {
        let (k, stride) = (self.kernel, self.stride);
        let (pad_y, oh) = same_padding(h, k, stride);
        let (pad_x, ow) = same_padding(w, k, stride);
        DepthwiseGeometry {
            input: [h, w],
            output: [oh, ow],
            kernel: [k, k],
            strides: [stride, stride],
            dilations: [1, 1],
            leading_pads: [pad_y, pad_x],
        }
    }

    const RELU6: FusedEpilogue<'static> = FusedEpilogue {
        relu6: true,
        residual: None,
        grid: None,
    };

    fn forward(&self, input: &[f32], h: usize, w: usize) -> Result<(Vec<f32>, usize, usize)> {
        let geometry = self.geometry(h, w);
        let [pad_y, pad_x] = geometry.leading_pads;
        let [oh, ow] = geometry.output;
        if let Some(int8) = &self.int8 {
            let out = int8.forward(input, 1, &geometry, &self.bias, Self::RELU6)?;
            return Ok((out, oh, ow));
        }
        let k = self.kernel;
        let quantized;
        let input = match &self.input_quant {
            Some(q) if !self.input_on_grid => {
                quantized = fake_quantize_all(input, q);
                &quantized[..]
            }
            _ => input,
        };
        let c = self.channels;
        let unpacked;
        let weight = match &self.int4 {
            Some(packed) => {
                unpacked = tap_major(&packed.unpack_all(), c, k * k);
                &unpacked[..]
            }
            None => &self.weight[..],
        };
        let mut out = vec![0f32; oh * ow * c];
        for oy in 0..oh {
            for ox in 0..ow {
                let acc = &mut out[(oy * ow + ox) * c..(oy * ow + ox + 1) * c];
                acc.copy_from_slice(&self.bias);
                let (ys, y0) = valid_taps(oy, self.stride, pad_y, k, h);
                let (xs, x0) = valid_taps(ox, self.stride, pad_x, k, w);
                for ky in ys {
                    let iy = (y0 + ky as isize) as usize;
                    for kx in xs.clone() {
                        let ix = (x0 + kx as isize) as usize;
                        let at = (iy * w + ix) * c;
                        let src = &input[at..at + c];
                        let wt = &weight[(ky * k + kx) * c..(ky * k + kx + 1) * c];
                        for ((a, s), w) in acc.iter_mut().zip(src).zip(wt) {
                            *a += s * w;
                        }
                    }
                }
                acc.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
            }
        }
        Ok((out, oh, ow))
    }
}

struct Block {
    expand: Option<Pointwise>,
    depthwise: Depthwise,
    project: Pointwise,
    skip: bool,
}

impl Block {
    /// The block on its int8 kernels with no float tensor inside it: the expansion (if
    /// any) writes its output quantized straight into the depthwise layer's bordered input,
    /// and the depthwise layer into the projection's. `None` unless all of them are int8.
    fn forward_int8(
        &self,
        x: &[f32],
        h: usize,
        w: usize,
    ) -> Result<Option<(Vec<f32>, usize, usize)>> {
        let (dw, project) = (&self.depthwise, &self.project);
        let (Some(dw_kernel), Some(project_kernel)) = (&dw.int8, &project.int8) else {
            return Ok(None);
        };
        let expand_kernel = match &self.expand {
            Some(e) => match &e.int8 {
                Some(k) => Some((e, k)),
                None => return Ok(None),
            },
            None => None,
        };
        let geometry = dw.geometry(h, w);
        let mut dw_input = dw_kernel.input_for(&geometry)?;
        match expand_kernel {
            Some((e, k)) => k.forward_centred(x, h * w, &e.bias, e.relu6, &mut dw_input),
            None => {
                for (p, values) in x.chunks_exact(dw.channels.max(1)).enumerate() {
                    dw_input.write(p, 0, values);
                }
            }
        }
        let [oh, ow] = geometry.output;
        let mut project_input = project_kernel.input_for(oh * ow);
        dw_kernel.run_into_next(&dw_input, &geometry, &dw.bias, true, &mut project_input)?;
        let epilogue = FusedEpilogue {
            relu6: project.relu6,
            residual: self.skip.then_some(x),
            grid: project.output_grid.as_ref(),
        };
        let out = project_kernel.forward_input(&project_input, &project.bias, epilogue);
        Ok(Some((out, oh, ow)))
    }
}

/// The stem: a dense 3×3 stride-2 convolution on 3 channels, as im2col + GEMM.
struct Stem {
    kernel: usize,
    stride: usize,
    cin: usize,
    input_quant: Option<ActivationParams>,
    /// Weights `[cout, k·k·cin]` with the inner order (ky, kx, ci) of the im2col rows.
    as_pointwise: Pointwise,
}

impl Stem {
    fn forward(&self, input: &[f32], h: usize, w: usize) -> (Vec<f32>, usize, usize) {
        let quantized;
        let input = match &self.input_quant {
            Some(q) => {
                quantized = fake_quantize_all(input, q);
                &quantized[..]
            }
            None => input,
        };
        let (k, c) = (self.kernel, self.cin);
        let (pad_y, oh) = same_padding(h, k, self.stride);
        let (pad_x, ow) = same_padding(w, k, self.stride);
        let row = k * k * c;
        let mut cols = vec![0f32; oh * ow * row];
        for oy in 0..oh {
            for ox in 0..ow {
                let dst = &mut cols[(oy * ow + ox) * row..(oy * ow + ox + 1) * row];
                let (ys, y0) = valid_taps(oy, self.stride, pad_y, k, h);
                let (xs, x0) = valid_taps(ox, self.stride, pad_x, k, w);
                for ky in ys {
                    let iy = (y0 + ky as isize) as usize;
                    for kx in xs.clone() {
                        let ix = (x0 + kx as isize) as usize;
                        let at = (iy * w + ix) * c;
                        dst[(ky * k + kx) * c..(ky * k + kx + 1) * c]
                            .copy_from_slice(&input[at..at + c]);
                    }
                }
            }
        }
        (self.as_pointwise.forward(&cols, oh * ow, None), oh, ow)
    }
}

/// Sees each weight layer's input (channels-last) with the layer's index.
type LayerObserver<'a> = dyn FnMut(usize, &[f32]) + 'a;

/// EfficientNet-Lite on the CPU, from the same lukemelas-named weights as the burn model.
pub struct CpuEfficientNet {
    stem: Stem,
    blocks: Vec<Block>,
    head: Pointwise,
    classifier: Pointwise,
}

fn folded(store: &TensorStore, conv: &str, bn: &str) -> Result<(Vec<usize>, Vec<f32>, Vec<f32>)> {
    let (shape, w, b) = folded_conv(store, conv, bn)?;
    if shape.len() != 4 {
        return Err(EngineError::ShapeMismatch {
            name: format!("{conv}.weight"),
            found: shape,
            expected: vec![0; 4],
        });
    }
    Ok((shape, w, b))
}

fn pointwise(store: &TensorStore, conv: &str, bn: &str, relu6: bool) -> Result<Pointwise> {
    let (shape, weight, bias) = folded(store, conv, bn)?;
    Ok(Pointwise::new(shape[1], shape[0], weight, bias, relu6))
}

/// PyTorch's depthwise layout `[channels, taps]` → `[taps, channels]`.
fn tap_major(weight: &[f32], channels: usize, taps: usize) -> Vec<f32> {
    let mut out = vec![0f32; weight.len()];
    for (c, row) in weight.chunks_exact(taps).enumerate().take(channels) {
        for (t, &v) in row.iter().enumerate() {
            out[t * channels + c] = v;
        }
    }
    out
}

/// Fake-quantizes every value (the float reference for a quantized input).
fn fake_quantize_all(input: &[f32], q: &ActivationParams) -> Vec<f32> {
    input.iter().map(|&x| q.fake_quantize(x)).collect()
}

impl CpuEfficientNet {
    pub fn from_store(store: &TensorStore) -> Result<Self> {
        let (shape, w, bias) = folded(store, "_conv_stem", "_bn0")?;
        let (cout, cin, k) = (shape[0], shape[1], shape[2]);
        // [cout][ci][ky][kx] → [cout][ky][kx][ci] to match the im2col rows.
        let mut weight = vec![0f32; w.len()];
        for o in 0..cout {
            for ci in 0..cin {
                for ky in 0..k {
                    for kx in 0..k {
                        weight[((o * k + ky) * k + kx) * cin + ci] =
                            w[((o * cin + ci) * k + ky) * k + kx];
                    }
                }
            }
        }
        let stem = Stem {
            kernel: k,
            stride: 2,
            cin,
            input_quant: None,
            as_pointwise: Pointwise::new(k * k * cin, cout, weight, bias, true),
        };
        let mut blocks = Vec::new();
        for (i, &stride) in block_strides().iter().enumerate() {
            let p = format!("_blocks.{i}.");
            let expand = if store.contains(&format!("{p}_expand_conv.weight")) {
                Some(pointwise(
                    store,
                    &format!("{p}_expand_conv"),
                    &format!("{p}_bn0"),
                    true,
                )?)
            } else {
                None
            };
            let (shape, w, bias) =
                folded(store, &format!("{p}_depthwise_conv"), &format!("{p}_bn1"))?;
            let (channels, k) = (shape[0], shape[2]);
            let depthwise = Depthwise {
                channels,
                kernel: k,
                stride,
                weight: tap_major(&w, channels, k * k),
                int4: None,
                int8: None,
                bias,
                input_quant: None,
                input_on_grid: false,
            };
            let project = pointwise(
                store,
                &format!("{p}_project_conv"),
                &format!("{p}_bn2"),
                false,
            )?;
            let cin = expand.as_ref().map_or(channels, |e| e.cin);
            blocks.push(Block {
                skip: stride == 1 && cin == project.cout,
                expand,
                depthwise,
                project,
            });
        }
        let head = pointwise(store, "_conv_head", "_bn1", true)?;
        let fc_w = store.get("_fc.weight")?;
        let fc_b = store.get("_fc.bias")?;
        let classifier = Pointwise::new(
            fc_w.shape[1],
            fc_w.shape[0],
            fc_w.data.clone(),
            fc_b.data.clone(),
            false,
        );
        Ok(Self {
            stem,
            blocks,
            head,
            classifier,
        })
    }

    /// The compressed model: float layers with its (pruned, dequantized) weights, inputs
    /// fake-quantized where calibrated, and 1×1 convolutions and the classifier on the
    /// integer kernel where both weights and inputs are int8 (unless `integer_kernels` is
    /// false: then everything runs as the float fake-quant reference).
    pub fn from_compressed(model: &CompressedModel, integer_kernels: bool) -> Result<Self> {
        let mut net = Self::from_store(&model.store)?;
        let mut quant = model.layers.iter();
        let mut next = || {
            quant
                .next()
                .ok_or_else(|| EngineError::Weights("layer table shorter than the network".into()))
        };
        let attach = |p: &mut Pointwise, layer: &CompressedLayer| p.attach(layer, integer_kernels);
        net.stem.input_quant = next()?.activation;
        for block in &mut net.blocks {
            if let Some(e) = &mut block.expand {
                attach(e, next()?)?;
            }
            let layer = next()?;
            let dw = &mut block.depthwise;
            dw.input_quant = layer.activation;
            if let (true, Some(q)) = (integer_kernels, &layer.weights) {
                let taps = dw.kernel * dw.kernel;
                dw.int4 = Int4Weights::unpacked_per_run(q, taps, dw.channels);
                if let Some(grid) = &dw.input_quant {
                    dw.int8 = Int8Depthwise::new(q, grid, dw.channels, [dw.kernel, dw.kernel])?;
                }
                if dw.int4.is_some() || dw.int8.is_some() {
                    dw.weight = Vec::new();
                }
            }
            if let (Some(e), None) = (&mut block.expand, &block.depthwise.int8) {
                // The expansion writes the depthwise's input already quantized (the int8
                // kernel quantizes its input itself, as it copies it).
                e.output_grid = block.depthwise.input_quant;
                block.depthwise.input_on_grid = true;
            }
            attach(&mut block.project, next()?)?;
        }
        attach(&mut net.head, next()?)?;
        attach(&mut net.classifier, next()?)?;
        Ok(net)
    }

    fn pointwise_layers(&self) -> impl Iterator<Item = &Pointwise> {
        self.blocks
            .iter()
            .flat_map(|b| b.expand.iter().chain([&b.project]))
            .chain([&self.head, &self.classifier])
    }

    /// How many layers run on the int8 kernels.
    pub fn int8_layers(&self) -> usize {
        self.pointwise_layers().filter(|p| p.is_integer()).count()
            + self
                .blocks
                .iter()
                .filter(|b| b.depthwise.int8.is_some())
                .count()
    }

    /// How many layers compute from packed int4 weights.
    pub fn int4_layers(&self) -> usize {
        self.pointwise_layers().filter(|p| p.is_int4()).count()
            + self
                .blocks
                .iter()
                .filter(|b| b.depthwise.int4.is_some())
                .count()
    }

    /// Bytes the network's weights and biases hold while it runs (packed where a layer
    /// runs on an integer kernel, f32 elsewhere).
    pub fn weight_bytes(&self) -> usize {
        let depthwise: usize = self
            .blocks
            .iter()
            .map(|b| {
                let dw = &b.depthwise;
                4 * (dw.weight.len() + dw.bias.len())
                    + dw.int4.as_ref().map_or(0, Int4Weights::weight_bytes)
                    + dw.int8.as_ref().map_or(0, Int8Depthwise::weight_bytes)
            })
            .sum();
        self.stem.as_pointwise.weight_bytes()
            + depthwise
            + self
                .pointwise_layers()
                .map(Pointwise::weight_bytes)
                .sum::<usize>()
    }

    /// Logits for one NCHW image `[3, h, w]` (the engine's preprocessed input).
    pub fn forward(&self, nchw: &[f32], h: usize, w: usize) -> Result<Vec<f32>> {
        self.run(nchw, h, w, None)
    }

    /// [`Self::forward`], showing every weight layer's input (channels-last) to `observe`
    /// with the layer's index in [`crate::efficientnet::weight_layers`] order.
    pub fn forward_observed(
        &self,
        nchw: &[f32],
        h: usize,
        w: usize,
        observe: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<Vec<f32>> {
        self.run(nchw, h, w, Some(observe))
    }

    /// With an observer every layer's input exists as floats; without one, a block whose
    /// layers are all int8 passes quantized values from layer to layer instead.
    fn run(
        &self,
        nchw: &[f32],
        h: usize,
        w: usize,
        mut observe: Option<&mut LayerObserver>,
    ) -> Result<Vec<f32>> {
        let c = self.stem.cin;
        if nchw.len() != c * h * w {
            return Err(EngineError::PixelBuffer {
                found: nchw.len(),
                expected: c * h * w,
            });
        }
        let plane = h * w;
        let mut nhwc = vec![0f32; nchw.len()];
        for (i, px) in nhwc.chunks_exact_mut(c).enumerate() {
            for (ch, v) in px.iter_mut().enumerate() {
                *v = nchw[ch * plane + i];
            }
        }
        let observing = observe.is_some();
        let mut layer = 0;
        let mut seen = |x: &[f32]| {
            if let Some(observe) = observe.as_mut() {
                observe(layer, x);
            }
            layer += 1;
        };
        seen(&nhwc);
        let (mut x, mut h, mut w) = self.stem.forward(&nhwc, h, w);
        for block in &self.blocks {
            if !observing && let Some((out, oh, ow)) = block.forward_int8(&x, h, w)? {
                (x, h, w) = (out, oh, ow);
                continue;
            }
            let expanded = match &block.expand {
                Some(e) => {
                    seen(&x);
                    e.forward(&x, h * w, None)
                }
                None => x.clone(),
            };
            seen(&expanded);
            let (d, oh, ow) = block.depthwise.forward(&expanded, h, w)?;
            let residual = block.skip.then_some(x.as_slice());
            seen(&d);
            x = block.project.forward(&d, oh * ow, residual);
            (h, w) = (oh, ow);
        }
        seen(&x);
        let features = self.head.forward(&x, h * w, None);
        let cf = self.head.cout;
        let mut pooled = vec![0f32; cf];
        for px in features.chunks_exact(cf) {
            pooled.iter_mut().zip(px).for_each(|(p, v)| *p += v);
        }
        let n = (h * w) as f32;
        pooled.iter_mut().for_each(|p| *p /= n);
        seen(&pooled);
        Ok(self.classifier.forward(&pooled, 1, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_clip_to_the_input() {
        // 3×3 stride 2 at 224: pad 0 before, so the last output's third tap is padding.
        assert_eq!(valid_taps(0, 2, 0, 3, 224), (0..3, 0));
        assert_eq!(valid_taps(111, 2, 0, 3, 224), (0..2, 222));
        // 5×5 stride 1, pad 2: the first output skips two taps.
        assert_eq!(valid_taps(0, 1, 2, 5, 7), (2..5, -2));
        assert_eq!(valid_taps(6, 1, 2, 5, 7), (0..3, 4));
    }
}
