//! Channel pruning derived from the graph, as Torch-Pruning's DepGraph does: channels that
//! must be removed together are found by walking the nodes, not by reading tensor names.
//!
//! Every output channel of a dense convolution, Gemm or MatMul is a *slot*. Walking the graph
//! gives each value a *layout* (the slot behind each position of its channel axis, axis 1)
//! and joins slots that must go together:
//! - elementwise ops, BatchNorm, pools and depthwise convolutions pass their input's layout on;
//! - Add / Sub / Mul / Sum join their operands position by position (residual partners,
//!   squeeze-excite gates);
//! - Concat on the channel axis concatenates layouts (each part keeps its own offsets);
//! - Flatten and channel-major Reshapes repeat each slot once per spatial position (Flatten
//!   into Gemm);
//! - whatever mixes channels in a way a removal cannot follow (grouped convolutions, channel
//!   shuffles, Softmax over channels, the graph's input and outputs) *fixes* its slots.
//!
//! The joined slots form the channels of a [`ChannelGroup`]; pruning removes the weakest
//! channels of each group from every tensor that has them: the producers' filters and biases,
//! depthwise filters, BatchNorm parameters, per-channel constants, the consumers' input
//! columns, and the channel counts written in Reshape targets and depthwise `group`s.

use std::collections::{BTreeMap, HashMap};

use super::shape::Dim;
use super::{Constant, Graph, Op};
use crate::error::{EngineError, Result};
use crate::prune::{ChannelPruning, ChannelRanking, check_fraction};

/// Channels that are removed together, and the nodes whose output channels they are.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelGroup {
    /// Nodes producing these channels (convolutions, Gemm / MatMul), in graph order.
    pub producers: Vec<String>,
    pub channels: usize,
    /// Why the channels cannot be removed (`None`: prunable).
    pub fixed: Option<String>,
    /// The union-find roots of the group's channels, in channel order of the first producer.
    classes: Vec<usize>,
}

/// Union-find over slots; each root knows whether (and why) its channel is fixed.
#[derive(Default)]
struct Slots {
    parent: Vec<usize>,
    fixed: Vec<Option<String>>,
    /// `(node index, output channel)` for slots made by a producer.
    producer: Vec<Option<(usize, usize)>>,
}

impl Slots {
    fn fresh(&mut self, producer: Option<(usize, usize)>, fixed: Option<&str>) -> usize {
        self.parent.push(self.parent.len());
        self.fixed.push(fixed.map(str::to_string));
        self.producer.push(producer);
        self.parent.len() - 1
    }

    fn find(&mut self, mut a: usize) -> usize {
        while self.parent[a] != a {
            self.parent[a] = self.parent[self.parent[a]];
            a = self.parent[a];
        }
        a
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.parent[rb] = ra;
            if self.fixed[ra].is_none() {
                self.fixed[ra] = self.fixed[rb].take();
            }
        }
    }

    fn fix(&mut self, layout: &[usize], why: &str) {
        for &s in layout {
            let r = self.find(s);
            if self.fixed[r].is_none() {
                self.fixed[r] = Some(why.to_string());
            }
        }
    }
}

/// How a node's constant input follows the channels of a value.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    /// Indexed by the node's output channels along `axis` (filters, biases, BN parameters,
    /// per-channel constants).
    Rows { axis: usize, zero_when_masked: bool },
    /// Indexed by the node's input channels along `axis` (the consumer's columns).
    Columns { axis: usize },
}

/// The analysed graph: layouts of every value and the constants that follow them.
struct Analysis {
    slots: Slots,
    layouts: HashMap<String, Vec<usize>>,
    /// `(node, input index, role)` for each constant that follows a layout.
    roles: Vec<(usize, usize, Role)>,
    /// Per slot: the sum of |γ| of the BatchNorms its channel passes through, if any.
    gamma: HashMap<usize, f64>,
}

fn channel_dim(dims: &[Dim]) -> Option<usize> {
    dims.get(1).and_then(Dim::known)
}

/// Whether the trailing-axes flatten of a `from` value into `to` keeps each output position
/// inside one input channel; returns the output positions per input channel's block ratio
/// `(t_in, t_out)` (positions p of `to` axis 1 lie in input channel `p·t_out / t_in`).
fn channel_major(from: &[Dim], to: &[Dim]) -> Option<(usize, usize)> {
    // Equal element counts after the batch axis imply equal batches.
    if from.len() < 2 || to.len() < 2 {
        return None;
    }
    let trailing = |d: &[Dim]| -> Option<usize> {
        d.iter()
            .try_fold(1usize, |acc, x| acc.checked_mul(x.known()?))
    };
    let (t_in, t_out) = (trailing(&from[2..])?, trailing(&to[2..])?);
    let total_in = t_in.checked_mul(channel_dim(from)?)?;
    let total_out = t_out.checked_mul(channel_dim(to)?)?;
    (total_in == total_out && t_out >= 1 && t_in % t_out == 0).then_some((t_in, t_out))
}

fn analyse(graph: &Graph) -> Result<Analysis> {
    let input = graph.input()?;
    // A batch of one: channel counts behind a reshape that copies the batch become known.
    let mut dims = input.dims.clone();
    if let Some(batch) = dims.first_mut() {
        *batch = Dim::Known(1);
    }
    let shapes = graph.shapes(&dims)?;
    let mut slots = Slots::default();
    let mut layouts: HashMap<String, Vec<usize>> = HashMap::new();
    let mut roles = Vec::new();
    let mut gamma: HashMap<usize, f64> = HashMap::new();
    let dims_of = |name: &str| -> Result<&Vec<Dim>> {
        shapes
            .get(name)
            .ok_or_else(|| EngineError::Onnx(format!("no shape for `{name}`")))
    };
    let fresh_fixed = |slots: &mut Slots, n: usize, why: &str| -> Vec<usize> {
        (0..n).map(|_| slots.fresh(None, Some(why))).collect()
    };
    // Output channels of node `i` that cannot be removed (listed as a fixed group).
    let fixed_producer = |slots: &mut Slots, i: usize, n: usize, why: &str| -> Vec<usize> {
        (0..n)
            .map(|c| slots.fresh(Some((i, c)), Some(why)))
            .collect()
    };
    let c_in = channel_dim(&input.dims).unwrap_or(0);
    let image = fresh_fixed(&mut slots, c_in, "the model's input");
    layouts.insert(input.name.clone(), image);

    for (i, node) in graph.nodes.iter().enumerate() {
        let out_dims = dims_of(&node.outputs[0])?.clone();
        let out_channels = channel_dim(&out_dims).unwrap_or(0);
        let act_inputs: Vec<(usize, &String)> = node
            .inputs
            .iter()
            .enumerate()
            .filter(|(_, n)| graph.constant(n).is_none())
            .collect();
        let layout_of = |name: &str| layouts.get(name).cloned().unwrap_or_default();
        let x = act_inputs
            .first()
            .map(|(_, n)| layout_of(n))
            .unwrap_or_default();
        let x_dims = act_inputs
            .first()
            .map(|(_, n)| dims_of(n).cloned())
            .transpose()?
            .unwrap_or_default();
        let producer = |slots: &mut Slots, n: usize| -> Vec<usize> {
            (0..n).map(|c| slots.fresh(Some((i, c)), None)).collect()
        };
        let out = match &node.op {
            Op::Conv(conv) => {
                let cout = graph
                    .constant(&node.inputs[1])
                    .and_then(|c| c.dims.first().copied())
                    .unwrap_or(0);
                // The filters and bias follow the output channels (of a dense or a
                // depthwise convolution alike).
                let rows = Role::Rows {
                    axis: 0,
                    zero_when_masked: true,
                };
                let filter_rows = |roles: &mut Vec<(usize, usize, Role)>| {
                    roles.push((i, 1, rows));
                    if node.inputs.len() > 2 {
                        roles.push((i, 2, rows));
                    }
                };
                if conv.group == 1 {
                    roles.push((i, 1, Role::Columns { axis: 1 }));
                    filter_rows(&mut roles);
                    producer(&mut slots, cout)
                } else if conv.group == x.len() && cout == x.len() {
                    // Depthwise: channel c in, channel c out.
                    filter_rows(&mut roles);
                    x
                } else {
                    slots.fix(&x, "grouped convolution");
                    fixed_producer(&mut slots, i, cout, "grouped convolution")
                }
            }
            Op::Gemm {
                trans_a, trans_b, ..
            } => {
                let w = graph.constant(&node.inputs[1]).map(|c| c.dims.clone());
                let n = w
                    .as_ref()
                    .and_then(|d| d.get(usize::from(!*trans_b)).copied())
                    .unwrap_or(0);
                if *trans_a || x_dims.len() != 2 {
                    slots.fix(&x, "Gemm reads its input transposed");
                    fixed_producer(&mut slots, i, n, "Gemm reads its input transposed")
                } else {
                    let (k_axis, n_axis) = if *trans_b { (1, 0) } else { (0, 1) };
                    roles.push((i, 1, Role::Columns { axis: k_axis }));
                    roles.push((
                        i,
                        1,
                        Role::Rows {
                            axis: n_axis,
                            zero_when_masked: true,
                        },
                    ));
                    let bias_per_unit = node
                        .inputs
                        .get(2)
                        .and_then(|b| graph.constant(b))
                        .is_some_and(|b| b.data.len() == n && n > 1);
                    if bias_per_unit {
                        let axis = graph
                            .constant(&node.inputs[2])
                            .map_or(0, |b| b.dims.len().saturating_sub(1));
                        roles.push((
                            i,
                            2,
                            Role::Rows {
                                axis,
                                zero_when_masked: true,
                            },
                        ));
                    }
                    producer(&mut slots, n)
                }
            }
            Op::MatMul => {
                let n = graph
                    .constant(&node.inputs[1])
                    .and_then(|c| c.dims.get(1).copied())
                    .unwrap_or(0);
                if x_dims.len() != 2 {
                    slots.fix(&x, "MatMul on a batch of matrices");
                    fixed_producer(&mut slots, i, out_channels, "MatMul on a batch of matrices")
                } else {
                    roles.push((i, 1, Role::Columns { axis: 0 }));
                    roles.push((
                        i,
                        1,
                        Role::Rows {
                            axis: 1,
                            zero_when_masked: true,
                        },
                    ));
                    producer(&mut slots, n)
                }
            }
            Op::BatchNorm { .. } => {
                for k in 1..5 {
                    // γ and β zeroed (the masked channel outputs 0); mean and variance kept.
                    roles.push((
                        i,
                        k,
                        Role::Rows {
                            axis: 0,
                            zero_when_masked: k <= 2,
                        },
                    ));
                }
                if let Some(g) = graph.constant(&node.inputs[1]) {
                    for (&s, v) in x.iter().zip(&g.data) {
                        let root = slots.find(s);
                        *gamma.entry(root).or_default() += f64::from(v.abs());
                    }
                }
                x
            }
            op if op.is_unary() => x,
            Op::GlobalAveragePool | Op::AveragePool(_) | Op::MaxPool(_) => x,
            Op::Add | Op::Sub | Op::Mul | Op::Div | Op::Sum => {
                let mut full: Option<Vec<usize>> = None;
                for (k, name) in node.inputs.iter().enumerate() {
                    let dims = dims_of(name)?;
                    let aligned = (dims.len() + 1).checked_sub(out_dims.len());
                    let extent = aligned.and_then(|a| dims.get(a)).and_then(Dim::known);
                    if graph.constant(name).is_some() {
                        if extent == Some(out_channels) && out_channels > 1 {
                            let axis = aligned.unwrap_or(0);
                            let divides = matches!(node.op, Op::Div);
                            if divides && k == 0 {
                                slots.fix(&x, "a per-channel constant divided by activations");
                            }
                            // 0 / 0 would be NaN: a divisor is only gathered, never zeroed.
                            roles.push((
                                i,
                                k,
                                Role::Rows {
                                    axis,
                                    zero_when_masked: !divides,
                                },
                            ));
                        }
                        continue;
                    }
                    let l = layout_of(name);
                    if dims.len() != out_dims.len() {
                        slots.fix(&l, "a broadcast across ranks");
                        continue;
                    }
                    if matches!(node.op, Op::Div) && k > 0 && l.len() > 1 {
                        slots.fix(&l, "division by activations");
                        slots.fix(&x, "division by activations");
                    }
                    if l.len() != out_channels {
                        continue; // broadcast along channels: one value for all of them
                    }
                    match &full {
                        None => full = Some(l),
                        Some(f) => {
                            for (&a, &b) in f.iter().zip(&l) {
                                slots.union(a, b);
                            }
                        }
                    }
                }
                full.unwrap_or_else(|| fresh_fixed(&mut slots, out_channels, "constant channels"))
            }
            Op::Concat { axis } => {
                let parts: Vec<Vec<usize>> = node.inputs.iter().map(|n| layout_of(n)).collect();
                let has_const = node.inputs.iter().any(|n| graph.constant(n).is_some());
                if has_const {
                    for p in &parts {
                        slots.fix(p, "concatenation with a constant");
                    }
                    fresh_fixed(&mut slots, out_channels, "concatenation with a constant")
                } else if *axis == 1 {
                    parts.concat()
                } else {
                    for p in &parts[1..] {
                        for (&a, &b) in parts[0].iter().zip(p) {
                            slots.union(a, b);
                        }
                    }
                    parts[0].clone()
                }
            }
            Op::Flatten { .. } | Op::Reshape { .. } => match channel_major(&x_dims, &out_dims) {
                Some((t_in, t_out)) => (0..out_channels).map(|p| x[p * t_out / t_in]).collect(),
                None => {
                    slots.fix(&x, "a reshape that mixes channels");
                    fresh_fixed(&mut slots, out_channels, "a reshape that mixes channels")
                }
            },
            Op::Transpose { perm } if perm.len() >= 2 && perm[0] == 0 && perm[1] == 1 => x,
            Op::Softmax { axis, .. } if *axis > 1 => x,
            other => {
                let why = format!("{} mixes channels", other.name());
                slots.fix(&x, &why);
                fresh_fixed(&mut slots, out_channels, &why)
            }
        };
        let out = if out.len() == out_channels {
            out
        } else {
            // Rank < 2 values, or counts that do not line up: nothing to prune there.
            slots.fix(&out, "an unexpected shape");
            fresh_fixed(&mut slots, out_channels, "an unexpected shape")
        };
        layouts.insert(node.outputs[0].clone(), out);
    }
    for output in &graph.outputs {
        if let Some(l) = layouts.get(&output.name) {
            slots.fix(&l.clone(), "the model's output");
        }
    }
    Ok(Analysis {
        slots,
        layouts,
        roles,
        gamma,
    })
}

impl Analysis {
    /// Groups of channels: classes (union-find roots) that share the same producers.
    fn groups(&mut self, graph: &Graph) -> Vec<ChannelGroup> {
        let mut producers_of: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        let mut order: Vec<usize> = Vec::new();
        for s in 0..self.slots.parent.len() {
            let Some((node, _)) = self.slots.producer[s] else {
                continue;
            };
            let root = self.slots.find(s);
            let entry = producers_of.entry(root).or_default();
            if entry.is_empty() {
                order.push(root);
            }
            if !entry.contains(&node) {
                entry.push(node);
            }
        }
        let mut groups: Vec<ChannelGroup> = Vec::new();
        let mut index: HashMap<(Vec<usize>, Option<String>), usize> = HashMap::new();
        for root in order {
            let mut nodes = producers_of[&root].clone();
            nodes.sort_unstable();
            let fixed = self.slots.fixed[root].clone();
            let key = (nodes.clone(), fixed.clone());
            let g = *index.entry(key).or_insert_with(|| {
                groups.push(ChannelGroup {
                    producers: nodes.iter().map(|&n| graph.nodes[n].name.clone()).collect(),
                    channels: 0,
                    fixed,
                    classes: Vec::new(),
                });
                groups.len() - 1
            });
            groups[g].channels += 1;
            groups[g].classes.push(root);
        }
        groups
    }

    /// Importance of each class: the summed L1 / L2 norms of its producers' filters, or the
    /// summed |γ| of the BatchNorms it passes (L1 where a group has no BatchNorm).
    fn scores(&mut self, graph: &Graph, group: &ChannelGroup, ranking: ChannelRanking) -> Vec<f64> {
        let class: HashMap<usize, usize> = group
            .classes
            .iter()
            .enumerate()
            .map(|(k, &r)| (r, k))
            .collect();
        let mut by_norm = vec![0.0; group.classes.len()];
        let mut by_gamma = vec![0.0; group.classes.len()];
        let mut saw_gamma = false;
        for s in 0..self.slots.parent.len() {
            let root = self.slots.find(s);
            let Some(&k) = class.get(&root) else {
                continue;
            };
            if let Some(g) = self.gamma.get(&s) {
                by_gamma[k] += g;
                saw_gamma = true;
            }
            let Some((node, channel)) = self.slots.producer[s] else {
                continue;
            };
            let n = &graph.nodes[node];
            let Some(w) = graph.constant(&n.inputs[1]) else {
                continue;
            };
            let axis = match n.op {
                Op::Gemm { trans_b: false, .. } | Op::MatMul => 1,
                _ => 0,
            };
            let row = lane(w, axis, channel);
            by_norm[k] += match ranking {
                ChannelRanking::L2 => row
                    .iter()
                    .map(|v| f64::from(*v).powi(2))
                    .sum::<f64>()
                    .sqrt(),
                _ => row.iter().map(|v| f64::from(v.abs())).sum(),
            };
        }
        if ranking == ChannelRanking::BatchNormGamma && saw_gamma {
            by_gamma
        } else {
            by_norm
        }
    }
}

/// The values of `c` at index `at` along `axis`.
fn lane(c: &Constant, axis: usize, at: usize) -> Vec<f32> {
    let outer: usize = c.dims[..axis].iter().product();
    let extent = c.dims[axis];
    let inner: usize = c.dims[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        let start = (o * extent + at) * inner;
        out.extend_from_slice(&c.data[start..start + inner]);
    }
    out
}

/// The channel groups of `graph`, prunable ones and fixed ones.
pub fn channel_groups(graph: &Graph) -> Result<Vec<ChannelGroup>> {
    let mut a = analyse(graph)?;
    Ok(a.groups(graph))
}

impl Analysis {
    /// Per channel of value `name` (by position along axis 1), whether it stays when the
    /// classes `removed` go: the one selection pruning, masking and [`kept_channels`] apply.
    fn stays(&mut self, name: &str, removed: &std::collections::HashSet<usize>) -> Vec<bool> {
        let layout = self.layouts.get(name).cloned().unwrap_or_default();
        layout
            .iter()
            .map(|&s| !removed.contains(&self.slots.find(s)))
            .collect()
    }
}

/// Channels removed from each prunable group: the weakest `ratio` of them (at least one
/// channel stays).
fn removed_classes(
    a: &mut Analysis,
    graph: &Graph,
    cfg: &ChannelPruning,
) -> Result<std::collections::HashSet<usize>> {
    check_fraction("channel ratio", cfg.ratio)?;
    let mut removed = std::collections::HashSet::new();
    for group in a.groups(graph) {
        if group.fixed.is_some() || group.channels < 2 {
            continue;
        }
        let scores = a.scores(graph, &group, cfg.ranking);
        let keep = ((1.0 - f64::from(cfg.ratio)) * group.channels as f64)
            .round()
            .max(1.0) as usize;
        let mut order: Vec<usize> = (0..group.channels).collect();
        // Strongest first; ties keep the lower channel.
        order.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]).then(x.cmp(&y)));
        removed.extend(
            order[keep.min(group.channels)..]
                .iter()
                .map(|&k| group.classes[k]),
        );
    }
    Ok(removed)
}

/// Removes the weakest channels of every prunable group: a smaller graph that computes what
/// [`mask_channels`] computes.
pub fn prune_channels(graph: &Graph, cfg: &ChannelPruning) -> Result<Graph> {
    rewrite(graph, cfg, false)
}

/// For each value that [`prune_channels`] narrows (by name in `graph`), the positions along
/// its axis 1 that stay, ascending: where the pruned graph's value came from in the
/// original's, e.g. to compare the two channel by channel.
pub fn kept_channels(graph: &Graph, cfg: &ChannelPruning) -> Result<HashMap<String, Vec<usize>>> {
    let mut a = analyse(graph)?;
    let removed = removed_classes(&mut a, graph, cfg)?;
    let mut kept = HashMap::new();
    if removed.is_empty() {
        return Ok(kept);
    }
    let names: Vec<String> = a.layouts.keys().cloned().collect();
    for name in names {
        let stays = a.stays(&name, &removed);
        if stays.contains(&false) {
            let positions = (0..stays.len()).filter(|&i| stays[i]).collect();
            kept.insert(name, positions);
        }
    }
    Ok(kept)
}

/// The same selection as [`prune_channels`], with the removed channels zeroed in place (the
/// producers' filters and biases, BatchNorm γ and β, per-channel constants and the consumers'
/// columns), so they contribute nothing: the reference the pruned graph must match.
pub fn mask_channels(graph: &Graph, cfg: &ChannelPruning) -> Result<Graph> {
    rewrite(graph, cfg, true)
}

fn rewrite(graph: &Graph, cfg: &ChannelPruning, mask: bool) -> Result<Graph> {
    let mut a = analyse(graph)?;
    let removed = removed_classes(&mut a, graph, cfg)?;
    let mut out = graph.clone();
    if removed.is_empty() {
        return Ok(out);
    }
    let roles = a.roles.clone();
    let mut keep_of = |name: &str| a.stays(name, &removed);
    // A constant read by two nodes is copied before the second node changes it.
    let mut claimed: HashMap<String, usize> = HashMap::new();
    for (i, k, role) in roles {
        let node = &graph.nodes[i];
        let keep = match role {
            Role::Rows { .. } => keep_of(&node.outputs[0]),
            Role::Columns { .. } => keep_of(&node.inputs[0]),
        };
        if keep.iter().all(|&k| k) {
            continue;
        }
        let name = node.inputs[k].clone();
        let target = match claimed.get(&name) {
            Some(&owner) if owner != i => {
                let copy = format!("{name}.{}", node.name);
                let original = out
                    .constants
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| EngineError::Onnx(format!("no constant `{name}`")))?;
                out.constants.insert(copy.clone(), original);
                out.nodes[i].inputs[k] = copy.clone();
                copy
            }
            _ => {
                claimed.insert(name.clone(), i);
                name
            }
        };
        let c = out
            .constants
            .get_mut(&target)
            .ok_or_else(|| EngineError::Onnx(format!("no constant `{target}`")))?;
        let (axis, zero) = match role {
            Role::Rows {
                axis,
                zero_when_masked,
            } => (axis, zero_when_masked),
            Role::Columns { axis } => (axis, true),
        };
        if !mask {
            *c = gather_lanes(c, axis, &keep)?;
        } else if zero {
            zero_lanes(c, axis, &keep)?;
        }
    }
    if !mask {
        for (i, node) in graph.nodes.iter().enumerate() {
            let keep = keep_of(&node.outputs[0]);
            let kept = keep.iter().filter(|&&k| k).count();
            match &mut out.nodes[i].op {
                // Only depthwise convolutions reach here with group > 1 and changed channels.
                Op::Conv(conv) if conv.group > 1 && conv.group == keep.len() => conv.group = kept,
                Op::Reshape { shape } if shape.len() >= 2 && shape[1] > 0 => shape[1] = kept as i64,
                _ => {}
            }
        }
    }
    out.shapes(&out.input()?.dims.clone())?;
    Ok(out)
}

fn check_extent(c: &Constant, axis: usize, keep: &[bool]) -> Result<()> {
    if c.dims.get(axis) != Some(&keep.len()) {
        return Err(EngineError::Onnx(format!(
            "a constant of shape {:?} does not have {} channels on axis {axis}",
            c.dims,
            keep.len()
        )));
    }
    Ok(())
}

fn gather_lanes(c: &Constant, axis: usize, keep: &[bool]) -> Result<Constant> {
    check_extent(c, axis, keep)?;
    let outer: usize = c.dims[..axis].iter().product();
    let inner: usize = c.dims[axis + 1..].iter().product();
    let mut data = Vec::new();
    for o in 0..outer {
        for (at, _) in keep.iter().enumerate().filter(|(_, k)| **k) {
            let start = (o * keep.len() + at) * inner;
            data.extend_from_slice(&c.data[start..start + inner]);
        }
    }
    let mut dims = c.dims.clone();
    dims[axis] = keep.iter().filter(|&&k| k).count();
    Ok(Constant { dims, data })
}

fn zero_lanes(c: &mut Constant, axis: usize, keep: &[bool]) -> Result<()> {
    check_extent(c, axis, keep)?;
    let outer: usize = c.dims[..axis].iter().product();
    let inner: usize = c.dims[axis + 1..].iter().product();
    for o in 0..outer {
        for (at, _) in keep.iter().enumerate().filter(|(_, k)| !**k) {
            let start = (o * keep.len() + at) * inner;
            c.data[start..start + inner].fill(0.0);
        }
    }
    Ok(())
}
