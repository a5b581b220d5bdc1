//! Graph rewrites that keep what a graph computes: BatchNorm folded into the convolution
//! before it (inference form), so the executors run one node where the file had two.

use super::{Constant, Graph, Op};

/// Inference BatchNorm as `y = x·scale + shift` per channel: `scale = γ/√(σ² + ε)`,
/// `shift = β − μ·scale`.
pub fn batch_norm_affine(
    gamma: &Constant,
    beta: &Constant,
    mean: &Constant,
    var: &Constant,
    epsilon: f32,
) -> (Vec<f32>, Vec<f32>) {
    let scale: Vec<f32> = gamma
        .data
        .iter()
        .zip(&var.data)
        .map(|(g, v)| g / (v + epsilon).sqrt())
        .collect();
    let shift = beta
        .data
        .iter()
        .zip(&mean.data)
        .zip(&scale)
        .map(|((b, m), s)| b - m * s)
        .collect();
    (scale, shift)
}

/// Folds every BatchNormalization whose input is a Conv read by nothing else into that
/// Conv's weights and bias: `w' = w · γ/√(σ² + ε)`, `b' = (b − μ) · γ/√(σ² + ε) + β`.
/// Returns how many were folded. Constants shared with other nodes are copied, not changed.
pub fn fold_batch_norms(graph: &mut Graph) -> usize {
    let consumers: std::collections::HashMap<String, usize> = graph
        .consumers()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.len()))
        .collect();
    let outputs: Vec<String> = graph.outputs.iter().map(|o| o.name.clone()).collect();
    let producer: std::collections::HashMap<String, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o.clone(), i)))
        .collect();
    let mut folded = 0;
    let mut removed = vec![false; graph.nodes.len()];
    for bn_index in 0..graph.nodes.len() {
        let bn = &graph.nodes[bn_index];
        let Op::BatchNorm { epsilon } = bn.op else {
            continue;
        };
        let [x, gamma, beta, mean, var] = bn.inputs.as_slice() else {
            continue;
        };
        let Some(&conv_index) = producer.get(x) else {
            continue;
        };
        if consumers.get(x) != Some(&1) || outputs.contains(x) || removed[conv_index] {
            continue;
        }
        let conv = &graph.nodes[conv_index];
        let Op::Conv(_) = conv.op else { continue };
        let (Some(w), Some(g), Some(b), Some(m), Some(v)) = (
            conv.inputs.get(1).and_then(|n| graph.constant(n)),
            graph.constant(gamma),
            graph.constant(beta),
            graph.constant(mean),
            graph.constant(var),
        ) else {
            continue;
        };
        let cout = w.dims.first().copied().unwrap_or(0);
        if cout == 0
            || [g, b, m, v].iter().any(|p| p.data.len() != cout)
            || !w.data.len().is_multiple_of(cout)
        {
            continue;
        }
        let bias = match conv.inputs.get(2).and_then(|n| graph.constant(n)) {
            Some(c) if c.data.len() == cout => c.data.clone(),
            Some(_) => continue,
            None => vec![0.0; cout],
        };
        let (scale, shift) = batch_norm_affine(g, b, m, v, epsilon);
        let per_channel = w.data.len() / cout;
        let weight: Vec<f32> = w
            .data
            .iter()
            .enumerate()
            .map(|(i, &x)| x * scale[i / per_channel])
            .collect();
        let new_bias: Vec<f32> = (0..cout).map(|c| bias[c] * scale[c] + shift[c]).collect();
        let w_dims = w.dims.clone();
        // Fresh names: the originals may be read elsewhere (a shared weight).
        let base = bn.outputs[0].clone();
        let (w_name, b_name) = (
            format!("{base}::folded_weight"),
            format!("{base}::folded_bias"),
        );
        graph.constants.insert(
            w_name.clone(),
            Constant {
                dims: w_dims,
                data: weight,
            },
        );
        graph.constants.insert(
            b_name.clone(),
            Constant {
                dims: vec![cout],
                data: new_bias,
            },
        );
        let conv = &mut graph.nodes[conv_index];
        conv.inputs.truncate(1);
        conv.inputs.push(w_name);
        conv.inputs.push(b_name);
        conv.outputs = vec![base];
        removed[bn_index] = true;
        folded += 1;
    }
    let mut i = 0;
    graph.nodes.retain(|_| {
        i += 1;
        !removed[i - 1]
    });
    graph.prune_unused();
    folded
}
