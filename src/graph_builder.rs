//! What the built-in networks' model builders (`efficientnet_graph.rs`, `fashion_graph.rs`)
//! share: a [`Graph`] written node by node from a [`TensorStore`], with a layer's constants
//! named as in the store (`{layer}.weight`, `{layer}.bias`) and, for a compressed variant, a
//! `QuantizeDequantize` node before each layer whose input the recipe quantizes.

use std::collections::BTreeMap;

use crate::compress::{ActivationParams, CompressedModel};
use crate::error::{EngineError, Result};
use crate::graph::{Constant, Dim, Graph, Node, Op, ValueInfo};
use crate::quant::QuantizedTensor;
use crate::weights::TensorStore;

/// The graph `network` writes for the float weights of `store`.
pub(crate) fn build_float(
    name: &str,
    store: &TensorStore,
    network: fn(Builder) -> Result<Graph>,
) -> Result<Graph> {
    network(Builder::new(name, store, &BTreeMap::new()))
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

/// A layer's weight constant (the store's name for it).
pub(crate) fn weight_name(layer: &str) -> String {
    format!("{layer}.weight")
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
        let b = self.constant(format!("{layer}.bias"), vec![outputs], bias);
        self.node(layer, op, vec![input, w, b], output)
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
