//! The Fashion-MNIST network on the CPU: its graph (`fashion_graph.rs`) on the graph
//! engine's CPU interpreter, a whole batch per run (every 3×3 convolution as im2col + GEMM,
//! BatchNorm folded). It runs the test set in the page and natively, in float, as fake
//! quant, or on the integer kernels, from the same [`CompressedModel`] as EfficientNet.

use crate::compress::CompressedModel;
use crate::error::{EngineError, Result};
use crate::exec::{CpuExecutor, Tensor};
use crate::fashion::{CLASSES, Evaluation, FashionSet, PIXELS, SIDE, normalize, weight_layers};
use crate::graph_builder::layer_inputs;
use crate::graph_builder::{compressed_network_graph, network_graph};
use crate::weights::TensorStore;

pub struct CpuFashionNet {
    executor: CpuExecutor,
    /// The value each weight layer reads, in [`weight_layers`] order.
    layer_inputs: Vec<String>,
}

/// The value each weight layer reads in `graph`, in [`weight_layers`] order.
fn inputs_of_layers(graph: &crate::graph::Graph) -> Result<Vec<String>> {
    let names: Vec<String> = weight_layers().into_iter().map(|l| l.name).collect();
    layer_inputs(graph, &names)
}

/// Images per run in [`evaluate`].
pub const EVAL_BATCH: usize = 100;

impl CpuFashionNet {
    /// From raw or folded weights.
    pub fn from_store(store: &TensorStore) -> Result<Self> {
        let graph = network_graph(store)?;
        let layer_inputs = inputs_of_layers(&graph)?;
        Ok(Self {
            executor: CpuExecutor::from_graph(graph)?,
            layer_inputs,
        })
    }

    /// The compressed model. With `integer_kernels` its int8 layers run on the int8 kernel
    /// and its int4 layers from their packed weights; without, it is the float fake-quant
    /// reference.
    pub fn from_compressed(model: &CompressedModel, integer_kernels: bool) -> Result<Self> {
        let (graph, weights) = compressed_network_graph(model)?;
        let layer_inputs = inputs_of_layers(&graph)?;
        let executor = if integer_kernels {
            CpuExecutor::quantized(graph, &weights)?
        } else {
            CpuExecutor::from_graph(graph)?
        };
        Ok(Self {
            executor,
            layer_inputs,
        })
    }

    /// How many of the five layers run on the int8 kernel.
    pub fn integer_layers(&self) -> usize {
        self.executor.kernel_use().int8
    }

    /// Logits `[batch][10]` for normalised images `[batch][28·28]`.
    pub fn forward(&self, images: &[f32]) -> Result<Vec<f32>> {
        self.forward_observed(images, &mut |_, _| {})
    }

    /// [`Self::forward`], showing each weight layer's input to `observe` with its index in
    /// [`weight_layers`] order (the values in the interpreter's order: what calibration's
    /// ranges and samples need).
    pub fn forward_observed(
        &self,
        images: &[f32],
        observe: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<Vec<f32>> {
        if images.is_empty() || !images.len().is_multiple_of(PIXELS) {
            return Err(EngineError::PixelBuffer {
                found: images.len(),
                expected: PIXELS,
            });
        }
        let input = Tensor {
            dims: vec![images.len() / PIXELS, 1, SIDE, SIDE],
            data: images.to_vec(),
        };
        let mut outputs = self.executor.run_observed(&input, &mut |name, values| {
            for (layer, _) in self
                .layer_inputs
                .iter()
                .enumerate()
                .filter(|(_, i)| *i == name)
            {
                observe(layer, values);
            }
        })?;
        if outputs.is_empty() {
            return Err(EngineError::Execution("the network has no output".into()));
        }
        let logits = outputs.swap_remove(0).data;
        Ok(logits)
    }
}

/// Index of the largest logit in each row of `[batch][10]`.
pub fn predictions(logits: &[f32]) -> Vec<usize> {
    logits
        .chunks_exact(CLASSES)
        .map(|row| {
            row.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i)
        })
        .collect()
}

/// Runs images `range` of `set` through `net` and adds them to `eval`.
pub fn evaluate_range(
    net: &CpuFashionNet,
    set: &FashionSet,
    range: std::ops::Range<usize>,
    eval: &mut Evaluation,
) -> Result<()> {
    let images = normalize(&set.images[range.start * PIXELS..range.end * PIXELS]);
    let logits = net.forward(&images)?;
    for (i, p) in predictions(&logits).into_iter().enumerate() {
        eval.add(set.labels[range.start + i], p);
    }
    Ok(())
}

/// Accuracy of `net` on every image of `set`.
pub fn evaluate(net: &CpuFashionNet, set: &FashionSet) -> Result<Evaluation> {
    let mut eval = Evaluation::new();
    for start in (0..set.len()).step_by(EVAL_BATCH) {
        evaluate_range(
            net,
            set,
            start..(start + EVAL_BATCH).min(set.len()),
            &mut eval,
        )?;
    }
    Ok(eval)
}
