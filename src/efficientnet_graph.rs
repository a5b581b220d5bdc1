//! EfficientNet-Lite0 as a [`Graph`]: the model builder that turns the photo model's weights
//! (or a compressed variant of them) into the graph every executor runs and the ONNX export
//! writes. This module and `efficientnet.rs` are the only places that know its tensor names.

use std::collections::BTreeMap;

use crate::efficientnet::{CLASSIFIER, INPUT_SIZE, block_skip, block_strides};
use crate::error::{EngineError, Result};
use crate::graph::{Conv, Graph, Op, Padding};
use crate::graph_builder::{Builder, bias_name, build_float, known, weight_name};
use crate::weights::TensorStore;

/// The graph's input and output names.
pub const INPUT: &str = "input";
pub const OUTPUT: &str = "logits";

/// The graph's name. [`crate::graph_builder::network_graph`] builds the float network
/// (BatchNorm folded), `input` `[1, 3, 224, 224]` → `logits` `[1, classes]`, and
/// [`crate::graph_builder::compressed_network_graph`] a compressed variant.
pub(crate) const NAME: &str = "efficientnet_lite0";

/// A convolution with its BatchNorm (folded, or a node of its own when building unfolded) and
/// an optional ReLU6, with TF "SAME" padding (the odd pixel at the end) for a `size`×`size`
/// input; returns its output.
#[allow(clippy::too_many_arguments)]
fn conv(
    b: &mut Builder,
    x: &str,
    conv: &str,
    bn: &str,
    stride: usize,
    depthwise: bool,
    relu6: bool,
    size: usize,
) -> Result<String> {
    let shape = &b.store.get(&weight_name(conv))?.shape;
    let (out_ch, k) = match shape[..] {
        [out_ch, _, k, _] => (out_ch, k),
        _ => {
            return Err(EngineError::ShapeMismatch {
                name: weight_name(conv),
                found: shape.clone(),
                expected: vec![0, 0, 0, 0],
            });
        }
    };
    let out = size.div_ceil(stride);
    let total = ((out - 1) * stride + k).saturating_sub(size);
    let (before, after) = (total / 2, total - total / 2);
    let op = Op::Conv(Conv {
        kernel: [k, k],
        strides: [stride, stride],
        dilations: [1, 1],
        padding: Padding::Explicit([before, before, after, after]),
        group: if depthwise { out_ch } else { 1 },
    });
    let y = b.batch_normed_conv(conv, bn, op, x)?;
    Ok(if relu6 {
        let clip = Op::Clip { min: 0.0, max: 6.0 };
        b.node(&format!("{conv}.relu6"), clip, vec![y], None)
    } else {
        y
    })
}

/// Writes the network node by node (folded or unfolded, as `b` is set up).
pub(crate) fn network(mut b: Builder) -> Result<Graph> {
    let store = b.store;
    let mut size = INPUT_SIZE;
    let mut x = conv(&mut b, INPUT, "_conv_stem", "_bn0", 2, false, true, size)?;
    size = size.div_ceil(2);
    for (i, &stride) in block_strides().iter().enumerate() {
        let p = format!("_blocks.{i}.");
        let expand = format!("{p}_expand_conv");
        let block_input = x.clone();
        let mut h = x.clone();
        let expanded = store.contains(&weight_name(&expand));
        if expanded {
            h = conv(
                &mut b,
                &h,
                &expand,
                &format!("{p}_bn0"),
                1,
                false,
                true,
                size,
            )?;
        }
        let dw = format!("{p}_depthwise_conv");
        h = conv(
            &mut b,
            &h,
            &dw,
            &format!("{p}_bn1"),
            stride,
            true,
            true,
            size,
        )?;
        size = size.div_ceil(stride);
        let project = format!("{p}_project_conv");
        h = conv(
            &mut b,
            &h,
            &project,
            &format!("{p}_bn2"),
            1,
            false,
            false,
            size,
        )?;
        // conv() checked that these weights are 4-D.
        let in_ch = if expanded {
            store.get(&weight_name(&expand))?.shape[1]
        } else {
            store.get(&weight_name(&dw))?.shape[0]
        };
        let out_ch = store.get(&weight_name(&project))?.shape[0];
        x = if block_skip(i, in_ch, out_ch)? {
            b.node(&format!("{p}add"), Op::Add, vec![h, block_input], None)
        } else {
            h
        };
    }
    x = conv(&mut b, &x, "_conv_head", "_bn1", 1, false, true, size)?;
    let pooled = b.node("pool", Op::GlobalAveragePool, vec![x], None);
    let flat = b.node("flatten", Op::Flatten { axis: 1 }, vec![pooled], None);
    let fc_w = store.get(&weight_name(CLASSIFIER))?;
    let fc_b = store.get(&bias_name(CLASSIFIER))?;
    let classes = fc_w.shape.first().copied().unwrap_or(0);
    b.layer(
        CLASSIFIER,
        gemm_trans_b(),
        &flat,
        (fc_w.shape.clone(), fc_w.data.clone()),
        fc_b.data.clone(),
        Some(OUTPUT),
    );
    b.finish(
        (INPUT, known(&[1, 3, INPUT_SIZE, INPUT_SIZE])),
        (OUTPUT, known(&[1, classes])),
    )
}

/// A fully connected layer with PyTorch's `[out, in]` weight as it is.
pub(crate) fn gemm_trans_b() -> Op {
    Op::Gemm {
        alpha: 1.0,
        beta: 1.0,
        trans_a: false,
        trans_b: true,
    }
}

/// The whole network as an ONNX model (opset of [`crate::graph::export_onnx`]): the float
/// weights, for other runtimes (ONNX Runtime in the benchmark) and for developers.
pub fn export_onnx(store: &TensorStore) -> Result<Vec<u8>> {
    crate::graph::export_onnx(&build_float(NAME, store, network)?, &BTreeMap::new(), &[])
}
