//! Integer 1×1 convolution for the CPU path: int8 inputs × int8 weights → int32 sums.
//!
//! Both operands are stored *centred* (q − zero point) as i16, so asymmetric inputs and
//! weights need no correction terms: |q − zp| ≤ 255, products ≤ 65 025, and a sum over up to
//! 32 000 inputs stays inside i32. On wasm the inner loop is `i32x4.dot_i16x8_s` (8 MACs per
//! instruction) on a 2-pixel × 4-output register tile; natively LLVM vectorises the
//! portable loop (`pmaddwd` on x86). Each group of the weights (per-tensor, per-channel or a
//! block of the input channels) has its own scale, applied once per group sum:
//! y = Σ_groups s_in · s_w · Σ_k (q_in − zp_in)(q_w − zp_w) + bias.

use crate::compress::ActivationParams;
use crate::error::{EngineError, Result};
use crate::quant::{Granularity, QuantizedTensor};

/// Output channels processed per pass over the pixels (their weights stay in L1).
const OUTPUT_TILE: usize = 32;

pub(crate) struct Int8Pointwise {
    cin: usize,
    cout: usize,
    /// `cin` rounded up to 8 (one SIMD vector of i16).
    kpad: usize,
    /// `[cout][kpad]`, centred, zero-padded.
    weights: Vec<i16>,
    /// Input-channel segments sharing one weight scale (one segment unless per-block).
    segments: Vec<(usize, usize)>,
    /// `[cout][segments]`: input scale × weight scale.
    scales: Vec<f32>,
    input: ActivationParams,
}

impl Int8Pointwise {
    /// Bytes the layer's weights hold while it runs (centred i16 and the scales).
    pub(crate) fn weight_bytes(&self) -> usize {
        2 * self.weights.len() + 4 * self.scales.len()
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
        let segments: Vec<(usize, usize)> = match q.scheme.granularity {
            Granularity::PerTensor | Granularity::PerChannel => vec![(0, cin)],
            Granularity::PerBlock(b) if b.is_multiple_of(8) => {
                (0..cin).step_by(b).map(|s| (s, (s + b).min(cin))).collect()
            }
            Granularity::PerBlock(_) => return Ok(None),
        };
        let kpad = cin.div_ceil(8) * 8;
        let mut weights = vec![0i16; cout * kpad];
        let mut scales = vec![0f32; cout * segments.len()];
        let ranges = q.group_ranges();
        for (g, range) in ranges.iter().enumerate() {
            let zp = q.zero_points[g] as i16;
            let (o, k0) = (range.start / cin, range.start % cin);
            for (i, idx) in range.clone().enumerate() {
                // Per-tensor groups span rows: recompute the position of every element.
                let (oo, kk) = if matches!(q.scheme.granularity, Granularity::PerTensor) {
                    (idx / cin, idx % cin)
                } else {
                    (o, k0 + i)
                };
                weights[oo * kpad + kk] = q.values[idx] as i16 - zp;
            }
            let scale = q.scales[g] * input.scale;
            match q.scheme.granularity {
                Granularity::PerTensor => scales.iter_mut().for_each(|s| *s = scale),
                Granularity::PerChannel => scales[o] = scale,
                Granularity::PerBlock(_) => {
                    let seg = segments.iter().position(|&(s, _)| s == k0).unwrap_or(0);
                    scales[o * segments.len() + seg] = scale;
                }
            }
        }
        Ok(Some(Self {
            cin,
            cout,
            kpad,
            weights,
            segments,
            scales,
            input: *input,
        }))
    }

    pub(crate) fn forward(
        &self,
        input: &[f32],
        pixels: usize,
        bias: &[f32],
        relu6: bool,
        residual: Option<&[f32]>,
    ) -> Vec<f32> {
        let (cin, kpad, cout) = (self.cin, self.kpad, self.cout);
        // Quantize (and centre) the input once.
        let zp = self.input.zero_point;
        let mut a = vec![0i16; pixels * kpad];
        for (row, src) in a.chunks_exact_mut(kpad).zip(input.chunks_exact(cin)) {
            for (d, &x) in row.iter_mut().zip(src) {
                *d = (self.input.quantize(x) - zp) as i16;
            }
        }
        let nseg = self.segments.len();
        let mut out = vec![0f32; pixels * cout];
        for o0 in (0..cout).step_by(OUTPUT_TILE) {
            let o1 = (o0 + OUTPUT_TILE).min(cout);
            for p0 in (0..pixels).step_by(2) {
                let p1 = (p0 + 1).min(pixels - 1);
                let a0 = &a[p0 * kpad..(p0 + 1) * kpad];
                let a1 = &a[p1 * kpad..(p1 + 1) * kpad];
                for oq in (o0..o1).step_by(4) {
                    let rows: [usize; 4] = std::array::from_fn(|i| (oq + i).min(o1 - 1));
                    let w: [&[i16]; 4] = rows.map(|o| &self.weights[o * kpad..(o + 1) * kpad]);
                    let mut sums = [[0f32; 4]; 2];
                    for (s, &(start, end)) in self.segments.iter().enumerate() {
                        // Segments start on multiples of 8; the last one runs to the padding.
                        let end = if end == cin { kpad } else { end };
                        let dots =
                            dot_2x4(&a0[start..end], &a1[start..end], w.map(|r| &r[start..end]));
                        for (i, &o) in rows.iter().enumerate() {
                            let scale = self.scales[o * nseg + s];
                            sums[0][i] += dots[0][i] as f32 * scale;
                            sums[1][i] += dots[1][i] as f32 * scale;
                        }
                    }
                    for (pi, p) in [p0, p1]
                        .into_iter()
                        .enumerate()
                        .take(1 + (p1 > p0) as usize)
                    {
                        for (i, &o) in rows.iter().enumerate().take(o1 - oq) {
                            out[p * cout + o] = sums[pi][i] + bias[o];
                        }
                    }
                }
            }
        }
        if relu6 {
            out.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
        }
        if let Some(res) = residual {
            out.iter_mut().zip(res).for_each(|(o, r)| *o += r);
        }
        out
    }
}

/// Dot products of two input rows with four weight rows (all the same length, a multiple
/// of 8).
#[cfg(target_arch = "wasm32")]
fn dot_2x4(a0: &[i16], a1: &[i16], w: [&[i16]; 4]) -> [[i32; 4]; 2] {
    use core::arch::wasm32::*;
    let n = a0.len();
    debug_assert!(n.is_multiple_of(8) && a1.len() == n && w.iter().all(|r| r.len() == n));
    let mut acc = [[i32x4_splat(0); 4]; 2];
    let mut k = 0;
    while k < n {
        // SAFETY: k + 8 ≤ n for every row (lengths checked above; n is a multiple of 8);
        // v128_load has no alignment requirement.
        unsafe {
            let x0 = v128_load(a0.as_ptr().add(k) as *const v128);
            let x1 = v128_load(a1.as_ptr().add(k) as *const v128);
            for (i, row) in w.iter().enumerate() {
                let y = v128_load(row.as_ptr().add(k) as *const v128);
                acc[0][i] = i32x4_add(acc[0][i], i32x4_dot_i16x8(x0, y));
                acc[1][i] = i32x4_add(acc[1][i], i32x4_dot_i16x8(x1, y));
            }
        }
        k += 8;
    }
    let hsum = |v: v128| {
        i32x4_extract_lane::<0>(v)
            + i32x4_extract_lane::<1>(v)
            + i32x4_extract_lane::<2>(v)
            + i32x4_extract_lane::<3>(v)
    };
    [acc[0].map(hsum), acc[1].map(hsum)]
}

/// The same tile with SSE2 `pmaddwd` (baseline on x86-64).
#[cfg(target_arch = "x86_64")]
fn dot_2x4(a0: &[i16], a1: &[i16], w: [&[i16]; 4]) -> [[i32; 4]; 2] {
    use core::arch::x86_64::*;
    let n = a0.len();
    assert!(n.is_multiple_of(8) && a1.len() == n && w.iter().all(|r| r.len() == n));
    // SAFETY: SSE2 is part of the x86-64 baseline; every load reads 8 i16 at k < n, with n a
    // multiple of 8 for all six rows (asserted); loadu has no alignment requirement.
    unsafe {
        let mut acc = [[_mm_setzero_si128(); 4]; 2];
        let mut k = 0;
        while k < n {
            let x0 = _mm_loadu_si128(a0.as_ptr().add(k) as *const __m128i);
            let x1 = _mm_loadu_si128(a1.as_ptr().add(k) as *const __m128i);
            for (i, row) in w.iter().enumerate() {
                let y = _mm_loadu_si128(row.as_ptr().add(k) as *const __m128i);
                acc[0][i] = _mm_add_epi32(acc[0][i], _mm_madd_epi16(x0, y));
                acc[1][i] = _mm_add_epi32(acc[1][i], _mm_madd_epi16(x1, y));
            }
            k += 8;
        }
        let hsum = |v: __m128i| {
            let mut lanes = [0i32; 4];
            _mm_storeu_si128(lanes.as_mut_ptr() as *mut __m128i, v);
            lanes.iter().sum::<i32>()
        };
        [acc[0].map(hsum), acc[1].map(hsum)]
    }
}

#[cfg(not(any(target_arch = "wasm32", target_arch = "x86_64")))]
fn dot_2x4(a0: &[i16], a1: &[i16], w: [&[i16]; 4]) -> [[i32; 4]; 2] {
    let dot =
        |a: &[i16], b: &[i16]| -> i32 { a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum() };
    [w.map(|r| dot(a0, r)), w.map(|r| dot(a1, r))]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantScheme;

    /// The integer kernel equals float arithmetic on the fake-quantized operands.
    #[test]
    fn matches_fake_quant_reference_for_every_granularity() {
        let (cin, cout, pixels) = (20, 7, 5);
        let w: Vec<f32> = (0..cin * cout)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0 * if i % 9 == 0 { 3.0 } else { 1.0 })
            .collect();
        let x: Vec<f32> = (0..pixels * cin)
            .map(|i| ((i * 53 % 97) as f32) / 15.0 - 1.0)
            .collect();
        let bias: Vec<f32> = (0..cout).map(|o| o as f32 * 0.1).collect();
        let act = ActivationParams {
            scale: 0.05,
            zero_point: -100,
            qmin: -128,
            qmax: 127,
        };
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
            let got = kernel.forward(&x, pixels, &bias, false, None);
            for p in 0..pixels {
                for o in 0..cout {
                    let want: f32 = bias[o]
                        + (0..cin)
                            .map(|k| act.fake_quantize(x[p * cin + k]) * wd[o * cin + k])
                            .sum::<f32>();
                    let g = got[p * cout + o];
                    assert!(
                        (g - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{granularity:?} {g} vs {want}"
                    );
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
}
