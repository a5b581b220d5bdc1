//! EfficientNet-Lite0 as a [`Graph`]: the model builder that turns the photo model's weights
//! (or a compressed variant of them) into the graph every executor runs and the ONNX export
//! writes. This module and `efficientnet.rs` are the only places that know its tensor names.

use std::collections::BTreeMap;

use crate::compress::{ActivationParams, CompressedModel};
use crate::efficientnet::{INPUT_SIZE, block_strides, folded_conv};
use crate::error::Result;
use crate::graph::{Constant, Conv, Dim, Graph, Node, Op, Padding, ValueInfo};
use crate::quant::QuantizedTensor;
use crate::weights::TensorStore;

/// The graph's input and output names.
pub const INPUT: &str = "input";
pub const OUTPUT: &str = "logits";

/// The float network (BatchNorm folded into the convolutions), `input` `[1, 3, 224, 224]` →
/// `logits` `[1, classes]`.
pub fn build(store: &TensorStore) -> Result<Graph> {
    Builder::new(store, &BTreeMap::new()).network()
}

/// A compressed variant as a graph and its integer weights (by constant name): the
/// dequantized weights, and a `QuantizeDequantize` node before each layer whose input the
/// recipe quantizes. Executors given both run the quantized layers on their integer kernels.
pub fn build_compressed(
    model: &CompressedModel,
) -> Result<(Graph, BTreeMap<String, QuantizedTensor>)> {
    let activations: BTreeMap<String, ActivationParams> = model
        .layers
        .iter()
        .filter_map(|l| Some((l.name.clone(), l.activation?)))
        .collect();
    let graph = Builder::new(&model.store, &activations).network()?;
    let weights = model
        .layers
        .iter()
        .filter_map(|l| Some((weight_name(&l.name), l.weights.clone()?)))
        .collect();
    Ok((graph, weights))
}

fn weight_name(layer: &str) -> String {
    format!("{layer}.weight")
}

struct Builder<'a> {
    store: &'a TensorStore,
    /// The static input grid of each layer (by layer name) that has one.
    activations: &'a BTreeMap<String, ActivationParams>,
    graph: Graph,
}

impl<'a> Builder<'a> {
    fn new(store: &'a TensorStore, activations: &'a BTreeMap<String, ActivationParams>) -> Self {
        Self {
            store,
            activations,
            graph: Graph {
                name: "efficientnet_lite0".into(),
                producer: "compresslab".into(),
                ..Graph::default()
            },
        }
    }

    fn node(&mut self, name: &str, op: Op, inputs: Vec<String>) -> String {
        let out = format!("{name}.out");
        self.graph.nodes.push(Node {
            name: name.to_string(),
            op,
            inputs,
            outputs: vec![out.clone()],
        });
        out
    }

    /// The layer's input, through its activation quantizer when it has one.
    fn layer_input(&mut self, layer: &str, x: &str) -> String {
        match self.activations.get(layer) {
            Some(&p) => self.node(
                &format!("{layer}.input_quant"),
                Op::QuantizeDequantize(p),
                vec![x.to_string()],
            ),
            None => x.to_string(),
        }
    }

    fn constant(&mut self, name: String, dims: Vec<usize>, data: Vec<f32>) -> String {
        self.graph
            .constants
            .insert(name.clone(), Constant { dims, data });
        name
    }

    /// A folded convolution (+ ReLU6) with TF "SAME" padding (the odd pixel at the end) for
    /// a `size`×`size` input; returns its output.
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        x: &str,
        conv: &str,
        bn: &str,
        stride: usize,
        depthwise: bool,
        relu6: bool,
        size: usize,
    ) -> Result<String> {
        let (shape, weight, bias) = folded_conv(self.store, conv, bn)?;
        let (out_ch, k) = (shape[0], shape[2]);
        let input = self.layer_input(conv, x);
        let w = self.constant(weight_name(conv), shape, weight);
        let b = self.constant(format!("{conv}.bias"), vec![out_ch], bias);
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
        let y = self.node(conv, op, vec![input, w, b]);
        Ok(if relu6 {
            let clip = Op::Clip { min: 0.0, max: 6.0 };
            self.node(&format!("{conv}.relu6"), clip, vec![y])
        } else {
            y
        })
    }

    fn network(mut self) -> Result<Graph> {
        let store = self.store;
        let mut size = INPUT_SIZE;
        let mut x = self.conv(INPUT, "_conv_stem", "_bn0", 2, false, true, size)?;
        size = size.div_ceil(2);
        for (i, &stride) in block_strides().iter().enumerate() {
            let p = format!("_blocks.{i}.");
            let expand = format!("{p}_expand_conv");
            let block_input = x.clone();
            let mut h = x.clone();
            let expanded = store.contains(&weight_name(&expand));
            if expanded {
                h = self.conv(&h, &expand, &format!("{p}_bn0"), 1, false, true, size)?;
            }
            let dw = format!("{p}_depthwise_conv");
            let channels = store.get(&weight_name(&dw))?.shape[0];
            h = self.conv(&h, &dw, &format!("{p}_bn1"), stride, true, true, size)?;
            size = size.div_ceil(stride);
            let project = format!("{p}_project_conv");
            h = self.conv(&h, &project, &format!("{p}_bn2"), 1, false, false, size)?;
            let in_ch = if expanded {
                store.get(&weight_name(&expand))?.shape[1]
            } else {
                channels
            };
            let out_ch = store.get(&weight_name(&project))?.shape[0];
            x = if stride == 1 && in_ch == out_ch {
                self.node(&format!("{p}add"), Op::Add, vec![h, block_input])
            } else {
                h
            };
        }
        x = self.conv(&x, "_conv_head", "_bn1", 1, false, true, size)?;
        let pooled = self.node("pool", Op::GlobalAveragePool, vec![x]);
        let flat = self.node("flatten", Op::Flatten { axis: 1 }, vec![pooled]);
        let fc_w = store.get("_fc.weight")?;
        let fc_b = store.get("_fc.bias")?;
        let classes = fc_w.shape.first().copied().unwrap_or(0);
        let input = self.layer_input("_fc", &flat);
        let w = self.constant(weight_name("_fc"), fc_w.shape.clone(), fc_w.data.clone());
        let b = self.constant("_fc.bias".into(), fc_b.shape.clone(), fc_b.data.clone());
        // Gemm with transB: PyTorch's [out, in] weight as it is.
        self.graph.nodes.push(Node {
            name: "classifier".into(),
            op: Op::Gemm {
                alpha: 1.0,
                beta: 1.0,
                trans_a: false,
                trans_b: true,
            },
            inputs: vec![input, w, b],
            outputs: vec![OUTPUT.into()],
        });
        let known = |dims: &[usize]| dims.iter().map(|&d| Dim::Known(d)).collect();
        self.graph.inputs = vec![ValueInfo {
            name: INPUT.into(),
            dims: known(&[1, 3, INPUT_SIZE, INPUT_SIZE]),
        }];
        self.graph.outputs = vec![ValueInfo {
            name: OUTPUT.into(),
            dims: known(&[1, classes]),
        }];
        // The shapes must chain (a pruned store whose widths disagree is an error here, not
        // in an executor).
        self.graph.shapes(&self.graph.input()?.dims.clone())?;
        Ok(self.graph)
    }
}

/// The whole network as an ONNX model (opset of [`crate::graph::export_onnx`]): the float
/// weights, for other runtimes (ONNX Runtime in the benchmark) and for developers.
pub fn export_onnx(store: &TensorStore) -> Result<Vec<u8>> {
    crate::graph::export_onnx(&build(store)?, &BTreeMap::new(), &[])
}
