//! Pruning: unstructured magnitude pruning (zeros inside the tensors) and structured
//! channel pruning (channels physically removed, every coupled tensor rewritten).
//!
//! Both work on a [`TensorStore`] with the lukemelas names, raw (with BatchNorm) or folded
//! (conv bias, no BatchNorm), and return a new store, so the result loads into every
//! executor (burn, the CPU path, ONNX export) and can be fine-tuned and pruned again
//! (prune → fine-tune → prune: call these functions again on the fine-tuned store).

use serde::{Deserialize, Serialize};

pub use compresslab_spec::recipe::{ChannelPruning, ChannelRanking, MagnitudePruning, PruneScope};

use crate::efficientnet::{LayerKind, weight_layers};
use crate::error::{EngineError, Result};
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
    weight_layers(store)
        .iter()
        .map(|l| {
            let w = store.get(&format!("{}.weight", l.name))?;
            Ok(LayerSparsity {
                layer: l.name.clone(),
                zeros: w.data.iter().filter(|v| **v == 0.0).count(),
                total: w.data.len(),
            })
        })
        .collect()
}

fn check_fraction(what: &str, f: f32) -> Result<()> {
    if (0.0..=0.95).contains(&f) {
        Ok(())
    } else {
        Err(EngineError::Config(format!(
            "{what} must be between 0 and 0.95, got {f}"
        )))
    }
}

/// Zeroes the smallest-magnitude weights of every included layer.
///
/// Exactly `round(sparsity × n)` weights are zeroed per layer (per-layer scope) or over all
/// included layers together (global scope); ties at the threshold are broken by position.
pub fn magnitude_prune(store: &TensorStore, cfg: &MagnitudePruning) -> Result<TensorStore> {
    check_fraction("sparsity", cfg.sparsity)?;
    let mut out = store.clone();
    let names: Vec<String> = weight_layers(store)
        .into_iter()
        .filter(|l| !cfg.exclude.contains(&l.name))
        .map(|l| format!("{}.weight", l.name))
        .collect();
    match cfg.scope {
        PruneScope::PerLayer => {
            for name in &names {
                let t = store.get(name)?;
                let k = (cfg.sparsity as f64 * t.data.len() as f64).round() as usize;
                let mut data = t.data.clone();
                zero_smallest(&mut [&mut data[..]], k);
                out.push(NamedTensor { data, ..t.clone() });
            }
        }
        PruneScope::Global => {
            let mut tensors: Vec<NamedTensor> = names
                .iter()
                .map(|n| store.get(n).cloned())
                .collect::<Result<_>>()?;
            let total: usize = tensors.iter().map(|t| t.data.len()).sum();
            let k = (cfg.sparsity as f64 * total as f64).round() as usize;
            let mut slices: Vec<&mut [f32]> = tensors.iter_mut().map(|t| &mut t.data[..]).collect();
            zero_smallest(&mut slices, k);
            for t in tensors {
                out.push(t);
            }
        }
    }
    Ok(out)
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

/// A set of channels that can be removed together, and every tensor coupled to them.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelGroup {
    /// The convolution producing the channels (expand conv of a block, or the head conv).
    pub producer: String,
    /// Per-channel tensors indexed along axis 0 (the producer and, in a block, the
    /// depthwise conv, their BatchNorms or biases).
    pub rows: Vec<String>,
    /// Tensors consuming the channels along axis 1 (the project conv, or the classifier).
    pub columns: Vec<String>,
    /// The BatchNorm after the producer, for γ ranking (`None` once folded).
    pub batch_norm: Option<String>,
    /// Whether the architecture puts a BatchNorm after the producer at all (a hidden
    /// linear layer does not; γ ranking then uses the L1 norm of its weights).
    pub has_batch_norm: bool,
    pub channels: usize,
}

/// The prunable channel groups: each block's expanded channels (expand → depthwise →
/// project, inside the residual so block outputs keep their width) and the head's channels
/// (head conv → classifier).
pub fn channel_groups(store: &TensorStore) -> Result<Vec<ChannelGroup>> {
    let per_channel = |prefix: &str, out: &mut Vec<String>| {
        for suffix in [".weight", ".bias", ".running_mean", ".running_var"] {
            let name = format!("{prefix}{suffix}");
            if store.contains(&name) {
                out.push(name);
            }
        }
    };
    let mut groups = Vec::new();
    let fashion = crate::fashion::is_fashion(store);
    for layer in weight_layers(store) {
        let (rows_from, columns, bn) = match layer.kind {
            // Fashion-MNIST: each conv's channels feed the next conv (or, flattened, fc1);
            // fc1's units feed the classifier.
            LayerKind::Conv if fashion => {
                let i: usize = layer.name[4..].parse().unwrap_or(1);
                let consumer = if i < 3 {
                    format!("conv{}.weight", i + 1)
                } else {
                    "fc1.weight".into()
                };
                (
                    vec![layer.name.clone(), format!("bn{i}")],
                    vec![consumer],
                    format!("bn{i}"),
                )
            }
            LayerKind::Dense => (
                vec![layer.name.clone()],
                vec!["fc2.weight".into()],
                String::new(),
            ),
            LayerKind::Expand => {
                let p = format!("_blocks.{}.", layer.block.unwrap_or_default());
                (
                    vec![
                        format!("{p}_expand_conv"),
                        format!("{p}_bn0"),
                        format!("{p}_depthwise_conv"),
                        format!("{p}_bn1"),
                    ],
                    vec![format!("{p}_project_conv.weight")],
                    format!("{p}_bn0"),
                )
            }
            LayerKind::Head => (
                vec!["_conv_head".into(), "_bn1".into()],
                vec!["_fc.weight".into()],
                "_bn1".into(),
            ),
            _ => continue,
        };
        let mut rows = Vec::new();
        for prefix in &rows_from {
            per_channel(prefix, &mut rows);
        }
        let channels = store.get(&format!("{}.weight", layer.name))?.shape[0];
        let bn_weight = format!("{bn}.weight");
        groups.push(ChannelGroup {
            producer: layer.name.clone(),
            rows,
            columns,
            batch_norm: store.contains(&bn_weight).then_some(bn.clone()),
            has_batch_norm: !bn.is_empty(),
            channels,
        });
    }
    Ok(groups)
}

/// Channels kept in each group (sorted indices), chosen by `cfg`.
pub fn select_channels(
    store: &TensorStore,
    cfg: &ChannelPruning,
) -> Result<Vec<(ChannelGroup, Vec<usize>)>> {
    check_fraction("channel ratio", cfg.ratio)?;
    channel_groups(store)?
        .into_iter()
        .map(|g| {
            let ranking = match (cfg.ranking, g.has_batch_norm) {
                (ChannelRanking::BatchNormGamma, false) => ChannelRanking::L1,
                (r, _) => r,
            };
            let scores: Vec<f64> = match ranking {
                ChannelRanking::L1 | ChannelRanking::L2 => {
                    let w = store.get(&format!("{}.weight", g.producer))?;
                    let per = w.data.len() / g.channels.max(1);
                    w.data
                        .chunks(per.max(1))
                        .map(|row| match ranking {
                            ChannelRanking::L1 => row.iter().map(|v| v.abs() as f64).sum(),
                            _ => row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt(),
                        })
                        .collect()
                }
                ChannelRanking::BatchNormGamma => {
                    let bn = g.batch_norm.as_ref().ok_or_else(|| {
                        EngineError::Config(
                            "BatchNorm γ ranking needs the unfolded model (this one has its BatchNorms folded); rank by L1 or L2".into(),
                        )
                    })?;
                    store
                        .get(&format!("{bn}.weight"))?
                        .data
                        .iter()
                        .map(|v| v.abs() as f64)
                        .collect()
                }
            };
            let keep_count = ((1.0 - cfg.ratio as f64) * g.channels as f64)
                .round()
                .max(1.0) as usize;
            let mut order: Vec<usize> = (0..g.channels).collect();
            // Strongest first; ties keep the lower index.
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            let mut keep = order[..keep_count.min(g.channels)].to_vec();
            keep.sort_unstable();
            Ok((g, keep))
        })
        .collect()
}

/// Removes the unselected channels: a smaller dense model.
pub fn prune_channels(store: &TensorStore, cfg: &ChannelPruning) -> Result<TensorStore> {
    let mut out = store.clone();
    // Groups can share a tensor (fc1 consumes conv3's channels and produces its own
    // units), so each gather reads the result of the previous ones.
    for (group, keep) in select_channels(store, cfg)? {
        for name in &group.rows {
            let t = gather(out.get(name)?, 0, &keep)?;
            out.push(t);
        }
        for name in &group.columns {
            let t = gather_columns(out.get(name)?, group.channels, &keep)?;
            out.push(t);
        }
    }
    Ok(out)
}

/// The same selection as [`prune_channels`], but the removed channels are zeroed in place
/// (their producer filters, BatchNorm γ and β or biases, and depthwise filters), so they
/// output exactly zero: the reference that the physically pruned model must match.
pub fn mask_channels(store: &TensorStore, cfg: &ChannelPruning) -> Result<TensorStore> {
    let mut out = store.clone();
    for (group, keep) in select_channels(store, cfg)? {
        let dropped: Vec<usize> = (0..group.channels)
            .filter(|c| keep.binary_search(c).is_err())
            .collect();
        for name in &group.rows {
            // Running statistics stay: with γ = β = 0 the BatchNorm outputs 0 whatever they are.
            if name.ends_with(".running_mean") || name.ends_with(".running_var") {
                continue;
            }
            let mut t = store.get(name)?.clone();
            let per = t.data.len() / group.channels.max(1);
            for &c in &dropped {
                t.data[c * per..(c + 1) * per].fill(0.0);
            }
            out.push(t);
        }
    }
    Ok(out)
}

/// Keeps the input channels `keep` of a consumer. A linear layer after a flatten has
/// `channels × plane` inputs per output (`[out, channels·plane]`): it keeps whole planes.
fn gather_columns(t: &NamedTensor, channels: usize, keep: &[usize]) -> Result<NamedTensor> {
    match t.shape[..] {
        [out, flat] if flat != channels && channels > 0 && flat.is_multiple_of(channels) => {
            let plane = flat / channels;
            let view = NamedTensor {
                shape: vec![out, channels, plane],
                ..t.clone()
            };
            let mut g = gather(&view, 1, keep)?;
            g.shape = vec![out, keep.len() * plane];
            Ok(g)
        }
        _ => gather(t, 1, keep),
    }
}

/// Keeps the indices `keep` along `axis` (0 or 1) of a row-major tensor.
fn gather(t: &NamedTensor, axis: usize, keep: &[usize]) -> Result<NamedTensor> {
    let dim = *t
        .shape
        .get(axis)
        .ok_or_else(|| EngineError::ShapeMismatch {
            name: t.name.clone(),
            found: t.shape.clone(),
            expected: vec![0; axis + 1],
        })?;
    let outer: usize = t.shape[..axis].iter().product();
    let inner: usize = t.shape[axis + 1..].iter().product();
    let mut data = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for &k in keep {
            let at = (o * dim + k) * inner;
            data.extend_from_slice(&t.data[at..at + inner]);
        }
    }
    let mut shape = t.shape.clone();
    shape[axis] = keep.len();
    Ok(NamedTensor {
        name: t.name.clone(),
        shape,
        data,
    })
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

    #[test]
    fn gather_keeps_rows_and_columns() {
        let t = NamedTensor {
            name: "t".into(),
            shape: vec![3, 2],
            data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        assert_eq!(
            gather(&t, 0, &[0, 2]).unwrap().data,
            vec![1.0, 2.0, 5.0, 6.0]
        );
        let g = gather(&t, 1, &[1]).unwrap();
        assert_eq!((g.shape.clone(), g.data), (vec![3, 1], vec![2.0, 4.0, 6.0]));
    }
}
