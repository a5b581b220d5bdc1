//! Quantization numerics, owned here rather than borrowed from burn (whose int4 per-block
//! path panics for blocks not divisible by 8 and dequantizes to float anyway).
//!
//! Definitions (all documented choices, tested against hand-computed cases):
//! - Integers are signed, `bits` ∈ {8, 4}.
//! - **Symmetric**: restricted range q ∈ [−(2^(b−1)−1), 2^(b−1)−1] (int8 ±127, int4 ±7),
//!   zero point 0, scale = max|x| / qmax.
//! - **Asymmetric**: full range q ∈ [−2^(b−1), 2^(b−1)−1] (int8 −128…127, int4 −8…7); the
//!   range [min, max] is first widened to contain 0 so that 0 is exact; scale =
//!   (max − min)/(qmax − qmin), zero point = clamp(qmin − round(min/scale), qmin, qmax).
//! - quantize: q = clamp(round_half_even(x/scale) + zp, qmin, qmax);
//!   dequantize: x̂ = (q − zp)·scale. A group that is all zeros gets scale 1.
//! - Granularity: one group per tensor, per output channel (axis 0), or per block of
//!   `block` consecutive elements within each output channel's row (the last block of a
//!   row may be shorter, so any block size works).
//! - int4 storage packs two values per byte, the first in the low nibble (two's complement).

pub use compresslab_spec::recipe::{Granularity, QuantScheme};

/// Round half to even (banker's rounding), IEEE `roundTiesToEven`.
pub fn round_half_even(x: f32) -> f32 {
    x.round_ties_even()
}

/// Scale and zero point for one group of values.
pub fn group_params(values: &[f32], scheme: &QuantScheme) -> (f32, i32) {
    let (qmin, qmax) = scheme.qrange();
    if scheme.symmetric {
        let max_abs = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if max_abs > 0.0 {
            max_abs / qmax as f32
        } else {
            1.0
        };
        (scale, 0)
    } else {
        let min = values.iter().fold(0f32, |m, &v| m.min(v));
        let max = values.iter().fold(0f32, |m, &v| m.max(v));
        if max == min {
            return (1.0, 0);
        }
        let scale = (max - min) / (qmax - qmin) as f32;
        let zp = (qmin as f32 - round_half_even(min / scale)) as i32;
        (scale, zp.clamp(qmin, qmax))
    }
}

pub fn quantize_value(x: f32, scale: f32, zp: i32, qmin: i32, qmax: i32) -> i8 {
    let q = round_half_even(x / scale) as i64 + zp as i64;
    q.clamp(qmin as i64, qmax as i64) as i8
}

#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor {
    pub shape: Vec<usize>,
    pub scheme: QuantScheme,
    /// One integer per element (unpacked; see [`pack_int4`] for storage).
    pub values: Vec<i8>,
    /// One scale and zero point per group, in group order.
    pub scales: Vec<f32>,
    pub zero_points: Vec<i8>,
    /// Grouping view: rows of `row_len` elements, each split into groups of `group_len`.
    group_len: usize,
    row_len: usize,
}

/// The grouping view `(group_len, row_len)`: rows are output channels (or the whole
/// tensor for per-tensor), split into groups.
pub(crate) fn layout(shape: &[usize], g: Granularity) -> (usize, usize) {
    let n: usize = shape.iter().product();
    let rows = shape.first().copied().unwrap_or(1).max(1);
    let row_len = if shape.len() < 2 { n } else { n / rows };
    match g {
        Granularity::PerTensor => (n.max(1), n.max(1)),
        Granularity::PerChannel => (row_len.max(1), row_len.max(1)),
        Granularity::PerBlock(b) => (b.max(1), row_len.max(1)),
    }
}

impl QuantizedTensor {
    pub fn quantize(data: &[f32], shape: &[usize], scheme: QuantScheme) -> Self {
        let (qmin, qmax) = scheme.qrange();
        let (group_len, row_len) = layout(shape, scheme.granularity);
        let mut values = vec![0i8; data.len()];
        let mut scales = Vec::new();
        let mut zero_points = Vec::new();
        for_each_group(data.len(), group_len, row_len, |range| {
            let (scale, zp) = group_params(&data[range.clone()], &scheme);
            for i in range {
                values[i] = quantize_value(data[i], scale, zp, qmin, qmax);
            }
            scales.push(scale);
            zero_points.push(zp as i8);
        });
        Self {
            shape: shape.to_vec(),
            scheme,
            values,
            scales,
            zero_points,
            group_len,
            row_len,
        }
    }

    /// Rebuilds a tensor from its stored parts (checked for consistency).
    pub fn from_parts(
        shape: &[usize],
        scheme: QuantScheme,
        values: Vec<i8>,
        scales: Vec<f32>,
        zero_points: Vec<i8>,
    ) -> Option<Self> {
        // Checked first, and before counting groups: a crafted shape must cost neither an
        // overflow nor a loop over more elements than `values` really holds.
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        let valid_scheme =
            matches!(scheme.bits, 4 | 8) && !matches!(scheme.granularity, Granularity::PerBlock(0));
        if values.len() != n || !valid_scheme {
            return None;
        }
        let (group_len, row_len) = layout(shape, scheme.granularity);
        let mut groups = 0;
        for_each_group(n, group_len, row_len, |_| groups += 1);
        let (qmin, qmax) = scheme.qrange();
        let in_range = values
            .iter()
            .chain(&zero_points)
            .all(|&v| (qmin..=qmax).contains(&(v as i32)));
        (values.len() == n
            && scales.len() == groups
            && zero_points.len() == groups
            && in_range
            && scales.iter().all(|s| s.is_finite() && *s > 0.0))
        .then_some(Self {
            shape: shape.to_vec(),
            scheme,
            values,
            scales,
            zero_points,
            group_len,
            row_len,
        })
    }

    /// `data` (same shape) on this tensor's grid: the same scales and zero points, new
    /// integers. Quantization-aware fine-tuning trains on a fixed grid, and this is its result.
    pub fn requantize(&self, data: &[f32]) -> Option<Self> {
        if data.len() != self.values.len() {
            return None;
        }
        let (qmin, qmax) = self.scheme.qrange();
        let mut values = vec![0i8; data.len()];
        let mut g = 0;
        for_each_group(data.len(), self.group_len, self.row_len, |range| {
            let (scale, zp) = (self.scales[g], self.zero_points[g] as i32);
            for i in range {
                values[i] = quantize_value(data[i], scale, zp, qmin, qmax);
            }
            g += 1;
        });
        Some(Self {
            values,
            ..self.clone()
        })
    }

    /// Each element's scale and zero point (the grid as two dense arrays).
    pub fn element_grid(&self) -> (Vec<f32>, Vec<f32>) {
        let mut scales = vec![0f32; self.values.len()];
        let mut zero_points = vec![0f32; self.values.len()];
        let mut g = 0;
        for_each_group(self.values.len(), self.group_len, self.row_len, |range| {
            for i in range {
                scales[i] = self.scales[g];
                zero_points[i] = f32::from(self.zero_points[g]);
            }
            g += 1;
        });
        (scales, zero_points)
    }

    /// Group length and row length of the grouping (see [`layout`]).
    pub fn grouping(&self) -> (usize, usize) {
        (self.group_len, self.row_len)
    }

    /// The element ranges of each group, in group order.
    pub fn group_ranges(&self) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::with_capacity(self.scales.len());
        for_each_group(self.values.len(), self.group_len, self.row_len, |r| {
            out.push(r)
        });
        out
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.values.len()];
        let mut g = 0;
        for_each_group(self.values.len(), self.group_len, self.row_len, |range| {
            let (scale, zp) = (self.scales[g], self.zero_points[g] as i32);
            for i in range {
                out[i] = (self.values[i] as i32 - zp) as f32 * scale;
            }
            g += 1;
        });
        out
    }

    /// Bytes to store it: packed integers + f32 scales + one byte per zero point
    /// (zero points are omitted for symmetric schemes, where they are all 0).
    pub fn storage_bytes(&self) -> usize {
        let ints = match self.scheme.bits {
            4 => self.values.len().div_ceil(2),
            _ => self.values.len(),
        };
        let zps = if self.scheme.symmetric {
            0
        } else {
            self.zero_points.len()
        };
        ints + 4 * self.scales.len() + zps
    }
}

fn for_each_group(
    n: usize,
    group_len: usize,
    row_len: usize,
    mut f: impl FnMut(std::ops::Range<usize>),
) {
    for row_start in (0..n).step_by(row_len.max(1)) {
        let row_end = (row_start + row_len).min(n);
        let mut start = row_start;
        while start < row_end {
            let end = (start + group_len).min(row_end);
            f(start..end);
            start = end;
        }
    }
}

/// Quantize then dequantize: the usual fake-quant definition.
pub fn fake_quantize(data: &[f32], shape: &[usize], scheme: QuantScheme) -> Vec<f32> {
    QuantizedTensor::quantize(data, shape, scheme).dequantize()
}

/// Packs int4 values (each in −8…7) two per byte, first value in the low nibble.
pub fn pack_int4(values: &[i8]) -> Vec<u8> {
    values
        .chunks(2)
        .map(|p| {
            let lo = (p[0] as u8) & 0x0f;
            let hi = p.get(1).map_or(0, |&v| (v as u8) & 0x0f);
            lo | (hi << 4)
        })
        .collect()
}

pub fn unpack_int4(bytes: &[u8], count: usize) -> Vec<i8> {
    let sign = |n: u8| ((n << 4) as i8) >> 4;
    bytes
        .iter()
        .flat_map(|&b| [sign(b & 0x0f), sign(b >> 4)])
        .take(count)
        .collect()
}

/// Signal-to-quantization-noise ratio in dB (∞ when exact).
pub fn sqnr_db(original: &[f32], reconstructed: &[f32]) -> f64 {
    let signal: f64 = original.iter().map(|&v| (v as f64).powi(2)).sum();
    let noise: f64 = original
        .iter()
        .zip(reconstructed)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (signal / noise).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYM8: QuantScheme = QuantScheme {
        bits: 8,
        symmetric: true,
        granularity: Granularity::PerTensor,
    };
    const ASYM8: QuantScheme = QuantScheme {
        bits: 8,
        symmetric: false,
        granularity: Granularity::PerTensor,
    };

    #[test]
    fn rounds_half_to_even() {
        let cases = [
            (2.5, 2.0),
            (3.5, 4.0),
            (-2.5, -2.0),
            (-3.5, -4.0),
            (0.5, 0.0),
            (1.5, 2.0),
            (2.4, 2.0),
            (-2.6, -3.0),
        ];
        for (x, r) in cases {
            assert_eq!(round_half_even(x), r, "{x}");
        }
    }

    #[test]
    fn symmetric_int8_by_hand() {
        let x = [-1.0, 0.5, 0.25, 1.0];
        let q = QuantizedTensor::quantize(&x, &[4], SYM8);
        // scale = 1/127; 0.5·127 = 63.5 → 64 (even); 0.25·127 = 31.75 → 32.
        assert_eq!(q.values, vec![-127, 64, 32, 127]);
        assert_eq!(q.zero_points, vec![0]);
        assert!((q.scales[0] - 1.0 / 127.0).abs() < 1e-9);
        let d = q.dequantize();
        assert!((d[1] - 64.0 / 127.0).abs() < 1e-7);
        assert_eq!(q.storage_bytes(), 4 + 4);
    }

    #[test]
    fn asymmetric_int8_by_hand() {
        // min widened to 0: scale = 5.1/255 = 0.02, zp = −128 − round(0) = −128.
        let x = [0.0, 1.0, 2.0, 5.1];
        let q = QuantizedTensor::quantize(&x, &[4], ASYM8);
        assert!((q.scales[0] - 0.02).abs() < 1e-7);
        assert_eq!(q.zero_points, vec![-128]);
        assert_eq!(q.values, vec![-128, -78, -28, 127]);
        // Negative range: [−1, 3] → scale 4/255, zp = −128 − round(−63.75) = −64.
        let q = QuantizedTensor::quantize(&[-1.0, 3.0], &[2], ASYM8);
        assert_eq!(q.zero_points, vec![-64]);
        assert_eq!(q.values, vec![-128, 127]);
        assert_eq!(q.dequantize()[0], (-128 + 64) as f32 * (4.0 / 255.0));
    }

    #[test]
    fn zero_is_exact_and_all_zero_groups_work() {
        for scheme in [SYM8, ASYM8] {
            let d = fake_quantize(&[0.0, 0.3, -0.7, 0.0], &[4], scheme);
            assert_eq!(d[0], 0.0);
            assert_eq!(d[3], 0.0);
            assert_eq!(fake_quantize(&[0.0; 5], &[5], scheme), vec![0.0; 5]);
        }
    }

    #[test]
    fn int4_packs_two_per_byte() {
        let v: Vec<i8> = (-8..=7).collect();
        let packed = pack_int4(&v);
        assert_eq!(packed.len(), 8);
        assert_eq!(packed[0], 0x9 << 4 | 0x8); // −8 low, −7 high
        assert_eq!(unpack_int4(&packed, v.len()), v);
        assert_eq!(unpack_int4(&pack_int4(&[3, -1, 5]), 3), vec![3, -1, 5]);
        let s4 = QuantScheme {
            bits: 4,
            symmetric: true,
            granularity: Granularity::PerTensor,
        };
        // max 7 → scale exactly 1: 3.5 → 4 and 2.5 → 2 (ties to even).
        let q = QuantizedTensor::quantize(&[-7.0, 3.5, 2.5, 7.0], &[4], s4);
        assert_eq!(q.values, vec![-7, 4, 2, 7]);
        assert_eq!(q.storage_bytes(), 2 + 4);
        assert_eq!(q.scales, vec![1.0]);
    }

    #[test]
    fn per_channel_beats_per_tensor_when_channels_differ() {
        // Channel 0 is 100× larger: per-tensor wastes the grid on channel 1.
        let mut x = Vec::new();
        for i in 0..64 {
            x.push((i as f32 - 32.0) * 1.0);
        }
        for i in 0..64 {
            x.push((i as f32 - 32.0) * 0.01);
        }
        let shape = [2, 64];
        let per_tensor = fake_quantize(&x, &shape, SYM8);
        let per_channel = fake_quantize(
            &x,
            &shape,
            QuantScheme {
                granularity: Granularity::PerChannel,
                ..SYM8
            },
        );
        let small = 64..128;
        let t = sqnr_db(&x[small.clone()], &per_tensor[small.clone()]);
        let c = sqnr_db(&x[small.clone()], &per_channel[small]);
        assert!(
            c > t + 30.0,
            "per-channel {c:.1} dB vs per-tensor {t:.1} dB"
        );
    }

    #[test]
    fn blocks_split_rows_and_any_block_size_works() {
        let x: Vec<f32> = (0..2 * 9).map(|i| (i as f32 * 0.37).sin()).collect();
        for block in [1, 2, 4, 5, 8, 32, 64, 128] {
            let scheme = QuantScheme {
                bits: 4,
                symmetric: false,
                granularity: Granularity::PerBlock(block),
            };
            let q = QuantizedTensor::quantize(&x, &[2, 9], scheme);
            assert_eq!(q.scales.len(), 2 * 9usize.div_ceil(block), "block {block}");
            let d = q.dequantize();
            assert_eq!(d.len(), x.len());
            // Every value within half a step of its group's grid.
            for (i, (&a, &b)) in x.iter().zip(&d).enumerate() {
                let g = (i / 9) * 9usize.div_ceil(block) + (i % 9) / block;
                assert!(
                    (a - b).abs() <= q.scales[g] / 2.0 + 1e-6,
                    "block {block} i {i}"
                );
            }
        }
    }

    #[test]
    fn fake_quant_is_within_half_a_step() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        for symmetric in [true, false] {
            for bits in [8, 4] {
                let scheme = QuantScheme {
                    bits,
                    symmetric,
                    granularity: Granularity::PerTensor,
                };
                let q = QuantizedTensor::quantize(&x, &[1000], scheme);
                let d = q.dequantize();
                let step = q.scales[0];
                assert!(
                    x.iter()
                        .zip(&d)
                        .all(|(a, b)| (a - b).abs() <= step / 2.0 + 1e-6)
                );
                assert_eq!(fake_quantize(&x, &[1000], scheme), d);
            }
        }
    }
}
