//! What the built-in networks' model builders (`efficientnet_graph.rs`, `fashion_graph.rs`)
//! share: a [`Graph`] written node by node from a [`TensorStore`], with a layer's constants
//! named as in the store (`{layer}.weight`, `{layer}.bias`) and, for a compressed variant, a
//! `QuantizeDequantize` node before each layer whose input the recipe quantizes. Unfolded,
//! the graph keeps each BatchNorm as a node whose constants are the store's own tensors, so a
//! rewrite of the graph's constants (channel pruning) maps back onto the store by name.

use std::collections::BTreeMap;

use crate::compress::{ActivationParams, CompressedModel};
use crate::efficientnet::{BATCH_NORM_EPS, folded_conv, weight_layers};
use crate::error::{EngineError, Result};
use crate::fashion::is_fashion;
use crate::graph::{Constant, Dim, Graph, Node, Op, ValueInfo};
use crate::quant::QuantizedTensor;
use crate::weights::TensorStore;
use crate::{efficientnet_graph, fashion_graph};

/// The graph `network` writes for the float weights of `store`.
pub(crate) fn build_float(
    name: &str,
    store: &TensorStore,
    network: fn(Builder) -> Result<Graph>,
) -> Result<Graph> {
    network(Builder::new(name, store, &BTreeMap::new()))
}

/// The graph `network` writes with every BatchNorm of `store` kept as a node: each constant is
/// a tensor of `store` under the same name.
pub(crate) fn build_unfolded(
    name: &str,
    store: &TensorStore,
    network: fn(Builder) -> Result<Graph>,
) -> Result<Graph> {
    let none = BTreeMap::new();
    let mut builder = Builder::new(name, store, &none);
    builder.unfold_batch_norms = true;
    network(builder)
}

/// The graph `network` writes for a compressed model (dequantized weights, a
/// `QuantizeDequantize` node before each layer whose input the recipe quantizes) and its
/// integer weights by constant name: executors given both run the quantized layers on their
/// integer kernels.
pub(crate) fn build_quantized(
    name: &str,
    model: &CompressedModel,
    network: fn(Builder) -> Result<Graph>,
) -> Result<(Graph, BTreeMap<String, QuantizedTensor>)> {
    let (activations, weights) = compressed_parts(model);
    let graph = network(Builder::new(name, &model.store, &activations))?;
    Ok((graph, weights))
}

/// The model builder of the built-in network `store` holds (EfficientNet-Lite0 or the
/// Fashion-MNIST CNN): its graph's name and the function that writes its nodes.
fn builder_of(store: &TensorStore) -> (&'static str, fn(Builder) -> Result<Graph>) {
    if is_fashion(store) {
        (fashion_graph::NAME, fashion_graph::network)
    } else {
        (efficientnet_graph::NAME, efficientnet_graph::network)
    }
}

/// The built-in network `store` holds as the graph the executors run.
pub fn network_graph(store: &TensorStore) -> Result<Graph> {
    let (name, network) = builder_of(store);
    build_float(name, store, network)
}

/// A compressed variant of a built-in network as a graph and its integer weights by constant
/// name: the dequantized weights, and a `QuantizeDequantize` node before each layer whose
/// input the recipe quantizes. Executors given both run the quantized layers on their integer
/// kernels.
pub fn compressed_network_graph(
    model: &CompressedModel,
) -> Result<(Graph, BTreeMap<String, QuantizedTensor>)> {
    let layers = weight_layers(&model.store).len();
    if model.layers.len() != layers {
        return Err(EngineError::Weights(format!(
            "{} layer entries for a {layers}-layer network",
            model.layers.len()
        )));
    }
    let (name, network) = builder_of(&model.store);
    build_quantized(name, model, network)
}

/// The built-in network `store` holds with its BatchNorms as nodes: every constant is a tensor
/// of `store` under the same name, for rewrites that map back onto the store.
pub fn unfolded_network_graph(store: &TensorStore) -> Result<Graph> {
    let (name, network) = builder_of(store);
    build_unfolded(name, store, network)
}

/// A layer's weight constant (the store's name for it).
pub(crate) fn weight_name(layer: &str) -> String {
    format!("{layer}.weight")
}

/// A layer's bias constant (the store's name for it, BatchNorm folded).
pub(crate) fn bias_name(layer: &str) -> String {
    format!("{layer}.bias")
}

/// The static input grid of each layer of a compressed model (by layer name), and its integer
/// weights (by weight constant name).
fn compressed_parts(
    model: &CompressedModel,
) -> (
    BTreeMap<String, ActivationParams>,
    BTreeMap<String, QuantizedTensor>,
) {
    let activations = model
        .layers
        .iter()
        .filter_map(|l| Some((l.name.clone(), l.activation?)))
        .collect();
    let weights = model
        .layers
        .iter()
        .filter_map(|l| Some((weight_name(&l.name), l.weights.clone()?)))
        .collect();
    (activations, weights)
}

/// The value each of `layers` reads as its input in `graph` (found from its weight constant).
pub fn layer_inputs(graph: &Graph, layers: &[String]) -> Result<Vec<String>> {
    layers
        .iter()
        .map(|layer| {
            let weight = weight_name(layer);
            graph
                .nodes
                .iter()
                .find(|n| n.inputs.get(1) == Some(&weight))
                .map(|n| n.inputs[0].clone())
                .ok_or_else(|| EngineError::Weights(format!("no layer reads {weight}")))
        })
        .collect()
}

pub(crate) struct Builder<'a> {
    pub(crate) store: &'a TensorStore,
    /// The static input grid of each layer (by layer name) that has one.
    activations: &'a BTreeMap<String, ActivationParams>,
    /// Write a convolution's BatchNorm as a node rather than folding it into the weights.
    unfold_batch_norms: bool,
    graph: Graph,
}

impl<'a> Builder<'a> {
    pub(crate) fn new(
        name: &str,
        store: &'a TensorStore,
        activations: &'a BTreeMap<String, ActivationParams>,
    ) -> Self {
        Self {
            store,
            activations,
            unfold_batch_norms: false,
            graph: Graph {
                name: name.into(),
                producer: "compresslab".into(),
                ..Graph::default()
            },
        }
    }

    /// Appends a node named `name` with one output, `{name}.out` (or `output` when given).
    pub(crate) fn node(
        &mut self,
        name: &str,
        op: Op,
        inputs: Vec<String>,
        output: Option<&str>,
    ) -> String {
        let out = output.map_or_else(|| format!("{name}.out"), str::to_string);
        self.graph.nodes.push(Node {
            name: name.to_string(),
            op,
            inputs,
            outputs: vec![out.clone()],
        });
        out
    }

    /// The layer's input, through its activation quantizer when it has one.
    pub(crate) fn layer_input(&mut self, layer: &str, x: &str) -> String {
        match self.activations.get(layer) {
            Some(&p) => self.node(
                &format!("{layer}.input_quant"),
                Op::QuantizeDequantize(p),
                vec![x.to_string()],
                None,
            ),
            None => x.to_string(),
        }
    }

    pub(crate) fn constant(&mut self, name: String, dims: Vec<usize>, data: Vec<f32>) -> String {
        self.graph
            .constants
            .insert(name.clone(), Constant { dims, data });
        name
    }

    /// A layer `layer` computing `op` on `x` with the given weight and bias (its input
    /// quantized first when the recipe says so); returns its output.
    pub(crate) fn layer(
        &mut self,
        layer: &str,
        op: Op,
        x: &str,
        (weight_dims, weight): (Vec<usize>, Vec<f32>),
        bias: Vec<f32>,
        output: Option<&str>,
    ) -> String {
        let input = self.layer_input(layer, x);
        let outputs = weight_dims.first().copied().unwrap_or(0);
        let w = self.constant(weight_name(layer), weight_dims, weight);
        let b = self.constant(bias_name(layer), vec![outputs], bias);
        self.node(layer, op, vec![input, w, b], output)
    }

    /// A convolution `layer` (`op`) on `x` followed by its BatchNorm `bn`: folded into the
    /// weights and a bias, or, when building unfolded and the store still has the BatchNorm,
    /// as a node of its own. Returns the output.
    pub(crate) fn batch_normed_conv(
        &mut self,
        layer: &str,
        bn: &str,
        op: Op,
        x: &str,
    ) -> Result<String> {
        let store = self.store;
        let separate = self.unfold_batch_norms
            && !store.contains(&bias_name(layer))
            && store.contains(&format!("{bn}.weight"));
        if !separate {
            let (shape, weight, bias) = folded_conv(store, layer, bn)?;
            return Ok(self.layer(layer, op, x, (shape, weight), bias, None));
        }
        let w = store.get(&weight_name(layer))?;
        let w = self.constant(w.name.clone(), w.shape.clone(), w.data.clone());
        let y = self.node(layer, op, vec![x.to_string(), w], None);
        let mut inputs = vec![y];
        for part in ["weight", "bias", "running_mean", "running_var"] {
            let t = store.get(&format!("{bn}.{part}"))?;
            inputs.push(self.constant(t.name.clone(), t.shape.clone(), t.data.clone()));
        }
        let epsilon = BATCH_NORM_EPS as f32;
        Ok(self.node(bn, Op::BatchNorm { epsilon }, inputs, None))
    }

    /// Declares the input and output and checks that the shapes chain (a store whose widths
    /// disagree is an error here, not in an executor).
    pub(crate) fn finish(
        mut self,
        (input, input_dims): (&str, Vec<Dim>),
        (output, output_dims): (&str, Vec<Dim>),
    ) -> Result<Graph> {
        self.graph.inputs = vec![ValueInfo {
            name: input.into(),
            dims: input_dims,
        }];
        self.graph.outputs = vec![ValueInfo {
            name: output.into(),
            dims: output_dims,
        }];
        self.graph.shapes(&self.graph.input()?.dims.clone())?;
        Ok(self.graph)
    }
}

/// Fixed dims.
pub(crate) fn known(dims: &[usize]) -> Vec<Dim> {
    dims.iter().map(|&d| Dim::Known(d)).collect()
}
