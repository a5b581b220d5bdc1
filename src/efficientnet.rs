//! EfficientNet-Lite0 (Tan & Le, 2019; the "lite" variant for mobile accelerators):
//! MBConv blocks without squeeze-excite, ReLU6, BatchNorm eps 1e-3, TF "SAME" padding
//! (asymmetric on stride-2 convolutions). Weights use the lukemelas PyTorch key names.
//!
//! The layer widths are read from the weights, not hard-coded, so a channel-pruned
//! checkpoint with thinner layers loads into the same code.

use burn::module::{Module, Param, RunningState};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;

pub use compresslab_spec::stats::LayerKind;

use crate::error::{EngineError, Result};
use crate::weights::{NamedTensor, TensorStore};

pub const BATCH_NORM_EPS: f64 = 1e-3;
pub const INPUT_SIZE: usize = 224;
pub const NUM_CLASSES: usize = 1000;

/// The classifier's name in the store (`_fc.weight`, `_fc.bias`).
pub const CLASSIFIER: &str = "_fc";

/// Lite0's seven stages (outputs 16/24/40/80/112/192/320 channels): MBConv blocks in each,
/// and the stride of its first block (the others have stride 1).
const STAGES: [(usize, usize); 7] = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)];
const BLOCKS: usize = 16;

/// Each block's stride and whether it opens its stage, from [`STAGES`].
const BLOCK_LAYOUT: [(usize, bool); BLOCKS] = {
    let mut out = [(1, false); BLOCKS];
    let (mut block, mut stage) = (0, 0);
    while stage < STAGES.len() {
        let (blocks, stride) = STAGES[stage];
        let mut i = 0;
        while i < blocks {
            out[block] = (if i == 0 { stride } else { 1 }, i == 0);
            block += 1;
            i += 1;
        }
        stage += 1;
    }
    out
};

const BLOCK_STRIDES: [usize; BLOCKS] = {
    let mut out = [1; BLOCKS];
    let mut i = 0;
    while i < BLOCKS {
        out[i] = BLOCK_LAYOUT[i].0;
        i += 1;
    }
    out
};

/// The stride of each MBConv block, in order.
pub fn block_strides() -> &'static [usize] {
    &BLOCK_STRIDES
}

/// Whether MBConv block `block` adds its input to its output: every block of a stage but the
/// first. Fixed by the architecture, not read from the widths, which channel pruning can make
/// equal by chance. A skip block whose input and output widths differ is an error.
pub fn block_skip(block: usize, in_ch: usize, out_ch: usize) -> Result<bool> {
    let skip = BLOCK_LAYOUT.get(block).is_some_and(|&(_, first)| !first);
    if skip && in_ch != out_ch {
        return Err(EngineError::Weights(format!(
            "block {block} adds its input ({in_ch} channels) to its output ({out_ch} channels)"
        )));
    }
    Ok(skip)
}

/// How BatchNorm is represented in the built model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchNormMode {
    /// Separate BatchNorm layers (the checkpoint's own form; trainable statistics).
    Separate,
    /// Folded into the preceding convolution's weight and bias (inference form).
    Folded,
}

/// A convolution, its optional BatchNorm, and an optional ReLU6.
#[derive(Module, Debug)]
pub struct ConvUnit {
    pub conv: Conv2d,
    pub bn: Option<BatchNorm>,
    pub relu6: bool,
}

impl ConvUnit {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.conv.forward(x);
        if let Some(bn) = &self.bn {
            x = bn.forward(x);
        }
        if self.relu6 { x.clamp(0.0, 6.0) } else { x }
    }
}

/// Inverted-residual block: (1×1 expand →) depthwise k×k → 1×1 project (+ skip).
#[derive(Module, Debug)]
pub struct MbConv {
    pub expand: Option<ConvUnit>,
    pub depthwise: ConvUnit,
    pub project: ConvUnit,
    pub skip: bool,
}

impl MbConv {
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input.clone();
        if let Some(expand) = &self.expand {
            x = expand.forward(x);
        }
        x = self.depthwise.forward(x);
        x = self.project.forward(x);
        if self.skip { x + input } else { x }
    }
}

#[derive(Module, Debug)]
pub struct EfficientNetLite {
    pub stem: ConvUnit,
    pub blocks: Vec<MbConv>,
    pub head: ConvUnit,
    pub classifier: Linear,
}

impl EfficientNetLite {
    /// Builds the model from lukemelas-named weights, on `device`.
    pub fn from_store(store: &TensorStore, device: &Device, mode: BatchNormMode) -> Result<Self> {
        let stem = conv_unit(store, "_conv_stem", "_bn0", 2, 1, true, mode, device)?;
        let mut blocks = Vec::with_capacity(BLOCK_STRIDES.len());
        for (i, &stride) in BLOCK_STRIDES.iter().enumerate() {
            let p = format!("_blocks.{i}.");
            let expand = if store.contains(&format!("{p}_expand_conv.weight")) {
                Some(conv_unit(
                    store,
                    &format!("{p}_expand_conv"),
                    &format!("{p}_bn0"),
                    1,
                    1,
                    true,
                    mode,
                    device,
                )?)
            } else {
                None
            };
            let dw_name = format!("{p}_depthwise_conv");
            let groups = store.get(&format!("{dw_name}.weight"))?.shape[0];
            let depthwise = conv_unit(
                store,
                &dw_name,
                &format!("{p}_bn1"),
                stride,
                groups,
                true,
                mode,
                device,
            )?;
            let project = conv_unit(
                store,
                &format!("{p}_project_conv"),
                &format!("{p}_bn2"),
                1,
                1,
                false,
                mode,
                device,
            )?;
            let in_ch = match &expand {
                Some(e) => e.conv.weight.dims()[1],
                None => depthwise.conv.weight.dims()[0],
            };
            let out_ch = project.conv.weight.dims()[0];
            let skip = block_skip(i, in_ch, out_ch)?;
            blocks.push(MbConv {
                expand,
                depthwise,
                project,
                skip,
            });
        }
        let head = conv_unit(store, "_conv_head", "_bn1", 1, 1, true, mode, device)?;
        let fc_w = store.get("_fc.weight")?;
        let fc_b = store.get("_fc.bias")?;
        let [classes, features] = dims2(fc_w)?;
        let mut classifier = LinearConfig::new(features, classes).init(device);
        // burn's Linear stores [in, out]; PyTorch stores [out, in].
        classifier.weight = Param::from_tensor(tensor(fc_w, device)?.transpose());
        classifier.bias = Some(Param::from_tensor(tensor_shaped(fc_b, [classes], device)?));
        Ok(Self {
            stem,
            blocks,
            head,
            classifier,
        })
    }

    /// Logits `[batch, classes]` for a normalised NCHW batch.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.classify(self.features(x))
    }

    /// Logits and the outputs of the MBConv blocks `taps` (in block order), for matching
    /// intermediate features. Channel pruning narrows them too (residual streams are pruned
    /// as groups), so a pruned student's taps cannot be compared with the teacher's.
    pub fn forward_tapped(&self, x: Tensor<4>, taps: &[usize]) -> (Tensor<2>, Vec<Tensor<4>>) {
        let mut x = self.stem.forward(x);
        let mut tapped = Vec::with_capacity(taps.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x);
            if taps.contains(&i) {
                tapped.push(x.clone());
            }
        }
        (self.classify(self.head.forward(x)), tapped)
    }

    /// Pooling and the classifier on the last feature map.
    fn classify(&self, features: Tensor<4>) -> Tensor<2> {
        let pooled: Tensor<2> = features.mean_dim(3).mean_dim(2).flatten(1, 3);
        self.classifier.forward(pooled)
    }

    /// Every conv unit with its name in the store (lukemelas naming), in execution order.
    pub fn units_mut(&mut self) -> Vec<(String, &mut ConvUnit)> {
        let mut out: Vec<(String, &mut ConvUnit)> = vec![("_conv_stem".into(), &mut self.stem)];
        for (i, block) in self.blocks.iter_mut().enumerate() {
            let p = format!("_blocks.{i}.");
            if let Some(e) = &mut block.expand {
                out.push((format!("{p}_expand_conv"), e));
            }
            out.push((format!("{p}_depthwise_conv"), &mut block.depthwise));
            out.push((format!("{p}_project_conv"), &mut block.project));
        }
        out.push(("_conv_head".into(), &mut self.head));
        out
    }

    /// The last feature map before pooling, `[batch, 1280, 7, 7]` at 224².
    pub fn features(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.stem.forward(x);
        for block in &self.blocks {
            x = block.forward(x);
        }
        self.head.forward(x)
    }
}

fn dims2(t: &NamedTensor) -> Result<[usize; 2]> {
    match t.shape[..] {
        [a, b] => Ok([a, b]),
        _ => Err(EngineError::ShapeMismatch {
            name: t.name.clone(),
            found: t.shape.clone(),
            expected: vec![0, 0],
        }),
    }
}

fn tensor<const D: usize>(t: &NamedTensor, device: &Device) -> Result<Tensor<D>> {
    if t.shape.len() != D {
        return Err(EngineError::ShapeMismatch {
            name: t.name.clone(),
            found: t.shape.clone(),
            expected: vec![0; D],
        });
    }
    Ok(Tensor::from_data(
        TensorData::new(t.data.clone(), t.shape.clone()),
        device,
    ))
}

fn tensor_shaped<const D: usize>(
    t: &NamedTensor,
    shape: [usize; D],
    device: &Device,
) -> Result<Tensor<D>> {
    if t.shape != shape {
        return Err(EngineError::ShapeMismatch {
            name: t.name.clone(),
            found: t.shape.clone(),
            expected: shape.to_vec(),
        });
    }
    tensor(t, device)
}

/// BatchNorm parameters of one layer, as plain vectors.
pub struct BnParams<'a> {
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub mean: &'a [f32],
    pub var: &'a [f32],
}

impl<'a> BnParams<'a> {
    pub fn from_store(store: &'a TensorStore, prefix: &str, channels: usize) -> Result<Self> {
        let get = |suffix: &str| -> Result<&'a [f32]> {
            Ok(&store
                .get_shaped(&format!("{prefix}.{suffix}"), &[channels])?
                .data)
        };
        Ok(Self {
            gamma: get("weight")?,
            beta: get("bias")?,
            mean: get("running_mean")?,
            var: get("running_var")?,
        })
    }

    /// Folds this BatchNorm into a bias-free convolution's weight (`[out, …]`, row-major):
    /// w' = w·γ/√(σ²+ε), b' = β − μ·γ/√(σ²+ε).
    pub fn fold_into(&self, weight: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
        let out = self.gamma.len();
        let per_out = weight.len() / out;
        let mut w = Vec::with_capacity(weight.len());
        let mut b = Vec::with_capacity(out);
        for o in 0..out {
            let scale = self.gamma[o] as f64 / (self.var[o] as f64 + eps).sqrt();
            w.extend(
                weight[o * per_out..(o + 1) * per_out]
                    .iter()
                    .map(|&v| (v as f64 * scale) as f32),
            );
            b.push((self.beta[o] as f64 - self.mean[o] as f64 * scale) as f32);
        }
        (w, b)
    }
}

#[allow(clippy::too_many_arguments)]
fn conv_unit(
    store: &TensorStore,
    conv_name: &str,
    bn_name: &str,
    stride: usize,
    groups: usize,
    relu6: bool,
    mode: BatchNormMode,
    device: &Device,
) -> Result<ConvUnit> {
    let w = store.get(&format!("{conv_name}.weight"))?;
    let [out_ch, in_per_group, kh, kw] = match w.shape[..] {
        [a, b, c, d] => [a, b, c, d],
        _ => {
            return Err(EngineError::ShapeMismatch {
                name: w.name.clone(),
                found: w.shape.clone(),
                expected: vec![0; 4],
            });
        }
    };
    let in_ch = in_per_group * groups;
    let config = Conv2dConfig::new([in_ch, out_ch], [kh, kw])
        .with_stride([stride, stride])
        .with_groups(groups)
        .with_padding(PaddingConfig2d::Same);
    // A folded store (conv bias, no BatchNorm) can only be built folded.
    let mode = if store.contains(&format!("{conv_name}.bias")) {
        BatchNormMode::Folded
    } else {
        mode
    };
    match mode {
        BatchNormMode::Separate => {
            let bn = BnParams::from_store(store, bn_name, out_ch)?;
            let mut conv = config.with_bias(false).init(device);
            conv.weight = Param::from_tensor(tensor(w, device)?);
            let mut norm = BatchNormConfig::new(out_ch)
                .with_epsilon(BATCH_NORM_EPS)
                .init(device);
            let vec1 =
                |v: &[f32]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [out_ch]), device);
            norm.gamma = Param::from_tensor(vec1(bn.gamma));
            norm.beta = Param::from_tensor(vec1(bn.beta));
            norm.running_mean = RunningState::new(vec1(bn.mean));
            norm.running_var = RunningState::new(vec1(bn.var));
            Ok(ConvUnit {
                conv,
                bn: Some(norm),
                relu6,
            })
        }
        BatchNormMode::Folded => {
            let (_, fw, fb) = folded_conv(store, conv_name, bn_name)?;
            let mut conv = config.with_bias(true).init(device);
            conv.weight = Param::from_tensor(Tensor::from_data(
                TensorData::new(fw, w.shape.clone()),
                device,
            ));
            conv.bias = Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(fb, [out_ch]),
                device,
            )));
            Ok(ConvUnit {
                conv,
                bn: None,
                relu6,
            })
        }
    }
}

/// A convolution's weight shape, weight and bias with its BatchNorm folded in. A store that
/// is already folded (see [`fold_batch_norms`]) carries `{conv}.bias` and no BatchNorm.
pub fn folded_conv(
    store: &TensorStore,
    conv: &str,
    bn: &str,
) -> Result<(Vec<usize>, Vec<f32>, Vec<f32>)> {
    let w = store.get(&format!("{conv}.weight"))?;
    let out_ch = w.shape.first().copied().unwrap_or(0);
    if let Ok(bias) = store.get_shaped(&format!("{conv}.bias"), &[out_ch]) {
        return Ok((w.shape.clone(), w.data.clone(), bias.data.clone()));
    }
    let (fw, fb) = BnParams::from_store(store, bn, out_ch)?.fold_into(&w.data, BATCH_NORM_EPS);
    Ok((w.shape.clone(), fw, fb))
}

/// One weight layer: its convolution (or linear) name and the BatchNorm that follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRef {
    /// Tensor name prefix, e.g. `_blocks.3._expand_conv` or `_fc`.
    pub name: String,
    /// BatchNorm prefix (`None` for the classifier).
    pub bn: Option<String>,
    pub kind: LayerKind,
}

/// Every weight layer of the network in execution order (EfficientNet-Lite, or the
/// Fashion-MNIST network when `store` holds that).
pub fn weight_layers(store: &TensorStore) -> Vec<LayerRef> {
    if crate::fashion::is_fashion(store) {
        return crate::fashion::weight_layers();
    }
    let layer = |name: String, bn: Option<String>, kind| LayerRef { name, bn, kind };
    let mut out = vec![layer(
        "_conv_stem".into(),
        Some("_bn0".into()),
        LayerKind::Stem,
    )];
    for i in 0..BLOCK_STRIDES.len() {
        let p = format!("_blocks.{i}.");
        if store.contains(&format!("{p}_expand_conv.weight")) {
            out.push(layer(
                format!("{p}_expand_conv"),
                Some(format!("{p}_bn0")),
                LayerKind::Expand,
            ));
        }
        out.push(layer(
            format!("{p}_depthwise_conv"),
            Some(format!("{p}_bn1")),
            LayerKind::Depthwise,
        ));
        out.push(layer(
            format!("{p}_project_conv"),
            Some(format!("{p}_bn2")),
            LayerKind::Project,
        ));
    }
    out.push(layer(
        "_conv_head".into(),
        Some("_bn1".into()),
        LayerKind::Head,
    ));
    out.push(layer("_fc".into(), None, LayerKind::Classifier));
    out
}

/// The same network with every BatchNorm folded into its convolution: each conv gets a
/// `{conv}.bias` and the BatchNorm tensors are dropped (the deployable form that pruning
/// masks and quantization apply to).
pub fn fold_batch_norms(store: &TensorStore) -> Result<TensorStore> {
    let mut out = TensorStore::default();
    for layer in weight_layers(store) {
        match &layer.bn {
            Some(bn) => {
                let (shape, w, b) = folded_conv(store, &layer.name, bn)?;
                let out_ch = shape[0];
                out.push(NamedTensor {
                    name: format!("{}.weight", layer.name),
                    shape,
                    data: w,
                });
                out.push(NamedTensor {
                    name: format!("{}.bias", layer.name),
                    shape: vec![out_ch],
                    data: b,
                });
            }
            None => {
                out.push(store.get(&format!("{}.weight", layer.name))?.clone());
                out.push(store.get(&format!("{}.bias", layer.name))?.clone());
            }
        }
    }
    Ok(out)
}
