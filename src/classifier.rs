//! A loaded model plus labels: normalised input in, logits and top-k out.

use burn::prelude::Device;

use crate::compress::CompressedModel;
use crate::efficientnet::INPUT_SIZE;
use crate::error::{EngineError, Result};
use crate::exec::{CpuExecutor, GraphModel, Tensor};
use crate::gpu_int::{GpuFeatures, quantized_graph_on_integer_kernels};
use crate::graph_builder::{compressed_network_graph, network_graph};
use crate::labels::{Labels, Prediction, top_k};
use crate::weights::TensorStore;

/// Which executor runs the network's graph.
enum Runner {
    /// The burn interpreter on a burn device (WebGPU, Vulkan, or burn's CPU backend), with
    /// the WGSL integer kernels of `kernels/` for the layers they fit when asked for.
    Burn {
        model: Box<GraphModel>,
        device: Device,
    },
    /// The channels-last CPU interpreter (the browser's fallback), with its int8 and int4
    /// kernels for a compressed variant's quantized layers.
    Cpu(Box<CpuExecutor>),
}

pub struct ImageClassifier {
    runner: Runner,
    labels: Labels,
}

impl ImageClassifier {
    /// The float network on a burn `device`.
    pub fn new(weights: &TensorStore, labels: Labels, device: &Device) -> Result<Self> {
        let model = GraphModel::new(&network_graph(weights)?, device)?;
        Ok(Self {
            runner: Runner::Burn {
                model: Box::new(model),
                device: device.clone(),
            },
            labels,
        })
    }

    /// A compressed model on `device`. With `integer_kernels` (the device must be wgpu:
    /// WebGPU or Vulkan) quantized 1×1 layers and the classifier run on the WGSL integer
    /// kernels the adapter's features allow; the rest, or everything without it, runs as
    /// burn ops on dequantized weights with inputs fake-quantized.
    pub fn new_compressed(
        model: &CompressedModel,
        labels: Labels,
        device: &Device,
        integer_kernels: Option<GpuFeatures>,
    ) -> Result<Self> {
        let (graph, weights) = compressed_network_graph(model)?;
        let model = match integer_kernels {
            Some(features) => {
                quantized_graph_on_integer_kernels(&graph, &weights, device, features)?
            }
            None => GraphModel::new(&graph, device)?,
        };
        Ok(Self {
            runner: Runner::Burn {
                model: Box::new(model),
                device: device.clone(),
            },
            labels,
        })
    }

    /// Layers on integer kernels (int8, int4): the WGSL kernels on wgpu, the int8 and int4
    /// kernels of the CPU interpreter.
    pub fn integer_layers(&self) -> (usize, usize) {
        match &self.runner {
            Runner::Burn { model, .. } => model.kernel_layers(),
            Runner::Cpu(cpu) => {
                let used = cpu.kernel_use();
                (used.int8, used.int4)
            }
        }
    }

    /// Bytes the weights hold while this classifier runs: on the CPU in the heap, on wgpu in
    /// GPU buffers (packed int8 / int4 where a layer runs on an integer kernel, f32
    /// elsewhere; a layer on an integer kernel keeps no f32 copy).
    pub fn held_weight_bytes(&self) -> usize {
        match &self.runner {
            Runner::Cpu(cpu) => cpu.weight_bytes(),
            Runner::Burn { model, .. } => model.held_bytes(),
        }
    }

    /// A compressed model on the CPU interpreter, with its integer kernels.
    pub fn new_compressed_cpu(model: &CompressedModel, labels: Labels) -> Result<Self> {
        let (graph, weights) = compressed_network_graph(model)?;
        Ok(Self {
            runner: Runner::Cpu(Box::new(CpuExecutor::quantized(graph, &weights)?)),
            labels,
        })
    }

    /// The float network on the CPU interpreter (the browser's fallback).
    pub fn new_cpu(weights: &TensorStore, labels: Labels) -> Result<Self> {
        Ok(Self {
            runner: Runner::Cpu(Box::new(CpuExecutor::from_graph(network_graph(weights)?)?)),
            labels,
        })
    }

    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    /// Logits for one preprocessed image (`[3, 224, 224]` planar values).
    /// Async because the browser cannot read GPU memory synchronously.
    pub async fn logits(&self, input: &[f32]) -> Result<Vec<f32>> {
        let expected = 3 * INPUT_SIZE * INPUT_SIZE;
        if input.len() != expected {
            return Err(EngineError::PixelBuffer {
                found: input.len(),
                expected,
            });
        }
        let input = Tensor {
            dims: vec![1, 3, INPUT_SIZE, INPUT_SIZE],
            data: input.to_vec(),
        };
        let outputs = match &self.runner {
            Runner::Cpu(cpu) => cpu.run(&input)?,
            Runner::Burn { model, device } => model.run(&input, device).await?,
        };
        outputs
            .into_iter()
            .next()
            .map(|logits| logits.data)
            .ok_or_else(|| EngineError::Execution("the network has no output".into()))
    }

    pub async fn classify(&self, input: &[f32], k: usize) -> Result<Vec<Prediction>> {
        let logits = self.logits(input).await?;
        Ok(top_k(&logits, k, &self.labels))
    }
}

/// Largest absolute difference between two equally long vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
