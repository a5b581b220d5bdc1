//! The lab's recipe applied to any graph, by walking its nodes rather than reading names:
//! channel pruning by dependency groups → BatchNorm folding → magnitude pruning → weight
//! quantization → activation calibration. The result is itself a [`Graph`] that every
//! executor runs (dequantized weights, `QuantizeDequantize` nodes before each quantized
//! layer's input), plus the integer weights the ONNX export writes.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::depgraph::prune_channels;
use super::shape::{Dim, node_macs};
use super::{ActivationParams, Graph, Node, Op, fold_batch_norms, transpose};
use crate::compress::{
    ChannelGrid, Histogram, Observer, Progress, Recipe, percentile_range, percentile_sample,
    percentile_samples_per_image,
};
use crate::error::{EngineError, Result};
use crate::exec::{CpuExecutor, Tensor};
use crate::prune::{PruneScope, excluded, zero_smallest};
use crate::quant::{Granularity, QuantScheme, QuantizedTensor, group_params, sqnr_db};

/// One layer with weights (a convolution or a fully connected layer) after compression.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphLayer {
    /// The node's name, as in the file.
    pub node: String,
    pub op: &'static str,
    /// The weight constant's name and shape.
    pub weight: String,
    pub shape: Vec<usize>,
    pub parameters: usize,
    pub zeros: usize,
    /// For one input of the model's declared size (batch 1).
    pub macs: Option<u64>,
    pub bits: Option<u8>,
    /// Weight SQNR against the float weights before quantization.
    pub sqnr_db: Option<f64>,
    pub activation: Option<ActivationParams>,
    /// The float weights before quantization: all of them, and the narrowest output channel
    /// with the quantization levels that fall inside its range.
    pub histogram: Histogram,
    pub narrowest_channel: Option<ChannelGrid>,
}

/// Size and compute of a graph.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphStats {
    pub parameters: usize,
    /// 4 bytes per float value; packed integers, scales and zero points for quantized weights.
    pub weight_bytes: usize,
    pub macs: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct CompressedGraph {
    pub recipe: Recipe,
    /// What the executors run: pruned, folded, dequantized, activations fake-quantized.
    pub graph: Graph,
    /// Integer weights by constant name (the export writes these, not the floats).
    pub weights: BTreeMap<String, QuantizedTensor>,
    pub layers: Vec<GraphLayer>,
}

/// Nodes with a constant weight matrix or filter bank: where quantization applies.
pub fn weight_nodes(graph: &Graph) -> Vec<usize> {
    graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            matches!(n.op, Op::Conv(_) | Op::Gemm { .. } | Op::MatMul)
                && n.inputs.get(1).is_some_and(|w| graph.constant(w).is_some())
        })
        .map(|(i, _)| i)
        .collect()
}

/// Dims of every value for one input (batch 1); image sizes the model leaves open stay
/// unknown (MACs are then unknown too).
pub(crate) fn batch_one_shapes(graph: &Graph) -> Result<super::Shapes> {
    graph.shapes(&batch_one(graph)?)
}

/// The graph's input dims with a batch of one.
fn batch_one(graph: &Graph) -> Result<Vec<Dim>> {
    let mut dims = graph.input()?.dims.clone();
    if let Some(batch) = dims.first_mut() {
        *batch = Dim::Known(1);
    }
    Ok(dims)
}

/// Rewrites `MatMul` with a 2-D input and `Gemm` without `transB` as `Gemm` with `transB`
/// (weights `[out, in]`), so every weight's axis 0 is its output channel: the axis that
/// per-channel and per-block quantization group by.
fn weights_output_major(graph: &mut Graph) -> Result<()> {
    let shapes = graph.shapes(&graph.input()?.dims.clone())?;
    let uses = graph.consumers();
    let mut renames: Vec<(usize, String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        let two_d = shapes.get(&node.inputs[0]).is_some_and(|d| d.len() == 2);
        let flip = match node.op {
            Op::MatMul => two_d,
            Op::Gemm { trans_b, .. } => !trans_b,
            _ => false,
        };
        let Some(w) = node.inputs.get(1).and_then(|n| graph.constant(n)) else {
            continue;
        };
        if flip && w.dims.len() == 2 {
            let (dims, data) = transpose(&w.dims, &w.data, &[1, 0]);
            let shared = uses
                .get(node.inputs[1].as_str())
                .is_some_and(|u| u.len() > 1);
            let name = if shared {
                format!("{}.{}", node.inputs[1], node.name)
            } else {
                node.inputs[1].clone()
            };
            renames.push((i, name, dims, data));
        }
    }
    for (i, name, dims, data) in renames {
        let node = &mut graph.nodes[i];
        node.op = match node.op {
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                ..
            } => Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b: true,
            },
            _ => Op::Gemm {
                alpha: 1.0,
                beta: 1.0,
                trans_a: false,
                trans_b: true,
            },
        };
        node.inputs[1] = name.clone();
        graph.constants.insert(name, super::Constant { dims, data });
    }
    Ok(())
}

/// Applies `recipe` to `graph`. `calibration` holds NCHW input batches, needed only for
/// activation quantization. `recipe.keep_fp32` and the magnitude pruning's `exclude` list
/// name nodes.
pub fn compress_graph(
    graph: &Graph,
    recipe: &Recipe,
    calibration: &[Tensor],
    progress: Progress,
) -> Result<CompressedGraph> {
    compress_graph_with(
        Cow::Borrowed(graph),
        recipe,
        Calibration {
            batches: calibration.len(),
            batch: &|i| Ok(Cow::Borrowed(&calibration[i])),
        },
        progress,
    )
}

/// Calibration batches made one at a time (so a long calibration set is not copied whole).
pub(crate) struct Calibration<'a> {
    pub batches: usize,
    /// Batch `i` of `0..batches`.
    pub batch: &'a dyn Fn(usize) -> Result<Cow<'a, Tensor>>,
}

/// [`compress_graph`] with its calibration batches made as they are needed, on a graph it may
/// take (so the weights are not copied when nothing prunes channels).
pub(crate) fn compress_graph_with(
    graph: Cow<Graph>,
    recipe: &Recipe,
    calibration: Calibration,
    progress: Progress,
) -> Result<CompressedGraph> {
    recipe.validate()?;
    progress("pruning channels", 0.05)?;
    let mut g = match &recipe.channel_pruning {
        Some(cfg) => prune_channels(&graph, cfg)?,
        None => graph.into_owned(),
    };
    fold_batch_norms(&mut g);
    weights_output_major(&mut g)?;
    let layers = weight_nodes(&g);
    let weight_of = |g: &Graph, i: usize| g.nodes[i].inputs[1].clone();

    if let Some(cfg) = &recipe.magnitude_pruning {
        progress("magnitude pruning", 0.15)?;
        let last = layers.len().saturating_sub(1);
        // In graph order, each shared weight once: ties at a global threshold go to the
        // earlier layer.
        let mut seen = BTreeSet::new();
        let mut tensors: Vec<(String, Vec<f32>)> = layers
            .iter()
            .enumerate()
            .filter(|&(at, &i)| !excluded(cfg, &g.nodes[i].name, at, last))
            .map(|(_, &i)| weight_of(&g, i))
            .filter(|n| seen.insert(n.clone()))
            .filter_map(|n| g.constant(&n).map(|c| (n.clone(), c.data.clone())))
            .collect();
        let fraction = f64::from(cfg.sparsity);
        match cfg.scope {
            PruneScope::PerLayer => {
                for (_, data) in &mut tensors {
                    let k = (fraction * data.len() as f64).round() as usize;
                    zero_smallest(&mut [&mut data[..]], k);
                }
            }
            PruneScope::Global => {
                let total: usize = tensors.iter().map(|(_, d)| d.len()).sum();
                let k = (fraction * total as f64).round() as usize;
                let mut slices: Vec<&mut [f32]> =
                    tensors.iter_mut().map(|(_, d)| &mut d[..]).collect();
                zero_smallest(&mut slices, k);
            }
        }
        for (name, data) in tensors {
            if let Some(c) = g.constants.get_mut(&name) {
                c.data = data;
            }
        }
    }

    progress("quantizing weights", 0.3)?;
    let quantized_layers: Vec<usize> = layers
        .iter()
        .copied()
        .filter(|&i| !recipe.keep_fp32.contains(&g.nodes[i].name))
        .collect();
    let mut weights = BTreeMap::new();
    let mut sqnr = HashMap::new();
    // Histograms of the float weights, taken before quantization replaces them.
    let mut views: HashMap<String, WeightView> = HashMap::new();
    if let Some(scheme) = &recipe.weights {
        for (k, &i) in quantized_layers.iter().enumerate() {
            // Per layer, so a cancel lands between layers.
            progress(
                "quantizing weights",
                0.3 + 0.1 * k as f32 / quantized_layers.len().max(1) as f32,
            )?;
            let name = weight_of(&g, i);
            if weights.contains_key(&name) {
                continue;
            }
            let Some(c) = g.constants.get_mut(&name) else {
                continue;
            };
            let q = QuantizedTensor::quantize(&c.data, &c.dims, *scheme);
            let data = q.dequantize();
            sqnr.insert(name.clone(), sqnr_db(&c.data, &data));
            views.insert(name.clone(), WeightView::of(&c.data, &c.dims, Some(&q)));
            c.data = data;
            weights.insert(name, q);
        }
    }

    let mut activations: HashMap<String, ActivationParams> = HashMap::new();
    if let Some(act) = &recipe.activations {
        if calibration.batches == 0 {
            return Err(EngineError::Config(
                "activation quantization needs at least one calibration input".into(),
            ));
        }
        let observed: BTreeSet<String> = quantized_layers
            .iter()
            .map(|&i| g.nodes[i].inputs[0].clone())
            .collect();
        let executor = CpuExecutor::new(&g)?;
        let mut ranges: HashMap<String, (f32, f32, Vec<f32>)> = HashMap::new();
        let per_image = percentile_samples_per_image(observed.len(), calibration.batches);
        for k in 0..calibration.batches {
            progress(
                &format!(
                    "calibrating activations ({}/{})",
                    k + 1,
                    calibration.batches
                ),
                0.4 + 0.55 * k as f32 / calibration.batches as f32,
            )?;
            let batch = (calibration.batch)(k)?;
            executor.run_observed(&batch, &mut |name, values| {
                if !observed.contains(name) {
                    return;
                }
                let (lo, hi, samples) = ranges.entry(name.to_string()).or_default();
                for &v in values {
                    *lo = lo.min(v);
                    *hi = hi.max(v);
                }
                if let Observer::Percentile(_) = act.observer {
                    samples.extend(percentile_sample(values, per_image));
                }
            })?;
        }
        let scheme = QuantScheme {
            bits: act.bits,
            symmetric: act.symmetric,
            granularity: Granularity::PerTensor,
        };
        let (qmin, qmax) = scheme.qrange();
        for (name, (lo, hi, mut samples)) in ranges {
            let (lo, hi) = match act.observer {
                Observer::MinMax => (lo, hi),
                Observer::Percentile(p) => percentile_range(&mut samples, p),
            };
            let (scale, zero_point) = group_params(&[lo, hi], &scheme);
            activations.insert(
                name,
                ActivationParams {
                    scale,
                    zero_point,
                    qmin,
                    qmax,
                },
            );
        }
        insert_activation_quantizers(&mut g, &quantized_layers, &activations);
    }

    // Node indices moved when the quantizers went in: layers are known by name from here.
    let quantized_names: BTreeSet<&str> = g
        .nodes
        .iter()
        .filter(|n| !recipe.keep_fp32.contains(&n.name))
        .map(|n| n.name.as_str())
        .collect();
    let shapes = batch_one_shapes(&g)?;
    let layer_reports = weight_nodes(&g)
        .into_iter()
        .map(|i| {
            let node = &g.nodes[i];
            let name = weight_of(&g, i);
            let c = g.constant(&name);
            let input = node.inputs[0].trim_end_matches(QUANTIZED_SUFFIX);
            let quantized = quantized_names.contains(node.name.as_str());
            let view = match views.remove(&name) {
                Some(view) => view,
                None => WeightView::of(
                    c.map_or(&[][..], |c| &c.data[..]),
                    c.map_or(&[][..], |c| &c.dims[..]),
                    None,
                ),
            };
            GraphLayer {
                node: node.name.clone(),
                op: node.op.name(),
                shape: c.map(|c| c.dims.clone()).unwrap_or_default(),
                parameters: c.map_or(0, |c| c.data.len()),
                zeros: c.map_or(0, |c| c.data.iter().filter(|v| **v == 0.0).count()),
                macs: node_macs(&g, &shapes, node),
                bits: weights
                    .get(&name)
                    .filter(|_| quantized)
                    .map(|q| q.scheme.bits),
                sqnr_db: sqnr.get(&name).copied().filter(|_| quantized),
                activation: activations.get(input).copied().filter(|_| quantized),
                weight: name,
                histogram: view.histogram,
                narrowest_channel: view.narrowest_channel,
            }
        })
        .collect();
    progress("done", 1.0)?;
    Ok(CompressedGraph {
        recipe: recipe.clone(),
        graph: g,
        weights,
        layers: layer_reports,
    })
}

impl CompressedGraph {
    /// This variant with its constants replaced by `tuned` (after fine-tuning): quantized
    /// weights are quantized again on their grids (the SQNR is then against the tuned
    /// floats), everything else is taken as it is. Activation quantizers are kept.
    pub fn with_tuned_weights(
        &self,
        tuned: &BTreeMap<String, super::Constant>,
    ) -> Result<CompressedGraph> {
        let mut out = self.clone();
        let mut sqnr = HashMap::new();
        let mut views = HashMap::new();
        for (name, t) in tuned {
            let Some(c) = out.graph.constants.get_mut(name) else {
                continue;
            };
            if t.dims != c.dims || t.data.len() != c.data.len() {
                return Err(EngineError::Execution(format!(
                    "tuned `{name}` is {:?}, the variant's {:?}",
                    t.dims, c.dims
                )));
            }
            c.data = match out.weights.get_mut(name) {
                Some(q) => {
                    // Fine-tuning trained on this grid: keep its scales.
                    *q = q.requantize(&t.data).ok_or_else(|| {
                        EngineError::Execution(format!("tuned `{name}` does not fit its grid"))
                    })?;
                    let data = q.dequantize();
                    sqnr.insert(name.clone(), sqnr_db(&t.data, &data));
                    views.insert(name.clone(), WeightView::of(&t.data, &t.dims, Some(q)));
                    data
                }
                None => {
                    views.insert(name.clone(), WeightView::of(&t.data, &t.dims, None));
                    t.data.clone()
                }
            };
        }
        for layer in &mut out.layers {
            if let Some(c) = out.graph.constant(&layer.weight) {
                layer.zeros = c.data.iter().filter(|v| **v == 0.0).count();
            }
            if layer.sqnr_db.is_some() {
                layer.sqnr_db = sqnr.get(&layer.weight).copied();
            }
            if let Some(view) = views.remove(&layer.weight) {
                layer.histogram = view.histogram;
                layer.narrowest_channel = view.narrowest_channel;
            }
        }
        Ok(out)
    }
}

/// What the per-layer view draws of a weight tensor `[outputs, …]`.
struct WeightView {
    histogram: Histogram,
    narrowest_channel: Option<ChannelGrid>,
}

impl WeightView {
    /// Of the float weights `data`; `q` is their quantized form, when there is one.
    fn of(data: &[f32], dims: &[usize], q: Option<&QuantizedTensor>) -> Self {
        let per_output: usize = dims.iter().skip(1).product();
        WeightView {
            histogram: Histogram::of(data, 64),
            narrowest_channel: crate::compress::narrowest_channel(data, per_output, q),
        }
    }
}

/// Suffix of the value a `QuantizeDequantize` node writes.
const QUANTIZED_SUFFIX: &str = ".quantized";

/// One `QuantizeDequantize` node per quantized value, right after the node computing it;
/// the quantized layers read it, every other reader keeps the float value.
fn insert_activation_quantizers(
    g: &mut Graph,
    layers: &[usize],
    params: &HashMap<String, ActivationParams>,
) {
    let layer_names: BTreeSet<String> = layers.iter().map(|&i| g.nodes[i].name.clone()).collect();
    let mut nodes = Vec::with_capacity(g.nodes.len() * 2);
    let quantizer = |value: &str, p: ActivationParams| Node {
        name: format!("{value}.quantize"),
        op: Op::QuantizeDequantize(p),
        inputs: vec![value.to_string()],
        outputs: vec![format!("{value}{QUANTIZED_SUFFIX}")],
    };
    let input = g.inputs.first().map(|i| i.name.clone()).unwrap_or_default();
    if let Some(p) = params.get(&input) {
        nodes.push(quantizer(&input, *p));
    }
    for mut node in std::mem::take(&mut g.nodes) {
        if layer_names.contains(&node.name) && params.contains_key(&node.inputs[0]) {
            node.inputs[0] = format!("{}{QUANTIZED_SUFFIX}", node.inputs[0]);
        }
        let out = node.outputs[0].clone();
        nodes.push(node);
        if let Some(p) = params.get(&out) {
            nodes.push(quantizer(&out, *p));
        }
    }
    g.nodes = nodes;
}

impl Graph {
    /// Parameters, storage and MACs (for one input of the declared size, batch 1), with the
    /// integer weights of `quantized` counted at their packed size.
    pub fn stats(&self, quantized: &BTreeMap<String, QuantizedTensor>) -> Result<GraphStats> {
        self.stats_at(&batch_one(self)?, quantized)
    }

    /// [`Graph::stats`] with MACs for an input of `input` dims (for a model that leaves its
    /// image size open, the size it is fed).
    pub fn stats_at(
        &self,
        input: &[Dim],
        quantized: &BTreeMap<String, QuantizedTensor>,
    ) -> Result<GraphStats> {
        let shapes = self.shapes(input)?;
        let weight_bytes = self
            .constants
            .iter()
            .map(|(name, c)| match quantized.get(name) {
                Some(q) => q.storage_bytes(),
                None => 4 * c.data.len(),
            })
            .sum();
        Ok(GraphStats {
            parameters: self.constants.values().map(|c| c.data.len()).sum(),
            weight_bytes,
            macs: super::shape::macs(self, &shapes),
        })
    }
}
