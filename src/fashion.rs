//! Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017): the dataset, a small CNN we train
//! ourselves with burn, and its accuracy. It is the model with exact labelled accuracy
//! (10 000 test images) that shows what each compression setting really costs.
//!
//! Network (ReLU6 everywhere, BatchNorm eps 1e-3, as in EfficientNet-Lite, so both models
//! share the folding, pruning, quantization and CPU code):
//! `conv1 1→32 3×3 → pool → conv2 32→64 3×3 → pool → conv3 64→128 3×3 → pool →
//! flatten (128·3·3) → fc1 1152→256 → fc2 256→10`; 390 k parameters, 7.7 M MACs per image.
//! Tensor names follow PyTorch (`conv1.weight [32,1,3,3]`, `bn1.running_mean`,
//! `fc1.weight [256,1152]`), so the weights are an ordinary safetensors file.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{
    BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d,
};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

pub use compresslab_spec::report::{CLASS_NAMES, CLASSES, Evaluation, TrainLayers};

use crate::distill::{cosine_lr, read_f32};
use crate::efficientnet::{BATCH_NORM_EPS, LayerKind, LayerRef};
use crate::error::{EngineError, Result};
use crate::weights::{NamedTensor, TensorStore};

pub const SIDE: usize = 28;
pub const PIXELS: usize = SIDE * SIDE;
/// Mean and standard deviation of the training pixels (in 0–1).
const MEAN: f32 = 0.2860;
const STD: f32 = 0.3530;
/// Output channels of the three convolutions and the hidden fully connected layer.
const WIDTHS: [usize; 3] = [32, 64, 128];
const HIDDEN: usize = 256;
const FLAT_SIDE: usize = 3;

/// True when `store` holds this network (raw or folded).
pub fn is_fashion(store: &TensorStore) -> bool {
    store.contains("conv1.weight") && store.contains("fc2.weight")
}

/// The weight layers in execution order.
pub fn weight_layers() -> Vec<LayerRef> {
    let mut out: Vec<LayerRef> = (1..=3)
        .map(|i| LayerRef {
            name: format!("conv{i}"),
            bn: Some(format!("bn{i}")),
            kind: LayerKind::Conv,
        })
        .collect();
    out.push(LayerRef {
        name: "fc1".into(),
        bn: None,
        kind: LayerKind::Dense,
    });
    out.push(LayerRef {
        name: "fc2".into(),
        bn: None,
        kind: LayerKind::Classifier,
    });
    out
}

/// The layers `layers` lets learn, in [`weight_layers`] order: every layer, the last N
/// convolutions and the two dense layers, the dense layers (the classifier), or the last
/// layer alone.
pub fn trained_layers(layers: TrainLayers) -> Vec<String> {
    let convs = 3;
    let first = match layers {
        TrainLayers::All => 0,
        TrainLayers::LastBlocks(n) => convs - usize::from(n).min(convs),
        TrainLayers::Classifier => convs,
        TrainLayers::LastLayer => convs + 1,
    };
    weight_layers()
        .into_iter()
        .skip(first)
        .map(|l| l.name)
        .collect()
}

/// Normalised network input for 8-bit grey pixels.
pub fn normalize(pixels: &[u8]) -> Vec<f32> {
    pixels
        .iter()
        .map(|&p| (p as f32 / 255.0 - MEAN) / STD)
        .collect()
}

/// Images and labels, as 8-bit pixels (row-major 28×28 per image).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FashionSet {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

const ASSET_MAGIC: &[u8; 8] = b"FMNIST01";

impl FashionSet {
    /// From the dataset's IDX files (uncompressed `*-images-idx3-ubyte` and
    /// `*-labels-idx1-ubyte`).
    pub fn from_idx(images: &[u8], labels: &[u8]) -> Result<Self> {
        let be = |b: &[u8], at: usize| -> Result<usize> {
            b.get(at..at + 4)
                .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
                .ok_or_else(|| EngineError::Dataset("IDX header is truncated".into()))
        };
        if be(images, 0)? != 0x0803 || be(labels, 0)? != 0x0801 {
            return Err(EngineError::Dataset(
                "not IDX image (0x803) and label (0x801) files".into(),
            ));
        }
        let (n, rows, cols) = (be(images, 4)?, be(images, 8)?, be(images, 12)?);
        if (rows, cols) != (SIDE, SIDE) || be(labels, 4)? != n {
            return Err(EngineError::Dataset(format!(
                "expected {n} labels and 28×28 images, found {} labels and {rows}×{cols}",
                be(labels, 4)?
            )));
        }
        let set = Self {
            images: images.get(16..16 + n * PIXELS).unwrap_or_default().to_vec(),
            labels: labels.get(8..8 + n).unwrap_or_default().to_vec(),
        };
        set.check()?;
        Ok(set)
    }

    fn check(&self) -> Result<()> {
        if self.images.len() != self.labels.len() * PIXELS {
            return Err(EngineError::Dataset(format!(
                "{} image bytes for {} labels",
                self.images.len(),
                self.labels.len()
            )));
        }
        if let Some(bad) = self.labels.iter().find(|&&l| l as usize >= CLASSES) {
            return Err(EngineError::Dataset(format!("label {bad} is not a class")));
        }
        Ok(())
    }

    /// The site's compact form: magic, u32 LE count, labels, pixels.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.labels.len() + self.images.len());
        out.extend_from_slice(ASSET_MAGIC);
        out.extend_from_slice(&(self.labels.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.labels);
        out.extend_from_slice(&self.images);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.get(..8) != Some(ASSET_MAGIC) || bytes.len() < 12 {
            return Err(EngineError::Dataset("not a Fashion-MNIST asset".into()));
        }
        let n = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        if bytes.len() != 12 + n * (1 + PIXELS) {
            return Err(EngineError::Dataset(format!(
                "asset has {} bytes, expected {} for {n} images",
                bytes.len(),
                12 + n * (1 + PIXELS)
            )));
        }
        let set = Self {
            labels: bytes[12..12 + n].to_vec(),
            images: bytes[12 + n..].to_vec(),
        };
        set.check()?;
        Ok(set)
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * PIXELS..(i + 1) * PIXELS]
    }

    /// `per_class` images of each class, the first ones in dataset order (a fixed,
    /// stratified subset).
    pub fn stratified(&self, per_class: usize) -> Self {
        let mut taken = [0usize; CLASSES];
        let mut out = Self::default();
        for i in 0..self.len() {
            let c = self.labels[i] as usize;
            if taken[c] < per_class {
                taken[c] += 1;
                out.labels.push(self.labels[i]);
                out.images.extend_from_slice(self.image(i));
            }
        }
        out
    }
}

/// The trainable network (burn, any device; training uses an autodiff device).
#[derive(Module, Debug)]
pub struct FashionCnn {
    convs: Vec<Conv2d>,
    norms: Vec<BatchNorm>,
    pool: MaxPool2d,
    fc1: Linear,
    dropout: Dropout,
    fc2: Linear,
}

impl FashionCnn {
    /// Freshly initialised (burn's default Kaiming-uniform initialisation, seeded by the
    /// device).
    pub fn new(device: &Device) -> Self {
        Self::with_widths(WIDTHS, HIDDEN, true, device)
    }

    /// The same network with other widths (a channel-pruned one). Without `batch_norm` the
    /// convolutions carry a bias instead: the BatchNorm-folded form the deployed model runs.
    pub fn with_widths(
        widths: [usize; 3],
        hidden: usize,
        batch_norm: bool,
        device: &Device,
    ) -> Self {
        let mut cin = 1;
        let mut convs = Vec::new();
        let mut norms = Vec::new();
        for &cout in &widths {
            convs.push(
                Conv2dConfig::new([cin, cout], [3, 3])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .with_bias(!batch_norm)
                    .init(device),
            );
            if batch_norm {
                norms.push(
                    BatchNormConfig::new(cout)
                        .with_epsilon(BATCH_NORM_EPS)
                        .init(device),
                );
            }
            cin = cout;
        }
        Self {
            convs,
            norms,
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            fc1: LinearConfig::new(cin * FLAT_SIDE * FLAT_SIDE, hidden).init(device),
            dropout: DropoutConfig::new(0.3).init(),
            fc2: LinearConfig::new(hidden, CLASSES).init(device),
        }
    }

    /// Logits `[batch, 10]` for normalised images `[batch, 1, 28, 28]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let mut x = x;
        for (i, conv) in self.convs.iter().enumerate() {
            x = self
                .pool
                .forward(self.normed(i, conv.forward(x)).clamp(0.0, 6.0));
        }
        let x: Tensor<2> = x.flatten(1, 3);
        let x = self.dropout.forward(self.fc1.forward(x).clamp(0.0, 6.0));
        self.fc2.forward(x)
    }

    /// The `i`-th convolution's output through its BatchNorm (none in folded form).
    fn normed(&self, i: usize, y: Tensor<4>) -> Tensor<4> {
        match self.norms.get(i) {
            Some(norm) => norm.forward(y),
            None => y,
        }
    }

    /// The weights in PyTorch layout and naming (BatchNorm kept separate).
    pub async fn to_store(&self) -> Result<TensorStore> {
        let mut store = TensorStore::default();
        let mut push = |name: String, shape: Vec<usize>, data: Vec<f32>| {
            store.push(NamedTensor { name, shape, data })
        };
        for (i, conv) in self.convs.iter().enumerate() {
            let w = conv.weight.val();
            push(
                format!("conv{}.weight", i + 1),
                w.dims().to_vec(),
                read_f32(w).await?,
            );
            if let Some(b) = &conv.bias {
                let b = b.val();
                push(
                    format!("conv{}.bias", i + 1),
                    b.dims().to_vec(),
                    read_f32(b).await?,
                );
            }
            let Some(norm) = self.norms.get(i) else {
                continue;
            };
            let c = norm.gamma.val().dims()[0];
            for (suffix, t) in [
                ("weight", norm.gamma.val()),
                ("bias", norm.beta.val()),
                ("running_mean", norm.running_mean.value()),
                ("running_var", norm.running_var.value()),
            ] {
                push(format!("bn{}.{suffix}", i + 1), vec![c], read_f32(t).await?);
            }
        }
        for (name, fc) in [("fc1", &self.fc1), ("fc2", &self.fc2)] {
            // burn stores [in, out]; PyTorch [out, in].
            let w = fc.weight.val().transpose();
            push(
                format!("{name}.weight"),
                w.dims().to_vec(),
                read_f32(w).await?,
            );
            if let Some(b) = &fc.bias {
                let b = b.val();
                push(
                    format!("{name}.bias"),
                    b.dims().to_vec(),
                    read_f32(b).await?,
                );
            }
        }
        Ok(store)
    }

    /// Loads weights written by [`Self::to_store`]: raw (BatchNorm separate) or folded
    /// (conv biases, no BatchNorm), as [`crate::compress::pruned_and_folded`] gives.
    pub fn from_store(store: &TensorStore, device: &Device) -> Result<Self> {
        let width = |name: &str| -> Result<usize> {
            Ok(store.get(name)?.shape.first().copied().unwrap_or(0))
        };
        let widths = [
            width("conv1.weight")?,
            width("conv2.weight")?,
            width("conv3.weight")?,
        ];
        let batch_norm = store.contains("bn1.weight");
        let mut net = Self::with_widths(widths, width("fc1.weight")?, batch_norm, device);
        let param = |name: &str, shape: &[usize]| -> Result<Tensor<1>> {
            let t = store.get_shaped(name, shape)?;
            Ok(Tensor::from_data(
                TensorData::new(t.data.clone(), [t.data.len()]),
                device,
            ))
        };
        for (i, conv) in net.convs.iter_mut().enumerate() {
            let dims = conv.weight.dims();
            conv.weight =
                Param::from_tensor(param(&format!("conv{}.weight", i + 1), &dims)?.reshape(dims));
            let c = [dims[0]];
            if !batch_norm {
                conv.bias = Some(Param::from_tensor(param(
                    &format!("conv{}.bias", i + 1),
                    &c,
                )?));
                continue;
            }
            let norm = &mut net.norms[i];
            norm.gamma = Param::from_tensor(param(&format!("bn{}.weight", i + 1), &c)?);
            norm.beta = Param::from_tensor(param(&format!("bn{}.bias", i + 1), &c)?);
            norm.running_mean =
                burn::module::RunningState::new(param(&format!("bn{}.running_mean", i + 1), &c)?);
            norm.running_var =
                burn::module::RunningState::new(param(&format!("bn{}.running_var", i + 1), &c)?);
        }
        for (name, fc) in [("fc1", &mut net.fc1), ("fc2", &mut net.fc2)] {
            let [cin, cout] = fc.weight.dims();
            let w: Tensor<2> = param(&format!("{name}.weight"), &[cout, cin])?.reshape([cout, cin]);
            fc.weight = Param::from_tensor(w.transpose());
            fc.bias = Some(Param::from_tensor(param(&format!("{name}.bias"), &[cout])?));
        }
        Ok(net)
    }
}

/// Hyper-parameters of [`train`]; the defaults are the ones the committed weights used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Adam's peak learning rate, decayed to 0 by a cosine over all steps.
    pub learning_rate: f64,
    pub weight_decay: f32,
    /// Random horizontal flips of the training images.
    pub flip: bool,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 6,
            batch_size: 64,
            learning_rate: 2e-3,
            weight_decay: 1e-4,
            flip: true,
            seed: 42,
        }
    }
}

/// Progress of [`train`]: epoch (from 0), step within it, steps per epoch, mean loss of
/// the epoch so far.
#[derive(Debug, Clone, Copy)]
pub struct TrainProgress {
    pub epoch: usize,
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
}

/// SplitMix64: a tiny, well-mixed generator for shuffling and augmentation (the same
/// sequence on every platform).
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Trains the network from scratch on `data` (mini-batch Adam, cross-entropy) and returns
/// its weights. `device` must be an autodiff device.
pub async fn train(
    data: &FashionSet,
    cfg: &TrainConfig,
    device: &Device,
    progress: &mut dyn FnMut(TrainProgress),
) -> Result<TensorStore> {
    if data.is_empty() || cfg.batch_size == 0 || cfg.epochs == 0 {
        return Err(EngineError::Config(
            "training needs images, a batch size and at least one epoch".into(),
        ));
    }
    device.seed(cfg.seed);
    let mut rng = SplitMix::new(cfg.seed);
    let mut model = FashionCnn::new(device);
    let mut optim = AdamConfig::new()
        .with_weight_decay(Some(burn::optim::decay::WeightDecayConfig::new(
            cfg.weight_decay,
        )))
        .init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let steps = data.len().div_ceil(cfg.batch_size);
    let mut order: Vec<usize> = (0..data.len()).collect();
    for epoch in 0..cfg.epochs {
        rng.shuffle(&mut order);
        let mut loss_sum = 0.0;
        for (step, batch) in order.chunks(cfg.batch_size).enumerate() {
            let mut pixels = Vec::with_capacity(batch.len() * PIXELS);
            let mut labels = Vec::with_capacity(batch.len());
            for &i in batch {
                let img = normalize(data.image(i));
                if cfg.flip && rng.below(2) == 1 {
                    for row in img.chunks_exact(SIDE) {
                        pixels.extend(row.iter().rev());
                    }
                } else {
                    pixels.extend_from_slice(&img);
                }
                labels.push(data.labels[i] as i64);
            }
            let x = Tensor::<4>::from_data(
                TensorData::new(pixels, [batch.len(), 1, SIDE, SIDE]),
                device,
            );
            let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [batch.len()]), device);
            let loss = loss_fn.forward(model.forward(x), y);
            let loss_value = f64::from(
                read_f32(loss.clone())
                    .await?
                    .first()
                    .copied()
                    .unwrap_or(f32::NAN),
            );
            if !loss_value.is_finite() {
                return Err(EngineError::Execution(format!(
                    "loss became {loss_value} at epoch {epoch} step {step}"
                )));
            }
            loss_sum += loss_value;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let lr = cosine_lr(cfg.learning_rate, epoch * steps + step, steps * cfg.epochs);
            model = optim.step(lr, model, grads);
            progress(TrainProgress {
                epoch,
                step,
                steps,
                loss: loss_sum / (step + 1) as f64,
            });
        }
    }
    model.valid().to_store().await
}

/// The label of an image that has none (label-free distillation).
pub const UNLABELLED: u8 = u8::MAX;

/// The class a folder name stands for, ignoring case, spaces, punctuation and a plural
/// "s": "T-shirt_top", "tshirt", "Ankle boots", "sneakers"; also "0"–"9" (the dataset's
/// class indices) and a few common synonyms.
pub fn class_for_name(name: &str) -> Option<u8> {
    let key: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if let Ok(i) = key.parse::<u8>() {
        return (usize::from(i) < CLASSES).then_some(i);
    }
    let find = |k: &str| -> Option<u8> {
        let class = match k {
            "tshirttop" | "tshirt" | "top" | "tee" => 0,
            "trouser" | "pant" | "pants" | "jean" | "jeans" => 1,
            "pullover" | "sweater" | "jumper" => 2,
            "dress" => 3,
            "coat" | "jacket" => 4,
            "sandal" => 5,
            "shirt" => 6,
            "sneaker" | "trainer" => 7,
            "bag" | "handbag" => 8,
            "ankleboot" | "boot" => 9,
            _ => return None,
        };
        Some(class)
    };
    find(&key).or_else(|| key.strip_suffix('s').and_then(find))
}

/// Fashion-MNIST-like pixels from an RGBA image already drawn at 28×28: grey (Rec. 601
/// luma), inverted when the border is light, since the dataset shows light garments on
/// a black background and photos usually show dark ones on a light background.
pub fn pixels_from_rgba(rgba: &[u8]) -> Result<Vec<u8>> {
    if rgba.len() != PIXELS * 4 {
        return Err(EngineError::PixelBuffer {
            found: rgba.len(),
            expected: PIXELS * 4,
        });
    }
    let grey: Vec<u8> = rgba
        .chunks_exact(4)
        .map(|p| {
            let luma = 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
            // Transparent pixels count as background (black).
            (luma * p[3] as f32 / 255.0).round() as u8
        })
        .collect();
    let border: Vec<u8> = (0..PIXELS)
        .filter(|i| {
            let (y, x) = (i / SIDE, i % SIDE);
            y == 0 || x == 0 || y == SIDE - 1 || x == SIDE - 1
        })
        .map(|i| grey[i])
        .collect();
    let border_mean = border.iter().map(|&v| v as f32).sum::<f32>() / border.len() as f32;
    Ok(if border_mean > 127.0 {
        grey.iter().map(|&v| 255 - v).collect()
    } else {
        grey
    })
}

impl FashionSet {
    /// The images at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Self {
        let mut out = Self::default();
        for &i in indices {
            out.labels.push(self.labels[i]);
            out.images.extend_from_slice(self.image(i));
        }
        out
    }

    /// Images per class (index `CLASSES` counts the unlabelled ones).
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; CLASSES + 1];
        for &l in &self.labels {
            counts[usize::from(l).min(CLASSES)] += 1;
        }
        counts
    }

    /// A stratified split: from each class (and from the unlabelled images) a
    /// `heldout_fraction` share, rounded, at least one when the class has two or more
    /// images, chosen by a seeded shuffle. Returns (training, held-out) indices.
    pub fn stratified_split(&self, heldout_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
        let labels: Vec<Option<usize>> = self
            .labels
            .iter()
            .map(|&l| (usize::from(l) < CLASSES).then_some(usize::from(l)))
            .collect();
        stratified_split(&labels, heldout_fraction, seed)
    }
}

/// Image indices split into (training, held out): `heldout_fraction` of each class (and
/// of the unlabelled images, a stratum of their own) held out, at least one of every
/// stratum that has two or more images, shuffled by `seed`; both lists sorted.
pub fn stratified_split(
    labels: &[Option<usize>],
    heldout_fraction: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let mut rng = SplitMix::new(seed);
    let mut strata: Vec<Option<usize>> = labels.iter().copied().flatten().map(Some).collect();
    strata.sort_unstable();
    strata.dedup();
    strata.push(None);
    let (mut train, mut heldout) = (Vec::new(), Vec::new());
    for stratum in strata {
        let mut members: Vec<usize> = (0..labels.len())
            .filter(|&i| labels[i] == stratum)
            .collect();
        rng.shuffle(&mut members);
        let n = members.len();
        let mut take = (n as f64 * heldout_fraction).round() as usize;
        if heldout_fraction > 0.0 && n >= 2 {
            take = take.clamp(1, n - 1);
        }
        heldout.extend_from_slice(&members[..take.min(n)]);
        train.extend_from_slice(&members[take.min(n)..]);
    }
    train.sort_unstable();
    heldout.sort_unstable();
    (train, heldout)
}

/// The size an image of `width` × `height` is drawn at before [`pixels_from_fitted`]:
/// its longer side 28, aspect kept.
pub fn fitted_size(width: usize, height: usize) -> (usize, usize) {
    let long = width.max(height).max(1) as f64;
    let scale = SIDE as f64 / long;
    (
        ((width as f64 * scale).round() as usize).clamp(1, SIDE),
        ((height as f64 * scale).round() as usize).clamp(1, SIDE),
    )
}

/// [`pixels_from_rgba`] for an RGBA image drawn at [`fitted_size`]: centred on a 28×28
/// canvas padded with the mean colour of its own border, so the padding looks like its
/// background.
pub fn pixels_from_fitted(rgba: &[u8], width: usize, height: usize) -> Result<Vec<u8>> {
    if width == 0 || height == 0 || width > SIDE || height > SIDE {
        return Err(EngineError::ImageSize {
            width: width as u32,
            height: height as u32,
            reason: "a fitted image must be at most 28×28",
        });
    }
    if rgba.len() != width * height * 4 {
        return Err(EngineError::PixelBuffer {
            found: rgba.len(),
            expected: width * height * 4,
        });
    }
    let mut sum = [0u64; 4];
    let mut count = 0u64;
    for y in 0..height {
        for x in 0..width {
            if y == 0 || x == 0 || y == height - 1 || x == width - 1 {
                let p = &rgba[(y * width + x) * 4..(y * width + x) * 4 + 4];
                for (s, &v) in sum.iter_mut().zip(p) {
                    *s += u64::from(v);
                }
                count += 1;
            }
        }
    }
    let background: Vec<u8> = sum.iter().map(|&s| (s / count.max(1)) as u8).collect();
    let mut canvas: Vec<u8> = background
        .iter()
        .copied()
        .cycle()
        .take(PIXELS * 4)
        .collect();
    let (x0, y0) = ((SIDE - width) / 2, (SIDE - height) / 2);
    for y in 0..height {
        let from = &rgba[y * width * 4..(y + 1) * width * 4];
        let at = ((y0 + y) * SIDE + x0) * 4;
        canvas[at..at + width * 4].copy_from_slice(from);
    }
    pixels_from_rgba(&canvas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asset_round_trip_and_stratified_subset() {
        let mut set = FashionSet::default();
        for i in 0..30u8 {
            set.labels.push(i % 10);
            set.images.extend(std::iter::repeat_n(i, PIXELS));
        }
        assert_eq!(FashionSet::from_bytes(&set.to_bytes()).unwrap(), set);
        let sub = set.stratified(2);
        assert_eq!(sub.len(), 20);
        assert_eq!(sub.image(10)[0], 10); // class 0's second image
        assert!(FashionSet::from_bytes(&set.to_bytes()[..100]).is_err());
    }

    #[test]
    fn idx_headers_are_checked() {
        let mut images = vec![0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 28, 0, 0, 0, 28];
        images.extend(vec![7u8; PIXELS]);
        let labels = vec![0, 0, 8, 1, 0, 0, 0, 1, 9];
        let set = FashionSet::from_idx(&images, &labels).unwrap();
        assert_eq!((set.len(), set.labels[0], set.image(0)[5]), (1, 9, 7));
        assert!(FashionSet::from_idx(&labels, &images).is_err());
    }

    #[test]
    fn evaluation_counts_per_class() {
        let mut e = Evaluation::new();
        e.add(1, 1);
        e.add(1, 2);
        e.add(3, 3);
        assert_eq!(e.correct, 2);
        assert!((e.accuracy() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(e.class_accuracy()[1], 0.5);
        assert_eq!(e.confusion[1][2], 1);
    }
}
