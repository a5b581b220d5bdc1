//! What distillation needs beyond [`crate::distill::NetworkDistiller`] for the photo model,
//! EfficientNet-Lite0 at 224×224: random resized crops of the user's photos, and for the
//! user's own classes [`fit_head`], which first trains a new classifier on the teacher's
//! pooled features (transfer learning); teacher and student then both carry that head.

use burn::prelude::*;

use crate::distill::{batch_graph, read_f32};
use crate::efficientnet::CLASSIFIER;
use crate::error::Result;
use crate::exec::GraphModel;
use crate::fashion::SplitMix;
use crate::finetune_graph::{check_head_labels, fit_linear_classifier};
use crate::graph_builder::{bias_name, layer_inputs, weight_name};
use crate::preprocess::{CROP, RgbImage, box_reduce, to_nchw};
use crate::weights::{NamedTensor, TensorStore};

/// A random resized crop (35–100 % of the area, aspect 3:4–4:3, bilinear) of `img` at
/// 224×224, mirrored on a coin flip, as the network's normalised NCHW input.
pub fn augment_photo(img: &RgbImage, rng: &mut SplitMix) -> Vec<f32> {
    // Work from a reduced copy (shorter side ≥ 2·224) so large photos stay cheap.
    let src = box_reduce(img, CROP);
    let (sw, sh) = (src.width as f64, src.height as f64);
    let area = (0.35 + 0.65 * rng.unit()) * sw * sh;
    let aspect = ((0.75f64).ln() + rng.unit() * ((4.0f64 / 3.0).ln() - (0.75f64).ln())).exp();
    let w = (area * aspect).sqrt().min(sw);
    let h = (area / aspect).sqrt().min(sh);
    let (x0, y0) = (rng.unit() * (sw - w), rng.unit() * (sh - h));
    let flip = rng.below(2) == 1;
    let at = |x: isize, y: isize, c: usize| -> f64 {
        let x = x.clamp(0, src.width as isize - 1) as usize;
        let y = y.clamp(0, src.height as isize - 1) as usize;
        f64::from(src.pixels[(y * src.width + x) * 3 + c])
    };
    let mut out = vec![0u8; CROP * CROP * 3];
    for oy in 0..CROP {
        let sy = y0 + (oy as f64 + 0.5) * h / CROP as f64 - 0.5;
        let (fy, ty) = (sy.floor(), sy - sy.floor());
        for ox in 0..CROP {
            let sx = x0 + (ox as f64 + 0.5) * w / CROP as f64 - 0.5;
            let (fx, tx) = (sx.floor(), sx - sx.floor());
            let (ix, iy) = (fx as isize, fy as isize);
            let dx = if flip { CROP - 1 - ox } else { ox };
            for c in 0..3 {
                let v = (1.0 - ty) * ((1.0 - tx) * at(ix, iy, c) + tx * at(ix + 1, iy, c))
                    + ty * ((1.0 - tx) * at(ix, iy + 1, c) + tx * at(ix + 1, iy + 1, c));
                out[(oy * CROP + dx) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    to_nchw(&RgbImage {
        width: CROP,
        height: CROP,
        pixels: out,
    })
}

/// Photos per forward pass when [`fit_head`] computes their features.
const FEATURE_BATCH: usize = 8;

/// A new classifier for the user's own `classes` (transfer learning): trained with
/// cross-entropy on the pooled features `teacher` computes for each preprocessed input
/// and its mirror image, the backbone unchanged. Returns `_fc.weight` `[classes, 1280]`
/// and `_fc.bias`; [`with_head`] puts them on a network. Runs on `device` (autodiff).
pub async fn fit_head(
    teacher: &TensorStore,
    inputs: &[Vec<f32>],
    labels: &[usize],
    classes: usize,
    device: &Device,
) -> Result<(NamedTensor, NamedTensor)> {
    check_head_labels(inputs.len(), labels, classes)?;
    let plain = device.clone().inner();
    let graph = batch_graph(teacher)?;
    // The classifier's input: the pooled, flattened features.
    let pooled = layer_inputs(&graph, &[CLASSIFIER.to_string()])?;
    let backbone = GraphModel::new(&graph, &plain)?;
    let mut features = Vec::new();
    let mut ys = Vec::new();
    for (batch, batch_labels) in inputs
        .chunks(FEATURE_BATCH)
        .zip(labels.chunks(FEATURE_BATCH))
    {
        let n = batch.len();
        let x = Tensor::<4>::from_data(TensorData::new(batch.concat(), [n, 3, CROP, CROP]), &plain);
        for x in [x.clone(), x.flip([3])] {
            let (_, tapped) = backbone.logits_tapped(x, &pooled)?;
            for t in tapped {
                features.extend(read_f32(t.flat()?).await?);
            }
            ys.extend_from_slice(batch_labels);
        }
    }
    let rows = ys.len();
    let (weight, bias) = fit_linear_classifier(&features, rows, &ys, classes, device).await?;
    let width = weight.len() / classes;
    Ok((
        NamedTensor {
            name: weight_name(CLASSIFIER),
            shape: vec![classes, width],
            data: weight,
        },
        NamedTensor {
            name: bias_name(CLASSIFIER),
            shape: vec![classes],
            data: bias,
        },
    ))
}

/// `store` with its classifier replaced by `head` (from [`fit_head`]).
pub fn with_head(store: &TensorStore, head: &(NamedTensor, NamedTensor)) -> TensorStore {
    let mut out = store.clone();
    out.push(head.0.clone());
    out.push(head.1.clone());
    out
}
