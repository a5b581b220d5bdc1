//! The graph engine's model: tensors and typed nodes, as imported from ONNX (or built by our
//! own model builders), with shape inference shared by the importer, `inspect` and every
//! executor. Names are kept for display only: nothing outside the model builders relies on
//! a particular tensor name.

mod compress;
mod depgraph;
mod export;
mod fold;
mod head;
mod import;
mod proto;
mod shape;

use std::collections::{BTreeMap, HashMap, HashSet};

pub(crate) use compress::{Calibration, batch_one_shapes, compress_graph_with};
pub use compress::{CompressedGraph, GraphLayer, GraphStats, compress_graph, weight_nodes};
pub use depgraph::{ChannelGroup, channel_groups, kept_channels, mask_channels, prune_channels};
pub use export::export_onnx;
pub use fold::{batch_norm_affine, fold_batch_norms};
pub use head::ClassifierHead;
pub use import::{MAX_MODEL_BYTES, import_onnx, transpose};
pub use shape::{
    Dim, Shapes, concrete as concrete_dims, element_count, known as known_dims, node_macs,
};

pub use compresslab_spec::labels::parse_class_names;

pub use crate::compress::ActivationParams;
use crate::error::{EngineError, Result};

/// Metadata keys exporters put class names under (compared in lower case).
pub(crate) const CLASS_NAME_KEYS: [&str; 5] =
    ["labels", "classes", "class_names", "names", "id2label"];

/// A weight or other constant, stored as f32 (ONNX's integer constants are folded away at
/// import, where they only ever describe shapes).
#[derive(Debug, Clone, PartialEq)]
pub struct Constant {
    pub dims: Vec<usize>,
    pub data: Vec<f32>,
}

/// A graph input or output: its name and its declared dimensions (`?` dims are symbolic).
#[derive(Debug, Clone, PartialEq)]
pub struct ValueInfo {
    pub name: String,
    pub dims: Vec<Dim>,
}

/// How a convolution or pooling window is padded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Padding {
    /// `[top, left, bottom, right]`.
    Explicit([usize; 4]),
    /// TF-style "SAME": the output is `ceil(in / stride)`; the odd pixel goes at the end
    /// (`upper`) or at the start.
    Same { upper: bool },
}

impl Padding {
    /// Padding before the first row and the first column of an `h`×`w` input.
    pub fn leading(
        &self,
        [h, w]: [usize; 2],
        kernel: [usize; 2],
        strides: [usize; 2],
        dilations: [usize; 2],
    ) -> [usize; 2] {
        [
            self.resolve(0, h, kernel[0], strides[0], dilations[0]).0,
            self.resolve(1, w, kernel[1], strides[1], dilations[1]).0,
        ]
    }

    /// `(before, after)` padding of one spatial axis of size `size`.
    pub fn resolve(
        &self,
        axis: usize,
        size: usize,
        kernel: usize,
        stride: usize,
        dilation: usize,
    ) -> (usize, usize) {
        match *self {
            Padding::Explicit(p) => (p[axis], p[axis + 2]),
            Padding::Same { upper } => {
                let out = size.div_ceil(stride.max(1));
                let span = kernel.saturating_sub(1).saturating_mul(dilation) + 1;
                let total = (out.saturating_sub(1))
                    .saturating_mul(stride)
                    .saturating_add(span)
                    .saturating_sub(size);
                let small = total / 2;
                if upper {
                    (small, total - small)
                } else {
                    (total - small, small)
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Conv {
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    pub padding: Padding,
    pub group: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    pub padding: Padding,
    pub ceil_mode: bool,
    /// AveragePool: whether padded positions count in the mean.
    pub count_include_pad: bool,
}

/// The operations the engine runs, with their attributes resolved at import.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Inputs: x, weight `[cout, cin/group, kh, kw]`, optional bias `[cout]`.
    Conv(Conv),
    /// Inputs: x, scale, bias, mean, variance (inference form).
    BatchNorm {
        epsilon: f32,
    },
    Relu,
    Clip {
        min: f32,
        max: f32,
    },
    LeakyRelu {
        alpha: f32,
    },
    Sigmoid,
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    /// `x · relu6(x + 3) / 6`: the ONNX op, or the Add→Clip→Mul→Div pattern fused at import.
    HardSwish,
    Add,
    Sub,
    Mul,
    Div,
    /// n-ary Add.
    Sum,
    Concat {
        axis: usize,
    },
    GlobalAveragePool,
    AveragePool(Pool),
    MaxPool(Pool),
    Flatten {
        axis: usize,
    },
    /// ONNX semantics: 0 copies the input's dimension, −1 takes what is left.
    Reshape {
        shape: Vec<i64>,
    },
    Transpose {
        perm: Vec<usize>,
    },
    /// Inputs: A, B, optional C. `Y = alpha·A'·B' + beta·C`.
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    MatMul,
    /// `legacy`: opset < 13, where the input is seen as 2-D `[.. axis) × [axis ..]`.
    Softmax {
        axis: usize,
        legacy: bool,
    },
    /// Identity and Dropout (inference).
    Identity,
    /// Static activation quantization as it runs in float: QuantizeLinear then
    /// DequantizeLinear, `(clamp(round(x/s) + zp, qmin, qmax) − zp)·s`.
    QuantizeDequantize(ActivationParams),
}

impl Op {
    /// An activation function (what a convolution can apply as it writes its output).
    pub fn is_activation(&self) -> bool {
        matches!(
            self,
            Op::Relu
                | Op::Clip { .. }
                | Op::LeakyRelu { .. }
                | Op::Sigmoid
                | Op::HardSigmoid { .. }
                | Op::HardSwish
        )
    }

    /// An elementwise function of one input (the shape passes through).
    pub fn is_unary(&self) -> bool {
        self.is_activation() || matches!(self, Op::Identity | Op::QuantizeDequantize(_))
    }

    /// The ONNX operator this node runs as.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Conv(_) => "Conv",
            Op::BatchNorm { .. } => "BatchNormalization",
            Op::Relu => "Relu",
            Op::Clip { .. } => "Clip",
            Op::LeakyRelu { .. } => "LeakyRelu",
            Op::Sigmoid => "Sigmoid",
            Op::HardSigmoid { .. } => "HardSigmoid",
            Op::HardSwish => "HardSwish",
            Op::Add => "Add",
            Op::Sub => "Sub",
            Op::Mul => "Mul",
            Op::Div => "Div",
            Op::Sum => "Sum",
            Op::Concat { .. } => "Concat",
            Op::GlobalAveragePool => "GlobalAveragePool",
            Op::AveragePool(_) => "AveragePool",
            Op::MaxPool(_) => "MaxPool",
            Op::Flatten { .. } => "Flatten",
            Op::Reshape { .. } => "Reshape",
            Op::Transpose { .. } => "Transpose",
            Op::Gemm { .. } => "Gemm",
            Op::MatMul => "MatMul",
            Op::Softmax { .. } => "Softmax",
            Op::Identity => "Identity",
            Op::QuantizeDequantize(_) => "QuantizeLinear+DequantizeLinear",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub op: Op,
    /// Value names: activations or constants, in the operator's input order.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// A whole model: nodes in execution order, the constants they read, inputs and outputs.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub name: String,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    pub nodes: Vec<Node>,
    pub constants: BTreeMap<String, Constant>,
    /// The default-domain opset the file declared (0 for graphs we build ourselves).
    pub opset: i64,
    pub producer: String,
    /// `metadata_props` of the file (class names live here when an exporter wrote them).
    pub metadata: Vec<(String, String)>,
}

/// What `inspect` prints: the graph's size and what it computes.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub nodes: usize,
    /// Operator → count, sorted by name.
    pub ops: Vec<(String, usize)>,
    pub parameters: usize,
    /// Multiply-accumulates of one input of the given shape (None when a dim is unknown).
    pub macs: Option<u64>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
}

impl Graph {
    pub fn constant(&self, name: &str) -> Option<&Constant> {
        self.constants.get(name)
    }

    /// The same graph with every constant's data dropped (its dims kept): what an executor
    /// that holds the weights elsewhere needs for shapes and the node order.
    pub fn without_weights(&self) -> Graph {
        Graph {
            name: self.name.clone(),
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
            nodes: self.nodes.clone(),
            constants: self
                .constants
                .iter()
                .map(|(name, c)| {
                    let dims = c.dims.clone();
                    (
                        name.clone(),
                        Constant {
                            dims,
                            data: Vec::new(),
                        },
                    )
                })
                .collect(),
            opset: self.opset,
            producer: self.producer.clone(),
            metadata: self.metadata.clone(),
        }
    }

    /// The single image input of a CNN (the executors take one input).
    pub fn input(&self) -> Result<&ValueInfo> {
        match self.inputs.as_slice() {
            [one] => Ok(one),
            other => Err(EngineError::Onnx(format!(
                "the graph has {} inputs besides its weights; one image input is supported",
                other.len()
            ))),
        }
    }

    /// The graph taking batches of any size: the leading axis of its input and outputs
    /// symbolic (the built-in networks declare a batch of one, what the page classifies;
    /// training runs batches). Shape inference still decides whether a batch fits.
    pub fn with_any_batch(mut self) -> Self {
        for value in self.inputs.iter_mut().chain(self.outputs.iter_mut()) {
            if let Some(batch) = value.dims.first_mut() {
                *batch = Dim::Sym("batch".into());
            }
        }
        self
    }

    /// Shapes of every value for the given input dimensions (`Dim::Sym` where unknown).
    pub fn shapes(&self, input: &[Dim]) -> Result<Shapes> {
        shape::infer(self, input)
    }

    /// Every value some node reads or the graph outputs; drops nodes and constants that
    /// nothing needs (the shape arithmetic left behind by folding, unused weights).
    pub fn prune_unused(&mut self) {
        let mut needed: HashSet<String> = self.outputs.iter().map(|o| o.name.clone()).collect();
        let mut keep = vec![false; self.nodes.len()];
        for (i, node) in self.nodes.iter().enumerate().rev() {
            if node.outputs.iter().any(|o| needed.contains(o)) {
                keep[i] = true;
                needed.extend(node.inputs.iter().cloned());
            }
        }
        let mut i = 0;
        self.nodes.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        self.constants.retain(|name, _| needed.contains(name));
    }

    /// For each node, the computed values whose last reader it is (never a graph output):
    /// what an executor can free once the node has run.
    pub fn last_readers(&self) -> Vec<Vec<String>> {
        let outputs: HashSet<&str> = self.outputs.iter().map(|o| o.name.as_str()).collect();
        let mut last_use: HashMap<&str, usize> = HashMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            for input in &node.inputs {
                if self.constant(input).is_none() {
                    last_use.insert(input, i);
                }
            }
        }
        let mut frees = vec![Vec::new(); self.nodes.len()];
        for (name, i) in last_use {
            if !outputs.contains(name) {
                frees[i].push(name.to_string());
            }
        }
        frees
    }

    /// Which nodes read each value.
    pub fn consumers(&self) -> HashMap<&str, Vec<usize>> {
        let mut map: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            for input in &node.inputs {
                map.entry(input.as_str()).or_default().push(i);
            }
        }
        map
    }

    /// Class names an exporter left in the metadata (`labels`, `classes`, `class_names`,
    /// `names`, `id2label`): a JSON list, a JSON or Python dict from index to name, or one
    /// name per line / comma. Empty when there are none.
    pub fn class_names(&self) -> Vec<String> {
        self.metadata
            .iter()
            .filter(|(k, _)| CLASS_NAME_KEYS.contains(&k.to_ascii_lowercase().as_str()))
            .map(|(_, v)| parse_class_names(v))
            .find(|names| !names.is_empty())
            .unwrap_or_default()
    }

    pub fn summary(&self, input: &[Dim]) -> Result<Summary> {
        let mut ops: BTreeMap<String, usize> = BTreeMap::new();
        for node in &self.nodes {
            *ops.entry(node.op.name().to_string()).or_default() += 1;
        }
        let shapes = self.shapes(input)?;
        let macs = shape::macs(self, &shapes);
        let outputs = self
            .outputs
            .iter()
            .map(|o| ValueInfo {
                name: o.name.clone(),
                dims: shapes
                    .get(&o.name)
                    .cloned()
                    .unwrap_or_else(|| o.dims.clone()),
            })
            .collect();
        Ok(Summary {
            nodes: self.nodes.len(),
            ops: ops.into_iter().collect(),
            parameters: self.constants.values().map(|c| c.data.len()).sum(),
            macs,
            inputs: self.inputs.clone(),
            outputs,
        })
    }
}
