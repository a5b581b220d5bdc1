//! The Fashion-MNIST network on the CPU: channels-last activations, every 3×3 convolution
//! as im2col + GEMM over a whole batch, BatchNorm folded. It runs the test set in the
//! page and natively, in float, as fake quant, or on the int8 kernel, from the same
//! [`CompressedModel`] as EfficientNet.
//!
//! im2col rows are ordered (channel, ky, kx), PyTorch's flat weight order, so quantized
//! weights and their per-block groups apply unchanged.

use crate::compress::CompressedModel;
use crate::cpu::Pointwise;
use crate::efficientnet::folded_conv;
use crate::error::{EngineError, Result};
use crate::fashion::{CLASSES, Evaluation, FashionSet, PIXELS, SIDE, normalize};
use crate::weights::TensorStore;

pub struct CpuFashionNet {
    /// The three 3×3 convolutions, as GEMMs over im2col rows of `cin·9` values.
    convs: Vec<Pointwise>,
    fc1: Pointwise,
    fc2: Pointwise,
}

/// Images per GEMM in [`evaluate`].
pub const EVAL_BATCH: usize = 100;

impl CpuFashionNet {
    /// From raw or folded weights.
    pub fn from_store(store: &TensorStore) -> Result<Self> {
        let mut convs = Vec::new();
        for i in 1..=3 {
            let (shape, w, b) = folded_conv(store, &format!("conv{i}"), &format!("bn{i}"))?;
            if shape.len() != 4 || shape[2..] != [3, 3] {
                return Err(EngineError::ShapeMismatch {
                    name: format!("conv{i}.weight"),
                    found: shape,
                    expected: vec![0, 0, 3, 3],
                });
            }
            convs.push(Pointwise::new(shape[1] * 9, shape[0], w, b, true));
        }
        let dense = |name: &str, relu6: bool| -> Result<Pointwise> {
            let w = store.get(&format!("{name}.weight"))?;
            let b = store.get(&format!("{name}.bias"))?;
            let [cout, cin] = w.shape[..] else {
                return Err(EngineError::ShapeMismatch {
                    name: w.name.clone(),
                    found: w.shape.clone(),
                    expected: vec![0, 0],
                });
            };
            Ok(Pointwise::new(
                cin,
                cout,
                w.data.clone(),
                b.data.clone(),
                relu6,
            ))
        };
        let net = Self {
            convs,
            fc1: dense("fc1", true)?,
            fc2: dense("fc2", false)?,
        };
        let flat = net.convs[2].cout * 9;
        if net.fc1.cin != flat || net.fc2.cin != net.fc1.cout || net.fc2.cout != CLASSES {
            return Err(EngineError::Weights(format!(
                "layer widths do not chain: conv3 gives {flat} features, fc1 takes {}, fc2 {}→{}",
                net.fc1.cin, net.fc2.cin, net.fc2.cout
            )));
        }
        Ok(net)
    }

    /// The compressed model. With `integer_kernels` its int8 layers run on the int8 kernel
    /// and its int4 layers from their packed weights; without, it is the float fake-quant
    /// reference.
    pub fn from_compressed(model: &CompressedModel, integer_kernels: bool) -> Result<Self> {
        let mut net = Self::from_store(&model.store)?;
        if model.layers.len() != 5 {
            return Err(EngineError::Weights(format!(
                "{} layer entries for a 5-layer network",
                model.layers.len()
            )));
        }
        let units = net.convs.iter_mut().chain([&mut net.fc1, &mut net.fc2]);
        for (unit, layer) in units.zip(&model.layers) {
            unit.attach(layer, integer_kernels)?;
        }
        Ok(net)
    }

    /// How many of the five layers run on the int8 kernel.
    pub fn integer_layers(&self) -> usize {
        self.convs
            .iter()
            .chain([&self.fc1, &self.fc2])
            .filter(|l| l.is_integer())
            .count()
    }

    /// Logits `[batch][10]` for normalised images `[batch][28·28]`.
    pub fn forward(&self, images: &[f32]) -> Result<Vec<f32>> {
        self.forward_observed(images, &mut |_, _| {})
    }

    /// [`Self::forward`], showing each weight layer's input (channels-last) to `observe`
    /// with its index in [`crate::fashion::weight_layers`] order.
    pub fn forward_observed(
        &self,
        images: &[f32],
        observe: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<Vec<f32>> {
        if images.is_empty() || !images.len().is_multiple_of(PIXELS) {
            return Err(EngineError::PixelBuffer {
                found: images.len(),
                expected: PIXELS,
            });
        }
        let batch = images.len() / PIXELS;
        let mut x = images.to_vec(); // one channel: NCHW = NHWC
        let (mut side, mut channels) = (SIDE, 1);
        for (i, conv) in self.convs.iter().enumerate() {
            observe(i, &x);
            let cols = im2col_3x3(&x, batch, side, channels);
            let y = conv.forward(&cols, batch * side * side, None);
            channels = conv.cout;
            x = max_pool_2x2(&y, batch, side, channels);
            side /= 2;
        }
        // Flatten in PyTorch's (channel, y, x) order.
        let plane = side * side;
        let mut flat = vec![0f32; batch * channels * plane];
        for (b, dst) in flat.chunks_exact_mut(channels * plane).enumerate() {
            let src = &x[b * plane * channels..(b + 1) * plane * channels];
            for p in 0..plane {
                for c in 0..channels {
                    dst[c * plane + p] = src[p * channels + c];
                }
            }
        }
        observe(3, &flat);
        let hidden = self.fc1.forward(&flat, batch, None);
        observe(4, &hidden);
        Ok(self.fc2.forward(&hidden, batch, None))
    }
}

/// 3×3, stride 1, zero padding 1: one row of `channels·9` values per output pixel, in
/// (channel, ky, kx) order.
fn im2col_3x3(x: &[f32], batch: usize, side: usize, channels: usize) -> Vec<f32> {
    let k = channels * 9;
    let mut cols = vec![0f32; batch * side * side * k];
    for b in 0..batch {
        let img = &x[b * side * side * channels..(b + 1) * side * side * channels];
        for y in 0..side {
            for xx in 0..side {
                let row = &mut cols[((b * side + y) * side + xx) * k..][..k];
                for ky in 0..3 {
                    let iy = y as isize + ky as isize - 1;
                    if iy < 0 || iy >= side as isize {
                        continue;
                    }
                    for kx in 0..3 {
                        let ix = xx as isize + kx as isize - 1;
                        if ix < 0 || ix >= side as isize {
                            continue;
                        }
                        let src = &img[(iy as usize * side + ix as usize) * channels..][..channels];
                        let tap = ky * 3 + kx;
                        for (c, &v) in src.iter().enumerate() {
                            row[c * 9 + tap] = v;
                        }
                    }
                }
            }
        }
    }
    cols
}

/// 2×2 max pool, stride 2 (odd sides drop the last row and column, like PyTorch).
fn max_pool_2x2(x: &[f32], batch: usize, side: usize, channels: usize) -> Vec<f32> {
    let half = side / 2;
    let mut out = vec![f32::NEG_INFINITY; batch * half * half * channels];
    for b in 0..batch {
        for oy in 0..half {
            for ox in 0..half {
                let dst = &mut out[((b * half + oy) * half + ox) * channels..][..channels];
                for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                    let at = ((b * side + 2 * oy + dy) * side + 2 * ox + dx) * channels;
                    for (d, &v) in dst.iter_mut().zip(&x[at..at + channels]) {
                        *d = d.max(v);
                    }
                }
            }
        }
    }
    out
}

/// Index of the largest logit in each row of `[batch][10]`.
pub fn predictions(logits: &[f32]) -> Vec<usize> {
    logits
        .chunks_exact(CLASSES)
        .map(|row| {
            row.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i)
        })
        .collect()
}

/// Runs images `range` of `set` through `net` and adds them to `eval`.
pub fn evaluate_range(
    net: &CpuFashionNet,
    set: &FashionSet,
    range: std::ops::Range<usize>,
    eval: &mut Evaluation,
) -> Result<()> {
    let images = normalize(&set.images[range.start * PIXELS..range.end * PIXELS]);
    let logits = net.forward(&images)?;
    for (i, p) in predictions(&logits).into_iter().enumerate() {
        eval.add(set.labels[range.start + i], p);
    }
    Ok(())
}

/// Accuracy of `net` on every image of `set`.
pub fn evaluate(net: &CpuFashionNet, set: &FashionSet) -> Result<Evaluation> {
    let mut eval = Evaluation::new();
    for start in (0..set.len()).step_by(EVAL_BATCH) {
        evaluate_range(
            net,
            set,
            start..(start + EVAL_BATCH).min(set.len()),
            &mut eval,
        )?;
    }
    Ok(eval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn im2col_pads_with_zeros_in_torch_order() {
        // 2 channels, 3×3 image, channel c at pixel p holds 10c + p.
        let x: Vec<f32> = (0..9).flat_map(|p| [p as f32, 10.0 + p as f32]).collect();
        let cols = im2col_3x3(&x, 1, 3, 2);
        let centre = &cols[4 * 18..5 * 18];
        assert_eq!(&centre[..9], &[0., 1., 2., 3., 4., 5., 6., 7., 8.]);
        assert_eq!(centre[9 + 4], 14.0);
        let corner = &cols[..18];
        assert_eq!(&corner[..9], &[0., 0., 0., 0., 0., 1., 0., 3., 4.]);
    }

    #[test]
    fn max_pool_takes_each_window_maximum() {
        let x: Vec<f32> = (0..9).map(|v| v as f32).collect();
        assert_eq!(max_pool_2x2(&x, 1, 3, 1), vec![4.0]);
    }
}
