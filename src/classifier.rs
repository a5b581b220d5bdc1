//! A loaded model plus labels: normalised input in, logits and top-k out.

use burn::prelude::*;

use crate::compress::CompressedModel;
use crate::cpu::CpuEfficientNet;
use crate::efficientnet::{BatchNormMode, EfficientNetLite, INPUT_SIZE};
use crate::error::{EngineError, Result};
use crate::gpu_int::{GpuCompressedNet, GpuFeatures};
use crate::labels::{Labels, Prediction, top_k};
use crate::weights::TensorStore;

/// Which implementation runs the network.
enum Runner {
    /// The burn model on a burn device (WebGPU, Vulkan, or burn's CPU backend).
    Burn {
        model: Box<EfficientNetLite>,
        device: Device,
    },
    /// A compressed model on wgpu with the integer kernels of `kernels/`.
    GpuInt {
        net: Box<GpuCompressedNet>,
        device: Device,
    },
    /// The dedicated channels-last CPU path (`cpu.rs`).
    Cpu(Box<CpuEfficientNet>),
}

pub struct ImageClassifier {
    runner: Runner,
    labels: Labels,
}

impl ImageClassifier {
    /// The burn model on `device`.
    pub fn new(weights: &TensorStore, labels: Labels, device: &Device) -> Result<Self> {
        let model = EfficientNetLite::from_store(weights, device, BatchNormMode::Folded)?;
        Ok(Self {
            runner: Runner::Burn {
                model: Box::new(model),
                device: device.clone(),
            },
            labels,
        })
    }

    /// A compressed model on `device`. With `integer_kernels` (the device must be wgpu:
    /// WebGPU or Vulkan) quantized 1×1 layers run on the WGSL integer kernels the adapter's
    /// features allow; the rest, or everything without it, runs as burn ops on dequantized
    /// weights with inputs fake-quantized.
    pub fn new_compressed(
        model: &CompressedModel,
        labels: Labels,
        device: &Device,
        integer_kernels: Option<GpuFeatures>,
    ) -> Result<Self> {
        let runner = if let Some(features) = integer_kernels {
            Runner::GpuInt {
                net: Box::new(GpuCompressedNet::new(model, device, features)?),
                device: device.clone(),
            }
        } else {
            Runner::Burn {
                model: Box::new(EfficientNetLite::from_compressed(model, device)?),
                device: device.clone(),
            }
        };
        Ok(Self { runner, labels })
    }

    /// Layers on integer kernels (int8, int4): the WGSL kernels on wgpu, the int8 kernel and
    /// the packed int4 GEMM on the CPU path.
    pub fn integer_layers(&self) -> (usize, usize) {
        match &self.runner {
            Runner::GpuInt { net, .. } => net.integer_layers(),
            Runner::Cpu(cpu) => (cpu.int8_layers(), cpu.int4_layers()),
            Runner::Burn { .. } => (0, 0),
        }
    }

    /// Bytes the weights hold while this classifier runs: on the dedicated CPU path in the
    /// heap, on wgpu in GPU buffers (packed int8 / int4 where a layer runs on an integer
    /// kernel, f32 elsewhere; a layer on an integer kernel keeps no f32 copy).
    pub fn held_weight_bytes(&self) -> usize {
        match &self.runner {
            Runner::Cpu(cpu) => cpu.weight_bytes(),
            Runner::GpuInt { net, .. } => net.weight_bytes(),
            Runner::Burn { model, .. } => model.num_params() * 4,
        }
    }

    /// A compressed model on the dedicated CPU path, with its integer kernels.
    pub fn new_compressed_cpu(model: &CompressedModel, labels: Labels) -> Result<Self> {
        Ok(Self {
            runner: Runner::Cpu(Box::new(CpuEfficientNet::from_compressed(model, true)?)),
            labels,
        })
    }

    /// The dedicated CPU path (the browser's fallback).
    pub fn new_cpu(weights: &TensorStore, labels: Labels) -> Result<Self> {
        Ok(Self {
            runner: Runner::Cpu(Box::new(CpuEfficientNet::from_store(weights)?)),
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
        let shape = [1, 3, INPUT_SIZE, INPUT_SIZE];
        let logits = match &self.runner {
            Runner::Cpu(cpu) => return cpu.forward(input, INPUT_SIZE, INPUT_SIZE),
            Runner::Burn { model, device } => model.forward(Tensor::from_data(
                TensorData::new(input.to_vec(), shape),
                device,
            )),
            Runner::GpuInt { net, device } => net.forward(Tensor::from_data(
                TensorData::new(input.to_vec(), shape),
                device,
            ))?,
        };
        let data = logits
            .into_data_async()
            .await
            .map_err(|e| EngineError::Execution(format!("{e:?}")))?;
        data.try_into_vec::<f32>()
            .map_err(|e| EngineError::Execution(format!("{e:?}")))
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
