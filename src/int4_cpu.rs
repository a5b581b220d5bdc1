//! int4 weight-only layers for the CPU path. The weights stay packed two per byte (one scale
//! and, when asymmetric, one zero point per group). A 1×1 convolution unpacks them a tile of
//! output channels at a time, just before that tile's float GEMM; a depthwise one unpacks its
//! few thousand for one run. So a running int4 layer holds 1/6–1/8 of its f32 weight memory
//! (the packed nibbles plus the scales) and one tile of floats only while it runs. Unpacking is arithmetic on whole bytes (sign-extend both nibbles, subtract the
//! zero point, scale), which the compiler vectorises.

use std::ops::Range;

use crate::quant::{QuantizedTensor, layout, pack_int4};

/// Unpacked weights per tile: 256 KiB of floats, enough output channels that the GEMM
/// still sees long rows, few enough that the tile stays in L2.
const TILE_ELEMENTS: usize = 1 << 16;

/// One layer's packed int4 weights `[cout, cin]` (a depthwise layer: `[channels, k·k]`).
pub(crate) struct Int4Weights {
    cin: usize,
    cout: usize,
    /// `[cout, cin]` row-major, two per byte, first value in the low nibble.
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

impl Int4Weights {
    /// `None` unless `q` holds 4-bit weights of a `[cout, cin]` layer.
    pub(crate) fn new(q: &QuantizedTensor, cin: usize, cout: usize) -> Option<Self> {
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
        Some(Self {
            cin,
            cout,
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
        })
    }

    /// Bytes this layer's weights hold while it runs.
    pub(crate) fn weight_bytes(&self) -> usize {
        self.packed.len() + 4 * self.scales.len() + self.zero_points.len()
    }

    /// All the weights as floats `[cout, cin]` (a depthwise layer's few thousand, for one
    /// run).
    pub(crate) fn unpack_all(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.cout * self.cin];
        self.unpack(0..self.cout, &mut out);
        out
    }

    /// Output channels `rows` of the weights, as floats `[rows, cin]`, into `out`.
    fn unpack(&self, rows: Range<usize>, out: &mut [f32]) {
        let (start, end) = (rows.start * self.cin, rows.end * self.cin);
        let mut i = start;
        while i < end {
            // The run of weights from `i` that shares one group (one scale, one zero point).
            let (row, within) = (i / self.row_len, i % self.row_len);
            let g = row * self.groups_per_row + within / self.group_len;
            let group_end = (within / self.group_len + 1) * self.group_len;
            let run_end = (row * self.row_len + group_end.min(self.row_len)).min(end);
            let scale = self.scales[g];
            let zp = self.zero_points.get(g).map_or(0, |&z| i32::from(z));
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
                run[0] = high(self.packed[i / 2]);
            }
            let bytes = (run.len() - lead) / 2;
            let first_byte = (i + lead) / 2;
            for (pair, &byte) in run[lead..lead + 2 * bytes]
                .chunks_exact_mut(2)
                .zip(&self.packed[first_byte..first_byte + bytes])
            {
                pair[0] = low(byte);
                pair[1] = high(byte);
            }
            if lead + 2 * bytes < run.len() {
                run[run.len() - 1] = low(self.packed[(run_end - 1) / 2]);
            }
            i = run_end;
        }
    }

    /// `out[pixels, cout] += input[pixels, cin] · Wᵀ`, a tile of output channels at a time.
    pub(crate) fn accumulate(&self, input: &[f32], pixels: usize, out: &mut [f32]) {
        assert_eq!(input.len(), pixels * self.cin);
        assert_eq!(out.len(), pixels * self.cout);
        let tile_rows = (TILE_ELEMENTS / self.cin.max(1)).clamp(1, self.cout);
        let mut tile = vec![0f32; tile_rows * self.cin];
        for first in (0..self.cout).step_by(tile_rows) {
            let rows = first..(first + tile_rows).min(self.cout);
            let n = rows.len();
            let weights = &mut tile[..n * self.cin];
            self.unpack(rows, weights);
            crate::cpu::gemm_accumulate(
                &mut out[first..],
                self.cout,
                input,
                weights,
                pixels,
                self.cin,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use compresslab_spec::recipe::{Granularity, QuantScheme};

    use super::*;

    /// Unpacked tile by tile, the packed weights give `input · dequantized(W)ᵀ` for every
    /// grid: symmetric and not, per tensor, per channel, per block (even and odd block
    /// lengths), odd widths, layers of one tile and of several.
    #[test]
    fn packed_products_match_the_dequantized_weights() {
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        // (300 × 260 and 300 × 1000 take several tiles: later ones start inside a
        // per-tensor group.)
        for (cin, cout) in [(64, 10), (40, 3), (7, 5), (300, 260), (300, 1000)] {
            for granularity in [
                Granularity::PerTensor,
                Granularity::PerChannel,
                Granularity::PerBlock(32),
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
                    for pixels in [1, 3, 9] {
                        let input: Vec<f32> = (0..pixels * cin).map(|_| next()).collect();
                        let mut out = vec![0.5f32; pixels * cout];
                        kernel.accumulate(&input, pixels, &mut out);
                        for p in 0..pixels {
                            for o in 0..cout {
                                let expected = 0.5
                                    + (0..cin)
                                        .map(|i| input[p * cin + i] * dequantized[o * cin + i])
                                        .sum::<f32>();
                                let got = out[p * cout + o];
                                assert!(
                                    (got - expected).abs() <= 1e-4 * (1.0 + expected.abs()),
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
