//! A compression recipe applied to a built-in network's weights: channel pruning → BatchNorm
//! folding on the store, then the rest (magnitude pruning → weight quantization → activation
//! calibration) as [`crate::graph::compress_graph`] on the model builder's graph. The result keeps the
//! integer weights (for size accounting, export and the integer kernels) next to the
//! dequantized float weights (for the float executors), plus per-layer statistics.

use std::borrow::Cow;
use std::collections::HashMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

pub use compresslab_spec::recipe::{ActivationQuant, Observer, Recipe};
pub use compresslab_spec::stats::{
    ActivationParams, ChannelGrid, Histogram, LayerStats, ModelStats,
};

use crate::efficientnet::{LayerKind, fold_batch_norms, weight_layers};
use crate::error::{EngineError, Result};
use crate::exec::Tensor;
use crate::graph::{Calibration, compress_graph_with};
use crate::graph::{CompressedGraph, Graph, batch_one_shapes};
use crate::graph_builder::{bias_name, compressed_network_graph, network_graph, weight_name};
use crate::prune::prune_channels;
use crate::quant::{QuantScheme, QuantizedTensor, pack_int4, unpack_int4};
use crate::weights::{NamedTensor, TensorStore};

/// One weight layer after compression.
#[derive(Debug, Clone)]
pub struct CompressedLayer {
    pub name: String,
    pub kind: LayerKind,
    pub weights: Option<QuantizedTensor>,
    pub activation: Option<ActivationParams>,
    /// What compression saw of the layer's float weights before quantizing them (every layer
    /// it compressed, float ones too); `None` where they are gone (a loaded export) or for the
    /// uncompressed original.
    pub before_quantization: Option<WeightsBefore>,
}

/// A layer's float weights as compression found them, before quantizing them.
#[derive(Debug, Clone)]
pub struct WeightsBefore {
    /// Of the quantized weights against these (`None`: the layer stayed float).
    pub sqnr_db: Option<f64>,
    pub histogram: Histogram,
    pub narrowest_channel: Option<ChannelGrid>,
}

#[derive(Debug, Clone)]
pub struct CompressedModel {
    pub recipe: Recipe,
    /// Folded weights as float executors see them (pruned, dequantized).
    pub store: TensorStore,
    /// In [`weight_layers`] order.
    pub layers: Vec<CompressedLayer>,
    /// Names of the images it was calibrated or trained on, kept in the export so that a
    /// later load measures agreement only on other images. Empty when none or unknown.
    pub seen_images: Vec<String>,
}

/// Progress callback: (stage description, fraction done 0–1). An error (normally
/// [`EngineError::Cancelled`]) stops the work at that point and is returned.
pub type Progress<'a> = &'a mut dyn FnMut(&str, f32) -> Result<()>;

/// Applies `recipe` to the original (raw or folded) weights. `calibration` holds
/// preprocessed images of the network's input size (one `[3, 224, 224]` per entry for
/// EfficientNet, whose graph takes a batch of one; any number of normalised 28×28 images per
/// entry for the Fashion-MNIST network); it is needed only for activation quantization.
///
/// Channel pruning and BatchNorm folding rewrite the store (BatchNorm γ ranking needs the
/// unfolded network); everything after runs as [`crate::graph::compress_graph`] on the model builder's
/// graph, the same compression any imported model gets.
pub fn compress(
    original: &TensorStore,
    recipe: &Recipe,
    calibration: &[Vec<f32>],
    progress: Progress,
) -> Result<CompressedModel> {
    recipe.validate()?;
    progress("pruning channels", 0.05)?;
    let store = channel_pruned_and_folded(original, recipe)?;
    let graph = network_graph(&store)?;
    let batch_dims = match recipe.activations {
        Some(_) => calibration_dims(&graph, calibration)?,
        None => Vec::new(),
    };
    let after_channels = Recipe {
        channel_pruning: None,
        ..recipe.clone()
    };
    let batch = |i: usize| -> Result<Cow<Tensor>> {
        Ok(Cow::Owned(Tensor {
            dims: batch_dims.get(i).cloned().unwrap_or_default(),
            data: calibration.get(i).cloned().unwrap_or_default(),
        }))
    };
    let calibration = Calibration {
        batches: batch_dims.len(),
        batch: &batch,
    };
    let compressed =
        compress_graph_with(Cow::Owned(graph), &after_channels, calibration, progress)?;
    CompressedModel::from_graph(store, compressed, recipe)
}

/// The recipe's pruning applied and BatchNorm folded: the float model that quantization
/// starts from (and that per-layer SQNR is measured against).
pub fn pruned_and_folded(original: &TensorStore, recipe: &Recipe) -> Result<TensorStore> {
    let pruning_only = Recipe {
        weights: None,
        activations: None,
        ..recipe.clone()
    };
    Ok(compress(original, &pruning_only, &[], &mut |_, _| Ok(()))?.store)
}

/// Channel pruning (on the unfolded network, so every ranking is available) and BatchNorm
/// folding.
fn channel_pruned_and_folded(original: &TensorStore, recipe: &Recipe) -> Result<TensorStore> {
    let pruned = match &recipe.channel_pruning {
        Some(cfg) if cfg.ratio > 0.0 => Some(prune_channels(original, cfg)?),
        _ => None,
    };
    fold_batch_norms(pruned.as_ref().unwrap_or(original))
}

/// The dims of each calibration entry as an input batch of `graph`: each entry is a whole
/// number of images of the input's fixed image size (exactly the batch, when the graph fixes
/// one).
fn calibration_dims(graph: &Graph, calibration: &[Vec<f32>]) -> Result<Vec<Vec<usize>>> {
    if calibration.is_empty() {
        return Err(EngineError::Config(
            "activation quantization needs at least one calibration image".into(),
        ));
    }
    let (batch, image_dims) = match graph.input()?.dims.split_first() {
        Some((batch, image)) if !image.is_empty() => (
            batch.known(),
            image
                .iter()
                .map(|d| d.known())
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| {
                    EngineError::Config("the network's input size is not fixed".into())
                })?,
        ),
        _ => {
            return Err(EngineError::Config(
                "the network's input has no image axes".into(),
            ));
        }
    };
    let image_len: usize = image_dims.iter().product();
    calibration
        .iter()
        .map(|entry| {
            let images = entry.len().checked_div(image_len).unwrap_or(0);
            if images == 0
                || images * image_len != entry.len()
                || batch.is_some_and(|b| b != images)
            {
                return Err(EngineError::Config(format!(
                    "a calibration entry of {} values is not {} image(s) of {image_dims:?}",
                    entry.len(),
                    batch.map_or_else(|| "whole".to_string(), |b| b.to_string())
                )));
            }
            Ok([&[images][..], &image_dims].concat())
        })
        .collect()
}

/// At most this many values per image and layer feed a percentile observer.
const PERCENTILE_SAMPLES: usize = 65_536;
/// At most this many values in all (64 MB of f32) are kept for the percentile observers of
/// one calibration, so its memory does not grow with the number of images or layers.
const PERCENTILE_BUDGET: usize = 1 << 24;

/// How many values of one layer's input a percentile observer keeps per calibration image:
/// the budget split evenly over layers and images, at most [`PERCENTILE_SAMPLES`].
pub(crate) fn percentile_samples_per_image(layers: usize, images: usize) -> usize {
    (PERCENTILE_BUDGET / layers.max(1) / images.max(1)).clamp(1, PERCENTILE_SAMPLES)
}

/// Every `step`-th value, so that at most `budget` of `values` are kept.
pub(crate) fn percentile_sample(values: &[f32], budget: usize) -> impl Iterator<Item = &f32> {
    values
        .iter()
        .step_by(values.len().div_ceil(budget.max(1)).max(1))
}

/// The `p`-th percentile from below and `(100 − p)`-th from above (nearest rank).
pub(crate) fn percentile_range(values: &mut [f32], p: f32) -> (f32, f32) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    values.sort_unstable_by(f32::total_cmp);
    let n = values.len();
    let rank = |q: f64| ((q / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1;
    (values[rank(100.0 - p as f64)], values[rank(p as f64)])
}

/// Output pixels of each of `layers` for one input of the network's size, read from the
/// shapes of the network's graph (1 for a fully connected layer).
fn output_pixels(store: &TensorStore, layers: &[CompressedLayer]) -> Result<Vec<u64>> {
    let graph = network_graph(store)?;
    let shapes = batch_one_shapes(&graph)?;
    layers
        .iter()
        .map(|layer| {
            let weight = weight_name(&layer.name);
            let dims = graph
                .nodes
                .iter()
                .find(|n| n.inputs.get(1) == Some(&weight))
                .and_then(|n| shapes.get(&n.outputs[0]))
                .ok_or_else(|| EngineError::Weights(format!("no layer reads {weight}")))?;
            dims.iter()
                .skip(2)
                .map(|d| d.known().map(|v| v as u64))
                .product::<Option<u64>>()
                .ok_or_else(|| {
                    EngineError::Weights(format!("{}'s output size is not fixed", layer.name))
                })
        })
        .collect()
}

impl CompressedModel {
    /// The built-in network of `folded` as [`crate::graph::compress_graph`] compressed it: each layer's
    /// weight and bias from the compressed graph's constants (the store's names, which the
    /// model builder gives them), its integer weights and its input's grid.
    fn from_graph(
        folded: TensorStore,
        compressed: CompressedGraph,
        recipe: &Recipe,
    ) -> Result<Self> {
        let CompressedGraph {
            graph,
            mut weights,
            layers: reports,
            ..
        } = compressed;
        let mut constants = graph.constants;
        let mut store = TensorStore::default();
        let mut layers = Vec::new();
        for layer in weight_layers(&folded) {
            for name in [weight_name(&layer.name), bias_name(&layer.name)] {
                let before = folded.get(&name)?;
                let c = constants
                    .remove(&name)
                    .filter(|c| c.dims == before.shape)
                    .ok_or_else(|| {
                        EngineError::Weights(format!("the compressed graph has no `{name}`"))
                    })?;
                store.push(NamedTensor {
                    name,
                    shape: c.dims,
                    data: c.data,
                });
            }
            let report = reports.iter().find(|r| r.node == layer.name);
            layers.push(CompressedLayer {
                weights: weights.remove(&weight_name(&layer.name)),
                name: layer.name,
                kind: layer.kind,
                activation: report.and_then(|r| r.activation),
                before_quantization: report.map(|r| WeightsBefore {
                    sqnr_db: r.sqnr_db,
                    histogram: r.histogram.clone(),
                    narrowest_channel: r.narrowest_channel.clone(),
                }),
            });
        }
        Ok(Self {
            recipe: recipe.clone(),
            store,
            layers,
            seen_images: Vec::new(),
        })
    }

    /// The uncompressed model in the same form (for "before" statistics).
    pub fn original(store: &TensorStore) -> Result<Self> {
        let store = fold_batch_norms(store)?;
        let layers = weight_layers(&store)
            .into_iter()
            .map(|l| CompressedLayer {
                name: l.name,
                kind: l.kind,
                weights: None,
                activation: None,
                before_quantization: None,
            })
            .collect();
        Ok(Self {
            recipe: Recipe::default(),
            store,
            layers,
            seen_images: Vec::new(),
        })
    }

    /// Per-layer statistics: SQNR and the weight histograms from the float weights
    /// compression quantized; after loading an export, where those are gone, no SQNR and the
    /// histograms of the dequantized weights.
    pub fn layer_stats(&self) -> Result<Vec<LayerStats>> {
        let sizes = output_pixels(&self.store, &self.layers)?;
        self.layers
            .iter()
            .zip(sizes)
            .map(|(layer, pixels)| {
                let w = self.store.get(&weight_name(&layer.name))?;
                let bias = self.store.get(&bias_name(&layer.name))?;
                let per_output: usize = w.shape[1..].iter().product();
                let macs = pixels * w.data.len() as u64;
                let weight_bytes = 4 * bias.data.len()
                    + layer
                        .weights
                        .as_ref()
                        .map_or(4 * w.data.len(), |q| q.storage_bytes());
                let before = layer.before_quantization.as_ref();
                let (histogram, narrowest_channel) = match before {
                    Some(b) => (b.histogram.clone(), b.narrowest_channel.clone()),
                    None => (
                        Histogram::of(&w.data, 64),
                        narrowest_channel(&w.data, per_output, layer.weights.as_ref()),
                    ),
                };
                Ok(LayerStats {
                    name: layer.name.clone(),
                    kind: layer.kind,
                    shape: w.shape.clone(),
                    parameters: w.data.len() + bias.data.len(),
                    zeros: w.data.iter().filter(|v| **v == 0.0).count(),
                    macs,
                    weight_bytes,
                    bits: layer.weights.as_ref().map(|q| q.scheme.bits),
                    sqnr_db: before.and_then(|b| b.sqnr_db),
                    histogram,
                    narrowest_channel,
                    activation: layer.activation,
                })
            })
            .collect()
    }

    pub fn stats(&self) -> Result<ModelStats> {
        let sizes = output_pixels(&self.store, &self.layers)?;
        let mut s = ModelStats {
            parameters: 0,
            nonzero_parameters: 0,
            weight_bytes: 0,
            macs: 0,
            nonzero_macs: 0,
        };
        for (layer, pixels) in self.layers.iter().zip(sizes) {
            let w = self.store.get(&weight_name(&layer.name))?;
            let bias = self.store.get(&bias_name(&layer.name))?;
            let nonzero = w.data.iter().filter(|v| **v != 0.0).count();
            s.parameters += w.data.len() + bias.data.len();
            s.nonzero_parameters += nonzero + bias.data.len();
            s.weight_bytes += 4 * bias.data.len()
                + layer
                    .weights
                    .as_ref()
                    .map_or(4 * w.data.len(), |q| q.storage_bytes());
            s.macs += pixels * w.data.len() as u64;
            s.nonzero_macs += pixels * nonzero as u64;
        }
        Ok(s)
    }

    /// The variant as an ONNX model other runtimes load: pruned channels removed, int8
    /// weights and activations as QuantizeLinear/DequantizeLinear pairs, int4 blocks as
    /// DequantizeLinear with `block_size` (opset 21); the recipe in the metadata.
    pub fn to_onnx(&self) -> Result<Vec<u8>> {
        let (graph, weights) = compressed_network_graph(self)?;
        crate::graph::export_onnx(
            &graph,
            &weights,
            &[(RECIPE_KEY.into(), self.recipe.to_json())],
        )
    }

    /// Safetensors with integer weights (I8, or U8 with two int4 per byte), F32 scales,
    /// I8 zero points, F32 for everything kept in float; the recipe and the per-layer
    /// quantization (schemes, activation parameters) in the metadata as JSON.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let mut entries: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let mut layer_meta = Vec::new();
        for layer in &self.layers {
            let w = self.store.get(&weight_name(&layer.name))?;
            let b = self.store.get(&bias_name(&layer.name))?;
            match &layer.weights {
                Some(q) => {
                    let (dtype, shape, raw) = if q.scheme.bits == 4 {
                        let packed = pack_int4(&q.values);
                        (Dtype::U8, vec![packed.len()], packed)
                    } else {
                        (
                            Dtype::I8,
                            q.shape.clone(),
                            q.values.iter().map(|&v| v as u8).collect(),
                        )
                    };
                    entries.push((format!("{}.q", weight_name(&layer.name)), dtype, shape, raw));
                    entries.push((
                        format!("{}.scale", weight_name(&layer.name)),
                        Dtype::F32,
                        vec![q.scales.len()],
                        f32_bytes(&q.scales),
                    ));
                    entries.push((
                        format!("{}.zero_point", weight_name(&layer.name)),
                        Dtype::I8,
                        vec![q.zero_points.len()],
                        q.zero_points.iter().map(|&v| v as u8).collect(),
                    ));
                }
                None => entries.push((
                    w.name.clone(),
                    Dtype::F32,
                    w.shape.clone(),
                    f32_bytes(&w.data),
                )),
            }
            entries.push((
                b.name.clone(),
                Dtype::F32,
                b.shape.clone(),
                f32_bytes(&b.data),
            ));
            layer_meta.push(StoredLayer {
                name: layer.name.clone(),
                shape: w.shape.clone(),
                scheme: layer.weights.as_ref().map(|q| q.scheme),
                activation: layer.activation,
            });
        }
        let views = entries
            .iter()
            .map(|(name, dtype, shape, raw)| {
                TensorView::new(*dtype, shape.clone(), raw)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| EngineError::Weights(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        let json_error = |e: serde_json::Error| EngineError::Weights(e.to_string());
        let metadata = HashMap::from([
            (RECIPE_KEY.to_string(), self.recipe.to_json()),
            (
                LAYERS_KEY.to_string(),
                serde_json::to_string(&layer_meta).map_err(json_error)?,
            ),
            (
                SEEN_IMAGES_KEY.to_string(),
                serde_json::to_string(&self.seen_images).map_err(json_error)?,
            ),
        ]);
        safetensors::serialize(views, Some(metadata))
            .map_err(|e| EngineError::Weights(e.to_string()))
    }

    /// Reads what [`Self::to_safetensors`] wrote.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self> {
        let bad = |m: String| EngineError::Weights(m);
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header
            .metadata()
            .as_ref()
            .ok_or_else(|| bad("not a compresslab export (no metadata)".into()))?;
        let recipe = Recipe::from_json(
            meta.get(RECIPE_KEY)
                .ok_or_else(|| bad("not a compresslab export (no recipe)".into()))?,
        )?;
        let stored: Vec<StoredLayer> = serde_json::from_str(
            meta.get(LAYERS_KEY)
                .ok_or_else(|| bad("not a compresslab export (no layer table)".into()))?,
        )
        .map_err(|e| bad(format!("layer table: {e}")))?;
        // Optional: exports written before it was recorded have none.
        let seen_images: Vec<String> = match meta.get(SEEN_IMAGES_KEY) {
            Some(text) => serde_json::from_str(text)
                .map_err(|e| bad(format!("the names of the images it saw: {e}")))?,
            None => Vec::new(),
        };
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let raw = |name: &str, dtype: Dtype| -> Result<Vec<u8>> {
            let t = st
                .tensor(name)
                .map_err(|_| EngineError::MissingTensor { name: name.into() })?;
            if t.dtype() != dtype {
                return Err(bad(format!(
                    "{name} is {:?}, expected {dtype:?}",
                    t.dtype()
                )));
            }
            Ok(t.data().to_vec())
        };
        let floats = |name: &str| -> Result<Vec<f32>> {
            Ok(raw(name, Dtype::F32)?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let mut store = TensorStore::default();
        let mut layers = Vec::new();
        for l in &stored {
            if let Some(a) = l.activation.filter(|a| !a.is_valid()) {
                return Err(bad(format!(
                    "{}: activation grid {a:?} is not a signed 8-bit grid with a positive scale",
                    l.name
                )));
            }
            let n = l
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("{}: the shape {:?} overflows", l.name, l.shape)))?;
            let weights = match l.scheme {
                Some(scheme) => {
                    let q = raw(
                        &format!("{}.q", weight_name(&l.name)),
                        if scheme.bits == 4 {
                            Dtype::U8
                        } else {
                            Dtype::I8
                        },
                    )?;
                    let values = if scheme.bits == 4 {
                        unpack_int4(&q, n)
                    } else {
                        q.iter().map(|&v| v as i8).collect()
                    };
                    let scales = floats(&format!("{}.scale", weight_name(&l.name)))?;
                    let zps = raw(&format!("{}.zero_point", weight_name(&l.name)), Dtype::I8)?
                        .into_iter()
                        .map(|v| v as i8)
                        .collect();
                    let q = QuantizedTensor::from_parts(&l.shape, scheme, values, scales, zps)
                        .ok_or_else(|| {
                            bad(format!("{}: inconsistent quantized weights", l.name))
                        })?;
                    store.push(NamedTensor {
                        name: weight_name(&l.name),
                        shape: l.shape.clone(),
                        data: q.dequantize(),
                    });
                    Some(q)
                }
                None => {
                    let data = floats(&weight_name(&l.name))?;
                    if data.len() != n {
                        return Err(bad(format!("{} has the wrong size", weight_name(&l.name))));
                    }
                    store.push(NamedTensor {
                        name: weight_name(&l.name),
                        shape: l.shape.clone(),
                        data,
                    });
                    None
                }
            };
            let bias = floats(&bias_name(&l.name))?;
            store.push(NamedTensor {
                name: bias_name(&l.name),
                shape: vec![bias.len()],
                data: bias,
            });
            layers.push((weights, l.activation));
        }
        // The layer list must be exactly the network's (and loadable).
        let network = weight_layers(&store);
        if network.len() != stored.len()
            || network.iter().zip(&stored).any(|(a, b)| a.name != b.name)
        {
            return Err(bad(
                "the layer table does not describe EfficientNet-Lite0 or the Fashion-MNIST network"
                    .into(),
            ));
        }
        let layers = network
            .into_iter()
            .zip(layers)
            .map(|(layer, (weights, activation))| CompressedLayer {
                name: layer.name,
                kind: layer.kind,
                weights,
                activation,
                before_quantization: None,
            })
            .collect();
        let model = Self {
            recipe,
            store,
            layers,
            seen_images,
        };
        // The widths must chain from layer to layer (shape inference of the whole network).
        network_graph(&model.store)?;
        Ok(model)
    }
}

const RECIPE_KEY: &str = "compresslab.recipe";
const LAYERS_KEY: &str = "compresslab.layers";
const SEEN_IMAGES_KEY: &str = "compresslab.seen_images";

#[derive(Debug, Serialize, Deserialize)]
struct StoredLayer {
    name: String,
    shape: Vec<usize>,
    scheme: Option<QuantScheme>,
    activation: Option<ActivationParams>,
}

/// The output channel (rows of `per_output` values) with the smallest max|w| among those not
/// all zero, its histogram, and the levels of its quantization grid (`q`) inside its range.
pub fn narrowest_channel(
    weights: &[f32],
    per_output: usize,
    q: Option<&QuantizedTensor>,
) -> Option<ChannelGrid> {
    let rows = weights.len() / per_output.max(1);
    if rows == 0 {
        return None;
    }
    let max_abs = |r: usize| {
        weights[r * per_output..(r + 1) * per_output]
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()))
    };
    let channel = (0..rows)
        .filter(|&r| max_abs(r) > 0.0)
        .min_by(|&a, &b| max_abs(a).total_cmp(&max_abs(b)))?;
    let values = &weights[channel * per_output..(channel + 1) * per_output];
    let histogram = Histogram::of(values, 32);
    let levels = match q {
        Some(q) => {
            let start = channel * per_output;
            let ranges = q.group_ranges();
            let g = ranges.iter().position(|r| r.contains(&start)).unwrap_or(0);
            let (scale, zp) = (q.scales[g], q.zero_points[g] as i32);
            let (qmin, qmax) = q.scheme.qrange();
            let (lo, hi) = values
                .iter()
                .fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
            // A small tolerance keeps the endpoint levels that equal min/max up to rounding.
            let eps = (hi - lo) * 1e-4;
            (qmin..=qmax)
                .map(|v| (v - zp) as f32 * scale)
                .filter(|x| *x >= lo - eps && *x <= hi + eps)
                .collect()
        }
        None => Vec::new(),
    };
    Some(ChannelGrid {
        channel,
        histogram,
        levels,
    })
}

/// Top-1 agreement and KL(reference ‖ variant) of two logit vectors.
pub fn agreement(reference: &[f32], variant: &[f32]) -> (bool, f64) {
    let p = crate::labels::softmax(reference);
    let q = crate::labels::softmax(variant);
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    let kl = p
        .iter()
        .zip(&q)
        .filter(|(pi, _)| **pi > 0.0)
        .map(|(&pi, &qi)| pi as f64 * ((pi as f64).ln() - (qi.max(1e-30) as f64).ln()))
        .sum::<f64>()
        .max(0.0);
    (argmax(reference) == argmax(variant), kl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_range_clips_outliers() {
        let mut v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        v.push(1e6);
        v.push(-1e6);
        let (lo, hi) = percentile_range(&mut v, 99.0);
        assert!((0.0..=20.0).contains(&lo), "{lo}");
        assert!((980.0..=999.0).contains(&hi), "{hi}");
    }

    #[test]
    fn activation_fake_quant_follows_the_definition() {
        let p = ActivationParams {
            scale: 0.5,
            zero_point: -128,
            qmin: -128,
            qmax: 127,
        };
        assert_eq!(p.quantize(0.0), -128);
        assert_eq!(p.fake_quantize(1.25), 1.0); // 2.5 rounds to 2
        assert_eq!(p.fake_quantize(1000.0), 127.5); // clamped to qmax
        assert_eq!(p.fake_quantize(-3.0), 0.0); // clamped to qmin = zero point
        // The fast rounding equals round_half_even everywhere in range.
        let q = ActivationParams {
            scale: 1.0,
            zero_point: 3,
            qmin: -128,
            qmax: 127,
        };
        for i in -140_000..140_000 {
            let x = i as f32 * 0.001 + 0.0005 * (i % 3) as f32;
            let want = (crate::quant::round_half_even(x) as i32 + 3).clamp(-128, 127);
            assert_eq!(q.quantize(x), want, "{x}");
        }
    }

    #[test]
    fn agreement_measures_top1_and_kl() {
        let (same, kl) = agreement(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]);
        assert!(same && kl.abs() < 1e-12);
        let (same, kl) = agreement(&[3.0, 2.0, 1.0], &[1.0, 2.0, 3.0]);
        assert!(!same && kl > 0.5);
    }
}
