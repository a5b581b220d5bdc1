//! Pruning on a built-in network's [`TensorStore`], raw (with BatchNorm) or folded (conv bias,
//! no BatchNorm): structured channel pruning (channels physically removed, every coupled
//! tensor rewritten), found by walking the network's graph, not from names, and returned as a
//! new store, so the result loads into every executor (burn, the CPU path, ONNX export) and
//! can be fine-tuned and pruned again (prune → fine-tune → prune). Magnitude pruning (zeros
//! inside the tensors) runs on the graph, in [`crate::graph::compress_graph`]; the helpers it
//! shares with the sparsity report live here.

use serde::{Deserialize, Serialize};

pub(crate) use compresslab_spec::recipe::check_fraction;
pub use compresslab_spec::recipe::{ChannelPruning, ChannelRanking, MagnitudePruning, PruneScope};

use crate::efficientnet::weight_layers;
use crate::error::{EngineError, Result};
use crate::graph::{self, Graph, Op};
use crate::graph_builder::{unfolded_network_graph, weight_name};
use crate::weights::{NamedTensor, TensorStore};

/// Sparsity actually reached in one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSparsity {
    pub layer: String,
    pub zeros: usize,
    pub total: usize,
}

impl LayerSparsity {
    pub fn fraction(&self) -> f64 {
        self.zeros as f64 / self.total.max(1) as f64
    }
}

/// Zero fraction of every weight layer's weight tensor.
pub fn sparsity_report(store: &TensorStore) -> Result<Vec<LayerSparsity>> {
    layer_weights(store)
        .into_iter()
        .map(|(layer, weight)| {
            let w = store.get(&weight)?;
            Ok(LayerSparsity {
                layer,
                zeros: w.data.iter().filter(|v| **v == 0.0).count(),
                total: w.data.len(),
            })
        })
        .collect()
}

/// Each layer with weights (convolution or fully connected) in execution order, as its name
/// and its weight tensor's name, from the model builder.
fn layer_weights(store: &TensorStore) -> Vec<(String, String)> {
    weight_layers(store)
        .into_iter()
        .map(|l| {
            let weight = weight_name(&l.name);
            (l.name, weight)
        })
        .collect()
}

/// Whether magnitude pruning leaves layer `layer` (at `position` of `0..=last` in graph
/// order) alone.
pub(crate) fn excluded(cfg: &MagnitudePruning, layer: &str, position: usize, last: usize) -> bool {
    cfg.exclude.iter().any(|e| e == layer)
        || (cfg.exclude_ends && (position == 0 || position == last))
}

/// Sets the `k` smallest |values| across `slices` to zero (ties: earlier positions first).
pub(crate) fn zero_smallest(slices: &mut [&mut [f32]], k: usize) {
    let total: usize = slices.iter().map(|s| s.len()).sum();
    if k == 0 || total == 0 {
        return;
    }
    let k = k.min(total);
    let mut mags: Vec<f32> = slices
        .iter()
        .flat_map(|s| s.iter().map(|v| v.abs()))
        .collect();
    let (_, threshold, _) = mags.select_nth_unstable_by(k - 1, f32::total_cmp);
    let threshold = *threshold;
    let below: usize = slices
        .iter()
        .map(|s| s.iter().filter(|v| v.abs() < threshold).count())
        .sum();
    let mut ties_left = k - below;
    for s in slices.iter_mut() {
        for v in s.iter_mut() {
            let m = v.abs();
            if m < threshold {
                *v = 0.0;
            } else if m == threshold && ties_left > 0 {
                *v = 0.0;
                ties_left -= 1;
            }
        }
    }
}

/// Removes the weakest channels of every group that the graph's dependency analysis finds
/// ([`crate::graph::prune_channels`]): a smaller dense model, every coupled tensor rewritten.
pub fn prune_channels(store: &TensorStore, cfg: &ChannelPruning) -> Result<TensorStore> {
    through_graph(store, cfg, |graph| graph::prune_channels(graph, cfg))
}

/// The same selection as [`prune_channels`], with the removed channels zeroed in place, so
/// they contribute nothing: the reference that the physically pruned model must match.
pub fn mask_channels(store: &TensorStore, cfg: &ChannelPruning) -> Result<TensorStore> {
    through_graph(store, cfg, |graph| graph::mask_channels(graph, cfg))
}

/// For each value of the network's unfolded graph (see
/// [`crate::graph_builder::unfolded_network_graph`]) that [`prune_channels`] narrows, the
/// channels that stay: where the pruned network's values come from in the original's.
pub fn kept_channels(
    store: &TensorStore,
    cfg: &ChannelPruning,
) -> Result<std::collections::HashMap<String, Vec<usize>>> {
    check_fraction("channel ratio", cfg.ratio)?;
    graph::kept_channels(&unfolded_network_graph(store)?, cfg)
}

/// `rewrite` applied to the network's unfolded graph, whose constants are the store's
/// tensors; the rewritten constants go back into the store under their names.
fn through_graph(
    store: &TensorStore,
    cfg: &ChannelPruning,
    rewrite: impl FnOnce(&Graph) -> Result<Graph>,
) -> Result<TensorStore> {
    check_fraction("channel ratio", cfg.ratio)?;
    let graph = unfolded_network_graph(store)?;
    if cfg.ranking == ChannelRanking::BatchNormGamma
        && !graph
            .nodes
            .iter()
            .any(|n| matches!(n.op, Op::BatchNorm { .. }))
    {
        return Err(EngineError::Config(
            "BatchNorm γ ranking needs the unfolded model (this one has its BatchNorms folded); rank by L1 or L2".into(),
        ));
    }
    let mut rewritten = rewrite(&graph)?.constants;
    if let Some(copy) = rewritten
        .keys()
        .find(|n| !store.contains(n) && !graph.constants.contains_key(*n))
    {
        return Err(EngineError::Weights(format!(
            "pruning made a tensor `{copy}` that the model's weights have no place for"
        )));
    }
    // At most the store, the graph and its rewrite at once: each tensor moves from the rewrite.
    drop(graph);
    let mut out = TensorStore::default();
    for t in store.iter() {
        out.push(match rewritten.remove(&t.name) {
            Some(c) => NamedTensor {
                name: t.name.clone(),
                shape: c.dims,
                data: c.data,
            },
            None => t.clone(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_smallest_counts_exactly_and_breaks_ties_by_position() {
        let mut a = vec![3.0, -1.0, 2.0, 1.0];
        let mut b = vec![-1.0, 5.0];
        zero_smallest(&mut [&mut a[..], &mut b[..]], 2);
        assert_eq!(a, vec![3.0, 0.0, 2.0, 0.0]);
        assert_eq!(b, vec![-1.0, 5.0]);
        let mut c = vec![0.5, -0.25, 4.0];
        zero_smallest(&mut [&mut c[..]], 3);
        assert_eq!(c, vec![0.0, 0.0, 0.0]);
    }
}
