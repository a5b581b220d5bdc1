//! Statistics of a model and its layers, as the lab's tables and plots show them.

use serde::{Deserialize, Serialize};

/// Quantization parameters of one layer's input: x̂ = (clamp(round(x/s) + zp) − zp)·s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ActivationParams {
    pub scale: f32,
    pub zero_point: i32,
    pub qmin: i32,
    pub qmax: i32,
}

impl ActivationParams {
    /// Whether these describe a grid the int8 kernels can run: a finite positive scale and
    /// `qmin ≤ zero_point ≤ qmax` within signed 8 bits (what the lab writes; an uploaded
    /// export is checked against it).
    pub fn is_valid(&self) -> bool {
        self.scale.is_finite()
            && self.scale > 0.0
            && -128 <= self.qmin
            && self.qmin <= self.zero_point
            && self.zero_point <= self.qmax
            && self.qmax <= 127
    }

    /// q = clamp(round_half_even(x/s) + zp, qmin, qmax).
    #[inline]
    pub fn quantize(&self, x: f32) -> i32 {
        self.centred(x) + self.zero_point
    }

    #[inline]
    pub fn fake_quantize(&self, x: f32) -> f32 {
        self.centred(x) as f32 * self.scale
    }

    /// q − zp = clamp(round_half_even(x/s), qmin − zp, qmax − zp), NaN → 0. Written without
    /// branches, casts that saturate or libm calls so that a loop over it vectorises (it runs
    /// once per activation of every quantized layer): clamping first to the integer bounds
    /// changes nothing and keeps |x/s| small enough for the add-and-subtract-1.5·2²³
    /// rounding trick (exact round-half-even for |v| < 2²²), whose sum's low mantissa bits
    /// are the integer.
    #[inline]
    pub fn centred(&self, x: f32) -> i32 {
        const MAGIC: f32 = 12_582_912.0;
        let lo = (self.qmin - self.zero_point) as f32;
        let hi = (self.qmax - self.zero_point) as f32;
        let v = x / self.scale;
        #[allow(clippy::eq_op)] // v != v ⇔ NaN
        let v = if v != v { 0.0 } else { v };
        let v = if v < lo { lo } else { v };
        let v = if v > hi { hi } else { v };
        (v + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32
    }
}

/// Size and compute of a model (original or compressed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelStats {
    pub parameters: usize,
    pub nonzero_parameters: usize,
    /// Bytes to store the weights: packed integers + scales + zero points for quantized
    /// layers, 4 bytes per value otherwise (biases included).
    pub weight_bytes: usize,
    /// Multiply-accumulates for one 224×224 image with dense kernels.
    pub macs: u64,
    /// MACs whose weight is non-zero (what a sparse kernel would need).
    pub nonzero_macs: u64,
}

/// Per-layer view for the panel's table and plots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    pub name: String,
    pub kind: LayerKind,
    pub shape: Vec<usize>,
    pub parameters: usize,
    pub zeros: usize,
    pub macs: u64,
    pub weight_bytes: usize,
    pub bits: Option<u8>,
    /// Weight SQNR against the same layer before quantization (None when not quantized).
    pub sqnr_db: Option<f64>,
    /// Histogram of all weights.
    pub histogram: Histogram,
    /// The output channel with the smallest max|w|: its values and the grid it was
    /// quantized on. Shows why per-tensor scales starve small channels.
    pub narrowest_channel: Option<ChannelGrid>,
    pub activation: Option<ActivationParams>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub min: f32,
    pub max: f32,
    pub counts: Vec<u32>,
}

impl Histogram {
    pub fn of(values: &[f32], bins: usize) -> Self {
        let min = values.iter().copied().fold(f32::INFINITY, f32::min);
        let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let (min, max) = if min.is_finite() && max > min {
            (min, max)
        } else {
            // Empty or constant: a unit-wide range around the value.
            let centre = if min.is_finite() { min } else { 0.0 };
            (centre - 0.5, centre + 0.5)
        };
        let mut counts = vec![0u32; bins];
        let width = (max - min) / bins as f32;
        for &v in values {
            let b = (((v - min) / width) as usize).min(bins - 1);
            counts[b] += 1;
        }
        Self { min, max, counts }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelGrid {
    pub channel: usize,
    pub histogram: Histogram,
    /// Quantization levels (dequantized values) inside the channel's value range: how
    /// finely its grid resolves it (a per-channel 8-bit grid gives ≥ 128).
    pub levels: Vec<f32>,
}

/// The role of a weight layer in the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LayerKind {
    Stem,
    Expand,
    Depthwise,
    Project,
    Head,
    Classifier,
    /// A full 3×3 convolution (the Fashion-MNIST network).
    Conv,
    /// A hidden fully connected layer (the Fashion-MNIST network).
    Dense,
}
