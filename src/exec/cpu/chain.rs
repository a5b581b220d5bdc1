//! Chains of int8 layers that pass quantized values along: an int8 1×1 expansion → an int8
//! depthwise convolution → an int8 1×1 projection (one end may be missing), joined only by
//! the activations and activation quantizers fused into them. The chain runs at its first
//! node's turn: the expansion writes its outputs quantized straight into the depthwise
//! layer's bordered input, and the depthwise layer into the projection's packed input, so
//! the wide tensors between them never exist as floats (on a 2-core machine these layers
//! are bound by memory more than by arithmetic).

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use super::conv::{ConvKernel, Weights};
use super::{Kernel, Value, checked_len, exec_err};
use crate::error::Result;
use crate::graph::Graph;
use crate::int8_cpu::{FusedEpilogue, Int8Pointwise};

/// What the run loop does at a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    /// Runs its own kernel.
    Run,
    /// Part of a chain that ran at an earlier node.
    Skip,
    /// Runs the chain through the depthwise node `depthwise` (and the projection node
    /// `project`) from here; its output is that last node's.
    Chain {
        depthwise: usize,
        project: Option<usize>,
    },
}

fn int8_pointwise(k: &ConvKernel) -> Option<&Int8Pointwise> {
    match &k.weights {
        Weights::Int8(kernel) if k.is_plain_pointwise() => Some(kernel),
        _ => None,
    }
}

/// Whether the layer's fused epilogue is at most ReLU6 (what a chain's inner writes apply).
fn relu6_at_most(k: &ConvKernel) -> bool {
    k.epilogue.residual.is_none() && k.epilogue.as_int8(None).is_some_and(|e| e.grid.is_none())
}

/// The chains of a graph whose quantized layers are on their kernels (after the epilogues
/// are fused): one [`Plan`] per node.
pub(super) fn plan_chains(
    graph: &Graph,
    kernels: &[Kernel],
    producers: &HashMap<&str, usize>,
    consumers: &HashMap<&str, Vec<usize>>,
    outputs: &HashSet<&str>,
) -> Vec<Plan> {
    let mut plan = vec![Plan::Run; graph.nodes.len()];
    let conv = |i: usize| match &kernels[i] {
        Kernel::Conv(k) => Some(&**k),
        _ => None,
    };
    // A value read by `reader` alone, and not a graph output.
    let only_for = |value: &str, reader: usize| {
        !outputs.contains(value) && consumers.get(value).map(Vec::as_slice) == Some(&[reader][..])
    };
    let passes = |i: usize, value: &str| {
        matches!(kernels[i], Kernel::PassOn(0)) && graph.nodes[i].inputs[0] == value
    };
    let input = graph.input().ok().map(|i| i.name.as_str());
    for depthwise in 0..graph.nodes.len() {
        let Some(dk) = conv(depthwise) else {
            continue;
        };
        if !matches!(dk.weights, Weights::Int8Depthwise(_)) || !relu6_at_most(dk) {
            continue;
        }
        // Back from the depthwise input, through the nodes fused into the expansion.
        let mut inner = Vec::new();
        let (mut reader, mut value) = (depthwise, graph.nodes[depthwise].inputs[0].as_str());
        let expand = loop {
            let Some(&p) = producers.get(value).filter(|_| only_for(value, reader)) else {
                break None;
            };
            let node = &graph.nodes[p];
            if matches!(kernels[p], Kernel::PassOn(0)) {
                inner.push(p);
                (reader, value) = (p, node.inputs[0].as_str());
                continue;
            }
            // A 1×1 layer that already ends an earlier chain (dw → 1×1 → dw → 1×1, as in
            // MobileNet v1) stays there: its float input never exists.
            break conv(p)
                .filter(|k| int8_pointwise(k).is_some() && relu6_at_most(k))
                .filter(|_| plan[p] == Plan::Run)
                .map(|_| p);
        };
        if expand.is_none() {
            inner.clear();
        }
        let first = expand.unwrap_or(depthwise);
        let chain_input = graph.nodes[first].inputs[0].as_str();
        if graph.constant(chain_input).is_some() {
            continue;
        }
        // On from the depthwise output to a projection reading it.
        let mut after = Vec::new();
        let mut value = graph.nodes[depthwise].outputs[0].as_str();
        let project = loop {
            let Some(&[j]) = consumers.get(value).map(Vec::as_slice) else {
                break None;
            };
            if outputs.contains(value) {
                break None;
            }
            if passes(j, value) {
                after.push(j);
                value = graph.nodes[j].outputs[0].as_str();
                continue;
            }
            let fits = conv(j).is_some_and(|k| {
                let residual_ready = k.epilogue.residual.as_deref().is_none_or(|r| {
                    input == Some(r) || producers.get(r).is_some_and(|&p| p < first)
                });
                graph.nodes[j].inputs[0] == value
                    && int8_pointwise(k).is_some()
                    && k.epilogue.as_int8(None).is_some()
                    && residual_ready
            });
            break fits.then_some(j);
        };
        if project.is_none() {
            after.clear();
        }
        if expand.is_none() && project.is_none() {
            continue;
        }
        plan[first] = Plan::Chain { depthwise, project };
        let skipped = inner
            .into_iter()
            .chain(expand.map(|_| depthwise))
            .chain(after)
            .chain(project);
        for i in skipped {
            plan[i] = Plan::Skip;
        }
    }
    plan
}

/// Runs a chain planned at node `first`; `dims_of` gives a value's concrete dims.
pub(super) fn run_chain(
    graph: &Graph,
    kernels: &[Kernel],
    [first, depthwise]: [usize; 2],
    project: Option<usize>,
    values: &HashMap<&str, Rc<Value>>,
    dims_of: &dyn Fn(&str) -> Result<Vec<usize>>,
) -> Result<Value> {
    let conv = |i: usize| match &kernels[i] {
        Kernel::Conv(k) => Ok(&**k),
        _ => Err(exec_err(
            &graph.nodes[i],
            "planned into a chain but not a convolution",
        )),
    };
    let pointwise = |i: usize| {
        let k = conv(i)?;
        int8_pointwise(k)
            .map(|kernel| (k, kernel))
            .ok_or_else(|| exec_err(&graph.nodes[i], "planned into a chain but not int8 1×1"))
    };
    let (dw_node, dk) = (&graph.nodes[depthwise], conv(depthwise)?);
    let Weights::Int8Depthwise(dw) = &dk.weights else {
        return Err(exec_err(
            dw_node,
            "planned into a chain but not int8 depthwise",
        ));
    };
    let expand = (first != depthwise).then(|| pointwise(first)).transpose()?;
    let project = project.map(|c| pointwise(c).map(|p| (c, p))).transpose()?;
    let first_node = &graph.nodes[first];
    let x = values
        .get(first_node.inputs[0].as_str())
        .ok_or_else(|| exec_err(first_node, "its input is not computed"))?;
    let converted;
    let x = if x.nhwc || x.layout_free() {
        &**x
    } else {
        converted = (**x).clone().into_nhwc();
        &converted
    };
    let [n, channels, h, w] = match x.dims.as_slice() {
        &[n, c, h, w] => [n, c, h, w],
        dims => return Err(exec_err(first_node, format!("a {}-D input", dims.len()))),
    };
    let dw_out = dims_of(&dw_node.outputs[0])?;
    let [oh, ow] = match dw_out.as_slice() {
        &[_, _, oh, ow] => [oh, ow],
        _ => return Err(exec_err(dw_node, "output shape unknown")),
    };
    let geometry = dk.depthwise_geometry([h, w], [oh, ow]);
    let out_dims = match &project {
        Some((c, _)) => dims_of(&graph.nodes[*c].outputs[0])?,
        None => dw_out,
    };
    let last = &graph.nodes[project.map_or(depthwise, |(c, _)| c)];
    let out_len = checked_len(last, &out_dims)?;
    let image = checked_len(first_node, &[channels, h, w])?;
    let out_image = out_len / n.max(1);
    let residual = match project.and_then(|(_, (k, _))| k.epilogue.residual.as_deref()) {
        Some(name) => {
            let r = values
                .get(name)
                .ok_or_else(|| exec_err(last, format!("its residual `{name}` is not computed")))?;
            if r.dims != out_dims {
                return Err(exec_err(last, "adds a residual of another shape"));
            }
            Some(if r.nhwc || r.layout_free() {
                Rc::clone(r)
            } else {
                Rc::new((**r).clone().into_nhwc())
            })
        }
        None => None,
    };
    let relu6 = |k: &ConvKernel| k.epilogue.as_int8(None).is_some_and(|e| e.relu6);
    let mut dw_input = dw.input_for(&geometry)?;
    let mut out = Vec::with_capacity(out_len);
    for (b, xi) in x.data.chunks_exact(image.max(1)).take(n).enumerate() {
        match expand {
            Some((ek, k)) => k.forward_centred(xi, h * w, &ek.bias, relu6(ek), &mut dw_input),
            None => {
                for (p, values) in xi.chunks_exact(channels.max(1)).enumerate() {
                    dw_input.write(p, 0, values);
                }
            }
        }
        match &project {
            Some((c, (ck, k))) => {
                let mut next = k.input_for(oh * ow);
                dw.run_into_next(&dw_input, &geometry, &dk.bias, relu6(dk), &mut next)?;
                let span = b * out_image..(b + 1) * out_image;
                let residual = residual.as_ref().map(|r| &r.data[span.clone()]);
                let epilogue = ck
                    .epilogue
                    .as_int8(residual)
                    .ok_or_else(|| exec_err(&graph.nodes[*c], "epilogue not fusable"))?;
                if out.len() < out_len {
                    // The projection writes every value of each image's part.
                    if k.output_len(oh * ow) != Some(out_image) {
                        return Err(exec_err(last, "its output does not have its shape's size"));
                    }
                    out.resize(out_len, 0.0);
                }
                k.forward_input_into(&next, &ck.bias, epilogue, &mut out[span]);
            }
            None => {
                let epilogue = FusedEpilogue {
                    relu6: relu6(dk),
                    ..FusedEpilogue::default()
                };
                out.extend(dw.run(&dw_input, &geometry, &dk.bias, epilogue)?);
            }
        }
    }
    Ok(Value {
        dims: out_dims,
        data: out,
        nhwc: true,
    })
}
