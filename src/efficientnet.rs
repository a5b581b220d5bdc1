//! EfficientNet-Lite0 (Tan & Le, 2019; the "lite" variant for mobile accelerators):
//! MBConv blocks without squeeze-excite, ReLU6, BatchNorm eps 1e-3, TF "SAME" padding
//! (asymmetric on stride-2 convolutions). Weights use the lukemelas PyTorch key names.
//!
//! What the architecture fixes (the stage table: strides and skips), its layer list, which
//! layers a fine-tune trains and BatchNorm folding. `efficientnet_graph.rs` writes the network
//! as a graph from these; every executor and the fine-tuning run that graph. Layer widths are
//! read from the weights, so a channel-pruned store builds the same way.

pub use compresslab_spec::stats::LayerKind;

use crate::error::{EngineError, Result};
use crate::fashion::TrainLayers;
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

/// The block a layer belongs to (`None`: the stem, the head or the classifier).
fn block_of(layer: &str) -> Option<usize> {
    layer
        .strip_prefix("_blocks.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The layers (by name, in [`weight_layers`] order) a fine-tune of `layers` updates: the
/// last N MBConv blocks and everything after them (the stem too when every block learns),
/// the head and the classifier, or the classifier alone (for the Fashion-MNIST network,
/// [`crate::fashion::trained_layers`]).
pub fn trained_layers(store: &TensorStore, layers: TrainLayers) -> Vec<String> {
    if crate::fashion::is_fashion(store) {
        return crate::fashion::trained_layers(layers);
    }
    let first_trained_block = match layers {
        TrainLayers::All => 0,
        TrainLayers::LastBlocks(n) => BLOCKS.saturating_sub(usize::from(n)),
        TrainLayers::Classifier | TrainLayers::LastLayer => BLOCKS,
    };
    weight_layers(store)
        .into_iter()
        .filter(|l| match (block_of(&l.name), l.kind) {
            (Some(b), _) => b >= first_trained_block,
            (None, LayerKind::Stem) => first_trained_block == 0,
            (None, LayerKind::Classifier) => true,
            (None, _) => layers != TrainLayers::LastLayer,
        })
        .map(|l| l.name)
        .collect()
}

/// The layer that reads MBConv block `block`'s output: the next block's first convolution,
/// or the head after the last block.
pub fn reader_of_block(store: &TensorStore, block: usize) -> Result<String> {
    if block >= BLOCKS {
        return Err(EngineError::Config(format!(
            "the network has blocks 0–{}, not {block}",
            BLOCKS - 1
        )));
    }
    weight_layers(store)
        .into_iter()
        .find(|l| match block_of(&l.name) {
            Some(b) => b == block + 1,
            None => l.kind == LayerKind::Head,
        })
        .map(|l| l.name)
        .ok_or_else(|| EngineError::Weights(format!("no layer reads block {block}'s output")))
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
