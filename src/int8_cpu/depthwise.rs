//! Integer depthwise convolution for the CPU path: int8 inputs × int8 weights → int32 sums,
//! one output channel per input channel.
//!
//! The input is quantized (and centred, q − zero point, as i16) once into a zero-bordered
//! copy, so every output pixel reads all its taps without bounds checks: a border value of
//! 0 is the real 0 of zero padding. The taps are taken two at a time: the two taps' inputs
//! for 8 channels are interleaved ((x₀[c], x₁[c]) per i32 lane) and multiplied into the two
//! taps' weights, stored interleaved the same way, with `i32x4.dot_i16x8_s` (`pmaddwd`):
//! 16 multiply-adds per 2 instructions where float needs 8 (wasm has no fused multiply-add).
//! An odd tap count pairs the last tap with a zero weight. The epilogue (scale, bias,
//! ReLU6, residual, the next layer's grid) runs on the sums in registers. On x86-64 with
//! AVX2 the loop takes 16 channels per pass (with AVX-512 VNNI's `vpdpwssd` where the CPU
//! has it) and quantizes for the next 1×1 layer on 8 lanes; the results are the same.

#[cfg(target_arch = "x86_64")]
use super::WIDE_PIXELS;
use super::{FusedEpilogue, PointwiseInput};
use crate::compress::ActivationParams;
use crate::error::{EngineError, Result};
use crate::quant::QuantizedTensor;

/// Channels per step: one 128-bit vector of i16 inputs.
const LANES: usize = 8;

/// Where a depthwise layer reads and writes: input and output sizes, strides, dilations and
/// the padding before the first row and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DepthwiseGeometry {
    pub input: [usize; 2],
    pub output: [usize; 2],
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    pub leading_pads: [usize; 2],
}

impl DepthwiseGeometry {
    /// Rows and columns of the zero-bordered input the output pixels read.
    fn bordered(&self) -> Option<[usize; 2]> {
        let extent = |a: usize| -> Option<usize> {
            let last_origin = self.output[a]
                .checked_sub(1)?
                .checked_mul(self.strides[a])?;
            let reach = self.kernel[a]
                .checked_sub(1)?
                .checked_mul(self.dilations[a].max(1))?;
            last_origin.checked_add(reach)?.checked_add(1)
        };
        Some([extent(0)?, extent(1)?])
    }
}

/// Where the kernel writes: floats with the epilogue fused into the writes, or, ReLU6
/// applied, quantized straight into the next 1×1 int8 layer's input.
enum Sink<'a> {
    Float {
        out: &'a mut [f32],
        epilogue: FusedEpilogue<'a>,
    },
    Next {
        relu6: bool,
        input: &'a mut PointwiseInput,
    },
}

impl Sink<'_> {
    /// Writes output pixel `pixel`'s channels `channel..` (of `channels`; ReLU6 applied).
    fn write(&mut self, pixel: usize, channels: usize, channel: usize, values: &[f32]) {
        match self {
            Sink::Float { out, epilogue } => {
                let at = pixel * channels + channel;
                epilogue.write_tail(values, &mut out[at..at + values.len()], at);
            }
            Sink::Next { input, .. } => input.write(pixel, channel, values),
        }
    }

    fn relu6(&self) -> bool {
        match self {
            Sink::Float { epilogue, .. } => epilogue.relu6,
            Sink::Next { relu6, .. } => *relu6,
        }
    }
}

fn too_big() -> EngineError {
    EngineError::Execution("depthwise layer too large to run".into())
}

fn wrong_size() -> EngineError {
    EngineError::Execution("int8 depthwise layer given buffers of the wrong size".into())
}

/// A depthwise layer's input as the int8 kernel reads it: quantized and centred i16 in a
/// zero border (the real 0 of zero padding), `padded` channels per pixel (the padding
/// channels stay 0).
pub(crate) struct DepthwiseInput {
    data: Vec<i16>,
    /// Bordered rows and columns.
    rows: usize,
    columns: usize,
    padded: usize,
    /// The input's own columns, and where its first pixel sits in the border.
    width: usize,
    pads: [usize; 2],
    grid: ActivationParams,
}

impl DepthwiseInput {
    /// Writes `values`, quantized and centred, as channels `channel..` of input pixel
    /// `pixel` (row-major). Pixels no output reads (past the last window) are skipped.
    pub(crate) fn write(&mut self, pixel: usize, channel: usize, values: &[f32]) {
        let y = pixel / self.width + self.pads[0];
        let x = pixel % self.width + self.pads[1];
        if y >= self.rows || x >= self.columns {
            return;
        }
        let at = (y * self.columns + x) * self.padded + channel;
        super::centre(values, &mut self.data[at..at + values.len()], &self.grid);
    }

    /// Where channels `channel..channel + width` of each of the `n` (≤ [`WIDE_PIXELS`])
    /// pixels from `pixel` lie in the data (`None`: a pixel no output reads), the data to write them to and
    /// the grid to quantize them to (for the wide x86 kernel's fused epilogue).
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn row_starts(
        &mut self,
        pixel: usize,
        n: usize,
        channel: usize,
        width: usize,
    ) -> ([Option<usize>; WIDE_PIXELS], &mut [i16], ActivationParams) {
        // A wider write would run into the next pixel's channels.
        assert!(channel + width <= self.padded && n <= WIDE_PIXELS);
        let mut starts = [None; WIDE_PIXELS];
        let (mut y, mut x) = (pixel / self.width, pixel % self.width);
        for start in starts.iter_mut().take(n) {
            let (by, bx) = (y + self.pads[0], x + self.pads[1]);
            if by < self.rows && bx < self.columns {
                *start = Some((by * self.columns + bx) * self.padded + channel);
            }
            x += 1;
            if x == self.width {
                (y, x) = (y + 1, 0);
            }
        }
        (starts, &mut self.data, self.grid)
    }

    /// [`Self::write`] of `n` consecutive pixels from `pixel`, each `width` values from
    /// `rows` (`stride` apart): one division for all of them (a tile's rows).
    pub(crate) fn write_rows(
        &mut self,
        pixel: usize,
        channel: usize,
        rows: &[f32],
        stride: usize,
        n: usize,
        width: usize,
    ) {
        let (mut y, mut x) = (pixel / self.width, pixel % self.width);
        for values in rows.chunks(stride.max(1)).take(n) {
            let (by, bx) = (y + self.pads[0], x + self.pads[1]);
            if by < self.rows && bx < self.columns {
                let at = (by * self.columns + bx) * self.padded + channel;
                super::centre(&values[..width], &mut self.data[at..at + width], &self.grid);
            }
            x += 1;
            if x == self.width {
                (y, x) = (y + 1, 0);
            }
        }
    }
}

pub(crate) struct Int8Depthwise {
    channels: usize,
    /// `channels` rounded up to [`LANES`].
    padded: usize,
    kernel: [usize; 2],
    /// Taps in pairs (an odd last one twice, its second weight 0).
    pairs: Vec<(usize, usize)>,
    /// `[padded / 8][pairs][2 × 4 channels][2 taps]` centred i16: for each step of 8
    /// channels, each tap pair's weights as the interleaved inputs meet them.
    weights: Vec<i16>,
    /// `[padded]` input scale × the channel's weight scale.
    scales: Vec<f32>,
    input: ActivationParams,
}

impl Int8Depthwise {
    /// Bytes the layer's weights hold while it runs (centred i16 and the scales).
    pub(crate) fn weight_bytes(&self) -> usize {
        2 * self.weights.len() + 4 * self.scales.len()
    }

    /// `None` where this layer cannot run on the kernel: not 8-bit, inputs wider than int8,
    /// a scale group that covers part of a channel, or a target without the vector kernel.
    pub(crate) fn new(
        q: &QuantizedTensor,
        input: &ActivationParams,
        channels: usize,
        kernel: [usize; 2],
    ) -> Result<Option<Self>> {
        let supported = cfg!(any(target_arch = "wasm32", target_arch = "x86_64"));
        if !supported || q.scheme.bits != 8 || input.qmax > 127 || input.qmin < -128 {
            return Ok(None);
        }
        let taps = kernel[0] * kernel[1];
        if taps == 0 || q.values.len() != channels * taps {
            return Err(EngineError::ShapeMismatch {
                name: "int8 depthwise weights".into(),
                found: q.shape.clone(),
                expected: vec![channels, 1, kernel[0], kernel[1]],
            });
        }
        // One scale and zero point per channel, from the groups that cover whole channels.
        let mut channel_group = vec![None; channels];
        for (g, range) in q.group_ranges().iter().enumerate() {
            if !range.start.is_multiple_of(taps) || !range.end.is_multiple_of(taps) {
                return Ok(None);
            }
            for slot in &mut channel_group[range.start / taps..range.end / taps] {
                *slot = Some(g);
            }
        }
        let padded = channels.div_ceil(LANES) * LANES;
        let pairs: Vec<(usize, usize)> = (0..taps)
            .step_by(2)
            .map(|t| (t, if t + 1 < taps { t + 1 } else { t }))
            .collect();
        let mut weights = vec![0i16; padded * pairs.len() * 2];
        let mut scales = vec![0f32; padded];
        for (c, group) in channel_group.iter().enumerate() {
            let Some(g) = *group else {
                return Ok(None);
            };
            let zp = i16::from(q.zero_points[g]);
            scales[c] = q.scales[g] * input.scale;
            let (step, lane) = (c / LANES, c % LANES);
            for (p, &(t0, t1)) in pairs.iter().enumerate() {
                let at = ((step * pairs.len() + p) * LANES + lane) * 2;
                weights[at] = i16::from(q.values[c * taps + t0]) - zp;
                if t1 != t0 {
                    weights[at + 1] = i16::from(q.values[c * taps + t1]) - zp;
                }
            }
        }
        Ok(Some(Self {
            channels,
            padded,
            kernel,
            pairs,
            weights,
            scales,
            input: *input,
        }))
    }

    /// An all-zero input for `geometry`, to fill with [`DepthwiseInput::write`].
    pub(crate) fn input_for(&self, geometry: &DepthwiseGeometry) -> Result<DepthwiseInput> {
        if geometry.kernel != self.kernel {
            return Err(EngineError::Execution(format!(
                "int8 depthwise kernel built for {:?} taps, run with {:?}",
                self.kernel, geometry.kernel
            )));
        }
        let [rows, columns] = geometry.bordered().ok_or_else(too_big)?;
        let len = rows
            .checked_mul(columns)
            .and_then(|p| p.checked_mul(self.padded))
            .ok_or_else(too_big)?;
        Ok(DepthwiseInput {
            data: vec![0; len],
            rows,
            columns,
            padded: self.padded,
            width: geometry.input[1].max(1),
            pads: geometry.leading_pads,
            grid: self.input,
        })
    }

    /// One image from its filled input → `[output pixels, channels]`; the epilogue's
    /// residual spans that output.
    pub(crate) fn run(
        &self,
        input: &DepthwiseInput,
        geometry: &DepthwiseGeometry,
        bias: &[f32],
        epilogue: FusedEpilogue,
    ) -> Result<Vec<f32>> {
        let [oh, ow] = geometry.output;
        let len = oh
            .checked_mul(ow)
            .and_then(|p| p.checked_mul(self.channels))
            .ok_or_else(too_big)?;
        if epilogue.residual.is_some_and(|r| r.len() != len) {
            return Err(wrong_size());
        }
        let mut out = vec![0f32; len];
        let sink = Sink::Float {
            out: &mut out,
            epilogue,
        };
        self.run_into(input, geometry, bias, sink)?;
        Ok(out)
    }

    /// [`Self::run`] with ReLU6 where asked, its outputs quantized straight into the next
    /// 1×1 int8 layer's input (`next`, one pixel per output pixel): no float tensor between
    /// the two layers.
    pub(crate) fn run_into_next(
        &self,
        input: &DepthwiseInput,
        geometry: &DepthwiseGeometry,
        bias: &[f32],
        relu6: bool,
        next: &mut PointwiseInput,
    ) -> Result<()> {
        let [oh, ow] = geometry.output;
        if Some(next.pixels()) != oh.checked_mul(ow) || next.row < self.channels {
            return Err(wrong_size());
        }
        let sink = Sink::Next { relu6, input: next };
        self.run_into(input, geometry, bias, sink)
    }

    fn run_into(
        &self,
        input: &DepthwiseInput,
        geometry: &DepthwiseGeometry,
        bias: &[f32],
        sink: Sink,
    ) -> Result<()> {
        if geometry.bordered() != Some([input.rows, input.columns])
            || input.padded != self.padded
            || bias.len() != self.channels
        {
            return Err(wrong_size());
        }
        let mut bias_padded = bias.to_vec();
        bias_padded.resize(self.padded, 0.0);
        kernel::run(
            self,
            &input.data,
            input.columns,
            geometry,
            &bias_padded,
            sink,
        );
        Ok(())
    }

    /// `batch` channels-last float images of `geometry.input` → `[batch, output,
    /// channels]`, quantizing each image as it copies it into the bordered input.
    pub(crate) fn forward(
        &self,
        input: &[f32],
        batch: usize,
        geometry: &DepthwiseGeometry,
        bias: &[f32],
        epilogue: FusedEpilogue,
    ) -> Result<Vec<f32>> {
        let c = self.channels;
        let [h, w] = geometry.input;
        let pixels = h.checked_mul(w).ok_or_else(too_big)?;
        let image = pixels.checked_mul(c).ok_or_else(too_big)?;
        if Some(input.len()) != image.checked_mul(batch) {
            return Err(wrong_size());
        }
        let [oh, ow] = geometry.output;
        let out_image = oh
            .checked_mul(ow)
            .and_then(|p| p.checked_mul(c))
            .ok_or_else(too_big)?;
        let mut bordered = self.input_for(geometry)?;
        let mut out = Vec::new();
        for (b, image) in input.chunks_exact(image.max(1)).enumerate() {
            for (p, values) in image.chunks_exact(c).enumerate() {
                bordered.write(p, 0, values);
            }
            let at = out.len();
            let image_epilogue = FusedEpilogue {
                residual: match epilogue.residual {
                    Some(r) => Some(r.get(at..at + out_image).ok_or_else(|| {
                        EngineError::Execution(format!("no residual for image {b}"))
                    })?),
                    None => None,
                },
                ..epilogue
            };
            let run = self.run(&bordered, geometry, bias, image_epilogue);
            out.extend(run?);
        }
        Ok(out)
    }

    /// The offset, in i16 from an output pixel's first input, of each tap pair's two inputs.
    fn pair_offsets(&self, g: &DepthwiseGeometry, bw: usize) -> Vec<(usize, usize)> {
        let kw = self.kernel[1];
        let offset = |t: usize| {
            let (ky, kx) = (t / kw, t % kw);
            (ky * g.dilations[0].max(1) * bw + kx * g.dilations[1].max(1)) * self.padded
        };
        self.pairs
            .iter()
            .map(|&(t0, t1)| (offset(t0), offset(t1)))
            .collect()
    }
}

/// The pixel loop with 128-bit lanes on wasm (SIMD128) and x86-64 (SSE2), and on x86-64
/// with AVX2 (chosen at run time) the wide loop: 16 channels per pass.
#[cfg(any(target_arch = "wasm32", target_arch = "x86_64"))]
mod kernel {
    use super::super::lanes::*;
    use super::{DepthwiseGeometry, Int8Depthwise, LANES, Sink};

    pub(super) fn run(
        layer: &Int8Depthwise,
        bordered: &[i16],
        bw: usize,
        g: &DepthwiseGeometry,
        bias: &[f32],
        mut sink: Sink,
    ) {
        let (c, cp) = (layer.channels, layer.padded);
        let [oh, ow] = g.output;
        let [sy, sx] = g.strides;
        let relu6 = sink.relu6();
        let offsets = layer.pair_offsets(g, bw);
        let pairs = offsets.len();
        // The furthest element any load reads: the last output pixel's last tap, plus a
        // whole step of channels.
        let reach = offsets.iter().map(|&(a, b)| a.max(b)).max().unwrap_or(0);
        let last_origin = ((oh.saturating_sub(1) * sy) * bw + ow.saturating_sub(1) * sx) * cp;
        assert!(last_origin + reach + cp <= bordered.len());
        match &sink {
            Sink::Float { out, .. } => assert!(out.len() == oh * ow * c),
            Sink::Next { input, .. } => assert!(input.pixels() == oh * ow && input.row >= c),
        }
        assert!(bias.len() == cp && layer.scales.len() == cp);
        assert!(layer.weights.len() == cp * pairs * 2);
        #[cfg(target_arch = "x86_64")]
        if super::super::wide::available() {
            let wide = Loop {
                layer,
                bordered,
                bw,
                g,
                bias,
                offsets: &offsets,
            };
            // SAFETY: the CPU has AVX2 (just checked); every load stays within the bounds
            // asserted above, as in the loop below.
            unsafe {
                if super::super::wide::vnni() {
                    wide.run_vnni(sink)
                } else {
                    wide.run_avx2(sink)
                }
            }
            return;
        }
        for oy in 0..oh {
            for ox in 0..ow {
                let origin = ((oy * sy) * bw + ox * sx) * cp;
                let pixel = oy * ow + ox;
                for step in (0..cp).step_by(LANES) {
                    // SAFETY: every input load reads 8 i16 from origin + offset + step, at
                    // most last_origin + reach + cp (asserted above); the weights hold
                    // 16 i16 per pair of each step (asserted).
                    let sums = unsafe { step_sums(layer, bordered, &offsets, origin + step, step) };
                    finish_step(layer, bias, &mut sink, pixel, step, sums, relu6);
                }
            }
        }
    }

    /// The integer sums of one step of 8 channels of one output pixel whose first input is
    /// at `first` of `bordered`: each tap pair's inputs interleaved and multiplied into its
    /// weights, channels 0–3 and 4–7.
    ///
    /// # Safety
    /// `bordered` holds 8 i16 from `first` + each offset; the weights hold 16 i16 per pair
    /// from `step`'s.
    #[inline(always)]
    unsafe fn step_sums(
        layer: &Int8Depthwise,
        bordered: &[i16],
        offsets: &[(usize, usize)],
        first: usize,
        step: usize,
    ) -> [I; 2] {
        let mut sums = [zero(), zero()];
        // SAFETY: the caller's contract; no load needs alignment.
        unsafe {
            let weights = layer.weights.as_ptr().add(step * offsets.len() * 2);
            let first = bordered.as_ptr().add(first);
            for (p, &(o0, o1)) in offsets.iter().enumerate() {
                let (lo, hi) = interleave_i16(load_i16(first.add(o0)), load_i16(first.add(o1)));
                sums[0] = dot_add(sums[0], lo, load_i16(weights.add(16 * p)));
                sums[1] = dot_add(sums[1], hi, load_i16(weights.add(16 * p + 8)));
            }
        }
        sums
    }

    /// The epilogue of one step of 8 channels of one output pixel: scales and bias,
    /// ReLU6, then into the sink (residual and next grid, or the next layer's input).
    #[inline(always)]
    fn finish_step(
        layer: &Int8Depthwise,
        bias: &[f32],
        sink: &mut Sink,
        pixel: usize,
        step: usize,
        sums: [I; 2],
        relu6: bool,
    ) {
        let c = layer.channels;
        let (zero6, six) = (fsplat(0.0), fsplat(6.0));
        // Written out rather than `array::map`, which LLVM does not always inline.
        let half = |h: usize| {
            let s = step + 4 * h;
            scale_add(load_f32(&bias[s..]), sums[h], load_f32(&layer.scales[s..]))
        };
        let mut v = [half(0), half(1)];
        if relu6 {
            v = [clamp(v[0], zero6, six), clamp(v[1], zero6, six)];
        }
        let width = LANES.min(c - step);
        match (sink, width == LANES) {
            (Sink::Float { out, epilogue }, true) => {
                let dst = pixel * c + step;
                if let Some(res) = epilogue.residual {
                    v[0] = fadd(v[0], load_f32(&res[dst..]));
                    v[1] = fadd(v[1], load_f32(&res[dst + 4..]));
                }
                if let Some(grid) = epilogue.grid {
                    v = [fake_quantize(v[0], grid), fake_quantize(v[1], grid)];
                }
                store_f32(&mut out[dst..], v[0]);
                store_f32(&mut out[dst + 4..], v[1]);
            }
            (Sink::Next { input, .. }, true) => {
                let at = pixel * input.row + step;
                let centred = centred_i16(v[0], v[1], &input.grid);
                let dst = &mut input.data[at..at + LANES];
                // SAFETY: `dst` holds 8 i16 (just sliced).
                unsafe { store_i16(dst.as_mut_ptr(), centred) };
            }
            (sink, false) => {
                let (lo, hi) = (to_array(v[0]), to_array(v[1]));
                let values: [f32; LANES] =
                    std::array::from_fn(|j| if j < 4 { lo[j] } else { hi[j - 4] });
                sink.write(pixel, c, step, &values[..width]);
            }
        }
    }

    /// What the wide x86 loop reads (its bounds asserted by [`run`]).
    #[cfg(target_arch = "x86_64")]
    struct Loop<'a> {
        layer: &'a Int8Depthwise,
        bordered: &'a [i16],
        bw: usize,
        g: &'a DepthwiseGeometry,
        bias: &'a [f32],
        offsets: &'a [(usize, usize)],
    }

    /// The pixel loop on 256-bit lanes: 16 channels (two steps) per pass, each tap pair's
    /// inputs interleaved within 128-bit halves (`vpunpcklwd` / `vpunpckhwd`) and its two
    /// steps' weights side by side, so one multiply-add does two steps' work; a last step
    /// of 8 runs on 128 bits. The integer sums and the float epilogue are the 128-bit
    /// loop's, so the results are identical. `$dot(acc, x, w)` = acc + pairwise products.
    #[cfg(target_arch = "x86_64")]
    macro_rules! wide_loop {
        ($(#[$doc:meta])* $name:ident, $features:literal, |$acc:ident, $x:ident, $w:ident| $dot:expr) => {
            $(#[$doc])*
            ///
            /// # Safety
            /// The CPU has the features named, and [`run`]'s asserts hold.
            #[target_feature(enable = $features)]
            unsafe fn $name(&self, mut sink: Sink) {
                use core::arch::x86_64::*;
                use super::super::wide::{Grid8, relu6_if};
                let Loop { layer, bordered, bw, g, bias, offsets } = *self;
                let cp = layer.padded;
                let [oh, ow] = g.output;
                let [sy, sx] = g.strides;
                let relu6 = sink.relu6();
                let pairs = offsets.len();
                let next_grid = match &sink {
                    Sink::Next { input, .. } => Some(Grid8::new(&input.grid)),
                    Sink::Float { .. } => None,
                };
                for oy in 0..oh {
                    for ox in 0..ow {
                        let origin = ((oy * sy) * bw + ox * sx) * cp;
                        let pixel = oy * ow + ox;
                        let mut step = 0;
                        while step + 2 * LANES <= cp {
                            let mut sums = [_mm256_setzero_si256(); 2];
                            // SAFETY: as in the 128-bit loop: 16 i16 from origin + offset +
                            // step ≤ last_origin + reach + cp, and 16 i16 per pair of
                            // both steps' weights; no load needs alignment.
                            unsafe {
                                let first = layer.weights.as_ptr().add(step * pairs * 2);
                                let second = first.add(LANES * pairs * 2);
                                let inputs = bordered.as_ptr().add(origin + step);
                                for (p, &(o0, o1)) in offsets.iter().enumerate() {
                                    let x0 = _mm256_loadu_si256(inputs.add(o0) as *const __m256i);
                                    let x1 = _mm256_loadu_si256(inputs.add(o1) as *const __m256i);
                                    let weights = |half: usize| {
                                        _mm256_loadu2_m128i(
                                            second.add(16 * p + half) as *const __m128i,
                                            first.add(16 * p + half) as *const __m128i,
                                        )
                                    };
                                    sums[0] = {
                                        let ($acc, $x, $w) =
                                            (sums[0], _mm256_unpacklo_epi16(x0, x1), weights(0));
                                        $dot
                                    };
                                    sums[1] = {
                                        let ($acc, $x, $w) =
                                            (sums[1], _mm256_unpackhi_epi16(x0, x1), weights(8));
                                        $dot
                                    };
                                }
                            }
                            let [lo, hi] = sums;
                            if let (Sink::Next { input, .. }, Some(grid), true) =
                                (&mut sink, &next_grid, step + 2 * LANES <= layer.channels)
                            {
                                // The epilogue on 8 lanes, straight to the next layer's
                                // input: `lo` holds channels 0–3 and 8–11 of the two
                                // steps, `hi` 4–7 and 12–15, so the scales and bias are
                                // loaded in that order and packing puts 0–15 in place.
                                let channels = step..step + 2 * LANES;
                                let (b, sc) = (&bias[channels.clone()], &layer.scales[channels]);
                                let in_order = |v: &[f32], from: usize| {
                                    // SAFETY: `v` holds 16 f32 (sliced above), from ≤ 4.
                                    unsafe { _mm256_loadu2_m128(v[from + 8..].as_ptr(), v[from..].as_ptr()) }
                                };
                                let value = |sum: __m256i, from: usize| {
                                    let v = _mm256_add_ps(
                                        in_order(b, from),
                                        _mm256_mul_ps(_mm256_cvtepi32_ps(sum), in_order(sc, from)),
                                    );
                                    grid.centred(relu6_if(v, relu6))
                                };
                                let packed = _mm256_packs_epi32(value(lo, 0), value(hi, 4));
                                let at = pixel * input.row + step;
                                let dst = &mut input.data[at..at + 2 * LANES];
                                // SAFETY: `dst` holds 16 i16 (just sliced).
                                unsafe { _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, packed) };
                                step += 2 * LANES;
                                continue;
                            }
                            for (s, half) in [(step, 0), (step + LANES, 1)] {
                                let quads = if half == 0 {
                                    [_mm256_castsi256_si128(lo), _mm256_castsi256_si128(hi)]
                                } else {
                                    [_mm256_extracti128_si256::<1>(lo), _mm256_extracti128_si256::<1>(hi)]
                                };
                                finish_step(layer, bias, &mut sink, pixel, s, quads, relu6);
                            }
                            step += 2 * LANES;
                        }
                        if step < cp {
                            // SAFETY: as in the 128-bit loop.
                            let sums = unsafe { step_sums(layer, bordered, offsets, origin + step, step) };
                            finish_step(layer, bias, &mut sink, pixel, step, sums, relu6);
                        }
                    }
                }
            }
        };
    }

    #[cfg(target_arch = "x86_64")]
    impl Loop<'_> {
        wide_loop!(
            /// With `vpmaddwd` and `vpaddd`.
            run_avx2,
            "avx2",
            |acc, x, w| _mm256_add_epi32(acc, _mm256_madd_epi16(x, w))
        );
        wide_loop!(
            /// With AVX-512 VNNI's `vpdpwssd` on 256-bit lanes.
            run_vnni,
            "avx2,avx512f,avx512vl,avx512vnni",
            |acc, x, w| _mm256_dpwssd_epi32(acc, x, w)
        );
    }
}

/// The same loop in portable Rust (other native targets; [`Int8Depthwise::new`] does not
/// build the layer there, so this only keeps them compiling).
#[cfg(not(any(target_arch = "wasm32", target_arch = "x86_64")))]
mod kernel {
    use super::{DepthwiseGeometry, Int8Depthwise, LANES, Sink};

    pub(super) fn run(
        layer: &Int8Depthwise,
        bordered: &[i16],
        bw: usize,
        g: &DepthwiseGeometry,
        bias: &[f32],
        mut sink: Sink,
    ) {
        let relu6 = sink.relu6();
        let (c, cp) = (layer.channels, layer.padded);
        let [oh, ow] = g.output;
        let offsets = layer.pair_offsets(g, bw);
        let pairs = offsets.len();
        for oy in 0..oh {
            for ox in 0..ow {
                let origin = ((oy * g.strides[0]) * bw + ox * g.strides[1]) * cp;
                let values: Vec<f32> = (0..c)
                    .map(|ch| {
                        let (step, lane) = (ch / LANES * LANES, ch % LANES);
                        let sum: i32 = offsets
                            .iter()
                            .enumerate()
                            .map(|(p, &(o0, o1))| {
                                let w = &layer.weights
                                    [((step / LANES * pairs + p) * LANES + lane) * 2..];
                                i32::from(bordered[origin + o0 + ch]) * i32::from(w[0])
                                    + i32::from(bordered[origin + o1 + ch]) * i32::from(w[1])
                            })
                            .sum();
                        let y = sum as f32 * layer.scales[ch] + bias[ch];
                        if relu6 { y.clamp(0.0, 6.0) } else { y }
                    })
                    .collect();
                sink.write(oy * ow + ox, c, 0, &values);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{Granularity, QuantScheme};

    /// The float reference: fake-quantized inputs × dequantized weights, zero padding.
    fn reference(
        x: &[f32],
        wd: &[f32],
        bias: &[f32],
        act: &ActivationParams,
        g: &DepthwiseGeometry,
        c: usize,
    ) -> Vec<f32> {
        let [h, w] = g.input;
        let [oh, ow] = g.output;
        let [kh, kw] = g.kernel;
        let mut out = vec![0f32; oh * ow * c];
        for oy in 0..oh {
            for ox in 0..ow {
                for ch in 0..c {
                    let mut y = bias[ch];
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy = (oy * g.strides[0] + ky * g.dilations[0]) as isize
                                - g.leading_pads[0] as isize;
                            let ix = (ox * g.strides[1] + kx * g.dilations[1]) as isize
                                - g.leading_pads[1] as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let v = x[(iy as usize * w + ix as usize) * c + ch];
                            y += act.fake_quantize(v) * wd[ch * kh * kw + ky * kw + kx];
                        }
                    }
                    out[(oy * ow + ox) * c + ch] = y;
                }
            }
        }
        out
    }

    /// The integer kernel equals float arithmetic on the fake-quantized operands for 3×3
    /// and 5×5 filters, strides (1,1), (2,2) and (2,1), a dilation, channel counts that do
    /// and do not fill a vector, every whole-channel granularity, with and without ReLU6, a
    /// residual and the next layer's grid.
    #[test]
    fn matches_fake_quant_reference() {
        let act = ActivationParams {
            scale: 0.04,
            zero_point: -90,
            qmin: -128,
            qmax: 127,
        };
        let next = ActivationParams {
            scale: 0.05,
            zero_point: -128,
            qmin: -128,
            qmax: 127,
        };
        let cases = [
            // (channels, input, kernel, strides, dilations, leading pads, output)
            (16, [9, 7], [3, 3], [1, 1], [1, 1], [1, 1], [9, 7]),
            (13, [10, 9], [3, 3], [2, 2], [1, 1], [0, 0], [5, 5]),
            (24, [11, 11], [5, 5], [2, 2], [1, 1], [2, 2], [6, 6]),
            (8, [8, 12], [3, 3], [2, 1], [1, 1], [1, 1], [4, 12]),
            (5, [9, 9], [3, 3], [1, 1], [2, 2], [2, 2], [9, 9]),
            (20, [6, 6], [1, 1], [1, 1], [1, 1], [0, 0], [6, 6]),
        ];
        for (c, input, kernel, strides, dilations, leading_pads, output) in cases {
            let g = DepthwiseGeometry {
                input,
                output,
                kernel,
                strides,
                dilations,
                leading_pads,
            };
            let taps = kernel[0] * kernel[1];
            let w: Vec<f32> = (0..c * taps)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 60.0 * if i % 7 == 0 { 2.5 } else { 1.0 })
                .collect();
            let batch = 2;
            let x: Vec<f32> = (0..batch * input[0] * input[1] * c)
                .map(|i| ((i * 53 % 97) as f32) / 14.0 - 1.5)
                .collect();
            let bias: Vec<f32> = (0..c).map(|o| o as f32 * 0.05 - 0.3).collect();
            let out_len = batch * output[0] * output[1] * c;
            let residual: Vec<f32> = (0..out_len).map(|i| (i % 11) as f32 * 0.2).collect();
            for (granularity, symmetric) in [
                (Granularity::PerTensor, true),
                (Granularity::PerChannel, true),
                (Granularity::PerChannel, false),
            ] {
                let scheme = QuantScheme {
                    bits: 8,
                    symmetric,
                    granularity,
                };
                let q = QuantizedTensor::quantize(&w, &[c, 1, kernel[0], kernel[1]], scheme);
                let wd = q.dequantize();
                let layer = Int8Depthwise::new(&q, &act, c, kernel).unwrap().unwrap();
                let image = input[0] * input[1] * c;
                let out_image = output[0] * output[1] * c;
                let want: Vec<f32> = (0..batch)
                    .flat_map(|b| {
                        reference(&x[b * image..(b + 1) * image], &wd, &bias, &act, &g, c)
                    })
                    .collect();
                assert_eq!(want.len(), batch * out_image);
                for fused in [false, true] {
                    let epilogue = FusedEpilogue {
                        relu6: fused,
                        residual: fused.then_some(&residual[..]),
                        grid: fused.then_some(&next),
                    };
                    let got = layer.forward(&x, batch, &g, &bias, epilogue).unwrap();
                    for (i, (&got, &want)) in got.iter().zip(&want).enumerate() {
                        let ok = if fused {
                            let want = next.fake_quantize(want.clamp(0.0, 6.0) + residual[i]);
                            let steps = got / next.scale;
                            (got - want).abs() <= next.scale * 1.001
                                && (steps - steps.round()).abs() < 1e-3
                        } else {
                            (got - want).abs() < 1e-4 * (1.0 + want.abs())
                        };
                        assert!(
                            ok,
                            "{c} channels {g:?} {granularity:?} fused {fused} at {i}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// An int8 1×1 layer of `[cout, cin]` weights `w` quantized with `scheme`.
    fn pointwise(
        w: &[f32],
        [cout, cin]: [usize; 2],
        scheme: QuantScheme,
        input: &ActivationParams,
    ) -> crate::int8_cpu::Int8Pointwise {
        let q = QuantizedTensor::quantize(w, &[cout, cin], scheme);
        crate::int8_cpu::Int8Pointwise::new(&q, input, cin, cout)
            .unwrap()
            .unwrap()
    }

    /// A block's test data: `pixels` × `cin` inputs, `c` × `cin` expansion weights and `c`
    /// depthwise filters of `kernel`.
    fn block_data(
        cin: usize,
        c: usize,
        pixels: usize,
        kernel: [usize; 2],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let x = (0..pixels * cin)
            .map(|i| ((i * 29 % 83) as f32) / 20.0 - 2.0)
            .collect();
        let expand = (0..c * cin)
            .map(|i| ((i * 31 % 67) as f32 - 33.0) / 40.0)
            .collect();
        let depthwise = (0..c * kernel[0] * kernel[1])
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 60.0)
            .collect();
        (x, expand, depthwise)
    }

    /// An int8 1×1 expansion writing its outputs quantized straight into the depthwise
    /// layer's input, and that layer into a 1×1 projection's, computes what the three
    /// layers compute one after the other through floats.
    #[test]
    fn fused_block_matches_the_layers_apart() {
        let grid = |scale: f32, zero_point: i32| ActivationParams {
            scale,
            zero_point,
            qmin: -128,
            qmax: 127,
        };
        let (expand_in, dw_in, project_in) =
            (grid(0.03, -20), grid(6.0 / 255.0, -128), grid(0.025, -128));
        let symmetric = QuantScheme {
            bits: 8,
            symmetric: true,
            granularity: Granularity::PerChannel,
        };
        for (cin, c, input, geometry) in [
            (6, 13, [7, 9], ([3, 3], [2, 2], [0, 1], [4, 5])),
            (8, 24, [8, 8], ([5, 5], [1, 1], [2, 2], [8, 8])),
        ] {
            let (kernel, strides, leading_pads, output) = geometry;
            let g = DepthwiseGeometry {
                input,
                output,
                kernel,
                strides,
                dilations: [1, 1],
                leading_pads,
            };
            let pixels = input[0] * input[1];
            let (x, we, wd) = block_data(cin, c, pixels, kernel);
            let (be, bd) = (vec![0.2f32; c], vec![-0.1f32; c]);
            let expand = pointwise(&we, [c, cin], symmetric, &expand_in);
            let dw_weights =
                QuantizedTensor::quantize(&wd, &[c, 1, kernel[0], kernel[1]], symmetric);
            let depthwise = Int8Depthwise::new(&dw_weights, &dw_in, c, kernel)
                .unwrap()
                .unwrap();
            let cout = 5;
            let wp: Vec<f32> = (0..cout * c)
                .map(|i| ((i * 23 % 59) as f32 - 29.0) / 30.0)
                .collect();
            let bp = vec![0.05f32; cout];
            let project = pointwise(&wp, [cout, c], symmetric, &project_in);
            let relu6 = FusedEpilogue {
                relu6: true,
                ..FusedEpilogue::default()
            };
            let output_pixels = output[0] * output[1];
            let expanded = expand.forward(&x, pixels, &be, relu6);
            let depthwise_out = depthwise.forward(&expanded, 1, &g, &bd, relu6).unwrap();
            let apart =
                project.forward(&depthwise_out, output_pixels, &bp, FusedEpilogue::default());
            let mut dw_input = depthwise.input_for(&g).unwrap();
            expand.forward_centred(&x, pixels, &be, true, &mut dw_input);
            assert_eq!(
                depthwise.run(&dw_input, &g, &bd, relu6).unwrap(),
                depthwise_out
            );
            let mut project_input = project.input_for(output_pixels);
            depthwise
                .run_into_next(&dw_input, &g, &bd, true, &mut project_input)
                .unwrap();
            let fused = project.forward_input(&project_input, &bp, FusedEpilogue::default());
            assert_eq!(fused.len(), apart.len());
            for (a, b) in fused.iter().zip(&apart) {
                assert!(
                    (a - b).abs() < 1e-5 * (1.0 + b.abs()),
                    "{cin}→{c} {g:?}: {a} vs {b}"
                );
            }
        }
    }

    /// The wide x86 kernels (two panels of 1×1 outputs, 16 depthwise channels per pass,
    /// the epilogues on 8 lanes straight into the next layer's input), with AVX-512 VNNI
    /// and with AVX2 alone, give the 128-bit kernels' results bit for bit: 1×1 layers at
    /// every granularity with odd inputs and outputs that leave a one-panel tile and
    /// pixel tails, the fused epilogue, the expansion into a depthwise input, and that
    /// layer's float output and its output into a projection's input.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn wide_kernels_give_the_128_bit_results_bit_for_bit() {
        use crate::int8_cpu::wide::{Choice, wide_choices, with_choice};
        assert!(
            crate::int8_cpu::wide_available(),
            "this test needs an x86-64 CPU with AVX2"
        );
        let grid = |scale: f32, zero_point: i32| ActivationParams {
            scale,
            zero_point,
            qmin: -128,
            qmax: 127,
        };
        let (expand_in, dw_in, next) = (grid(0.03, -20), grid(6.0 / 255.0, -128), grid(0.02, 5));
        // (1×1 inputs, channels, input rows × columns, kernel, strides, ReLU6): whole and
        // partial two-panel tiles and 16-channel steps (30, 12 channels), tiles of 6 pixels
        // and tails of 1–5 (35, 7, 8, 10, 36 and 39 pixels).
        for (cin, c, input, kernel, strides, relu6) in [
            (33, 40, [5, 7], [3, 3], [1, 1], true),
            (16, 48, [9, 4], [5, 5], [2, 2], false),
            (7, 24, [3, 13], [3, 3], [2, 1], true),
            (20, 30, [1, 7], [3, 3], [1, 1], false),
            (9, 12, [2, 4], [3, 3], [1, 1], true),
            (40, 30, [2, 5], [5, 5], [2, 2], true),
        ] {
            let pads = [kernel[0] / 2, kernel[1] / 2];
            let output = [
                (input[0] + 2 * pads[0] - kernel[0]) / strides[0] + 1,
                (input[1] + 2 * pads[1] - kernel[1]) / strides[1] + 1,
            ];
            let g = DepthwiseGeometry {
                input,
                output,
                kernel,
                strides,
                dilations: [1, 1],
                leading_pads: pads,
            };
            let pixels = input[0] * input[1];
            let (x, we, wd) = block_data(cin, c, pixels, kernel);
            let be: Vec<f32> = (0..c).map(|o| o as f32 * 0.03 - 0.4).collect();
            let residual: Vec<f32> = (0..pixels * c).map(|i| (i % 13) as f32 * 0.1).collect();
            let dw_weights = QuantizedTensor::quantize(
                &wd,
                &[c, 1, kernel[0], kernel[1]],
                QuantScheme {
                    bits: 8,
                    symmetric: false,
                    granularity: Granularity::PerChannel,
                },
            );
            let depthwise = Int8Depthwise::new(&dw_weights, &dw_in, c, kernel)
                .unwrap()
                .unwrap();
            // Only its input grid matters: the depthwise layer writes into its input.
            let project = pointwise(
                &vec![0.5; 3 * c],
                [3, c],
                QuantScheme {
                    bits: 8,
                    symmetric: true,
                    granularity: Granularity::PerTensor,
                },
                &next,
            );
            for (granularity, symmetric) in [
                (Granularity::PerTensor, true),
                (Granularity::PerChannel, false),
                (Granularity::PerBlock(8), true),
            ] {
                let scheme = QuantScheme {
                    bits: 8,
                    symmetric,
                    granularity,
                };
                let expand = pointwise(&we, [c, cin], scheme, &expand_in);
                // Every output of one kernel choice, as bits.
                let outputs = || {
                    let plain = expand.forward(&x, pixels, &be, FusedEpilogue::default());
                    let fused = expand.forward(
                        &x,
                        pixels,
                        &be,
                        FusedEpilogue {
                            relu6: true,
                            residual: Some(&residual),
                            grid: Some(&next),
                        },
                    );
                    let mut dw_input = depthwise.input_for(&g).unwrap();
                    expand.forward_centred(&x, pixels, &be, relu6, &mut dw_input);
                    let dw_float = depthwise
                        .run(
                            &dw_input,
                            &g,
                            &be,
                            FusedEpilogue {
                                relu6,
                                ..FusedEpilogue::default()
                            },
                        )
                        .unwrap();
                    let mut next_input = project.input_for(output[0] * output[1]);
                    depthwise
                        .run_into_next(&dw_input, &g, &be, relu6, &mut next_input)
                        .unwrap();
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    (
                        bits(&plain),
                        bits(&fused),
                        dw_input.data.clone(),
                        bits(&dw_float),
                        next_input.data,
                    )
                };
                let narrow = with_choice(Choice::Narrow, outputs);
                assert!(narrow.2.iter().any(|&v| v != 0) && narrow.4.iter().any(|&v| v != 0));
                for choice in wide_choices() {
                    let wide = with_choice(choice, outputs);
                    let what = format!("{cin}→{c} {input:?} {kernel:?} {granularity:?} {choice:?}");
                    assert!(wide.0 == narrow.0, "1×1 floats differ: {what}");
                    assert!(wide.1 == narrow.1, "1×1 fused epilogue differs: {what}");
                    assert!(
                        wide.2 == narrow.2,
                        "expansion into the depthwise input differs: {what}"
                    );
                    assert!(wide.3 == narrow.3, "depthwise floats differ: {what}");
                    assert!(
                        wide.4 == narrow.4,
                        "depthwise into the next input differs: {what}"
                    );
                }
            }
        }
    }

    /// Blocks that split a channel's taps have several scales per channel: not this kernel.
    #[test]
    fn blocks_inside_a_channel_are_declined() {
        let q = QuantizedTensor::quantize(
            &[0.5; 2 * 9],
            &[2, 1, 3, 3],
            QuantScheme {
                bits: 8,
                symmetric: true,
                granularity: Granularity::PerBlock(4),
            },
        );
        let act = ActivationParams {
            scale: 0.1,
            zero_point: 0,
            qmin: -128,
            qmax: 127,
        };
        assert!(Int8Depthwise::new(&q, &act, 2, [3, 3]).unwrap().is_none());
    }
}
