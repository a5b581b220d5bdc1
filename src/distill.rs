//! Knowledge distillation (Hinton et al., 2015): the original network is the teacher, the
//! compressed one the student. The student learns the teacher's softened outputs, and the
//! labels when there are any, while keeping its compression: removed channels stay removed
//! (it is built with the pruned widths) and pruned weights stay zero (masks re-applied after
//! every step).
//!
//! Loss: α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α) · CE(s, labels).

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use compresslab_spec::messages::{DistilSettings, DistilTarget};
use serde::{Deserialize, Serialize};

pub use compresslab_spec::report::HeldOutReport;

use crate::compress::{CompressedModel, Recipe, compress, pruned_and_folded};
use crate::efficientnet::weight_layers;
use crate::error::{EngineError, Result};
use crate::exec::ste_fake_quant;
use crate::fashion::{
    CLASSES, FashionCnn, FashionSet, PIXELS, SIDE, SplitMix, TrainLayers, normalize,
};
use crate::graph_builder::weight_name;
use crate::quant::QuantScheme;
use crate::weights::TensorStore;

/// Per weight tensor (by name), 1 where the weight may train and 0 where it stays zero.
pub type Masks = Vec<(String, Vec<f32>)>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// Softening temperature T.
    pub temperature: f64,
    /// Weight α of the teacher term; 1.0 ignores the labels (label-free distillation).
    pub alpha: f64,
    /// Adam's peak learning rate, decayed to 0 by a cosine over all steps.
    pub learning_rate: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Which layers learn; the others keep their compressed values.
    pub layers: TrainLayers,
    /// Random resized crops (70–100 % of the area) and horizontal flips.
    pub augment: bool,
    /// Quantization-aware training: weights fake-quantized with this scheme in the forward
    /// pass, gradients passed straight through (STE).
    pub weight_quant: Option<QuantScheme>,
    /// Layers QAT leaves in fp32 (the recipe's mixed precision).
    pub fp32_layers: Vec<String>,
    /// Photo model: MBConv blocks (0–15) whose outputs the student also matches, by mean
    /// squared error to the teacher's, added to the loss with weight `feature_weight`.
    #[serde(default)]
    pub feature_blocks: Vec<usize>,
    #[serde(default = "one")]
    pub feature_weight: f64,
}

fn one() -> f64 {
    1.0
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
            layers: TrainLayers::All,
            augment: true,
            weight_quant: None,
            fp32_layers: Vec::new(),
            feature_blocks: Vec::new(),
            feature_weight: 1.0,
        }
    }
}

/// Most epochs a distillation run takes (the page's field has the same bound).
pub const MAX_EPOCHS: usize = DistilSettings::MAX_EPOCHS;
/// Largest batch of the Fashion-MNIST network (28×28 images).
pub const MAX_BATCH: usize = DistilTarget::Fashion.max_batch();
/// Largest batch of the photo model (see [`DistilTarget::max_batch`]).
pub const MAX_PHOTO_BATCH: usize = DistilTarget::Photos.max_batch();

impl DistillConfig {
    /// Bounds every setting a page or a CLI user can type, so a typo is a message, not an
    /// allocation the worker cannot survive or a run that never ends.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_EPOCHS).contains(&self.epochs) || !(1..=MAX_BATCH).contains(&self.batch_size) {
            return Err(EngineError::Config(format!(
                "distillation takes 1–{MAX_EPOCHS} epochs and batches of 1–{MAX_BATCH} (got {} epochs, batch {})",
                self.epochs, self.batch_size
            )));
        }
        if !(0.0..=1.0).contains(&self.alpha) || !(0.5..=20.0).contains(&self.temperature) {
            return Err(EngineError::Config(format!(
                "α must be in 0–1 and T in 0.5–20 (got α {}, T {})",
                self.alpha, self.temperature
            )));
        }
        if !(0.0..=100.0).contains(&self.feature_weight) {
            return Err(EngineError::Config(format!(
                "the feature-matching weight must be in 0–100, got {}",
                self.feature_weight
            )));
        }
        if !(self.learning_rate > 0.0 && self.learning_rate <= 0.1) {
            return Err(EngineError::Config(format!(
                "learning rate {} is outside (0, 0.1]",
                self.learning_rate
            )));
        }
        Ok(())
    }

    /// [`Self::validate`], with the photo model's smaller batch bound.
    pub fn validate_photo(&self) -> Result<()> {
        self.validate()?;
        if self.batch_size > MAX_PHOTO_BATCH {
            return Err(EngineError::Config(format!(
                "the photo model trains on batches of at most {MAX_PHOTO_BATCH} photos (got {}): larger ones need more memory than a browser tab gets",
                self.batch_size
            )));
        }
        Ok(())
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

/// One optimisation step's outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    pub epoch: usize,
    /// Step within the epoch (from 0) and steps per epoch.
    pub step: usize,
    pub steps: usize,
    /// This batch's loss and the epoch's mean so far.
    pub loss: f64,
    pub epoch_loss: f64,
    pub images: usize,
    pub epoch_done: bool,
}

/// The distillation loss, averaged over the batch. `labels` holds each image's class
/// (any value where unlabelled) and a 0/1 weight marking the labelled ones, with their
/// count; cross-entropy averages over those.
pub fn distillation_loss(
    student: Tensor<2>,
    teacher: Tensor<2>,
    labels: Option<(Tensor<1, Int>, Tensor<1>, usize)>,
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
        Some((y, weight, count)) if alpha < 1.0 && count > 0 => {
            let log_s = log_softmax(student, 1);
            let picked: Tensor<1> = log_s.gather(1, y.unsqueeze_dim(1)).flatten(0, 1);
            let ce: Tensor<1> = (picked * weight)
                .sum()
                .div_scalar(count as f64)
                .neg()
                .reshape([1]);
            soft + ce.mul_scalar(1.0 - alpha)
        }
        _ => soft,
    }
}

/// 1 where a weight may train, 0 where pruning zeroed it, for every layer's weight tensor
/// in `store` that has zeros (by name; the student's own shapes).
pub fn zero_masks(store: &TensorStore) -> Masks {
    weight_layers(store)
        .iter()
        .filter_map(|l| store.get(&weight_name(&l.name)).ok())
        .filter(|t| t.data.contains(&0.0))
        .map(|t| {
            (
                t.name.clone(),
                t.data.iter().map(|&v| (v != 0.0) as u8 as f32).collect(),
            )
        })
        .collect()
}

/// A random resized crop (70–100 % of the area, aspect 3:4–4:3, bilinear) and a coin-flip
/// mirror of one 28×28 image, normalised.
pub fn augment(pixels: &[u8], rng: &mut SplitMix) -> Vec<f32> {
    let side = SIDE as f64;
    let area = 0.7 + 0.3 * rng.unit();
    let aspect = ((0.75f64).ln() + rng.unit() * ((4.0f64 / 3.0).ln() - (0.75f64).ln())).exp();
    let w = (side * (area * aspect).sqrt()).min(side);
    let h = (side * (area / aspect).sqrt()).min(side);
    let (x0, y0) = (rng.unit() * (side - w), rng.unit() * (side - h));
    let flip = rng.below(2) == 1;
    let at = |x: isize, y: isize| -> f64 {
        let x = x.clamp(0, SIDE as isize - 1) as usize;
        let y = y.clamp(0, SIDE as isize - 1) as usize;
        pixels[y * SIDE + x] as f64
    };
    let mut out = vec![0u8; PIXELS];
    for oy in 0..SIDE {
        let sy = y0 + (oy as f64 + 0.5) * h / side - 0.5;
        let (fy, ty) = (sy.floor(), sy - sy.floor());
        for ox in 0..SIDE {
            let sx = x0 + (ox as f64 + 0.5) * w / side - 0.5;
            let (fx, tx) = (sx.floor(), sx - sx.floor());
            let (ix, iy) = (fx as isize, fy as isize);
            let v = (1.0 - ty) * ((1.0 - tx) * at(ix, iy) + tx * at(ix + 1, iy))
                + ty * ((1.0 - tx) * at(ix, iy + 1) + tx * at(ix + 1, iy + 1));
            let dx = if flip { SIDE - 1 - ox } else { ox };
            out[oy * SIDE + dx] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    normalize(&out)
}

/// Class tensors for [`distillation_loss`]: each image's class (0 where unknown), a 0/1
/// weight marking the known ones, and their count.
pub fn label_tensors(
    labels: &[Option<usize>],
    device: &Device,
) -> (Tensor<1, Int>, Tensor<1>, usize) {
    let n = labels.len();
    let ys: Vec<i64> = labels.iter().map(|l| l.unwrap_or(0) as i64).collect();
    let ws: Vec<f32> = labels.iter().map(|l| l.is_some() as u8 as f32).collect();
    (
        Tensor::from_data(TensorData::new(ys, [n]), device),
        Tensor::from_data(TensorData::new(ws, [n]), device),
        labels.iter().filter(|l| l.is_some()).count(),
    )
}

/// The loss's value, or an error saying at which step (`at`) when it is not finite.
pub(crate) async fn loss_value(loss: Tensor<1>, at: impl Fn() -> String) -> Result<f64> {
    let value = f64::from(read_f32(loss).await?.first().copied().unwrap_or(f32::NAN));
    if !value.is_finite() {
        return Err(EngineError::Execution(format!(
            "distillation loss became {value} at {}",
            at()
        )));
    }
    Ok(value)
}

/// `peak` decayed to 0 by a cosine over `total` steps.
pub(crate) fn cosine_lr(peak: f64, done: usize, total: usize) -> f64 {
    let t = (done as f64 / total.max(1) as f64).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

pub(crate) async fn read_f32<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data_async()
        .await
        .map_err(|e| EngineError::Execution(format!("{e:?}")))?
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| EngineError::Execution(format!("{e:?}")))
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Images per forward pass when measuring (no gradients).
const EVAL_BATCH: usize = 100;

/// A distillation run, one step at a time, so the caller can report progress, pause,
/// cancel or measure between steps. The student is built from its own (possibly pruned,
/// possibly BatchNorm-folded) weights; the teacher runs on the plain device.
pub struct Distiller {
    cfg: DistillConfig,
    device: Device,
    plain: Device,
    teacher: FashionCnn,
    student: Option<FashionCnn>,
    optim: ModuleOptimizer,
    masks: Vec<(String, Vec<f32>)>,
    train: FashionSet,
    order: Vec<usize>,
    rng: SplitMix,
    epoch: usize,
    step: usize,
    epoch_loss_sum: f64,
}

impl Distiller {
    /// `device` must be an autodiff device. `masks` (from [`zero_masks`]) keep pruned
    /// weights at zero.
    pub fn new(
        teacher: &TensorStore,
        student: &TensorStore,
        masks: Vec<(String, Vec<f32>)>,
        train: FashionSet,
        cfg: DistillConfig,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        if train.is_empty() {
            return Err(EngineError::Config("distillation needs images".into()));
        }
        if !cfg.feature_blocks.is_empty() {
            // Its conv outputs are what channel pruning narrows: no common width to match.
            return Err(EngineError::Config(
                "feature matching is for the photo model's blocks; the Fashion-MNIST network distils on its outputs".into(),
            ));
        }
        device.seed(cfg.seed);
        let plain = device.clone().inner();
        let teacher_net = FashionCnn::from_store(teacher, &plain)?;
        let model = FashionCnn::from_store(student, device)?.freeze(cfg.layers);
        let model = apply_masks(model, &masks, device);
        let mut rng = SplitMix::new(cfg.seed);
        let mut order: Vec<usize> = (0..train.len()).collect();
        rng.shuffle(&mut order);
        Ok(Self {
            device: device.clone(),
            plain,
            teacher: teacher_net,
            student: Some(model),
            optim: AdamConfig::new().init(),
            masks,
            train,
            order,
            rng,
            epoch: 0,
            step: 0,
            epoch_loss_sum: 0.0,
            cfg,
        })
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.train.len().div_ceil(self.cfg.batch_size)
    }

    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch() * self.cfg.epochs
    }

    pub fn steps_done(&self) -> usize {
        self.epoch * self.steps_per_epoch() + self.step
    }

    pub fn is_done(&self) -> bool {
        self.epoch >= self.cfg.epochs
    }

    fn model(&self) -> Result<&FashionCnn> {
        self.student
            .as_ref()
            .ok_or_else(|| EngineError::Execution("a failed step left no student".into()))
    }

    /// The student's logits, fake-quantized when training is quantization-aware.
    fn student_logits(&self, model: &FashionCnn, x: Tensor<4>) -> Tensor<2> {
        match &self.cfg.weight_quant {
            Some(scheme) => model.forward_mapped(x, &|name, w| {
                if self.cfg.fp32_layers.iter().any(|l| l == name) {
                    w
                } else {
                    ste_fake_quant(w, scheme)
                }
            }),
            None => model.forward(x),
        }
    }

    /// One Adam step on the next batch.
    pub async fn step(&mut self) -> Result<StepReport> {
        if self.is_done() {
            return Err(EngineError::Config("distillation already finished".into()));
        }
        let steps = self.steps_per_epoch();
        let bs = self.cfg.batch_size;
        let batch: Vec<usize> =
            self.order[self.step * bs..((self.step + 1) * bs).min(self.order.len())].to_vec();
        let n = batch.len();
        let mut pixels = Vec::with_capacity(n * PIXELS);
        let mut labels = Vec::with_capacity(n);
        for &i in &batch {
            if self.cfg.augment {
                pixels.extend(augment(self.train.image(i), &mut self.rng));
            } else {
                pixels.extend(normalize(self.train.image(i)));
            }
            let label = usize::from(self.train.labels[i]);
            labels.push((label < CLASSES).then_some(label));
        }
        let shape = [n, 1, SIDE, SIDE];
        let teacher = self.teacher.forward(Tensor::from_data(
            TensorData::new(pixels.clone(), shape),
            &self.plain,
        ));
        let teacher = Tensor::<2>::from_data(
            TensorData::new(read_f32(teacher).await?, [n, CLASSES]),
            &self.device,
        );
        let x = Tensor::<4>::from_data(TensorData::new(pixels, shape), &self.device);
        let model = self
            .student
            .take()
            .ok_or_else(|| EngineError::Execution("a failed step left no student".into()))?;
        let loss = distillation_loss(
            self.student_logits(&model, x),
            teacher,
            Some(label_tensors(&labels, &self.device)),
            self.cfg.temperature,
            self.cfg.alpha,
        );
        let (epoch, step) = (self.epoch + 1, self.step + 1);
        let value = loss_value(loss.clone(), || format!("epoch {epoch} step {step}")).await?;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = cosine_lr(
            self.cfg.learning_rate,
            self.steps_done(),
            self.total_steps(),
        );
        self.student = Some(apply_masks(
            self.optim.step(lr, model, grads),
            &self.masks,
            &self.device,
        ));
        self.epoch_loss_sum += value;
        let report = StepReport {
            epoch: self.epoch,
            step: self.step,
            steps,
            loss: value,
            epoch_loss: self.epoch_loss_sum / (self.step + 1) as f64,
            images: n,
            epoch_done: self.step + 1 == steps,
        };
        self.step += 1;
        if self.step == steps {
            self.step = 0;
            self.epoch += 1;
            self.epoch_loss_sum = 0.0;
            self.rng.shuffle(&mut self.order);
        }
        Ok(report)
    }

    /// The student (as it stands, no augmentation, fake-quantized when QAT) on `set`.
    pub async fn evaluate(&self, set: &FashionSet) -> Result<HeldOutReport> {
        let model = self.model()?.valid();
        let (mut loss_sum, mut correct, mut teacher_correct, mut labelled, mut agree) =
            (0.0, 0, 0, 0, 0);
        for start in (0..set.len()).step_by(EVAL_BATCH) {
            let end = (start + EVAL_BATCH).min(set.len());
            let n = end - start;
            let pixels = normalize(&set.images[start * PIXELS..end * PIXELS]);
            let x =
                Tensor::<4>::from_data(TensorData::new(pixels, [n, 1, SIDE, SIDE]), &self.plain);
            let t = self.teacher.forward(x.clone());
            let s = self.student_logits(&model, x);
            let batch_labels = &set.labels[start..end];
            let labels: Vec<Option<usize>> = batch_labels
                .iter()
                .map(|&l| (usize::from(l) < CLASSES).then_some(usize::from(l)))
                .collect();
            let loss = distillation_loss(
                s.clone(),
                t.clone(),
                Some(label_tensors(&labels, &self.plain)),
                self.cfg.temperature,
                self.cfg.alpha,
            );
            loss_sum +=
                f64::from(read_f32(loss).await?.first().copied().unwrap_or(f32::NAN)) * n as f64;
            let (sv, tv) = (read_f32(s).await?, read_f32(t).await?);
            for (i, &label) in batch_labels.iter().enumerate() {
                let sp = argmax(&sv[i * CLASSES..(i + 1) * CLASSES]);
                let tp = argmax(&tv[i * CLASSES..(i + 1) * CLASSES]);
                agree += (sp == tp) as usize;
                if usize::from(label) < CLASSES {
                    labelled += 1;
                    correct += (sp == usize::from(label)) as usize;
                    teacher_correct += (tp == usize::from(label)) as usize;
                }
            }
        }
        let images = set.len().max(1);
        let share = |k: usize| (labelled > 0).then(|| k as f64 / labelled as f64);
        Ok(HeldOutReport {
            images: set.len(),
            loss: loss_sum / images as f64,
            accuracy: share(correct),
            teacher_accuracy: share(teacher_correct),
            agreement: agree as f64 / images as f64,
        })
    }

    /// The student's weights as they stand (masks applied; the same form it was given:
    /// raw or folded). QAT students are returned in float: quantize them with the recipe.
    pub async fn student(&self) -> Result<TensorStore> {
        self.model()?.valid().to_store().await
    }
}

/// Distils `student` from `teacher` on `data` for `cfg.epochs` epochs and returns its
/// trained weights.
pub async fn distill_fashion(
    teacher: &TensorStore,
    student: &TensorStore,
    masks: &[(String, Vec<f32>)],
    data: &FashionSet,
    cfg: &DistillConfig,
    device: &Device,
    progress: &mut dyn FnMut(DistillProgress),
) -> Result<TensorStore> {
    let mut run = Distiller::new(
        teacher,
        student,
        masks.to_vec(),
        data.clone(),
        cfg.clone(),
        device,
    )?;
    while !run.is_done() {
        let r = run.step().await?;
        progress(DistillProgress {
            epoch: r.epoch,
            step: r.step,
            steps: r.steps,
            loss: r.epoch_loss,
        });
    }
    run.student().await
}

/// Zeroes the masked weights (the parameter keeps its id, so Adam's state follows it).
fn apply_masks(model: FashionCnn, masks: &[(String, Vec<f32>)], device: &Device) -> FashionCnn {
    if masks.is_empty() {
        return model;
    }
    model.mask_weights(masks, device)
}

/// Share of each class held out to measure a fine-tune, and the split's seed (the page
/// and the command line use the same).
pub const HELDOUT_FRACTION: f64 = 0.2;
pub const SPLIT_SEED: u64 = 2024;

/// The student a recipe makes of `teacher`: channel-pruned, BatchNorm-folded and
/// magnitude-pruned (the float network quantization starts from), with the masks that
/// keep its pruned weights at zero.
pub fn student_for(teacher: &TensorStore, recipe: &Recipe) -> Result<(TensorStore, Masks)> {
    let student = pruned_and_folded(teacher, recipe)?;
    let masks = match &recipe.magnitude_pruning {
        Some(m) if m.sparsity > 0.0 => zero_masks(&student),
        _ => Vec::new(),
    };
    Ok((student, masks))
}

/// The fine-tuned student quantized as `recipe` says; its pruning is already in it, so
/// only the quantization steps run. The result carries the whole recipe.
pub fn requantize(
    trained: &TensorStore,
    recipe: &Recipe,
    calibration: &[Vec<f32>],
) -> Result<CompressedModel> {
    let quantize_only = Recipe {
        channel_pruning: None,
        magnitude_pruning: None,
        ..recipe.clone()
    };
    let mut model = compress(trained, &quantize_only, calibration, &mut |_, _| Ok(()))?;
    model.recipe = recipe.clone();
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{Granularity, fake_quantize};

    // The straight-through forward pass must be the deployed quantization, ragged blocks
    // included (rows of 40 in blocks of 32).
    #[test]
    fn fake_quant_matches_the_deployed_grid() {
        let device = Device::flex();
        let (rows, cols) = (3, 40);
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect();
        for granularity in [
            Granularity::PerTensor,
            Granularity::PerChannel,
            Granularity::PerBlock(32),
            Granularity::PerBlock(8),
        ] {
            for symmetric in [true, false] {
                let scheme = QuantScheme {
                    bits: 4,
                    symmetric,
                    granularity,
                };
                let w =
                    Tensor::<2>::from_data(TensorData::new(data.clone(), [rows, cols]), &device);
                let ours =
                    futures_lite::future::block_on(read_f32(ste_fake_quant(w, &scheme))).unwrap();
                let deployed = fake_quantize(&data, &[rows, cols], scheme);
                let worst = ours
                    .iter()
                    .zip(&deployed)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(worst < 1e-4, "{scheme:?}: off by {worst}");
            }
        }
    }
}
