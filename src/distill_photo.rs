//! Distillation for the photo model, EfficientNet-Lite0 at 224×224: the original network
//! (fp32) is the teacher, the compressed one (pruned, BatchNorm-folded, as
//! [`crate::distill::student_for`] makes it) the student. The same loss and the same
//! step-at-a-time shape as the Fashion-MNIST [`crate::distill::Distiller`]; which layers
//! learn is all, the last N MBConv blocks and what follows, the head (last 1×1 conv +
//! classifier), or the classifier alone. Quantized students train with fake-quantized
//! weights (straight-through gradients) and are re-quantized with their recipe afterwards.
//!
//! For the user's own classes, [`fit_head`] first trains a new classifier on the teacher's
//! pooled features (transfer learning); teacher and student then both carry that head.

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;

use burn::nn::LinearConfig;
use burn::tensor::activation::log_softmax;

use crate::distill::{
    DistillConfig, HeldOutReport, Masks, cosine_lr, distillation_loss, label_tensors, loss_value,
    read_f32, ste_fake_quant,
};
use crate::efficientnet::{BatchNormMode, CLASSIFIER, EfficientNetLite, block_strides};
use crate::error::{EngineError, Result};
use crate::fashion::{SplitMix, TrainLayers};
use crate::graph_builder::{bias_name, weight_name};
use crate::preprocess::{CROP, RgbImage, box_reduce, to_nchw};
use crate::quant::QuantScheme;
use crate::weights::{NamedTensor, TensorStore};

/// A folded network's weights in lukemelas naming (conv weight + bias, `_fc`).
pub async fn folded_store(net: &EfficientNetLite) -> Result<TensorStore> {
    let mut net = net.clone();
    let mut store = TensorStore::default();
    for (name, unit) in net.units_mut() {
        let w = unit.conv.weight.val();
        let shape = w.dims().to_vec();
        store.push(NamedTensor {
            name: weight_name(&name),
            shape,
            data: read_f32(w).await?,
        });
        let bias = unit.conv.bias.as_ref().ok_or_else(|| {
            EngineError::Execution(format!("{name} has no bias: the student must be folded"))
        })?;
        let b = bias.val();
        store.push(NamedTensor {
            name: bias_name(&name),
            shape: b.dims().to_vec(),
            data: read_f32(b).await?,
        });
    }
    // burn stores [in, out]; PyTorch [out, in].
    let w = net.classifier.weight.val().transpose();
    store.push(NamedTensor {
        name: weight_name(CLASSIFIER),
        shape: w.dims().to_vec(),
        data: read_f32(w).await?,
    });
    if let Some(b) = &net.classifier.bias {
        let b = b.val();
        store.push(NamedTensor {
            name: bias_name(CLASSIFIER),
            shape: b.dims().to_vec(),
            data: read_f32(b).await?,
        });
    }
    Ok(store)
}

/// Multiplies the masked weights by their masks, keeping parameter ids (and whether they
/// train), so the optimizer's state carries over.
fn apply_masks(mut net: EfficientNetLite, masks: &Masks, device: &Device) -> EfficientNetLite {
    if masks.is_empty() {
        return net;
    }
    let find = |name: &str| masks.iter().find(|(n, _)| n == name).map(|(_, m)| m);
    for (name, unit) in net.units_mut() {
        if let Some(m) = find(&weight_name(&name)) {
            let m = Tensor::<1>::from_data(TensorData::new(m.clone(), [m.len()]), device);
            unit.conv.weight = unit.conv.weight.clone().map(|w| {
                let dims = w.dims();
                let trains = w.is_require_grad();
                w.mul(m.reshape(dims)).detach().set_require_grad(trains)
            });
        }
    }
    if let Some(m) = find(&weight_name(CLASSIFIER)) {
        let m = Tensor::<1>::from_data(TensorData::new(m.clone(), [m.len()]), device);
        net.classifier.weight = net.classifier.weight.clone().map(|w| {
            let [cin, cout] = w.dims();
            let trains = w.is_require_grad();
            let m: Tensor<2> = m.reshape([cout, cin]).transpose();
            w.mul(m).detach().set_require_grad(trains)
        });
    }
    net
}

/// Stops gradients to the layers `layers` leaves out.
fn freeze(mut net: EfficientNetLite, layers: TrainLayers) -> EfficientNetLite {
    let blocks = net.blocks.len();
    let first_trained_block = match layers {
        TrainLayers::All => return net,
        TrainLayers::LastBlocks(n) => blocks.saturating_sub(usize::from(n)),
        TrainLayers::Classifier | TrainLayers::LastLayer => blocks,
    };
    if first_trained_block > 0 {
        net.stem = net.stem.no_grad();
    }
    net.blocks = net
        .blocks
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            if i < first_trained_block {
                b.no_grad()
            } else {
                b
            }
        })
        .collect();
    if layers == TrainLayers::LastLayer {
        net.head = net.head.no_grad();
    }
    net
}

/// `net` with every weight passed through `f(layer name, [outputs, inputs] matrix)` for
/// one forward pass; gradients reach the original parameters through `f`.
fn mapped(net: &EfficientNetLite, f: &dyn Fn(&str, Tensor<2>) -> Tensor<2>) -> EfficientNetLite {
    let mut net = net.clone();
    for (name, unit) in net.units_mut() {
        unit.conv.weight = unit.conv.weight.clone().map(|w| {
            let dims = w.dims();
            let rows: Tensor<2> = w.reshape([dims[0], dims[1] * dims[2] * dims[3]]);
            f(&name, rows).reshape(dims)
        });
    }
    net.classifier.weight = net
        .classifier
        .weight
        .clone()
        .map(|w| f(CLASSIFIER, w.transpose()).transpose());
    net
}

/// The student's forward pass (logits and the outputs of the blocks `taps`): weights
/// fake-quantized (straight-through) when `quant` is set, except the layers `fp32` names.
fn student_forward(
    net: &EfficientNetLite,
    x: Tensor<4>,
    quant: Option<&QuantScheme>,
    fp32: &[String],
    taps: &[usize],
) -> (Tensor<2>, Vec<Tensor<4>>) {
    match quant {
        Some(scheme) => mapped(net, &|name, w| {
            if fp32.iter().any(|l| l == name) {
                w
            } else {
                ste_fake_quant(w, scheme)
            }
        })
        .forward_tapped(x, taps),
        None => net.forward_tapped(x, taps),
    }
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

/// Distils an EfficientNet-Lite0 student, one batch at a time.
pub struct PhotoDistiller {
    cfg: DistillConfig,
    device: Device,
    plain: Device,
    teacher: EfficientNetLite,
    student: Option<EfficientNetLite>,
    optim: ModuleOptimizer,
    masks: Masks,
    total_steps: usize,
    steps_done: usize,
}

impl PhotoDistiller {
    /// `student` is a folded store (conv biases); `device` an autodiff device; the
    /// learning rate follows a cosine over `total_steps`.
    pub fn new(
        teacher: &TensorStore,
        student: &TensorStore,
        masks: Masks,
        cfg: DistillConfig,
        total_steps: usize,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate_photo()?;
        let mut cfg = cfg;
        cfg.feature_blocks.sort_unstable();
        cfg.feature_blocks.dedup();
        if let Some(&b) = cfg
            .feature_blocks
            .iter()
            .find(|&&b| b >= block_strides().len())
        {
            return Err(EngineError::Config(format!(
                "feature matching at block {b}: the network has blocks 0–{}",
                block_strides().len() - 1
            )));
        }
        device.seed(cfg.seed);
        let plain = device.clone().inner();
        let teacher = EfficientNetLite::from_store(teacher, &plain, BatchNormMode::Folded)?;
        let net = EfficientNetLite::from_store(student, device, BatchNormMode::Folded)?;
        for &b in &cfg.feature_blocks {
            let width = |n: &EfficientNetLite| n.blocks[b].project.conv.weight.dims()[0];
            let (ours, theirs) = (width(&net), width(&teacher));
            if ours != theirs {
                return Err(EngineError::Config(format!(
                    "feature matching at block {b}: channel pruning left the student {ours} of the teacher's {theirs} output channels there, so the two cannot be compared; fine-tune without feature matching"
                )));
            }
        }
        let net = apply_masks(freeze(net, cfg.layers), &masks, device);
        Ok(Self {
            cfg,
            device: device.clone(),
            plain,
            teacher,
            student: Some(net),
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
        let taps = &self.cfg.feature_blocks;
        let (teacher, teacher_features) = self.teacher.forward_tapped(
            Tensor::from_data(TensorData::new(images.clone(), shape), &self.plain),
            taps,
        );
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
        let (logits, features) = student_forward(
            &model,
            x,
            self.cfg.weight_quant.as_ref(),
            &self.cfg.fp32_layers,
            taps,
        );
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
            for (s, t) in features.into_iter().zip(teacher_features) {
                let dims = t.dims();
                let t =
                    Tensor::<4>::from_data(TensorData::new(read_f32(t).await?, dims), &self.device);
                let mse: Tensor<1> = (s - t).powf_scalar(2.0).mean().reshape([1]);
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
        self.student = Some(apply_masks(
            self.optim.step(lr, model, grads),
            &self.masks,
            &self.device,
        ));
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
        let (s, _) = student_forward(
            &student,
            x.clone(),
            self.cfg.weight_quant.as_ref(),
            &self.cfg.fp32_layers,
            &[],
        );
        Ok((read_f32(s).await?, read_f32(self.teacher.forward(x)).await?))
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
        folded_store(&net).await
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
    let backbone = EfficientNetLite::from_store(teacher, &plain, BatchNormMode::Folded)?;
    let mut features = Vec::new();
    let mut ys = Vec::new();
    for (batch, batch_labels) in inputs.chunks(EVAL_BATCH).zip(labels.chunks(EVAL_BATCH)) {
        let n = batch.len();
        let x = Tensor::<4>::from_data(TensorData::new(batch.concat(), [n, 3, CROP, CROP]), &plain);
        for x in [x.clone(), x.flip([3])] {
            let pooled: Tensor<2> = backbone.features(x).mean_dim(3).mean_dim(2).flatten(1, 3);
            features.extend(read_f32(pooled).await?);
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
