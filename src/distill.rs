//! Knowledge distillation (Hinton et al., 2015): the original network is the teacher, the
//! compressed one the student. The student learns the teacher's softened outputs, and the
//! labels when there are any, while keeping its compression: removed channels stay removed
//! (it is built with the pruned widths) and pruned weights stay zero (masks re-applied after
//! every step). Both built-in networks distil the same way, as the model builder's graphs on
//! the burn interpreter ([`NetworkDistiller`]); [`Distiller`] feeds it Fashion-MNIST
//! epochs, `finetune_photo` photos (cropped by `distill_photo`).
//!
//! Loss: α · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α) · CE(s, labels).

use std::collections::{HashMap, HashSet};

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use compresslab_spec::messages::{DistilSettings, DistilTarget};
use serde::{Deserialize, Serialize};

pub use compresslab_spec::report::HeldOutReport;

use crate::compress::{CompressedModel, Recipe, compress, pruned_and_folded};
use crate::efficientnet::{reader_of_block, trained_layers, weight_layers};
use crate::error::{EngineError, Result};
use crate::exec::GraphModel;
use crate::fashion::{
    CLASSES, FashionSet, PIXELS, SIDE, SplitMix, TrainLayers, is_fashion, normalize,
};
use crate::graph::{Graph, batch_one_shapes};
use crate::graph_builder::{
    bias_name, layer_inputs, network_graph, unfolded_network_graph, weight_name,
};
use crate::prune::{ChannelPruning, kept_channels};
use crate::quant::QuantScheme;
use crate::weights::{NamedTensor, TensorStore};

/// Per weight tensor (by name), 1 where the weight may train and 0 where it stays zero.
pub type Masks = Vec<(String, Vec<f32>)>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// Softening temperature T.
    pub temperature: f64,
    /// Weight α of the teacher term; 1.0 ignores the labels (label-free distillation).
    pub alpha: f64,
    /// Adam's peak learning rate, reached after a linear warm-up over the first tenth of the
    /// steps and decayed to 0 by a cosine over all steps.
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

/// The network `store` holds as a graph that takes batches of any size.
pub(crate) fn batch_graph(store: &TensorStore) -> Result<Graph> {
    Ok(network_graph(store)?.with_any_batch())
}

/// [`batch_graph`] with the BatchNorms as nodes (the same outputs): the graph channel pruning
/// analyses, so its values are the ones [`kept_channels`] names.
fn unfolded_batch_graph(store: &TensorStore) -> Result<Graph> {
    Ok(unfolded_network_graph(store)?.with_any_batch())
}

/// The values feature matching compares: the outputs of the photo model's MBConv blocks
/// `blocks` (each the input of the layer after the block), with their channel counts.
fn block_outputs(
    store: &TensorStore,
    graph: &Graph,
    blocks: &[usize],
) -> Result<Vec<(String, usize)>> {
    let readers = blocks
        .iter()
        .map(|&b| reader_of_block(store, b))
        .collect::<Result<Vec<_>>>()?;
    let shapes = batch_one_shapes(graph)?;
    layer_inputs(graph, &readers)?
        .into_iter()
        .map(|value| {
            let width = shapes
                .get(&value)
                .and_then(|d| d.get(1))
                .and_then(|d| d.known())
                .ok_or_else(|| EngineError::Execution(format!("`{value}` has no fixed width")))?;
            Ok((value, width))
        })
        .collect()
}

/// The shape of one input image of `graph` (its input without the batch).
fn image_dims(graph: &Graph) -> Result<[usize; 3]> {
    let dims: Vec<usize> = graph
        .inputs
        .first()
        .map(|input| {
            input
                .dims
                .iter()
                .skip(1)
                .filter_map(|d| d.known())
                .collect()
        })
        .unwrap_or_default();
    dims.try_into().map_err(|dims: Vec<usize>| {
        EngineError::Execution(format!(
            "the network's input is {dims:?} per image, not C×H×W"
        ))
    })
}

/// Values per forward pass when measuring (no gradients): eight photos at 224², at most
/// [`MAX_EVAL_IMAGES`] smaller images.
const EVAL_VALUES: usize = 8 * 3 * 224 * 224;
const MAX_EVAL_IMAGES: usize = 100;

/// Distils a compressed built-in network (EfficientNet-Lite0 or the Fashion-MNIST CNN) from
/// its original, one batch at a time: teacher and student are the model builder's graphs on
/// the burn interpreter ([`GraphModel`]). The student keeps its compression (built with the
/// pruned widths, masks keep pruned weights at zero, quantized layers train fake-quantized);
/// [`TrainLayers`] chooses which layers learn.
pub struct NetworkDistiller {
    cfg: DistillConfig,
    device: Device,
    plain: Device,
    teacher: GraphModel,
    student: Option<GraphModel>,
    /// One input image's shape.
    image: [usize; 3],
    /// The block outputs feature matching compares, in the teacher's graph and in the
    /// student's, and per block the teacher's channels the student kept where channel
    /// pruning narrowed it.
    teacher_taps: Vec<String>,
    taps: Vec<String>,
    kept: Vec<Option<Vec<usize>>>,
    optim: ModuleOptimizer,
    /// Per weight constant, 1 where it may train and 0 where it stays zero.
    masks: HashMap<String, Tensor<1>>,
    total_steps: usize,
    steps_done: usize,
}

impl NetworkDistiller {
    /// `student` is made of `teacher` by a recipe (see [`student_for`]), with `pruning`'s
    /// channels removed if any (feature matching compares the channels it kept); `masks`
    /// (from [`zero_masks`]) keep pruned weights at zero; `device` is an autodiff device;
    /// the learning rate warms up over the first tenth of `total_steps`, then follows a
    /// cosine.
    pub fn new(
        teacher: &TensorStore,
        student: &TensorStore,
        masks: Masks,
        pruning: Option<&ChannelPruning>,
        cfg: DistillConfig,
        total_steps: usize,
        device: &Device,
    ) -> Result<Self> {
        let mut cfg = cfg;
        if is_fashion(student) {
            cfg.validate()?;
            if !cfg.feature_blocks.is_empty() {
                return Err(EngineError::Config(
                    "feature matching is for the photo model's blocks; the Fashion-MNIST network distils on its outputs".into(),
                ));
            }
        } else {
            cfg.validate_photo()?;
        }
        cfg.feature_blocks.sort_unstable();
        cfg.feature_blocks.dedup();
        device.seed(cfg.seed);
        let plain = device.clone().inner();
        let pruned = match pruning {
            Some(p) if p.ratio > 0.0 && !cfg.feature_blocks.is_empty() => {
                kept_channels(teacher, p)?
            }
            _ => HashMap::new(),
        };
        // Where the teacher's channels are selected, its graph is the one pruning analysed
        // (BatchNorms as nodes), whose value names the selection uses.
        let teacher_graph = if pruned.is_empty() {
            batch_graph(teacher)?
        } else {
            unfolded_batch_graph(teacher)?
        };
        let student_graph = batch_graph(student)?;
        let image = image_dims(&student_graph)?;
        if image_dims(&teacher_graph)? != image {
            return Err(EngineError::Config(
                "the student takes other images than the teacher".into(),
            ));
        }
        let theirs = block_outputs(teacher, &teacher_graph, &cfg.feature_blocks)?;
        let ours = block_outputs(student, &student_graph, &cfg.feature_blocks)?;
        let mut kept = Vec::new();
        for ((b, (_, width)), (their, their_width)) in
            cfg.feature_blocks.iter().zip(&ours).zip(&theirs)
        {
            let channels = pruned.get(their);
            if *width != channels.map_or(*their_width, Vec::len) {
                return Err(EngineError::Config(format!(
                    "feature matching at block {b}: the student has {width} output channels there and the teacher {their_width}, which its channel pruning does not explain"
                )));
            }
            kept.push(channels.cloned());
        }
        let teacher_taps = theirs.into_iter().map(|(value, _)| value).collect();
        let taps = ours.into_iter().map(|(value, _)| value).collect();
        let trained: HashSet<String> = trained_layers(student, cfg.layers)
            .iter()
            .flat_map(|l| [weight_name(l), bias_name(l)])
            .collect();
        let mut net = GraphModel::new(&student_graph, device)?.freeze_except(&trained);
        if let Some(scheme) = cfg.weight_quant {
            let quantized: Vec<String> = weight_layers(student)
                .into_iter()
                .filter(|l| !cfg.fp32_layers.contains(&l.name))
                .map(|l| weight_name(&l.name))
                .collect();
            net = net.with_live_weight_quantization(&quantized, scheme);
        }
        let masks: HashMap<String, Tensor<1>> = masks
            .into_iter()
            .map(|(name, m)| {
                let n = m.len();
                (name, Tensor::from_data(TensorData::new(m, [n]), device))
            })
            .collect();
        Ok(Self {
            teacher: GraphModel::new(&teacher_graph, &plain)?,
            student: Some(net.mask_zeros(&masks)),
            image,
            teacher_taps,
            taps,
            kept,
            cfg,
            device: device.clone(),
            plain,
            optim: AdamConfig::new().init(),
            masks,
            total_steps: total_steps.max(1),
            steps_done: 0,
        })
    }

    pub fn steps_done(&self) -> usize {
        self.steps_done
    }

    /// One input image's values.
    fn image_len(&self) -> usize {
        self.image.iter().product()
    }

    /// `n` images' values as a batch tensor on `device`.
    fn batch(&self, images: Vec<f32>, n: usize, device: &Device) -> Result<Tensor<4>> {
        let [c, h, w] = self.image;
        let expected = n.checked_mul(self.image_len());
        if n == 0 || expected != Some(images.len()) {
            return Err(EngineError::Config(format!(
                "a batch of {n} images of {c}×{h}×{w} needs {} values, got {}",
                expected.map_or("more".into(), |e| e.to_string()),
                images.len()
            )));
        }
        Ok(Tensor::from_data(
            TensorData::new(images, [n, c, h, w]),
            device,
        ))
    }

    fn model(&self) -> Result<&GraphModel> {
        self.student
            .as_ref()
            .ok_or_else(|| EngineError::Execution("a failed step left no student".into()))
    }

    /// One Adam step on `labels.len()` preprocessed images (NCHW, flattened), with a class
    /// per image where known. Returns the batch's loss.
    pub async fn step(&mut self, images: Vec<f32>, labels: &[Option<usize>]) -> Result<f64> {
        let n = labels.len();
        let x = self.batch(images, n, &self.plain)?;
        let taps = &self.taps;
        let (teacher, teacher_features) =
            self.teacher.logits_tapped(x.clone(), &self.teacher_taps)?;
        let [_, classes] = teacher.dims();
        let teacher = Tensor::<2>::from_data(
            TensorData::new(read_f32(teacher).await?, [n, classes]),
            &self.device,
        );
        let model = self
            .student
            .take()
            .ok_or_else(|| EngineError::Execution("a failed step left no student".into()))?;
        let (logits, features) = model.logits_tapped(x.to_device(&self.device), taps)?;
        let mut loss = distillation_loss(
            logits,
            teacher,
            Some(label_tensors(labels, &self.device)),
            self.cfg.temperature,
            self.cfg.alpha,
        );
        if !taps.is_empty() {
            // Mean squared error of each tapped block's output, averaged over the blocks.
            let weight = self.cfg.feature_weight / taps.len() as f64;
            for ((s, t), kept) in features.into_iter().zip(teacher_features).zip(&self.kept) {
                let t = match kept {
                    Some(channels) => t.select_channels(channels)?,
                    None => t,
                };
                let t = read_f32(t.flat()?).await?;
                let len = t.len();
                let t = Tensor::<1>::from_data(TensorData::new(t, [len]), &self.device);
                let mse: Tensor<1> = (s.flat()? - t).powf_scalar(2.0).mean().reshape([1]);
                loss = loss + mse.mul_scalar(weight);
            }
        }
        let step = self.steps_done + 1;
        let value = loss_value(loss.clone(), || format!("step {step}")).await?;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        // A linear warm-up over the first tenth: Adam's first steps move every weight by
        // about the full rate, which jolts a pretrained network.
        let warmup = (self.total_steps / 10).max(1);
        let lr = cosine_lr(self.cfg.learning_rate, self.steps_done, self.total_steps)
            * ((self.steps_done + 1) as f64 / warmup as f64).min(1.0);
        self.student = Some(self.optim.step(lr, model, grads).mask_zeros(&self.masks));
        self.steps_done += 1;
        Ok(value)
    }

    /// Student (fake-quantized when training is quantization-aware) and teacher logits
    /// for `n` preprocessed images, without gradients.
    pub async fn logits(&self, images: Vec<f32>, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let student = self.model()?.valid();
        let x = self.batch(images, n, &self.plain)?;
        let s = student.logits(x.clone())?;
        let t = self.teacher.logits(x)?;
        Ok((read_f32(s).await?, read_f32(t).await?))
    }

    /// The student as it stands on preprocessed images (one NCHW image each), next to the
    /// teacher: the distillation loss without augmentation (the output terms: feature
    /// matching only guides training), accuracy on the labelled ones and top-1 agreement.
    pub async fn evaluate(
        &self,
        inputs: &[Vec<f32>],
        labels: &[Option<usize>],
    ) -> Result<HeldOutReport> {
        let (mut loss_sum, mut correct, mut teacher_correct, mut agree) = (0.0, 0, 0, 0);
        let labelled = labels.iter().flatten().count();
        let per_pass = (EVAL_VALUES / self.image_len().max(1)).clamp(1, MAX_EVAL_IMAGES);
        for (batch, batch_labels) in inputs.chunks(per_pass).zip(labels.chunks(per_pass)) {
            let n = batch.len();
            let (s, t) = self.logits(batch.concat(), n).await?;
            let classes = s.len() / n.max(1);
            let tensor = |v: &[f32]| {
                Tensor::<2>::from_data(TensorData::new(v.to_vec(), [n, classes]), &self.plain)
            };
            let loss = distillation_loss(
                tensor(&s),
                tensor(&t),
                Some(label_tensors(batch_labels, &self.plain)),
                self.cfg.temperature,
                self.cfg.alpha,
            );
            loss_sum +=
                f64::from(read_f32(loss).await?.first().copied().unwrap_or(f32::NAN)) * n as f64;
            for (i, label) in batch_labels.iter().enumerate() {
                let sp = argmax(&s[i * classes..(i + 1) * classes]);
                let tp = argmax(&t[i * classes..(i + 1) * classes]);
                agree += (sp == tp) as usize;
                if let Some(y) = *label {
                    correct += (sp == y) as usize;
                    teacher_correct += (tp == y) as usize;
                }
            }
        }
        let images = inputs.len().max(1);
        let share = |k: usize| (labelled > 0).then(|| k as f64 / labelled as f64);
        Ok(HeldOutReport {
            images: inputs.len(),
            loss: loss_sum / images as f64,
            accuracy: share(correct),
            teacher_accuracy: share(teacher_correct),
            agreement: agree as f64 / images as f64,
        })
    }

    /// The student's weights (BatchNorm folded, masks applied), to re-quantize with its
    /// recipe. QAT students are returned in float.
    pub async fn student(&self) -> Result<TensorStore> {
        let net = self.model()?.valid();
        // The folded network's graph holds exactly its store's tensors, under their names.
        let mut store = TensorStore::default();
        for (name, c) in net.constants().await? {
            store.push(NamedTensor {
                name,
                shape: c.dims,
                data: c.data,
            });
        }
        Ok(store)
    }
}

/// Index of the largest value.
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Distillation of the Fashion-MNIST network on a labelled (or partly labelled) set: a
/// [`NetworkDistiller`] fed shuffled, augmented batches epoch by epoch, so the caller can
/// report progress, pause, cancel or measure between steps.
pub struct Distiller {
    run: NetworkDistiller,
    cfg: DistillConfig,
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
        masks: Masks,
        train: FashionSet,
        cfg: DistillConfig,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        if train.is_empty() {
            return Err(EngineError::Config("distillation needs images".into()));
        }
        let total = train.len().div_ceil(cfg.batch_size) * cfg.epochs;
        let run = NetworkDistiller::new(teacher, student, masks, None, cfg.clone(), total, device)?;
        let mut rng = SplitMix::new(cfg.seed);
        let mut order: Vec<usize> = (0..train.len()).collect();
        rng.shuffle(&mut order);
        Ok(Self {
            run,
            cfg,
            train,
            order,
            rng,
            epoch: 0,
            step: 0,
            epoch_loss_sum: 0.0,
        })
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.train.len().div_ceil(self.cfg.batch_size)
    }

    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch() * self.cfg.epochs
    }

    pub fn steps_done(&self) -> usize {
        self.run.steps_done()
    }

    pub fn is_done(&self) -> bool {
        self.epoch >= self.cfg.epochs
    }

    /// One Adam step on the next batch.
    pub async fn step(&mut self) -> Result<StepReport> {
        if self.is_done() {
            return Err(EngineError::Config("distillation already finished".into()));
        }
        let steps = self.steps_per_epoch();
        let bs = self.cfg.batch_size;
        let batch = &self.order[self.step * bs..((self.step + 1) * bs).min(self.order.len())];
        let mut pixels = Vec::with_capacity(batch.len() * PIXELS);
        let mut labels = Vec::with_capacity(batch.len());
        for &i in batch {
            if self.cfg.augment {
                pixels.extend(augment(self.train.image(i), &mut self.rng));
            } else {
                pixels.extend(normalize(self.train.image(i)));
            }
            let label = usize::from(self.train.labels[i]);
            labels.push((label < CLASSES).then_some(label));
        }
        let value = self.run.step(pixels, &labels).await?;
        self.epoch_loss_sum += value;
        let report = StepReport {
            epoch: self.epoch,
            step: self.step,
            steps,
            loss: value,
            epoch_loss: self.epoch_loss_sum / (self.step + 1) as f64,
            images: labels.len(),
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
        let inputs: Vec<Vec<f32>> = (0..set.len()).map(|i| normalize(set.image(i))).collect();
        let labels: Vec<Option<usize>> = set
            .labels
            .iter()
            .map(|&l| (usize::from(l) < CLASSES).then_some(usize::from(l)))
            .collect();
        self.run.evaluate(&inputs, &labels).await
    }

    /// The student's weights as they stand (masks applied, BatchNorm folded). QAT students
    /// are returned in float: quantize them with the recipe.
    pub async fn student(&self) -> Result<TensorStore> {
        self.run.student().await
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
