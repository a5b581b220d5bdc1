//! Integer 1×1 convolution for the CPU path: int8 inputs × int8 weights → int32 sums.
//!
//! Both operands are stored *centred* (q − zero point) as i16, so asymmetric inputs and
//! weights need no correction terms: |q − zp| ≤ 255, products ≤ 65 025, and a sum over up to
//! 32 000 inputs stays inside i32. The weights are packed once into panels of 8 output
//! channels × 2 inputs (one 128-bit vector per input pair and 4 outputs), so the inner loop
//! broadcasts a pair of a pixel's inputs and multiplies it into 8 output lanes with
//! `i32x4.dot_i16x8_s` on wasm (`pmaddwd` on x86): 16 MACs per weight load shared by 4
//! pixels, no horizontal sums. Each group of the weights (per-tensor, per-channel or a block
//! of the input channels) has its own scale, applied once per group sum, and the epilogue
//! (scale, bias, ReLU6, residual, and the next layer's input quantization where the caller
//! asks for it) runs on the accumulators while they are in registers:
//! y = Σ_groups s_in · s_w · Σ_k (q_in − zp_in)(q_w − zp_w) + bias.
//!
//! On x86-64 with AVX2 (checked at run time) the wide kernels (module `wide`) take two
//! panels × 6 pixels per tile, with AVX-512 VNNI's `vpdpwssd` where the CPU has it, and
//! quantize an expansion's outputs for the depthwise layer in registers; their results are
//! the 128-bit kernels' bit for bit.

mod depthwise;

pub(crate) use depthwise::{DepthwiseGeometry, DepthwiseInput, Int8Depthwise};

use crate::compress::ActivationParams;
use crate::error::{EngineError, Result};
use crate::quant::{Granularity, QuantizedTensor};

/// What an integer kernel applies to its sums as it writes them, after scale and bias:
/// ReLU6, then a residual (spanning the whole output), then the next layer's grid (its
/// fake quantization fused here saves that layer a pass).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FusedEpilogue<'a> {
    pub relu6: bool,
    pub residual: Option<&'a [f32]>,
    pub grid: Option<&'a ActivationParams>,
}

impl FusedEpilogue<'_> {
    /// Writes `values` (ReLU6 already applied) to `out`, which starts at `at` of the whole
    /// output: the residual added, then fake-quantized.
    #[inline(always)]
    fn write_tail(&self, values: &[f32], out: &mut [f32], at: usize) {
        out.copy_from_slice(values);
        if let Some(res) = self.residual {
            out.iter_mut()
                .zip(&res[at..at + values.len()])
                .for_each(|(v, r)| *v += r);
        }
        if let Some(grid) = self.grid {
            out.iter_mut().for_each(|v| *v = grid.fake_quantize(*v));
        }
    }
}

/// Output channels per weight panel (two vectors of four i32 lanes).
const PANEL: usize = 8;
/// Pixels sharing one pass over a panel (8 accumulator vectors: they stay in registers).
const PIXELS: usize = 4;
/// Pixels sharing one pass over two panels on the wide x86 kernel (12 accumulators of 256
/// bits, two weight vectors and the broadcast input fill AVX2's 16 registers).
pub(crate) const WIDE_PIXELS: usize = 6;

/// Pixel chunks are a multiple of both tile heights where two-panel tiles run (else of
/// the one-panel tiles' only, so the chunk stays as small as the rows' budget allows).
pub(crate) fn chunk_step(wide: bool) -> usize {
    const BOTH: usize = 12;
    const _: () = assert!(BOTH.is_multiple_of(PIXELS) && BOTH.is_multiple_of(WIDE_PIXELS));
    if wide { BOTH } else { PIXELS }
}

/// Whether tiles of two panels run here (the wide x86 kernel).
pub(crate) fn wide_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return wide::available();
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}
/// Bytes of quantized input rows processed against every panel before moving on (the rows
/// stay in L1 while the panels stream past).
const ROWS_BYTES: usize = 16 * 1024;

pub(crate) struct Int8Pointwise {
    cin: usize,
    cout: usize,
    /// Input pairs per pixel: `cin` rounded up to 2, halved.
    pairs: usize,
    /// `[cout / 8][pairs][8 outputs][2 inputs]`, centred, zero-padded.
    panels: Vec<i16>,
    /// Input-pair ranges sharing one weight scale (one range unless per-block).
    segments: Vec<(usize, usize)>,
    /// `[segments][cout rounded up to 8]`: input scale × weight scale.
    scales: Vec<f32>,
    input: ActivationParams,
}

impl Int8Pointwise {
    /// Bytes the layer's weights hold while it runs (centred i16 and the scales).
    pub(crate) fn weight_bytes(&self) -> usize {
        2 * self.panels.len() + 4 * self.scales.len()
    }

    /// `None` when this layer cannot run on the integer kernel (not 8-bit, or blocks not
    /// a multiple of 8 inputs); it then runs as float fake-quant.
    pub(crate) fn new(
        q: &QuantizedTensor,
        input: &ActivationParams,
        cin: usize,
        cout: usize,
    ) -> Result<Option<Self>> {
        if q.scheme.bits != 8 || input.qmax > 127 || input.qmin < -128 {
            return Ok(None);
        }
        if q.values.len() != cin * cout {
            return Err(EngineError::ShapeMismatch {
                name: "int8 weights".into(),
                found: q.shape.clone(),
                expected: vec![cout, cin],
            });
        }
        let pairs = cin.div_ceil(2);
        let segments: Vec<(usize, usize)> = match q.scheme.granularity {
            Granularity::PerTensor | Granularity::PerChannel => vec![(0, pairs)],
            Granularity::PerBlock(b) if b.is_multiple_of(8) => (0..cin)
                .step_by(b)
                .map(|s| (s / 2, (s + b).min(cin).div_ceil(2)))
                .collect(),
            Granularity::PerBlock(_) => return Ok(None),
        };
        let padded = cout.div_ceil(PANEL) * PANEL;
        let mut panels = vec![0i16; padded * pairs * 2];
        let mut scales = vec![0f32; padded * segments.len()];
        let slot =
            |o: usize, k: usize| ((o / PANEL * pairs + k / 2) * PANEL + o % PANEL) * 2 + k % 2;
        for (g, range) in q.group_ranges().iter().enumerate() {
            let zp = q.zero_points[g] as i16;
            for idx in range.clone() {
                panels[slot(idx / cin, idx % cin)] = q.values[idx] as i16 - zp;
            }
            let scale = q.scales[g] * input.scale;
            let (o, k0) = (range.start / cin, range.start % cin);
            match q.scheme.granularity {
                Granularity::PerTensor => scales.iter_mut().for_each(|s| *s = scale),
                Granularity::PerChannel => scales[o] = scale,
                Granularity::PerBlock(_) => {
                    let seg = segments.iter().position(|&(s, _)| s == k0 / 2).unwrap_or(0);
                    scales[seg * padded + o] = scale;
                }
            }
        }
        Ok(Some(Self {
            cin,
            cout,
            pairs,
            panels,
            segments,
            scales,
            input: *input,
        }))
    }

    /// An all-zero input of `pixels` pixels, to fill with [`PointwiseInput::write`].
    pub(crate) fn input_for(&self, pixels: usize) -> PointwiseInput {
        PointwiseInput {
            data: vec![0; pixels * self.pairs * 2],
            row: self.pairs * 2,
            grid: self.input,
        }
    }

    /// `pixels` rows of `cin` floats quantized to the input grid.
    fn quantize(&self, input: &[f32], pixels: usize) -> PointwiseInput {
        assert!(input.len() == pixels * self.cin);
        let mut quantized = self.input_for(pixels);
        for (p, values) in input.chunks_exact(self.cin.max(1)).enumerate() {
            quantized.write(p, 0, values);
        }
        quantized
    }

    pub(crate) fn forward(
        &self,
        input: &[f32],
        pixels: usize,
        bias: &[f32],
        epilogue: FusedEpilogue,
    ) -> Vec<f32> {
        self.forward_input(&self.quantize(input, pixels), bias, epilogue)
    }

    /// [`Self::forward`] from an input already quantized (written by the layer before).
    pub(crate) fn forward_input(
        &self,
        input: &PointwiseInput,
        bias: &[f32],
        epilogue: FusedEpilogue,
    ) -> Vec<f32> {
        let mut out = vec![0f32; input.pixels() * self.cout];
        self.forward_input_into(input, bias, epilogue, &mut out);
        out
    }

    /// Outputs for `pixels` pixels (`None` when the product overflows).
    pub(crate) fn output_len(&self, pixels: usize) -> Option<usize> {
        pixels.checked_mul(self.cout)
    }

    /// [`Self::forward_input`] into `out` (`pixels × cout`), e.g. one image's part of a
    /// batch's output, without a copy.
    pub(crate) fn forward_input_into(
        &self,
        input: &PointwiseInput,
        bias: &[f32],
        epilogue: FusedEpilogue,
        out: &mut [f32],
    ) {
        let cout = self.cout;
        let pixels = input.pixels();
        assert!(epilogue.residual.is_none_or(|r| r.len() == pixels * cout));
        assert!(out.len() == pixels * cout);
        self.each_tile(input, bias, epilogue.relu6, |tile, rows, p, n| {
            let at = p * cout + tile.o0;
            let dst = Dst {
                out: &mut out[at..],
                at,
                stride: cout,
                width: tile.width().min(cout - tile.o0),
                epilogue,
                row_scales: None,
            };
            run_tile(n, tile, rows, dst);
        });
    }

    /// The outputs quantized to the depthwise layer's input grid, written straight into
    /// its bordered input (`pixels` = that input's rows × columns): the next layer's input
    /// quantization fused into this layer's epilogue, no float output in between.
    pub(crate) fn forward_centred(
        &self,
        input: &[f32],
        pixels: usize,
        bias: &[f32],
        relu6: bool,
        target: &mut DepthwiseInput,
    ) {
        let cout = self.cout;
        const STRIDE: usize = 2 * PANEL;
        let mut tile_out = [0f32; WIDE_PIXELS * STRIDE];
        let input = self.quantize(input, pixels);
        self.each_tile(&input, bias, relu6, |tile, rows, p, n| {
            #[cfg(target_arch = "x86_64")]
            if tile.panels == 2 && tile.o0 + tile.width() <= cout {
                let (starts, out, grid) = target.row_starts(p, n, tile.o0, tile.width());
                let grid = &grid;
                return match n {
                    6 => wide::run_centred::<6>(tile, rows, grid, out, &starts),
                    5 => wide::run_centred::<5>(tile, rows, grid, out, &starts),
                    4 => wide::run_centred::<4>(tile, rows, grid, out, &starts),
                    3 => wide::run_centred::<3>(tile, rows, grid, out, &starts),
                    2 => wide::run_centred::<2>(tile, rows, grid, out, &starts),
                    _ => wide::run_centred::<1>(tile, rows, grid, out, &starts),
                };
            }
            let dst = Dst {
                out: &mut tile_out,
                at: 0,
                stride: STRIDE,
                width: tile.width(),
                epilogue: FusedEpilogue::default(),
                row_scales: None,
            };
            run_tile(n, tile, rows, dst);
            let width = tile.width().min(cout - tile.o0);
            target.write_rows(p, tile.o0, &tile_out, STRIDE, n, width);
        });
    }

    /// Hands every tile (a panel of 8 outputs × up to 4 pixels, or on the wide x86 kernel
    /// two panels × up to 6 pixels, from pixel `p`) to `sink` with the input rows from `p`
    /// on.
    fn each_tile(
        &self,
        input: &PointwiseInput,
        bias: &[f32],
        relu6: bool,
        mut sink: impl FnMut(&Tile, &[i16], usize, usize),
    ) {
        let (cout, pairs) = (self.cout, self.pairs);
        assert!(input.row == 2 * pairs && bias.len() == cout);
        let (rows, pixels) = (&input.data, input.pixels());
        let padded = cout.div_ceil(PANEL) * PANEL;
        let mut bias_padded = bias.to_vec();
        bias_padded.resize(padded, 0.0);
        let wide = wide_available();
        let step = chunk_step(wide);
        let chunk = (ROWS_BYTES / (4 * pairs.max(1))).max(step) / step * step;
        for p0 in (0..pixels).step_by(chunk) {
            let p1 = (p0 + chunk).min(pixels);
            let mut o0 = 0;
            while o0 < padded {
                let panels = if wide && o0 + 2 * PANEL <= padded {
                    2
                } else {
                    1
                };
                let o1 = o0 + panels * PANEL;
                let tile = Tile {
                    panel: &self.panels[o0 * pairs * 2..o1 * pairs * 2],
                    panels,
                    segments: &self.segments,
                    scales: &self.scales,
                    scale_stride: padded,
                    o0,
                    bias: &bias_padded[o0..o1],
                    relu6,
                };
                let height = if panels == 2 { WIDE_PIXELS } else { PIXELS };
                let mut p = p0;
                while p < p1 {
                    let n = (p1 - p).min(height);
                    sink(&tile, &rows[p * 2 * pairs..], p, n);
                    p += n;
                }
                o0 = o1;
            }
        }
    }
}

/// A 1×1 int8 layer's input quantized to its grid and centred (q − zero point): `2·pairs`
/// i16 per pixel (an odd channel count leaves the last one 0), so that each adjacent two
/// read as one i32 meet one packed weight pair.
pub(crate) struct PointwiseInput {
    data: Vec<i16>,
    row: usize,
    grid: ActivationParams,
}

impl PointwiseInput {
    fn pixels(&self) -> usize {
        self.data.len() / self.row.max(1)
    }

    /// Writes `values`, quantized and centred, as channels `channel..` of pixel `pixel`.
    pub(crate) fn write(&mut self, pixel: usize, channel: usize, values: &[f32]) {
        let at = pixel * self.row + channel;
        centre(values, &mut self.data[at..at + values.len()], &self.grid);
    }
}

/// `dst[i]` = `src[i]` quantized to `grid` and centred (|q − zp| ≤ 255 on an int8 grid),
/// eight at a time with 128-bit lanes where the target has them.
fn centre(src: &[f32], dst: &mut [i16], grid: &ActivationParams) {
    assert!(dst.len() == src.len());
    #[cfg(any(target_arch = "wasm32", target_arch = "x86_64"))]
    let whole = {
        let whole = src.len() / 8 * 8;
        for (s, d) in src[..whole]
            .chunks_exact(8)
            .zip(dst[..whole].chunks_exact_mut(8))
        {
            let v = lanes::centred_i16(lanes::load_f32(&s[..4]), lanes::load_f32(&s[4..]), grid);
            // SAFETY: `d` holds 8 i16 (one exact chunk).
            unsafe { lanes::store_i16(d.as_mut_ptr(), v) };
        }
        whole
    };
    #[cfg(not(any(target_arch = "wasm32", target_arch = "x86_64")))]
    let whole = 0;
    for (d, &v) in dst[whole..].iter_mut().zip(&src[whole..]) {
        *d = grid.centred(v) as i16;
    }
}

/// One tile of `n` pixels (1–4; 1–6 for two panels, which only the wide x86 kernel is
/// given).
pub(crate) fn run_tile(n: usize, tile: &Tile, rows: &[i16], dst: Dst) {
    #[cfg(target_arch = "x86_64")]
    if tile.panels == 2 {
        return match n {
            6 => wide::run::<6>(tile, rows, dst),
            5 => wide::run::<5>(tile, rows, dst),
            4 => wide::run::<4>(tile, rows, dst),
            3 => wide::run::<3>(tile, rows, dst),
            2 => wide::run::<2>(tile, rows, dst),
            _ => wide::run::<1>(tile, rows, dst),
        };
    }
    match n {
        4 => lanes::run::<4>(tile, rows, dst),
        3 => lanes::run::<3>(tile, rows, dst),
        2 => lanes::run::<2>(tile, rows, dst),
        _ => lanes::run::<1>(tile, rows, dst),
    }
}

/// Where a tile's results go: rows `stride` apart from the start of `out`, which is `at`
/// of the whole output, `width` (≤ the tile's width) outputs each; and what is fused into
/// the writes.
pub(crate) struct Dst<'a> {
    pub(crate) out: &'a mut [f32],
    pub(crate) at: usize,
    pub(crate) stride: usize,
    pub(crate) width: usize,
    pub(crate) epilogue: FusedEpilogue<'a>,
    /// One input scale per pixel of the tile (inputs on a grid of their own per pixel, as
    /// the int4 kernel's): `y = s_pixel · Σ_segments s_w · Σ + bias`. `None`: the input
    /// scale is in the tile's scales.
    pub(crate) row_scales: Option<&'a [f32]>,
}

impl Dst<'_> {
    /// Writes `values` (ReLU6 already applied) as row `i`'s outputs from `column` on: the
    /// residual added, then fake-quantized.
    #[inline(always)]
    fn write_from(&mut self, i: usize, column: usize, values: &[f32]) {
        let at = i * self.stride + column;
        self.epilogue
            .write_tail(values, &mut self.out[at..at + values.len()], self.at + at);
    }
}

/// One panel of 8 outputs (or two side by side) and what its sums need: the scales of each
/// input segment, the bias and whether ReLU6 follows.
pub(crate) struct Tile<'a> {
    /// `[panels][pairs][8][2]` i16.
    pub(crate) panel: &'a [i16],
    /// 1, or 2 on the wide x86 kernel.
    pub(crate) panels: usize,
    pub(crate) segments: &'a [(usize, usize)],
    /// `[segments][scale_stride]`.
    pub(crate) scales: &'a [f32],
    pub(crate) scale_stride: usize,
    pub(crate) o0: usize,
    pub(crate) bias: &'a [f32],
    pub(crate) relu6: bool,
}

impl Tile<'_> {
    fn pairs(&self) -> usize {
        self.panel.len() / (2 * PANEL * self.panels.max(1))
    }

    /// Outputs: 8 per panel.
    fn width(&self) -> usize {
        PANEL * self.panels
    }

    fn scale(&self, segment: usize) -> &[f32] {
        let at = segment * self.scale_stride + self.o0;
        &self.scales[at..at + self.width()]
    }
}

/// The tile kernel: `P` consecutive rows of input pairs (from `rows`) × one panel, scaled,
/// biased and clamped → `[P][8]` floats. 128-bit lanes on wasm (SIMD128) and x86-64 (SSE2;
/// the sums on AVX2 where the CPU has it); the checks and the epilogue ([`lanes::finish`])
/// also serve the wide x86 kernel's two panels.
#[cfg(any(target_arch = "wasm32", target_arch = "x86_64"))]
pub(crate) mod lanes {
    use super::{Dst, PANEL, Tile};
    use crate::compress::ActivationParams;
    #[cfg(target_arch = "wasm32")]
    use core::arch::wasm32::*;
    #[cfg(target_arch = "x86_64")]
    use core::arch::x86_64::*;

    #[cfg(target_arch = "wasm32")]
    pub(crate) type I = v128;
    #[cfg(target_arch = "wasm32")]
    pub(crate) type F = v128;
    #[cfg(target_arch = "x86_64")]
    pub(crate) type I = __m128i;
    #[cfg(target_arch = "x86_64")]
    pub(crate) type F = __m128;

    // SAFETY (every x86 intrinsic below): SSE2 is part of the x86-64 baseline, and none
    // of these touches memory.
    #[inline(always)]
    pub(crate) fn zero() -> I {
        #[cfg(target_arch = "wasm32")]
        return i32x4_splat(0);
        #[cfg(target_arch = "x86_64")]
        return unsafe { _mm_setzero_si128() };
    }

    /// acc + pairwise products of i16 lanes (`i32x4.dot_i16x8_s` / `pmaddwd`).
    #[inline(always)]
    pub(crate) fn dot_add(acc: I, a: I, b: I) -> I {
        #[cfg(target_arch = "wasm32")]
        return i32x4_add(acc, i32x4_dot_i16x8(a, b));
        #[cfg(target_arch = "x86_64")]
        return unsafe { _mm_add_epi32(acc, _mm_madd_epi16(a, b)) };
    }

    /// The i16 lanes of `a` and `b` interleaved: (a0, b0, a1, b1, a2, b2, a3, b3) and the
    /// same of lanes 4–7 (`punpcklwd` / `punpckhwd`).
    #[inline(always)]
    pub(crate) fn interleave_i16(a: I, b: I) -> (I, I) {
        #[cfg(target_arch = "wasm32")]
        return (
            i16x8_shuffle::<0, 8, 1, 9, 2, 10, 3, 11>(a, b),
            i16x8_shuffle::<4, 12, 5, 13, 6, 14, 7, 15>(a, b),
        );
        #[cfg(target_arch = "x86_64")]
        return unsafe { (_mm_unpacklo_epi16(a, b), _mm_unpackhi_epi16(a, b)) };
    }

    /// # Safety
    /// `p` points at a readable i32.
    #[inline(always)]
    pub(crate) unsafe fn splat_load(p: *const i32) -> I {
        // SAFETY: the caller's contract; neither load needs alignment.
        #[cfg(target_arch = "wasm32")]
        return unsafe { v128_load32_splat(p as *const u32) };
        #[cfg(target_arch = "x86_64")]
        return unsafe { _mm_set1_epi32(p.read_unaligned()) };
    }

    #[inline(always)]
    pub(crate) fn fsplat(x: f32) -> F {
        #[cfg(target_arch = "wasm32")]
        return f32x4_splat(x);
        #[cfg(target_arch = "x86_64")]
        return unsafe { _mm_set1_ps(x) };
    }

    /// acc + f32(v) · scale.
    #[inline(always)]
    pub(crate) fn scale_add(acc: F, v: I, scale: F) -> F {
        #[cfg(target_arch = "wasm32")]
        return f32x4_add(acc, f32x4_mul(f32x4_convert_i32x4(v), scale));
        #[cfg(target_arch = "x86_64")]
        return unsafe { _mm_add_ps(acc, _mm_mul_ps(_mm_cvtepi32_ps(v), scale)) };
    }

    #[inline(always)]
    pub(crate) fn clamp(v: F, lo: F, hi: F) -> F {
        #[cfg(target_arch = "wasm32")]
        return f32x4_pmin(f32x4_pmax(v, lo), hi);
        #[cfg(target_arch = "x86_64")]
        return unsafe { _mm_min_ps(_mm_max_ps(v, lo), hi) };
    }

    /// # Safety
    /// `p` points at 8 readable i16.
    #[inline(always)]
    pub(crate) unsafe fn load_i16(p: *const i16) -> I {
        // SAFETY: the caller's contract; neither load needs alignment.
        #[cfg(target_arch = "wasm32")]
        return unsafe { v128_load(p as *const v128) };
        #[cfg(target_arch = "x86_64")]
        return unsafe { _mm_loadu_si128(p as *const __m128i) };
    }

    /// Loads 4 f32 from a slice holding at least that many.
    #[inline(always)]
    pub(crate) fn load_f32(s: &[f32]) -> F {
        assert!(s.len() >= 4);
        // SAFETY: 4 readable f32 (asserted); neither load needs alignment.
        #[cfg(target_arch = "wasm32")]
        return unsafe { v128_load(s.as_ptr() as *const v128) };
        #[cfg(target_arch = "x86_64")]
        return unsafe { _mm_loadu_ps(s.as_ptr()) };
    }

    #[inline(always)]
    pub(crate) fn to_array(v: F) -> [f32; 4] {
        // SAFETY: both vector types have the size and bit layout of four f32.
        unsafe { std::mem::transmute::<F, [f32; 4]>(v) }
    }

    #[inline(always)]
    pub(crate) fn store_f32(s: &mut [f32], v: F) {
        assert!(s.len() >= 4);
        // SAFETY: 4 writable f32 (asserted); neither store needs alignment.
        #[cfg(target_arch = "wasm32")]
        unsafe {
            v128_store(s.as_mut_ptr() as *mut v128, v)
        };
        #[cfg(target_arch = "x86_64")]
        unsafe {
            _mm_storeu_ps(s.as_mut_ptr(), v)
        };
    }

    /// [`ActivationParams::fake_quantize`] on four lanes (the same rounding: clamp to the
    /// integer bounds, then add and subtract 1.5·2²³).
    #[inline(always)]
    pub(crate) fn fake_quantize(v: F, grid: &ActivationParams) -> F {
        const MAGIC: f32 = 12_582_912.0;
        let lo = fsplat((grid.qmin - grid.zero_point) as f32);
        let hi = fsplat((grid.qmax - grid.zero_point) as f32);
        let (scale, magic) = (fsplat(grid.scale), fsplat(MAGIC));
        #[cfg(target_arch = "wasm32")]
        return f32x4_mul(
            f32x4_sub(f32x4_add(clamp(f32x4_div(v, scale), lo, hi), magic), magic),
            scale,
        );
        #[cfg(target_arch = "x86_64")]
        return unsafe {
            _mm_mul_ps(
                _mm_sub_ps(
                    _mm_add_ps(clamp(_mm_div_ps(v, scale), lo, hi), magic),
                    magic,
                ),
                scale,
            )
        };
    }

    /// [`ActivationParams::centred`] on eight lanes, narrowed to i16 (the same arithmetic:
    /// divide, NaN → 0, clamp to the integer bounds, round by adding 1.5·2²³).
    #[inline(always)]
    pub(crate) fn centred_i16(a: F, b: F, grid: &ActivationParams) -> I {
        let lo = fsplat((grid.qmin - grid.zero_point) as f32);
        let hi = fsplat((grid.qmax - grid.zero_point) as f32);
        let scale = fsplat(grid.scale);
        #[cfg(target_arch = "wasm32")]
        let (a, b) = (f32x4_div(a, scale), f32x4_div(b, scale));
        #[cfg(target_arch = "x86_64")]
        let (a, b) = unsafe { (_mm_div_ps(a, scale), _mm_div_ps(b, scale)) };
        narrow_rounded(a, b, lo, hi)
    }

    /// `a · factor` and `b · factor` rounded to integers within ±`bound`, narrowed to i16
    /// (NaN → 0).
    #[inline(always)]
    pub(crate) fn scaled_i16(a: F, b: F, factor: F, bound: f32) -> I {
        let (lo, hi) = (fsplat(-bound), fsplat(bound));
        narrow_rounded(fmul(a, factor), fmul(b, factor), lo, hi)
    }

    /// Eight lanes clamped to `lo..=hi` (NaN → 0), rounded half to even by adding
    /// 1.5·2²³, narrowed to i16.
    #[inline(always)]
    fn narrow_rounded(a: F, b: F, lo: F, hi: F) -> I {
        const MAGIC: f32 = 12_582_912.0;
        let magic = fsplat(MAGIC);
        #[cfg(target_arch = "wasm32")]
        {
            let round = |v: F| {
                let v = clamp(v128_and(v, f32x4_eq(v, v)), lo, hi);
                i32x4_sub(f32x4_add(v, magic), i32x4_splat(MAGIC.to_bits() as i32))
            };
            i16x8_narrow_i32x4(round(a), round(b))
        }
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let round = |v: F| {
                let v = clamp(_mm_and_ps(v, _mm_cmpeq_ps(v, v)), lo, hi);
                _mm_sub_epi32(
                    _mm_castps_si128(_mm_add_ps(v, magic)),
                    _mm_set1_epi32(MAGIC.to_bits() as i32),
                )
            };
            _mm_packs_epi32(round(a), round(b))
        }
    }

    /// # Safety
    /// `p` points at 8 writable i16.
    #[inline(always)]
    pub(crate) unsafe fn store_i16(p: *mut i16, v: I) {
        // SAFETY: the caller's contract; neither store needs alignment.
        #[cfg(target_arch = "wasm32")]
        unsafe {
            v128_store(p as *mut v128, v)
        };
        #[cfg(target_arch = "x86_64")]
        unsafe {
            _mm_storeu_si128(p as *mut __m128i, v)
        };
    }

    #[inline(always)]
    pub(crate) fn fadd(a: F, b: F) -> F {
        #[cfg(target_arch = "wasm32")]
        return f32x4_add(a, b);
        #[cfg(target_arch = "x86_64")]
        return unsafe { _mm_add_ps(a, b) };
    }

    /// Eight bytes of packed int4 weights (each byte: two inputs of one output, the first in
    /// the low nibble) as two vectors of sign-extended i16 pairs, outputs 0–3 and 4–7 (the
    /// layout of an int8 weight panel): zero-extend the bytes to i16, then shift each nibble
    /// to the top and back arithmetically.
    ///
    /// # Safety
    /// `p` points at 8 readable bytes.
    #[inline(always)]
    pub(crate) unsafe fn nibble_pairs(p: *const u8) -> (I, I) {
        // SAFETY: the caller's contract; neither load needs alignment.
        #[cfg(target_arch = "wasm32")]
        let (low, high) = unsafe {
            let bytes = u16x8_extend_low_u8x16(v128_load64_zero(p as *const u64));
            (
                i16x8_shr(i16x8_shl(bytes, 12), 12),
                i16x8_shr(i16x8_shl(bytes, 8), 12),
            )
        };
        #[cfg(target_arch = "x86_64")]
        let (low, high) = unsafe {
            let bytes =
                _mm_unpacklo_epi8(_mm_loadl_epi64(p as *const __m128i), _mm_setzero_si128());
            (
                _mm_srai_epi16(_mm_slli_epi16(bytes, 12), 12),
                _mm_srai_epi16(_mm_slli_epi16(bytes, 8), 12),
            )
        };
        interleave_i16(low, high)
    }

    #[inline(always)]
    pub(crate) fn sub_i16(a: I, b: I) -> I {
        #[cfg(target_arch = "wasm32")]
        return i16x8_sub(a, b);
        #[cfg(target_arch = "x86_64")]
        return unsafe { _mm_sub_epi16(a, b) };
    }

    #[inline(always)]
    pub(crate) fn fmul(a: F, b: F) -> F {
        #[cfg(target_arch = "wasm32")]
        return f32x4_mul(a, b);
        #[cfg(target_arch = "x86_64")]
        return unsafe { _mm_mul_ps(a, b) };
    }

    /// The largest |x| of `s` (NaN ignored), four lanes at a time.
    pub(crate) fn max_abs(s: &[f32]) -> f32 {
        let whole = s.len() / 4 * 4;
        let mut m = fsplat(0.0);
        for chunk in s[..whole].chunks_exact(4) {
            let v = load_f32(chunk);
            // |v| by clearing the sign bit; `max(m, |v|)` keeps m where |v| is NaN.
            #[cfg(target_arch = "wasm32")]
            {
                m = f32x4_pmax(m, f32x4_abs(v));
            }
            #[cfg(target_arch = "x86_64")]
            unsafe {
                m = _mm_max_ps(_mm_andnot_ps(_mm_set1_ps(-0.0), v), m);
            }
        }
        let lanes = to_array(m);
        s[whole..].iter().fold(
            lanes[0].max(lanes[1]).max(lanes[2].max(lanes[3])),
            |m, v| m.max(v.abs()),
        )
    }

    /// `init` + Σ over the tile's segments of (the segment's integer sums × its scales), for
    /// `P` rows of `rows` (each `pairs` i16 pairs; the caller checks the lengths).
    #[inline(always)]
    pub(super) fn segment_sums<const P: usize>(
        tile: &Tile,
        rows: &[i16],
        init: [F; 2],
    ) -> [[F; 2]; P] {
        let pairs = tile.pairs();
        assert!(rows.len() >= 2 * P * pairs);
        // Two i16 of a row are one i32 pair (the first in the low half: little-endian).
        let rows = rows.as_ptr() as *const i32;
        let mut sums = [init; P];
        for (s, &(k0, k1)) in tile.segments.iter().enumerate() {
            assert!(k0 <= k1 && k1 <= pairs);
            let mut acc = [[zero(); 2]; P];
            let panel = tile.panel[k0 * 2 * PANEL..k1 * 2 * PANEL].as_ptr();
            // SAFETY: the panel slice holds 16 i16 per pair of k0..k1 (it was just sliced)
            // and row i holds `pairs` i32 from i·pairs with k1 ≤ pairs and 2·P·pairs ≤
            // the rows' i16 (asserted above); no load needs alignment.
            unsafe {
                for k in 0..k1 - k0 {
                    let (w0, w1) = (load_i16(panel.add(16 * k)), load_i16(panel.add(16 * k + 8)));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let x = splat_load(rows.add(i * pairs + k0 + k));
                        a[0] = dot_add(a[0], x, w0);
                        a[1] = dot_add(a[1], x, w1);
                    }
                }
            }
            let scale = tile.scale(s);
            let (s0, s1) = (load_f32(&scale[..4]), load_f32(&scale[4..]));
            for (sum, a) in sums.iter_mut().zip(&acc) {
                sum[0] = scale_add(sum[0], a[0], s0);
                sum[1] = scale_add(sum[1], a[1], s1);
            }
        }
        sums
    }

    /// Checks what every tile kernel relies on: `P` rows of `pairs` i16 pairs, segments
    /// within the pairs.
    #[inline(always)]
    pub(super) fn check<const P: usize>(tile: &Tile, rows: &[i16]) {
        let pairs = tile.pairs();
        assert!(rows.len() >= 2 * P * pairs);
        assert!(tile.panel.len() == 2 * PANEL * tile.panels * pairs);
        assert!(
            tile.segments
                .iter()
                .all(|&(k0, k1)| k0 <= k1 && k1 <= pairs)
        );
    }

    /// The tile's bias as `Q` vectors of four, and where the sums start: from the bias, or
    /// from zero when each row has a scale of its own (the bias is added after it).
    #[inline(always)]
    pub(super) fn bias_and_init<const Q: usize>(tile: &Tile, dst: &Dst) -> ([F; Q], [F; Q]) {
        let mut bias = [fsplat(0.0); Q];
        for (q, b) in bias.iter_mut().enumerate() {
            *b = load_f32(&tile.bias[4 * q..4 * q + 4]);
        }
        let init = if dst.row_scales.is_some() {
            [fsplat(0.0); Q]
        } else {
            bias
        };
        (bias, init)
    }

    #[inline(always)]
    pub(super) fn run<const P: usize>(tile: &Tile, rows: &[i16], dst: Dst) {
        check::<P>(tile, rows);
        let (bias, init) = bias_and_init::<2>(tile, &dst);
        #[cfg(target_arch = "x86_64")]
        let sums = if super::avx2::available() {
            // SAFETY: the CPU has AVX2 (just checked); rows and segments as checked above.
            unsafe { super::avx2::segment_sums::<P>(tile, rows, init) }
        } else {
            segment_sums::<P>(tile, rows, init)
        };
        #[cfg(target_arch = "wasm32")]
        let sums = segment_sums::<P>(tile, rows, init);
        finish(tile, sums, bias, dst);
    }

    /// The epilogue of `P` rows of `4·Q` sums: the row scales and bias where each row has
    /// its own scale, ReLU6, then the residual and the next layer's grid, written to `dst`.
    #[inline(always)]
    pub(super) fn finish<const P: usize, const Q: usize>(
        tile: &Tile,
        mut sums: [[F; Q]; P],
        bias: [F; Q],
        mut dst: Dst,
    ) {
        if let Some(row_scales) = dst.row_scales {
            assert!(row_scales.len() >= P);
            for (sum, &s) in sums.iter_mut().zip(row_scales) {
                let s = fsplat(s);
                for (v, b) in sum.iter_mut().zip(bias) {
                    *v = fadd(fmul(*v, s), b);
                }
            }
        }
        if tile.relu6 {
            let (lo, hi) = (fsplat(0.0), fsplat(6.0));
            for v in sums.as_flattened_mut() {
                *v = clamp(*v, lo, hi);
            }
        }
        for (i, sum) in sums.into_iter().enumerate() {
            // Panel by panel, as the one-panel kernel writes each (so two panels give its
            // results exactly): a whole panel on lanes, a narrower one (a layer's last)
            // value by value.
            // (Indexed, not sliced: a slice of the sums would take them out of registers.)
            for p in 0..Q / 2 {
                let first = PANEL * p;
                let width = dst.width.saturating_sub(first).min(PANEL);
                let (lo, hi) = (sum[2 * p], sum[2 * p + 1]);
                if width < PANEL {
                    if width > 0 {
                        let (lo, hi) = (to_array(lo), to_array(hi));
                        let values = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]];
                        dst.write_from(i, first, &values[..width]);
                    }
                    continue;
                }
                let at = i * dst.stride + first;
                let (mut lo, mut hi) = (lo, hi); // (the panel's own copies)
                if let Some(res) = dst.epilogue.residual {
                    let from = dst.at + at;
                    lo = fadd(lo, load_f32(&res[from..from + 4]));
                    hi = fadd(hi, load_f32(&res[from + 4..from + 8]));
                }
                if let Some(grid) = dst.epilogue.grid {
                    (lo, hi) = (fake_quantize(lo, grid), fake_quantize(hi, grid));
                }
                store_f32(&mut dst.out[at..at + 4], lo);
                store_f32(&mut dst.out[at + 4..at + 8], hi);
            }
        }
    }
}

/// The tile kernel's integer sums with 256-bit lanes where the CPU has AVX2 (chosen at run
/// time): one panel row of 8 outputs × 2 inputs is one vector, so each `vpmaddwd` does the
/// work of two SSE2 ones. Lane for lane the same arithmetic as the 128-bit kernel, so the
/// results are identical.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;

    use super::{PANEL, Tile};

    /// Whether this CPU has AVX2 (the standard library caches the answer).
    #[inline(always)]
    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("avx2")
    }

    /// [`super::lanes::segment_sums`] on 256-bit lanes.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn segment_sums<const P: usize>(
        tile: &Tile,
        rows: &[i16],
        init: [__m128; 2],
    ) -> [[__m128; 2]; P] {
        let pairs = tile.pairs();
        assert!(rows.len() >= 2 * P * pairs);
        let rows = rows.as_ptr() as *const i32;
        let mut sums = [_mm256_set_m128(init[1], init[0]); P];
        for (s, &(k0, k1)) in tile.segments.iter().enumerate() {
            assert!(k0 <= k1 && k1 <= pairs);
            let mut acc = [_mm256_setzero_si256(); P];
            let panel = tile.panel[k0 * 2 * PANEL..k1 * 2 * PANEL].as_ptr();
            for k in 0..k1 - k0 {
                // SAFETY: as in the 128-bit kernel: 16 i16 per pair of the sliced panel, and
                // `pairs` i32 per row with k1 ≤ pairs (asserted); no load needs alignment.
                let w = unsafe { _mm256_loadu_si256(panel.add(16 * k) as *const __m256i) };
                for (i, a) in acc.iter_mut().enumerate() {
                    let x =
                        _mm256_set1_epi32(unsafe { rows.add(i * pairs + k0 + k).read_unaligned() });
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(x, w));
                }
            }
            // SAFETY: `scale` returns 8 f32.
            let scale = unsafe { _mm256_loadu_ps(tile.scale(s).as_ptr()) };
            for (sum, a) in sums.iter_mut().zip(&acc) {
                *sum = _mm256_add_ps(*sum, _mm256_mul_ps(_mm256_cvtepi32_ps(*a), scale));
            }
        }
        let mut halves = [[_mm_setzero_ps(); 2]; P];
        for (h, v) in halves.iter_mut().zip(sums) {
            *h = [_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v)];
        }
        halves
    }
}

/// Two panels (16 outputs) × up to 6 pixels per pass on x86-64 with AVX2, chosen at run
/// time: each broadcast input pair meets two weight vectors, so a pass issues 12
/// multiply-adds of 16 MACs for 2 weight loads and 6 broadcasts (the AVX2 one-panel
/// kernel: 4 for 1 and 4; the 128-bit one: 8 of 8 MACs for 2 and 4). Where the CPU has
/// AVX-512 VNNI (with VL) the
/// multiply and the add are one `vpdpwssd`. The sums are the one-panel kernels' lane for
/// lane (the same integer products, the same float order), so results are identical.
#[cfg(target_arch = "x86_64")]
pub(crate) mod wide {
    use core::arch::x86_64::*;

    use super::lanes::{F, bias_and_init, check, finish};
    use super::{Dst, PANEL, Tile};
    use crate::compress::ActivationParams;

    /// Whether this CPU runs the wide kernel (AVX2; the standard library caches it).
    #[inline(always)]
    pub(super) fn available() -> bool {
        super::avx2::available() && !forced(Choice::Narrow)
    }

    /// Whether the wide kernels use AVX-512 VNNI's fused multiply-add of i16 pairs.
    #[inline(always)]
    pub(super) fn vnni() -> bool {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512vl")
            && !forced(Choice::NoVnni)
    }

    /// Kernels a test can hold back on its thread, to compare the others with them.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    #[cfg_attr(not(test), allow(dead_code))] // outside tests every kernel runs
    pub(crate) enum Choice {
        /// Every kernel the CPU has (the default).
        Best,
        NoVnni,
        Narrow,
    }

    #[cfg(test)]
    thread_local! {
        pub(crate) static CHOICE: std::cell::Cell<Choice> = const { std::cell::Cell::new(Choice::Best) };
    }

    /// `f` run with `choice` on this thread (back to the default after, panic or not).
    #[cfg(test)]
    pub(crate) fn with_choice<T>(choice: Choice, f: impl FnOnce() -> T) -> T {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                CHOICE.with(|c| c.set(Choice::Best));
            }
        }
        CHOICE.with(|c| c.set(choice));
        let _reset = Reset;
        f()
    }

    /// The kernel choices this CPU can compare with the 128-bit kernels.
    #[cfg(test)]
    pub(crate) fn wide_choices() -> Vec<Choice> {
        let mut choices = vec![Choice::NoVnni];
        if vnni() {
            choices.push(Choice::Best);
        }
        choices
    }

    #[inline(always)]
    fn forced(choice: Choice) -> bool {
        #[cfg(test)]
        return CHOICE.with(|c| c.get() == choice);
        #[cfg(not(test))]
        {
            let _ = choice;
            false
        }
    }

    #[inline(always)]
    pub(super) fn run<const P: usize>(tile: &Tile, rows: &[i16], dst: Dst) {
        check::<P>(tile, rows);
        assert!(tile.panels == 2 && available());
        let (bias, init) = bias_and_init::<4>(tile, &dst);
        let sums = if vnni() {
            // SAFETY: the CPU has AVX-512 VNNI and VL (just checked); rows, panels and
            // segments as checked above.
            unsafe { quads_vnni::<P>(tile, rows, init) }
        } else {
            // SAFETY: the CPU has AVX2 (asserted); the rest as checked above.
            unsafe { quads_avx2::<P>(tile, rows, init) }
        };
        finish(tile, sums, bias, dst);
    }

    /// A wide tile whose outputs go quantized to `grid` straight into the next layer's
    /// centred i16 input: row `i` to `out[starts[i]..][..16]` (`None`: a pixel no one
    /// reads). ReLU6 where the tile says, then `clamp(round(y / scale))` as
    /// [`ActivationParams::centred`] computes it, on 8 lanes at a time: the same values as
    /// [`run`] followed by [`super::centre`], without the float tile in between.
    #[inline(always)]
    pub(super) fn run_centred<const P: usize>(
        tile: &Tile,
        rows: &[i16],
        grid: &ActivationParams,
        out: &mut [i16],
        starts: &[Option<usize>],
    ) {
        check::<P>(tile, rows);
        assert!(tile.panels == 2 && available() && starts.len() >= P);
        if vnni() {
            // SAFETY: the CPU has AVX-512 VNNI and VL (just checked); rows, panels and
            // segments as checked above.
            unsafe { centred_vnni::<P>(tile, rows, grid, out, starts) }
        } else {
            // SAFETY: the CPU has AVX2 (asserted); the rest as checked above.
            unsafe { centred_avx2::<P>(tile, rows, grid, out, starts) }
        }
    }

    /// The wide kernels for one instruction set: the sums, the tile as floats, and the
    /// tile quantized for the next layer. `$dot(acc, x, w)` = acc + pairwise products of
    /// the i16 lanes of `x` and `w`.
    macro_rules! wide_kernels {
        ($sums:ident, $floats:ident, $centred:ident, $features:literal, |$acc:ident, $x:ident, $w:ident| $dot:expr) => {
            /// `init` + Σ over the segments of (integer sums × scales), 16 outputs as two
            /// vectors of 8, for `P` rows.
            ///
            /// # Safety
            /// The CPU has the features named; [`check`] holds for `P`, and the tile has
            /// two panels.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn $sums<const P: usize>(
                tile: &Tile,
                rows: &[i16],
                init: [__m256; 2],
            ) -> [[__m256; 2]; P] {
                let pairs = tile.pairs();
                let rows = rows.as_ptr() as *const i32;
                let mut sums = [init; P];
                for (s, &(k0, k1)) in tile.segments.iter().enumerate() {
                    let mut acc = [[_mm256_setzero_si256(); 2]; P];
                    let a = tile.panel[k0 * 2 * PANEL..k1 * 2 * PANEL].as_ptr();
                    let second = pairs * 2 * PANEL;
                    let b = tile.panel[second + k0 * 2 * PANEL..second + k1 * 2 * PANEL].as_ptr();
                    for k in 0..k1 - k0 {
                        // SAFETY: 16 i16 per pair of each sliced panel, and `pairs` i32 per
                        // row with k1 ≤ pairs and P rows (checked by the caller); no load
                        // needs alignment.
                        let (wa, wb) = unsafe {
                            (
                                _mm256_loadu_si256(a.add(16 * k) as *const __m256i),
                                _mm256_loadu_si256(b.add(16 * k) as *const __m256i),
                            )
                        };
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let $x = _mm256_set1_epi32(unsafe {
                                rows.add(i * pairs + k0 + k).read_unaligned()
                            });
                            acc[0] = {
                                let ($acc, $w) = (acc[0], wa);
                                $dot
                            };
                            acc[1] = {
                                let ($acc, $w) = (acc[1], wb);
                                $dot
                            };
                        }
                    }
                    let scale = tile.scale(s);
                    // SAFETY: `scale` returns 16 f32 for two panels.
                    let (sa, sb) = unsafe {
                        (
                            _mm256_loadu_ps(scale.as_ptr()),
                            _mm256_loadu_ps(scale[8..].as_ptr()),
                        )
                    };
                    for (sum, acc) in sums.iter_mut().zip(&acc) {
                        sum[0] =
                            _mm256_add_ps(sum[0], _mm256_mul_ps(_mm256_cvtepi32_ps(acc[0]), sa));
                        sum[1] =
                            _mm256_add_ps(sum[1], _mm256_mul_ps(_mm256_cvtepi32_ps(acc[1]), sb));
                    }
                }
                sums
            }

            /// The wide sums as the 128-bit quads [`finish`] takes.
            ///
            /// # Safety
            /// As for the wide sums.
            #[target_feature(enable = $features)]
            unsafe fn $floats<const P: usize>(
                tile: &Tile,
                rows: &[i16],
                init: [F; 4],
            ) -> [[F; 4]; P] {
                let init = [
                    _mm256_set_m128(init[1], init[0]),
                    _mm256_set_m128(init[3], init[2]),
                ];
                // SAFETY: the caller's contract.
                let sums = unsafe { $sums::<P>(tile, rows, init) };
                let mut quads = [[_mm_setzero_ps(); 4]; P];
                for (q, [a, b]) in quads.iter_mut().zip(sums) {
                    *q = [
                        _mm256_castps256_ps128(a),
                        _mm256_extractf128_ps::<1>(a),
                        _mm256_castps256_ps128(b),
                        _mm256_extractf128_ps::<1>(b),
                    ];
                }
                quads
            }

            /// See [`run_centred`].
            ///
            /// # Safety
            /// As for the wide sums, and `starts` holds at least `P` entries.
            #[target_feature(enable = $features)]
            unsafe fn $centred<const P: usize>(
                tile: &Tile,
                rows: &[i16],
                grid: &ActivationParams,
                out: &mut [i16],
                starts: &[Option<usize>],
            ) {
                let bias = &tile.bias[..2 * PANEL];
                // SAFETY: 16 bias values (just sliced); no load needs alignment.
                let init = unsafe {
                    [
                        _mm256_loadu_ps(bias.as_ptr()),
                        _mm256_loadu_ps(bias[PANEL..].as_ptr()),
                    ]
                };
                // SAFETY: the caller's contract.
                let sums = unsafe { $sums::<P>(tile, rows, init) };
                let grid = Grid8::new(grid);
                for (sum, start) in sums.into_iter().zip(starts) {
                    let Some(start) = *start else { continue };
                    let mut ints = [_mm256_setzero_si256(); 2];
                    for (int, v) in ints.iter_mut().zip(sum) {
                        *int = grid.centred(relu6_if(v, tile.relu6));
                    }
                    let [a, b] = ints;
                    // Packing works within 128-bit halves: a0–3 b0–3 a4–7 b4–7 → a0–7 b0–7.
                    let packed =
                        _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, b));
                    let dst = &mut out[start..start + 2 * PANEL];
                    // SAFETY: `dst` holds 16 i16 (just sliced); no store needs alignment.
                    unsafe { _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, packed) };
                }
            }
        };
    }

    /// An activation grid on 8 lanes.
    pub(super) struct Grid8 {
        lo: __m256,
        hi: __m256,
        scale: __m256,
    }

    const MAGIC: f32 = 12_582_912.0;

    impl Grid8 {
        #[inline]
        #[target_feature(enable = "avx2")]
        pub(super) fn new(grid: &ActivationParams) -> Self {
            Self {
                lo: _mm256_set1_ps((grid.qmin - grid.zero_point) as f32),
                hi: _mm256_set1_ps((grid.qmax - grid.zero_point) as f32),
                scale: _mm256_set1_ps(grid.scale),
            }
        }

        /// [`ActivationParams::centred`] on 8 lanes, as i32 (the 128-bit
        /// `lanes::centred_i16`'s arithmetic: divide, NaN → 0, clamp, round half to even
        /// by adding 1.5·2²³).
        #[inline]
        #[target_feature(enable = "avx2")]
        pub(super) fn centred(&self, v: __m256) -> __m256i {
            let v = _mm256_div_ps(v, self.scale);
            let v = _mm256_and_ps(v, _mm256_cmp_ps::<_CMP_EQ_OQ>(v, v));
            let v = _mm256_min_ps(_mm256_max_ps(v, self.lo), self.hi);
            _mm256_sub_epi32(
                _mm256_castps_si256(_mm256_add_ps(v, _mm256_set1_ps(MAGIC))),
                _mm256_set1_epi32(MAGIC.to_bits() as i32),
            )
        }
    }

    /// ReLU6 (`min(max(v, 0), 6)`, as the 128-bit kernels clamp) where `relu6`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn relu6_if(v: __m256, relu6: bool) -> __m256 {
        if relu6 {
            _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), _mm256_set1_ps(6.0))
        } else {
            v
        }
    }

    wide_kernels!(
        wide_sums_avx2,
        quads_avx2,
        centred_avx2,
        "avx2",
        |acc, x, w| _mm256_add_epi32(acc, _mm256_madd_epi16(x, w))
    );
    wide_kernels!(
        wide_sums_vnni,
        quads_vnni,
        centred_vnni,
        "avx2,avx512f,avx512vl,avx512vnni",
        |acc, x, w| _mm256_dpwssd_epi32(acc, x, w)
    );
}

/// The same tile in portable Rust (other native targets).
#[cfg(not(any(target_arch = "wasm32", target_arch = "x86_64")))]
mod lanes {
    use super::{Dst, PANEL, Tile};

    pub(super) fn run<const P: usize>(tile: &Tile, rows: &[i16], mut dst: Dst) {
        let pairs = tile.pairs();
        for i in 0..P {
            let values: [f32; PANEL] = std::array::from_fn(|j| {
                let mut y = if dst.row_scales.is_some() {
                    0.0
                } else {
                    tile.bias[j]
                };
                for (s, &(k0, k1)) in tile.segments.iter().enumerate() {
                    let dot: i32 = (k0..k1)
                        .map(|k| {
                            let x = &rows[(i * pairs + k) * 2..];
                            let w = &tile.panel[(k * PANEL + j) * 2..];
                            x[0] as i32 * w[0] as i32 + x[1] as i32 * w[1] as i32
                        })
                        .sum();
                    y += dot as f32 * tile.scale(s)[j];
                }
                if let Some(row_scales) = dst.row_scales {
                    y = y * row_scales[i] + tile.bias[j];
                }
                if tile.relu6 { y.clamp(0.0, 6.0) } else { y }
            });
            let width = dst.width;
            dst.write_from(i, 0, &values[..width]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantScheme;

    /// The integer kernel equals float arithmetic on the fake-quantized operands, for every
    /// granularity, full and partial panels, odd input counts and pixel tails, with and
    /// without ReLU6, a residual and the next layer's grid.
    #[test]
    fn matches_fake_quant_reference_for_every_granularity() {
        let act = ActivationParams {
            scale: 0.05,
            zero_point: -100,
            qmin: -128,
            qmax: 127,
        };
        let next = ActivationParams {
            scale: 0.1,
            zero_point: 3,
            qmin: -128,
            qmax: 127,
        };
        for (cin, cout, pixels) in [(20, 7, 5), (33, 16, 6), (16, 24, 9)] {
            let w: Vec<f32> = (0..cin * cout)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0 * if i % 9 == 0 { 3.0 } else { 1.0 })
                .collect();
            let x: Vec<f32> = (0..pixels * cin)
                .map(|i| ((i * 53 % 97) as f32) / 15.0 - 1.0)
                .collect();
            let bias: Vec<f32> = (0..cout).map(|o| o as f32 * 0.1 - 0.3).collect();
            let residual: Vec<f32> = (0..pixels * cout).map(|i| (i % 11) as f32 * 0.2).collect();
            for (granularity, symmetric) in [
                (Granularity::PerTensor, true),
                (Granularity::PerChannel, true),
                (Granularity::PerChannel, false),
                (Granularity::PerBlock(8), false),
                (Granularity::PerBlock(16), true),
            ] {
                let scheme = QuantScheme {
                    bits: 8,
                    symmetric,
                    granularity,
                };
                let q = QuantizedTensor::quantize(&w, &[cout, cin], scheme);
                let wd = q.dequantize();
                let kernel = Int8Pointwise::new(&q, &act, cin, cout).unwrap().unwrap();
                for fused in [false, true] {
                    let epilogue = FusedEpilogue {
                        relu6: fused,
                        residual: fused.then_some(&residual[..]),
                        grid: fused.then_some(&next),
                    };
                    let got = kernel.forward(&x, pixels, &bias, epilogue);
                    for p in 0..pixels {
                        for o in 0..cout {
                            let mut want: f32 = bias[o]
                                + (0..cin)
                                    .map(|k| act.fake_quantize(x[p * cin + k]) * wd[o * cin + k])
                                    .sum::<f32>();
                            if fused {
                                want = next
                                    .fake_quantize(want.clamp(0.0, 6.0) + residual[p * cout + o]);
                            }
                            let g = got[p * cout + o];
                            // Fused: on the next grid, and at most one step away (a sum
                            // that differs in its last bits may round the other way).
                            let ok = if fused {
                                let steps = g / next.scale;
                                (g - want).abs() <= next.scale * 1.001
                                    && (steps - steps.round()).abs() < 1e-3
                            } else {
                                (g - want).abs() < 1e-4 * (1.0 + want.abs())
                            };
                            assert!(
                                ok,
                                "{cin}→{cout} {granularity:?} fused {fused}: {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn odd_blocks_fall_back_to_float() {
        let q = QuantizedTensor::quantize(
            &[0.5; 24],
            &[2, 12],
            QuantScheme {
                bits: 8,
                symmetric: true,
                granularity: Granularity::PerBlock(6),
            },
        );
        let act = ActivationParams {
            scale: 1.0,
            zero_point: 0,
            qmin: -127,
            qmax: 127,
        };
        assert!(Int8Pointwise::new(&q, &act, 12, 2).unwrap().is_none());
    }

    /// The AVX2 one-panel sums are the 128-bit kernel's (SSE2), bit for bit: per-block
    /// segments, a tile of 4 pixels (each row's code is the same), extreme centred values,
    /// from a bias or from zero. With the wide kernels' test against the one-panel kernels
    /// this ties every x86 kernel to the 128-bit one that wasm runs too.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_sums_match_the_128_bit_kernel_bit_for_bit() {
        assert!(avx2::available(), "this test needs an x86-64 CPU with AVX2");
        let mut seed = 11u32;
        let mut next = move |range: i32| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as i32 % (2 * range + 1) - range
        };
        let pairs = 16;
        let panel: Vec<i16> = (0..2 * PANEL * pairs).map(|_| next(255) as i16).collect();
        let rows: Vec<i16> = (0..2 * 4 * pairs).map(|_| next(255) as i16).collect();
        let segments = [(0, 5), (5, 13), (13, 16)];
        let scales: Vec<f32> = (0..3 * PANEL).map(|_| next(1000) as f32 * 1e-5).collect();
        let bias: Vec<f32> = (0..PANEL).map(|_| next(100) as f32 * 0.01).collect();
        let tile = Tile {
            panel: &panel,
            panels: 1,
            segments: &segments,
            scales: &scales,
            scale_stride: PANEL,
            o0: 0,
            bias: &bias,
            relu6: false,
        };
        let lanes =
            |v: [[lanes::F; 2]; 4]| v.map(|[a, b]| (lanes::to_array(a), lanes::to_array(b)));
        for init in [
            [lanes::load_f32(&bias[..4]), lanes::load_f32(&bias[4..])],
            [lanes::fsplat(0.0); 2],
        ] {
            let sse2 = lanes::segment_sums::<4>(&tile, &rows, init);
            // SAFETY: AVX2 is available (asserted above).
            let wide = unsafe { avx2::segment_sums::<4>(&tile, &rows, init) };
            let (sse2, wide) = (lanes(sse2), lanes(wide));
            for (a, b) in sse2.iter().zip(&wide) {
                for (x, y) in a.0.iter().chain(&a.1).zip(b.0.iter().chain(&b.1)) {
                    assert_eq!(x.to_bits(), y.to_bits(), "{x} vs {y}");
                }
            }
            assert!(sse2.iter().any(|(a, _)| a[0] != 0.0));
        }
    }
}
