//! Knowledge distillation (Hinton et al., 2015): the original network is the teacher, the
//! compressed one the student. The student learns the teacher's softened outputs, and the
//! labels when there are any, while keeping its compression: removed channels stay removed
//! (it is built with the pruned widths) and pruned weights stay zero (masks re-applied after
//! every step).
//!
//! Loss: α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α) · CE(s, labels).

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::fashion::{FashionCnn, FashionSet, PIXELS, SIDE, SplitMix, normalize};
use crate::quant::{Granularity, QuantScheme};
use crate::weights::TensorStore;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// Softening temperature T.
    pub temperature: f64,
    /// Weight α of the teacher term; 1.0 ignores the labels (label-free distillation).
    pub alpha: f64,
    pub learning_rate: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Quantization-aware training: weights fake-quantized with this scheme in the forward
    /// pass, gradients passed straight through (STE).
    pub weight_quant: Option<QuantScheme>,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            temperature: 4.0,
            alpha: 0.9,
            learning_rate: 1e-3,
            epochs: 3,
            batch_size: 64,
            seed: 7,
            weight_quant: None,
        }
    }
}

/// Progress: epoch (from 0), step, steps per epoch, mean loss of the epoch so far.
#[derive(Debug, Clone, Copy)]
pub struct DistillProgress {
    pub epoch: usize,
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
}

/// The distillation loss, averaged over the batch.
pub fn distillation_loss(
    student: Tensor<2>,
    teacher: Tensor<2>,
    labels: Option<Tensor<1, Int>>,
    temperature: f64,
    alpha: f64,
) -> Tensor<1> {
    let t = temperature;
    let p = softmax(teacher.clone().div_scalar(t), 1);
    let log_p = log_softmax(teacher.div_scalar(t), 1);
    let log_q = log_softmax(student.clone().div_scalar(t), 1);
    let kl: Tensor<1> = (p * (log_p - log_q)).sum_dim(1).mean().reshape([1]);
    let soft = kl.mul_scalar(alpha * t * t);
    match labels {
        Some(y) if alpha < 1.0 => {
            let log_s = log_softmax(student, 1);
            let picked: Tensor<2> = log_s.gather(1, y.unsqueeze_dim(1));
            let ce: Tensor<1> = picked.mean().neg().reshape([1]);
            soft + ce.mul_scalar(1.0 - alpha)
        }
        _ => soft,
    }
}

/// 1 where a weight may train, 0 where pruning zeroed it, for every tensor of `store`
/// that has zeros (by name; the student's own shapes).
pub fn zero_masks(store: &TensorStore) -> Vec<(String, Vec<f32>)> {
    store
        .iter()
        .filter(|t| t.name.ends_with(".weight") && t.shape.len() > 1)
        .filter(|t| t.data.contains(&0.0))
        .map(|t| {
            (
                t.name.clone(),
                t.data.iter().map(|&v| (v != 0.0) as u8 as f32).collect(),
            )
        })
        .collect()
}

/// Distils `student` (raw weights: BatchNorm separate, possibly channel-pruned) from
/// `teacher` on `data`. `device` must be an autodiff device; the teacher runs on its inner
/// device. Returns the student's trained weights with `masks` applied.
pub async fn distill_fashion(
    teacher: &TensorStore,
    student: &TensorStore,
    masks: &[(String, Vec<f32>)],
    data: &FashionSet,
    cfg: &DistillConfig,
    device: &Device,
    progress: &mut dyn FnMut(DistillProgress),
) -> Result<TensorStore> {
    if data.is_empty() || cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(EngineError::Config(
            "distillation needs images, a batch size and at least one epoch".into(),
        ));
    }
    if !(0.0..=1.0).contains(&cfg.alpha) || cfg.temperature <= 0.0 {
        return Err(EngineError::Config(format!(
            "α must be in 0–1 and T positive (got α {}, T {})",
            cfg.alpha, cfg.temperature
        )));
    }
    device.seed(cfg.seed);
    let mut rng = SplitMix::new(cfg.seed);
    let plain = device.clone().inner();
    let teacher_net = FashionCnn::from_store(teacher, &plain)?;
    let mut model = apply_masks(FashionCnn::from_store(student, device)?, masks, device);
    let mut optim = AdamConfig::new().init();
    let steps = data.len().div_ceil(cfg.batch_size);
    let total = (steps * cfg.epochs) as f64;
    let mut order: Vec<usize> = (0..data.len()).collect();
    for epoch in 0..cfg.epochs {
        rng.shuffle(&mut order);
        let mut loss_sum = 0.0;
        for (step, batch) in order.chunks(cfg.batch_size).enumerate() {
            let mut pixels = Vec::with_capacity(batch.len() * PIXELS);
            let mut labels = Vec::with_capacity(batch.len());
            for &i in batch {
                let img = normalize(data.image(i));
                if rng.below(2) == 1 {
                    for row in img.chunks_exact(SIDE) {
                        pixels.extend(row.iter().rev());
                    }
                } else {
                    pixels.extend_from_slice(&img);
                }
                labels.push(data.labels[i] as i64);
            }
            let shape = [batch.len(), 1, SIDE, SIDE];
            let teacher_logits = teacher_net
                .forward(Tensor::from_data(
                    TensorData::new(pixels.clone(), shape),
                    &plain,
                ))
                .into_data_async()
                .await
                .map_err(|e| EngineError::Execution(format!("{e:?}")))?;
            let t = Tensor::<2>::from_data(teacher_logits, device);
            let x = Tensor::<4>::from_data(TensorData::new(pixels, shape), device);
            let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [batch.len()]), device);
            let loss = distillation_loss(model.forward(x), t, Some(y), cfg.temperature, cfg.alpha);
            let value = loss
                .clone()
                .into_data_async()
                .await
                .map_err(|e| EngineError::Execution(format!("{e:?}")))?
                .convert::<f64>()
                .try_into_vec::<f64>()
                .map_err(|e| EngineError::Execution(format!("{e:?}")))?
                .first()
                .copied()
                .unwrap_or(f64::NAN);
            if !value.is_finite() {
                return Err(EngineError::Execution(format!(
                    "distillation loss became {value} at epoch {epoch} step {step}"
                )));
            }
            loss_sum += value;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let progress_t = (epoch * steps + step) as f64 / total;
            let lr = cfg.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress_t).cos());
            model = apply_masks(optim.step(lr, model, grads), masks, device);
            progress(DistillProgress {
                epoch,
                step,
                steps,
                loss: loss_sum / (step + 1) as f64,
            });
        }
    }
    model.valid().to_store().await
}

/// Zeroes the masked weights (the parameter keeps its id, so Adam's state follows it).
fn apply_masks(model: FashionCnn, masks: &[(String, Vec<f32>)], device: &Device) -> FashionCnn {
    if masks.is_empty() {
        return model;
    }
    model.mask_weights(masks, device)
}

/// Fake quantization of an `[outputs, inputs]` weight matrix with `scheme`, with a
/// straight-through gradient: the forward pass sees the quantized values, the backward
/// pass the identity. Blocks that do not divide the row fall back to per-channel. (The
/// deployed model quantizes BatchNorm-folded weights; per-channel symmetric grids are the
/// same either way, since folding scales each row by a positive factor.)
pub fn ste_fake_quant(w: Tensor<2>, scheme: &QuantScheme) -> Tensor<2> {
    let [rows, cols] = w.dims();
    let (qmin, qmax) = scheme.qrange();
    let (qmin, qmax) = (qmin as f64, qmax as f64);
    let groups: Tensor<2> = match scheme.granularity {
        Granularity::PerTensor => w.clone().reshape([1, rows * cols]),
        Granularity::PerBlock(b) if b > 0 && cols.is_multiple_of(b) => {
            w.clone().reshape([rows * cols / b, b])
        }
        _ => w.clone(),
    };
    let q = if scheme.symmetric {
        let scale = groups
            .clone()
            .abs()
            .max_dim(1)
            .div_scalar(qmax)
            .clamp_min(1e-12);
        groups
            .div(scale.clone())
            .round()
            .clamp(qmin, qmax)
            .mul(scale)
    } else {
        let lo = groups.clone().min_dim(1).clamp_max(0.0);
        let hi = groups.clone().max_dim(1).clamp_min(0.0);
        let scale = (hi - lo.clone()).div_scalar(qmax - qmin).clamp_min(1e-12);
        let zp = lo.div(scale.clone()).neg().add_scalar(qmin).round();
        (groups.div(scale.clone()).round() + zp.clone())
            .clamp(qmin, qmax)
            .sub(zp)
            .mul(scale)
    };
    let q: Tensor<2> = q.reshape([rows, cols]);
    w.clone() + (q - w).detach()
}
