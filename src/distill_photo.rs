//! Distillation for the photo model, EfficientNet-Lite0 at 224×224: the original network
//! (fp32) is the teacher, the compressed one (pruned, BatchNorm-folded, as
//! [`crate::distill::student_for`] makes it) the student. The same loss and the same
//! step-at-a-time shape as the Fashion-MNIST [`crate::distill::Distiller`]; which layers
//! learn is all, the head (last 1×1 conv + classifier), or the classifier alone.
//! The student trains in float and is re-quantized with its recipe afterwards.

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::prelude::*;

use crate::distill::{
    DistillConfig, Masks, cosine_lr, distillation_loss, label_tensors, loss_value, read_f32,
};
use crate::efficientnet::{BatchNormMode, ConvUnit, EfficientNetLite};
use crate::error::{EngineError, Result};
use crate::fashion::{SplitMix, TrainLayers};
use crate::preprocess::{CROP, RgbImage, box_reduce, to_nchw};
use crate::weights::{NamedTensor, TensorStore};

/// The lukemelas names of every conv unit of `net`, in execution order, with the unit.
fn units_mut(net: &mut EfficientNetLite) -> Vec<(String, &mut ConvUnit)> {
    let mut out: Vec<(String, &mut ConvUnit)> = vec![("_conv_stem".into(), &mut net.stem)];
    for (i, block) in net.blocks.iter_mut().enumerate() {
        let p = format!("_blocks.{i}.");
        if let Some(e) = &mut block.expand {
            out.push((format!("{p}_expand_conv"), e));
        }
        out.push((format!("{p}_depthwise_conv"), &mut block.depthwise));
        out.push((format!("{p}_project_conv"), &mut block.project));
    }
    out.push(("_conv_head".into(), &mut net.head));
    out
}

/// A folded network's weights in lukemelas naming (conv weight + bias, `_fc`).
pub async fn folded_store(net: &EfficientNetLite) -> Result<TensorStore> {
    let mut net = net.clone();
    let mut store = TensorStore::default();
    for (name, unit) in units_mut(&mut net) {
        let w = unit.conv.weight.val();
        let shape = w.dims().to_vec();
        store.push(NamedTensor {
            name: format!("{name}.weight"),
            shape,
            data: read_f32(w).await?,
        });
        let bias = unit.conv.bias.as_ref().ok_or_else(|| {
            EngineError::Execution(format!("{name} has no bias: the student must be folded"))
        })?;
        let b = bias.val();
        store.push(NamedTensor {
            name: format!("{name}.bias"),
            shape: b.dims().to_vec(),
            data: read_f32(b).await?,
        });
    }
    // burn stores [in, out]; PyTorch [out, in].
    let w = net.classifier.weight.val().transpose();
    store.push(NamedTensor {
        name: "_fc.weight".into(),
        shape: w.dims().to_vec(),
        data: read_f32(w).await?,
    });
    if let Some(b) = &net.classifier.bias {
        let b = b.val();
        store.push(NamedTensor {
            name: "_fc.bias".into(),
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
    for (name, unit) in units_mut(&mut net) {
        if let Some(m) = find(&format!("{name}.weight")) {
            let m = Tensor::<1>::from_data(TensorData::new(m.clone(), [m.len()]), device);
            unit.conv.weight = unit.conv.weight.clone().map(|w| {
                let dims = w.dims();
                let trains = w.is_require_grad();
                w.mul(m.reshape(dims)).detach().set_require_grad(trains)
            });
        }
    }
    if let Some(m) = find("_fc.weight") {
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
    if layers == TrainLayers::All {
        return net;
    }
    net.stem = net.stem.no_grad();
    net.blocks = net.blocks.into_iter().map(|b| b.no_grad()).collect();
    if layers == TrainLayers::LastLayer {
        net.head = net.head.no_grad();
    }
    net
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
        cfg.validate()?;
        if cfg.weight_quant.is_some() {
            return Err(EngineError::Config(
                "quantization-aware training is not available for the photo model yet: it trains in float and is re-quantized".into(),
            ));
        }
        device.seed(cfg.seed);
        let plain = device.clone().inner();
        let teacher = EfficientNetLite::from_store(teacher, &plain, BatchNormMode::Folded)?;
        let net = EfficientNetLite::from_store(student, device, BatchNormMode::Folded)?;
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
        let teacher = self.teacher.forward(Tensor::from_data(
            TensorData::new(images.clone(), shape),
            &self.plain,
        ));
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
        let loss = distillation_loss(
            model.forward(x),
            teacher,
            Some(label_tensors(labels, &self.device)),
            self.cfg.temperature,
            self.cfg.alpha,
        );
        let step = self.steps_done + 1;
        let value = loss_value(loss.clone(), || format!("step {step}")).await?;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let lr = cosine_lr(self.cfg.learning_rate, self.steps_done, self.total_steps);
        self.student = Some(apply_masks(
            self.optim.step(lr, model, grads),
            &self.masks,
            &self.device,
        ));
        self.steps_done += 1;
        Ok(value)
    }

    /// Student and teacher logits for `n` preprocessed images (no gradients).
    pub async fn logits(&self, images: Vec<f32>, n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let student = self
            .student
            .as_ref()
            .ok_or_else(|| EngineError::Execution("a failed step left no student".into()))?
            .valid();
        let x = Tensor::<4>::from_data(TensorData::new(images, [n, 3, CROP, CROP]), &self.plain);
        Ok((
            read_f32(student.forward(x.clone())).await?,
            read_f32(self.teacher.forward(x)).await?,
        ))
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
