//! int4 weight-only layers for the CPU path. The weights stay packed two per byte (one scale
//! and, when asymmetric, one zero point per group), so a running int4 layer holds 1/6–1/8 of
//! its f32 weight memory.
//!
//! A 1×1 convolution or a matrix product computes from the packed bytes with integer dot
//! products, on the int8 kernel's tiles: the bytes lie in its panel order (eight output
//! channels × two inputs per 8 bytes), and each panel is expanded to centred i16 once per
//! chunk of pixels into a scratch panel (two side by side for the wide x86 kernel; no
//! unpacked copy of the layer's weights exists). Each pixel's inputs are rounded to 16 bits on a grid of its own (its
//! largest |x| ↦ 32 767 at most), so the only rounding beyond the weights' is 2⁻¹⁶ of the
//! pixel's range; the sums are exact in i32 (the grid is narrowed where a long row could
//! overflow). `y = s_pixel · Σ_groups s_w · Σ_k q_in · (q_w − zp_w) + bias`.
//!
//! A depthwise or k×k layer, and blocks that split an input pair (odd block lengths), unpack
//! to float instead: a depthwise layer its few thousand weights for one run, a GEMM a tile of
//! output channels at a time.

use crate::int8_cpu::{
    Dst, FusedEpilogue, Tile, WIDE_PIXELS, chunk_step, run_tile, wide_available,
};
use crate::quant::{Granularity, QuantizedTensor, layout, pack_int4};

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

/// Unpacked weights per tile of the float path: 256 KiB of floats, enough output channels
/// that the GEMM still sees long rows, few enough that the tile stays in L2.
const TILE_ELEMENTS: usize = 1 << 16;
/// Output channels per panel of the integer path (as the int8 kernel's).
const PANEL: usize = 8;
/// Pixels sharing one pass over a panel (over two panels on the wide x86 kernel:
/// `WIDE_PIXELS`).
const PIXELS: usize = 4;
/// Bytes of 16-bit input rows run against each panel before the next chunk: a panel is
/// expanded once per chunk, and the rows stay in L2.
const ROWS_BYTES: usize = 64 * 1024;
/// The finest 16-bit input grid: a pixel's largest |x| becomes ±32 767.
const INPUT_LEVELS: i32 = i16::MAX as i32;
/// The coarsest input grid worth an integer product; longer rows run as float.
const MIN_INPUT_LEVELS: i32 = 1023;

/// One layer's packed int4 weights `[cout, cin]` (a depthwise layer: `[channels, k·k]`).
pub(crate) struct Int4Weights {
    cin: usize,
    cout: usize,
    packing: Packing,
}

enum Packing {
    /// Row-major, unpacked to float as the layer runs.
    Rows(Rows),
    /// Panels for the integer kernel.
    Panels(Panels),
}

/// The weights row-major with the grid's own groups.
struct Rows {
    /// `[cout, cin]` two per byte, first value in the low nibble.
    packed: Vec<u8>,
    scales: Vec<f32>,
    /// One per group; empty when every zero point is 0 (symmetric quantization).
    zero_points: Vec<i8>,
    /// The quantization grid's layout: rows of `row_len` values, each split into groups of
    /// `group_len` (per-tensor: one row of everything).
    group_len: usize,
    row_len: usize,
    groups_per_row: usize,
}

/// The weights in the integer kernel's layout, with the scale and zero point of each
/// output in each input segment.
struct Panels {
    /// Input pairs per output: `cin` rounded up to 2, halved.
    pairs: usize,
    /// `[cout / 8][pairs][8 outputs]` bytes (the last panel as wide as the outputs it has):
    /// inputs 2k (low nibble) and 2k + 1 (high) of one output.
    nibbles: Vec<u8>,
    /// Input-pair ranges sharing one weight scale (one range unless per block).
    segments: Vec<(usize, usize)>,
    /// `[segments][cout]` weight scales.
    scales: Vec<f32>,
    /// `[segments][cout]` zero points; empty when symmetric.
    zero_points: Vec<i8>,
    /// The 16-bit input grid's largest level: 32 767 unless a long row needs fewer to keep
    /// its sums inside i32.
    input_levels: i32,
}

impl Int4Weights {
    /// A layer that multiplies (1×1, Gemm): on the integer kernel where it can take the
    /// grid. `None` unless `q` holds 4-bit weights of a `[cout, cin]` layer.
    pub(crate) fn new(q: &QuantizedTensor, cin: usize, cout: usize) -> Option<Self> {
        Self::build(q, cin, cout, true)
    }

    /// A layer that unpacks all its weights each run (depthwise, k×k): row-major, which
    /// unpacks whole bytes at a time.
    pub(crate) fn unpacked_per_run(q: &QuantizedTensor, cin: usize, cout: usize) -> Option<Self> {
        Self::build(q, cin, cout, false)
    }

    fn build(q: &QuantizedTensor, cin: usize, cout: usize, integer: bool) -> Option<Self> {
        let n = cin.checked_mul(cout)?;
        if q.scheme.bits != 4 || q.values.len() != n || n == 0 {
            return None;
        }
        let (group_len, row_len) = layout(&q.shape, q.scheme.granularity);
        let groups_per_row = row_len.div_ceil(group_len);
        let rows = n / row_len;
        if !n.is_multiple_of(row_len)
            || q.scales.len() != rows * groups_per_row
            || q.zero_points.len() != q.scales.len()
        {
            return None;
        }
        let packing = match integer.then(|| Panels::new(q, cin, cout)).flatten() {
            Some(panels) => Packing::Panels(panels),
            None => Packing::Rows(Rows {
                packed: pack_int4(&q.values),
                scales: q.scales.clone(),
                zero_points: if q.zero_points.iter().all(|&z| z == 0) {
                    Vec::new()
                } else {
                    q.zero_points.clone()
                },
                group_len,
                row_len,
                groups_per_row,
            }),
        };
        Some(Self { cin, cout, packing })
    }

    /// Whether products run on the integer kernel (else float on unpacked tiles).
    #[cfg(test)]
    fn is_integer(&self) -> bool {
        matches!(self.packing, Packing::Panels(_))
    }

    /// Bytes this layer's weights hold while it runs.
    pub(crate) fn weight_bytes(&self) -> usize {
        match &self.packing {
            Packing::Rows(r) => r.packed.len() + 4 * r.scales.len() + r.zero_points.len(),
            Packing::Panels(p) => p.nibbles.len() + 4 * p.scales.len() + p.zero_points.len(),
        }
    }

    /// All the weights as floats `[cout, cin]`, for one run (a depthwise or k×k layer, or a
    /// strided 1×1 one).
    pub(crate) fn unpack_all(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.cout * self.cin];
        match &self.packing {
            Packing::Rows(r) => r.unpack(self.cin * self.cout, &mut out),
            Packing::Panels(p) => {
                // Output by output, segment by segment: one scale and zero point per run.
                for (o, row) in out.chunks_exact_mut(self.cin).enumerate() {
                    for (s, &(k0, k1)) in p.segments.iter().enumerate() {
                        let at = s * self.cout + o;
                        let (scale, zp) = (
                            p.scales[at],
                            p.zero_points.get(at).map_or(0, |&z| i32::from(z)),
                        );
                        for (k, v) in row.iter_mut().enumerate().take(2 * k1).skip(2 * k0) {
                            let byte = p.nibbles[nibble_index(p.pairs, self.cout, o, k)];
                            let nibble = if k % 2 == 0 { byte << 4 } else { byte & 0xf0 };
                            *v = ((nibble as i8 >> 4) as i32 - zp) as f32 * scale;
                        }
                    }
                }
            }
        }
        out
    }

    /// `bias + input[pixels, cin] · Wᵀ`, `[pixels, cout]`.
    pub(crate) fn product(&self, input: &[f32], pixels: usize, bias: &[f32]) -> Vec<f32> {
        assert_eq!(input.len(), pixels * self.cin);
        assert_eq!(bias.len(), self.cout);
        match &self.packing {
            Packing::Panels(p) => p.product(input, pixels, self.cin, bias),
            Packing::Rows(r) => r.product(input, pixels, self.cin, bias),
        }
    }
}

impl Rows {
    /// The scale and zero point of weight `idx` (row-major `[cout, cin]`).
    fn group(&self, idx: usize) -> (f32, i32) {
        let (row, within) = (idx / self.row_len, idx % self.row_len);
        let g = row * self.groups_per_row + within / self.group_len;
        (
            self.scales[g],
            self.zero_points.get(g).map_or(0, |&z| i32::from(z)),
        )
    }

    /// Weights `start..end` (row-major) as floats, into `out`.
    fn unpack_range(&self, start: usize, end: usize, out: &mut [f32]) {
        let packed = &self.packed;
        let mut i = start;
        while i < end {
            // The run of weights from `i` that shares one group (one scale, one zero point).
            let (row, within) = (i / self.row_len, i % self.row_len);
            let group_end = (within / self.group_len + 1) * self.group_len;
            let run_end = (row * self.row_len + group_end.min(self.row_len)).min(end);
            let (scale, zp) = self.group(i);
            // Signed nibbles: the low one sign-extended from bit 3, the high one by an
            // arithmetic shift. Arithmetic rather than a table lookup so that the loop over
            // whole bytes vectorises.
            let low = |byte: u8| (((byte << 4) as i8 >> 4) as i32 - zp) as f32 * scale;
            let high = |byte: u8| (((byte as i8) >> 4) as i32 - zp) as f32 * scale;
            let run = &mut out[i - start..run_end - start];
            // An odd first index takes a high nibble alone; then whole bytes, two weights
            // each; then an odd last weight (a low nibble).
            let lead = i % 2;
            if lead == 1 {
                run[0] = high(packed[i / 2]);
            }
            let bytes = (run.len() - lead) / 2;
            let first_byte = (i + lead) / 2;
            for (pair, &byte) in run[lead..lead + 2 * bytes]
                .chunks_exact_mut(2)
                .zip(&packed[first_byte..first_byte + bytes])
            {
                pair[0] = low(byte);
                pair[1] = high(byte);
            }
            if lead + 2 * bytes < run.len() {
                run[run.len() - 1] = low(packed[(run_end - 1) / 2]);
            }
            i = run_end;
        }
    }

    /// All the weights as floats.
    fn unpack(&self, n: usize, out: &mut [f32]) {
        self.unpack_range(0, n, out);
    }

    /// `bias + input · Wᵀ` on float tiles: a tile of output channels unpacked at a time,
    /// then one GEMM.
    fn product(&self, input: &[f32], pixels: usize, cin: usize, bias: &[f32]) -> Vec<f32> {
        let cout = bias.len();
        let mut out: Vec<f32> = bias.iter().copied().cycle().take(pixels * cout).collect();
        let tile_rows = (TILE_ELEMENTS / cin.max(1)).clamp(1, cout);
        let mut tile = vec![0f32; tile_rows * cin];
        for first in (0..cout).step_by(tile_rows) {
            let last = (first + tile_rows).min(cout);
            let weights = &mut tile[..(last - first) * cin];
            self.unpack_range(first * cin, last * cin, weights);
            gemm_accumulate(&mut out[first..], cout, input, weights, pixels, cin);
        }
        out
    }
}

impl Panels {
    /// `None` where the integer kernel cannot take `q`: a block that splits an input pair,
    /// or rows so long that the 16-bit input grid would have to be coarse.
    fn new(q: &QuantizedTensor, cin: usize, cout: usize) -> Option<Self> {
        let pairs = cin.div_ceil(2);
        let segments: Vec<(usize, usize)> = match q.scheme.granularity {
            Granularity::PerTensor | Granularity::PerChannel => vec![(0, pairs)],
            Granularity::PerBlock(b) if b.is_multiple_of(2) && b > 0 => (0..cin)
                .step_by(b)
                .map(|s| (s / 2, (s + b).min(cin).div_ceil(2)))
                .collect(),
            Granularity::PerBlock(_) => return None,
        };
        // |q − zp| ≤ 15 bounds every product; the sum of 2·pairs of them must fit in i32.
        let largest_weight = q
            .group_ranges()
            .iter()
            .zip(&q.zero_points)
            .flat_map(|(range, &zp)| {
                q.values[range.clone()]
                    .iter()
                    .map(move |&v| (i32::from(v) - i32::from(zp)).abs())
            })
            .max()?
            .max(1);
        let inputs = i32::try_from(2 * pairs).ok()?;
        let input_levels = (i32::MAX / inputs / largest_weight).min(INPUT_LEVELS);
        if input_levels < MIN_INPUT_LEVELS {
            return None;
        }
        let mut nibbles = vec![0u8; cout.checked_mul(pairs)?];
        let mut scales = vec![0f32; cout * segments.len()];
        let symmetric = q.zero_points.iter().all(|&z| z == 0);
        let mut zero_points = vec![0i8; if symmetric { 0 } else { cout * segments.len() }];
        for (g, range) in q.group_ranges().iter().enumerate() {
            for idx in range.clone() {
                let (o, k) = (idx / cin, idx % cin);
                let nibble = (q.values[idx] as u8) & 0x0f;
                nibbles[nibble_index(pairs, cout, o, k)] |=
                    if k % 2 == 0 { nibble } else { nibble << 4 };
            }
            let (o, k0) = (range.start / cin, range.start % cin);
            let mut set = |segment_and_output: std::ops::Range<usize>| {
                for at in segment_and_output {
                    scales[at] = q.scales[g];
                    if let Some(z) = zero_points.get_mut(at) {
                        *z = q.zero_points[g];
                    }
                }
            };
            match q.scheme.granularity {
                Granularity::PerTensor => set(0..cout),
                Granularity::PerChannel => set(o..o + 1),
                Granularity::PerBlock(b) => set((k0 / b) * cout + o..(k0 / b) * cout + o + 1),
            }
        }
        Some(Self {
            pairs,
            nibbles,
            segments,
            scales,
            zero_points,
            input_levels,
        })
    }

    /// `bias + input[pixels, cin] · Wᵀ`: each pixel's inputs rounded to 16 bits on its own
    /// grid, then integer products panel by panel (a panel's nibbles expanded once per chunk
    /// of pixels, into a scratch panel of the int8 kernel's layout).
    fn product(&self, input: &[f32], pixels: usize, cin: usize, bias: &[f32]) -> Vec<f32> {
        let cout = bias.len();
        let row = 2 * self.pairs;
        let mut rows = vec![0i16; pixels * row];
        let mut row_scales = vec![0f32; pixels];
        let levels = self.input_levels as f32;
        for ((x, q), s) in input
            .chunks_exact(cin.max(1))
            .zip(rows.chunks_exact_mut(row))
            .zip(&mut row_scales)
        {
            let largest = max_abs(x);
            if largest > 0.0 && largest.is_finite() {
                round_row(x, &mut q[..cin], levels / largest, levels);
                *s = largest / levels;
            } else if !largest.is_finite() {
                // An infinite input: the products are not finite either.
                *s = f32::NAN;
            }
        }
        let padded = cout.div_ceil(PANEL) * PANEL;
        let mut bias_padded = bias.to_vec();
        bias_padded.resize(padded, 0.0);
        // Two panels where the wide x86 kernel runs (see `int8_cpu`), else one.
        let wide = wide_available();
        let panel_len = 2 * PANEL * self.pairs;
        let mut weights = vec![0i16; panel_len * if wide { 2 } else { 1 }];
        // A tile reads 8 scales per panel from its first output: the last one, when narrower, reads
        // past the end of the layer's.
        let with_slack;
        let scales = if cout.is_multiple_of(PANEL) {
            &self.scales
        } else {
            with_slack = [&self.scales[..], &[0.0; PANEL]].concat();
            &with_slack
        };
        let mut out = vec![0f32; pixels * cout];
        let step = chunk_step(wide);
        let chunk = (ROWS_BYTES / (2 * row).max(1)).max(step) / step * step;
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
                for (i, panel) in weights.chunks_exact_mut(panel_len).take(panels).enumerate() {
                    self.unpack_panel(o0 + i * PANEL, cout, panel);
                }
                let tile = Tile {
                    panel: &weights[..panels * panel_len],
                    panels,
                    segments: &self.segments,
                    scales,
                    scale_stride: cout,
                    o0,
                    bias: &bias_padded[o0..o1],
                    relu6: false,
                };
                let height = if panels == 2 { WIDE_PIXELS } else { PIXELS };
                let mut p = p0;
                while p < p1 {
                    let n = (p1 - p).min(height);
                    let at = p * cout + o0;
                    let dst = Dst {
                        out: &mut out[at..],
                        at,
                        stride: cout,
                        width: (panels * PANEL).min(cout - o0),
                        epilogue: FusedEpilogue::default(),
                        row_scales: Some(&row_scales[p..p + n]),
                    };
                    run_tile(n, &tile, &rows[p * row..], dst);
                    p += n;
                }
                o0 = o1;
            }
        }
        out
    }

    /// Panel `o0`'s weights as centred i16 pairs `[pairs][8][2]` (the int8 kernel's panel;
    /// the lanes past the last output 0).
    fn unpack_panel(&self, o0: usize, cout: usize, weights: &mut [i16]) {
        let width = PANEL.min(cout - o0);
        let nibbles = &self.nibbles[o0 * self.pairs..(o0 + width) * self.pairs];
        assert_eq!(weights.len(), 2 * PANEL * self.pairs);
        if width < PANEL {
            weights.fill(0);
        }
        for (s, &(k0, k1)) in self.segments.iter().enumerate() {
            let zero_point = |j: usize| {
                self.zero_points
                    .get(s * cout + o0 + j)
                    .map_or(0, |&z| i16::from(z))
            };
            if width < PANEL {
                // The last panel, narrower than 8: its bytes are `[pairs][width]`.
                for k in k0..k1 {
                    for (j, &byte) in nibbles[k * width..(k + 1) * width].iter().enumerate() {
                        let at = 2 * (k * PANEL + j);
                        weights[at] = i16::from((byte << 4) as i8 >> 4) - zero_point(j);
                        weights[at + 1] = i16::from(byte as i8 >> 4) - zero_point(j);
                    }
                }
                continue;
            }
            // The zero points in the weight vectors' lane order: outputs 0–3 twice each,
            // then 4–7.
            let zero_points: [i16; 2 * PANEL] = std::array::from_fn(|lane| zero_point(lane / 2));
            let (from, to) = (
                &nibbles[k0 * PANEL..k1 * PANEL],
                &mut weights[2 * k0 * PANEL..2 * k1 * PANEL],
            );
            unpack_pairs(from, to, &zero_points);
        }
    }
}

/// Where weight (`o`, `k`) of a `[cout, 2·pairs]` layer lies in the panel bytes: panels of 8
/// outputs `[pairs][8]`, the last one `[pairs][width]` (no padding), two inputs per byte.
fn nibble_index(pairs: usize, cout: usize, o: usize, k: usize) -> usize {
    let o0 = o / PANEL * PANEL;
    let width = PANEL.min(cout - o0);
    o0 * pairs + k / 2 * width + (o - o0)
}

/// `to` = the nibbles of `from` (8 bytes per input pair of a panel) sign-extended as
/// `[8 outputs][2 inputs]` i16, minus each lane's zero point.
fn unpack_pairs(from: &[u8], to: &mut [i16], zero_points: &[i16]) {
    assert!(to.len() == 2 * from.len() && zero_points.len() == 2 * PANEL);
    #[cfg(any(target_arch = "wasm32", target_arch = "x86_64"))]
    {
        use crate::int8_cpu::lanes::{load_i16, nibble_pairs, store_i16, sub_i16};
        // SAFETY: `zero_points` holds 16 i16; each step reads 8 bytes of `from` and writes
        // 16 i16 of `to`, which holds twice as many (asserted).
        unsafe {
            let (z0, z1) = (
                load_i16(zero_points.as_ptr()),
                load_i16(zero_points.as_ptr().add(8)),
            );
            for k in 0..from.len() / PANEL {
                let (w0, w1) = nibble_pairs(from.as_ptr().add(PANEL * k));
                store_i16(to.as_mut_ptr().add(2 * PANEL * k), sub_i16(w0, z0));
                store_i16(to.as_mut_ptr().add(2 * PANEL * k + PANEL), sub_i16(w1, z1));
            }
        }
    }
    #[cfg(not(any(target_arch = "wasm32", target_arch = "x86_64")))]
    for (k, bytes) in from.chunks_exact(PANEL).enumerate() {
        for (j, &byte) in bytes.iter().enumerate() {
            let z = zero_points[2 * j];
            to[2 * (k * PANEL + j)] = i16::from((byte << 4) as i8 >> 4) - z;
            to[2 * (k * PANEL + j) + 1] = i16::from(byte as i8 >> 4) - z;
        }
    }
}

/// `dst[i]` = round(`src[i]` · `factor`) within ±`bound` (NaN → 0), eight at a time with
/// 128-bit lanes where the target has them.
fn round_row(src: &[f32], dst: &mut [i16], factor: f32, bound: f32) {
    assert!(dst.len() == src.len());
    #[cfg(any(target_arch = "wasm32", target_arch = "x86_64"))]
    let whole = {
        use crate::int8_cpu::lanes::{fsplat, load_f32, scaled_i16, store_i16};
        let whole = src.len() / 8 * 8;
        let f = fsplat(factor);
        for (s, d) in src[..whole]
            .chunks_exact(8)
            .zip(dst[..whole].chunks_exact_mut(8))
        {
            let v = scaled_i16(load_f32(&s[..4]), load_f32(&s[4..]), f, bound);
            // SAFETY: `d` holds 8 i16 (one exact chunk).
            unsafe { store_i16(d.as_mut_ptr(), v) };
        }
        whole
    };
    #[cfg(not(any(target_arch = "wasm32", target_arch = "x86_64")))]
    let whole = 0;
    for (d, &x) in dst[whole..].iter_mut().zip(&src[whole..]) {
        let v = x * factor;
        *d = if v.is_nan() {
            0
        } else {
            v.clamp(-bound, bound).round_ties_even() as i16
        };
    }
}

#[cfg(any(target_arch = "wasm32", target_arch = "x86_64"))]
use crate::int8_cpu::lanes::max_abs;

#[cfg(not(any(target_arch = "wasm32", target_arch = "x86_64")))]
fn max_abs(s: &[f32]) -> f32 {
    s.iter().fold(0f32, |m, v| m.max(v.abs()))
}

#[cfg(test)]
mod tests {
    use compresslab_spec::recipe::{Granularity, QuantScheme};

    use super::*;

    /// The packed weights give `input · dequantized(W)ᵀ` for every grid: symmetric and not,
    /// per tensor, per channel, per block (even lengths on the integer kernel, odd ones
    /// unpacked to float), odd widths, partial panels, pixel tails, layers of one float tile
    /// and of several. The integer kernel rounds each pixel's inputs to 16 bits, so it may
    /// differ by half a step (the pixel's largest |x| / 32 767) times Σ|w| of the output,
    /// plus float rounding.
    #[test]
    fn packed_products_match_the_dequantized_weights() {
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        // (300 × 260 and 300 × 1000 take several float tiles: later ones start inside a
        // per-tensor group.)
        for (cin, cout) in [(64, 10), (40, 3), (7, 5), (300, 260), (300, 1000)] {
            for granularity in [
                Granularity::PerTensor,
                Granularity::PerChannel,
                Granularity::PerBlock(32),
                Granularity::PerBlock(6),
                Granularity::PerBlock(5),
            ] {
                for symmetric in [true, false] {
                    let scheme = QuantScheme {
                        bits: 4,
                        symmetric,
                        granularity,
                    };
                    let w: Vec<f32> = (0..cin * cout).map(|_| next()).collect();
                    let q = QuantizedTensor::quantize(&w, &[cout, cin], scheme);
                    let dequantized = q.dequantize();
                    let kernel = Int4Weights::new(&q, cin, cout).expect("4-bit weights");
                    let integer = granularity != Granularity::PerBlock(5);
                    assert_eq!(kernel.is_integer(), integer, "{granularity:?}");
                    // Both packings unpack to exactly the dequantized weights.
                    let rows = Int4Weights::unpacked_per_run(&q, cin, cout).expect("4-bit");
                    assert!(!rows.is_integer());
                    assert_eq!(
                        kernel.unpack_all(),
                        dequantized,
                        "{cin}×{cout} {granularity:?}"
                    );
                    assert_eq!(
                        rows.unpack_all(),
                        dequantized,
                        "{cin}×{cout} {granularity:?}"
                    );
                    // Tails of 1–5 rows after whole tiles of 4 or 6.
                    for pixels in [1, 3, 8, 9, 10, 11] {
                        let input: Vec<f32> = (0..pixels * cin).map(|_| next()).collect();
                        let out = kernel.product(&input, pixels, &vec![0.5; cout]);
                        // The wide x86 kernel's two-panel tiles give the one-panel
                        // tiles' results bit for bit.
                        #[cfg(target_arch = "x86_64")]
                        {
                            use crate::int8_cpu::wide::{Choice, wide_choices, with_choice};
                            assert!(
                                crate::int8_cpu::wide_available(),
                                "this test needs an x86-64 CPU with AVX2"
                            );
                            let bits = |choice| {
                                with_choice(choice, || {
                                    kernel.product(&input, pixels, &vec![0.5; cout])
                                })
                                .iter()
                                .map(|v| v.to_bits())
                                .collect::<Vec<_>>()
                            };
                            let narrow = bits(Choice::Narrow);
                            for choice in wide_choices() {
                                assert!(
                                    bits(choice) == narrow,
                                    "{cin}×{cout} {granularity:?} {pixels} rows: {choice:?} differs"
                                );
                            }
                        }
                        for p in 0..pixels {
                            let x = &input[p * cin..(p + 1) * cin];
                            let step = x.iter().fold(0f32, |m, v| m.max(v.abs())) / 32_767.0;
                            for o in 0..cout {
                                let w = &dequantized[o * cin..(o + 1) * cin];
                                let expected =
                                    0.5 + x.iter().zip(w).map(|(x, w)| x * w).sum::<f32>();
                                let rounding = if integer {
                                    0.5 * step * w.iter().map(|w| w.abs()).sum::<f32>()
                                } else {
                                    0.0
                                };
                                let got = out[p * cout + o];
                                assert!(
                                    (got - expected).abs()
                                        <= rounding + 1e-5 * (1.0 + expected.abs()),
                                    "{cin}×{cout} {granularity:?} symmetric {symmetric}, {pixels} rows: {got} vs {expected}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
