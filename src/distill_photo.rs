//! Distillation for the photo model, EfficientNet-Lite0 at 224×224: the original network
//! (fp32) is the teacher, the compressed one (pruned, BatchNorm-folded, as
//! [`crate::distill::student_for`] makes it) the student, both as the model builder's graphs
//! on the burn interpreter ([`GraphModel`]). The same loss and the same
//! step-at-a-time shape as the Fashion-MNIST [`crate::distill::Distiller`]; which layers
//! learn is all, the last N MBConv blocks and what follows, the head (last 1×1 conv +
//! classifier), or the classifier alone. Quantized students train with fake-quantized
//! weights (straight-through gradients) and are re-quantized with their recipe afterwards.
//!
//! For the user's own classes, [`fit_head`] first trains a new classifier on the teacher's
//! pooled features (transfer learning); teacher and student then both carry that head.

use std::collections::{HashMap, HashSet};

use burn::module::Module;
use burn::nn::LinearConfig;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;

use crate::distill::{
    DistillConfig, HeldOutReport, Masks, cosine_lr, distillation_loss, label_tensors, loss_value,
    read_f32,
};
use crate::efficientnet::{CLASSIFIER, reader_of_block, trained_layers, weight_layers};
use crate::error::{EngineError, Result};
use crate::exec::GraphModel;
use crate::fashion::SplitMix;
use crate::graph::{Graph, batch_one_shapes};
use crate::graph_builder::{
    bias_name, layer_inputs, network_graph, unfolded_network_graph, weight_name,
};
use crate::preprocess::{CROP, RgbImage, box_reduce, to_nchw};
use crate::prune::{ChannelPruning, kept_channels};
use crate::weights::{NamedTensor, TensorStore};

/// The network `store` holds as a graph that takes batches of any size.
fn batch_graph(store: &TensorStore) -> Result<Graph> {
    Ok(network_graph(store)?.with_any_batch())
}

/// [`batch_graph`] with the BatchNorms as nodes (the same outputs): the graph channel pruning
/// analyses, so its values are the ones [`kept_channels`] names.
fn unfolded_batch_graph(store: &TensorStore) -> Result<Graph> {
    Ok(unfolded_network_graph(store)?.with_any_batch())
}

/// The values feature matching compares: the outputs of MBConv blocks `blocks` (each the
/// input of the layer after the block), with their channel counts.
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

/// Distils an EfficientNet-Lite0 student, one batch at a time, both networks as graphs on
/// the burn interpreter.
pub struct PhotoDistiller {
    cfg: DistillConfig,
    device: Device,
    plain: Device,
    teacher: GraphModel,
    student: Option<GraphModel>,
    /// The block outputs feature matching compares, in the teacher's graph and in the
    /// student's, and per block the teacher's channels the student kept where channel
    /// pruning narrowed it.
    teacher_taps: Vec<String>,
    taps: Vec<String>,
    kept: Vec<Option<Tensor<1, Int>>>,
    optim: ModuleOptimizer,
    /// Per weight constant, 1 where it may train and 0 where it stays zero.
    masks: HashMap<String, Tensor<1>>,
    total_steps: usize,
    steps_done: usize,
}

impl PhotoDistiller {
    /// `student` is a folded store (conv biases) made of `teacher` with `pruning`'s channels
    /// removed, if any (feature matching compares the channels it kept); `device` an
    /// autodiff device; the learning rate follows a cosine over `total_steps`.
    pub fn new(
        teacher: &TensorStore,
        student: &TensorStore,
        masks: Masks,
        pruning: Option<&ChannelPruning>,
        cfg: DistillConfig,
        total_steps: usize,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate_photo()?;
        let mut cfg = cfg;
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
            kept.push(channels.map(|c| {
                let indices: Vec<i64> = c.iter().map(|&i| i as i64).collect();
                let n = indices.len();
                Tensor::<1, Int>::from_data(TensorData::new(indices, [n]), &plain)
            }));
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

    /// One Adam step on `n` preprocessed images (`[n, 3, 224, 224]`, flattened), with an
    /// ImageNet class per image where known. Returns the batch's loss.
    pub async fn step(&mut self, images: Vec<f32>, labels: &[Option<usize>]) -> Result<f64> {
        let n = labels.len();
        if n == 0 || images.len() != n * 3 * CROP * CROP {
            return Err(EngineError::Config(format!(
                "a batch of {n} images needs {} values, got {}",
                n * 3 * CROP * CROP,
                images.len()
            )));
        }
        let shape = [n, 3, CROP, CROP];
        let taps = &self.taps;
        let (teacher, teacher_features) = self.teacher.logits_tapped(
            Tensor::from_data(TensorData::new(images.clone(), shape), &self.plain),
            &self.teacher_taps,
        )?;
        let [_, classes] = teacher.dims();
        let teacher = Tensor::<2>::from_data(
            TensorData::new(read_f32(teacher).await?, [n, classes]),
            &self.device,
        );
        let model = self
            .student
            .take()
            .ok_or_else(|| EngineError::Execution("a failed step left no student".into()))?;
        let x = Tensor::<4>::from_data(TensorData::new(images, shape), &self.device);
        let (logits, features) = model.logits_tapped(x, taps)?;
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
                    Some(channels) => t.select_channels(channels.clone())?,
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
        let student = self
            .student
            .as_ref()
            .ok_or_else(|| EngineError::Execution("a failed step left no student".into()))?
            .valid();
        let x = Tensor::<4>::from_data(TensorData::new(images, [n, 3, CROP, CROP]), &self.plain);
        let s = student.logits(x.clone())?;
        let t = self.teacher.logits(x)?;
        Ok((read_f32(s).await?, read_f32(t).await?))
    }

    /// The student as it stands on preprocessed images (one `[3, 224, 224]` input each),
    /// next to the teacher: the distillation loss without augmentation (the output terms:
    /// feature matching only guides training), accuracy on the labelled ones and top-1
    /// agreement.
    pub async fn evaluate(
        &self,
        inputs: &[Vec<f32>],
        labels: &[Option<usize>],
    ) -> Result<HeldOutReport> {
        let (mut loss_sum, mut correct, mut teacher_correct, mut agree) = (0.0, 0, 0, 0);
        let labelled = labels.iter().flatten().count();
        for (batch, batch_labels) in inputs.chunks(EVAL_BATCH).zip(labels.chunks(EVAL_BATCH)) {
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

    /// The student's weights (folded, masks applied), to re-quantize with its recipe.
    pub async fn student(&self) -> Result<TensorStore> {
        let net = self
            .student
            .as_ref()
            .ok_or_else(|| EngineError::Execution("a failed step left no student".into()))?
            .valid();
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

/// Images per forward pass when measuring (no gradients).
const EVAL_BATCH: usize = 8;

/// Index of the largest value.
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

/// Full-batch Adam steps [`fit_head`] takes.
const HEAD_STEPS: usize = 300;
const HEAD_LEARNING_RATE: f64 = 5e-3;

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
    if classes < 2 || inputs.is_empty() || inputs.len() != labels.len() {
        return Err(EngineError::Config(format!(
            "a new head needs two or more classes and a label per image (got {classes} classes, {} images, {} labels)",
            inputs.len(),
            labels.len()
        )));
    }
    if let Some(&bad) = labels.iter().find(|&&y| y >= classes) {
        return Err(EngineError::Config(format!(
            "label {bad} is not one of {classes} classes"
        )));
    }
    device.seed(11);
    let plain = device.clone().inner();
    let graph = batch_graph(teacher)?;
    // The classifier's input: the pooled, flattened features.
    let pooled = layer_inputs(&graph, &[CLASSIFIER.to_string()])?;
    let backbone = GraphModel::new(&graph, &plain)?;
    let mut features = Vec::new();
    let mut ys = Vec::new();
    for (batch, batch_labels) in inputs.chunks(EVAL_BATCH).zip(labels.chunks(EVAL_BATCH)) {
        let n = batch.len();
        let x = Tensor::<4>::from_data(TensorData::new(batch.concat(), [n, 3, CROP, CROP]), &plain);
        for x in [x.clone(), x.flip([3])] {
            let (_, tapped) = backbone.logits_tapped(x, &pooled)?;
            for t in tapped {
                features.extend(read_f32(t.flat()?).await?);
            }
            ys.extend(batch_labels.iter().map(|&y| y as i64));
        }
    }
    let rows = ys.len();
    let width = features.len() / rows;
    let x = Tensor::<2>::from_data(TensorData::new(features, [rows, width]), device);
    let y = Tensor::<1, Int>::from_data(TensorData::new(ys, [rows]), device);
    let mut head = LinearConfig::new(width, classes).init(device);
    let mut optim = AdamConfig::new().init();
    for step in 0..HEAD_STEPS {
        let log_p = log_softmax(head.forward(x.clone()), 1);
        let loss: Tensor<1> = log_p
            .gather(1, y.clone().unsqueeze_dim(1))
            .mean()
            .neg()
            .reshape([1]);
        let grads = GradientsParams::from_grads(loss.backward(), &head);
        let lr = cosine_lr(HEAD_LEARNING_RATE, step, HEAD_STEPS);
        head = optim.step(lr, head, grads);
    }
    let head = head.valid();
    let w = head.weight.val().transpose();
    let weight = NamedTensor {
        name: weight_name(CLASSIFIER),
        shape: w.dims().to_vec(),
        data: read_f32(w).await?,
    };
    let b = head
        .bias
        .as_ref()
        .ok_or_else(|| EngineError::Execution("the new head has no bias".into()))?
        .val();
    let bias = NamedTensor {
        name: bias_name(CLASSIFIER),
        shape: b.dims().to_vec(),
        data: read_f32(b).await?,
    };
    Ok((weight, bias))
}

/// `store` with its classifier replaced by `head` (from [`fit_head`]).
pub fn with_head(store: &TensorStore, head: &(NamedTensor, NamedTensor)) -> TensorStore {
    let mut out = store.clone();
    out.push(head.0.clone());
    out.push(head.1.clone());
    out
}
