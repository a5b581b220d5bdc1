//! The Fashion-MNIST CNN as a [`Graph`]: three 3×3 convolutions (BatchNorm folded, ReLU6,
//! 2×2 max pool), flatten, a hidden fully connected layer with ReLU6 and the classifier.
//! This module and `fashion.rs` are the only places that know its tensor names.

use crate::efficientnet_graph::gemm_trans_b;
use crate::error::{EngineError, Result};
use crate::fashion::{CLASSES, SIDE};
use crate::graph::{Conv, Dim, Graph, Op, Padding, Pool};
use crate::graph_builder::{Builder, weight_name};

/// The graph's input (`[batch, 1, 28, 28]`, normalised) and output (`[batch, 10]` logits).
pub const INPUT: &str = "images";
pub const OUTPUT: &str = "logits";

/// The graph's name (built through [`crate::graph_builder::network_graph`] and
/// [`crate::graph_builder::compressed_network_graph`]).
pub(crate) const NAME: &str = "fashion_mnist_cnn";

/// Writes the network node by node (folded or unfolded, as `b` is set up).
pub(crate) fn network(mut b: Builder) -> Result<Graph> {
    let store = b.store;
    let relu6 = || Op::Clip { min: 0.0, max: 6.0 };
    let mut x = INPUT.to_string();
    for i in 1..=3 {
        let layer = format!("conv{i}");
        let shape = &store.get(&weight_name(&layer))?.shape;
        if shape.len() != 4 || shape[2..] != [3, 3] {
            return Err(EngineError::ShapeMismatch {
                name: weight_name(&layer),
                found: shape.clone(),
                expected: vec![0, 0, 3, 3],
            });
        }
        let conv = Op::Conv(Conv {
            kernel: [3, 3],
            strides: [1, 1],
            dilations: [1, 1],
            padding: Padding::Explicit([1; 4]),
            group: 1,
        });
        let y = b.batch_normed_conv(&layer, &format!("bn{i}"), conv, &x)?;
        let y = b.node(&format!("{layer}.relu6"), relu6(), vec![y], None);
        let pool = Op::MaxPool(Pool {
            kernel: [2, 2],
            strides: [2, 2],
            dilations: [1, 1],
            padding: Padding::Explicit([0; 4]),
            ceil_mode: false,
            count_include_pad: false,
        });
        x = b.node(&format!("pool{i}"), pool, vec![y], None);
    }
    let flat = b.node("flatten", Op::Flatten { axis: 1 }, vec![x], None);
    let dense = |name: &str| -> Result<(Vec<usize>, Vec<f32>, Vec<f32>)> {
        let w = store.get(&format!("{name}.weight"))?;
        let bias = store.get(&format!("{name}.bias"))?;
        if w.shape.len() != 2 {
            return Err(EngineError::ShapeMismatch {
                name: w.name.clone(),
                found: w.shape.clone(),
                expected: vec![0, 0],
            });
        }
        Ok((w.shape.clone(), w.data.clone(), bias.data.clone()))
    };
    let (dims, weight, bias) = dense("fc1")?;
    let hidden = b.layer("fc1", gemm_trans_b(), &flat, (dims, weight), bias, None);
    let hidden = b.node("fc1.relu6", relu6(), vec![hidden], None);
    let (dims, weight, bias) = dense("fc2")?;
    if dims[0] != CLASSES {
        return Err(EngineError::Weights(format!(
            "the classifier has {} outputs, not {CLASSES}",
            dims[0]
        )));
    }
    b.layer(
        "fc2",
        gemm_trans_b(),
        &hidden,
        (dims, weight),
        bias,
        Some(OUTPUT),
    );
    let batch = || Dim::Sym("batch".into());
    b.finish(
        (
            INPUT,
            vec![batch(), Dim::Known(1), Dim::Known(SIDE), Dim::Known(SIDE)],
        ),
        (OUTPUT, vec![batch(), Dim::Known(CLASSES)]),
    )
}
