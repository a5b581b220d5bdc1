//! A loaded model plus labels: normalised input in, logits and top-k out.

use burn::prelude::*;

use crate::efficientnet::{BatchNormMode, EfficientNetLite, INPUT_SIZE};
use crate::error::{EngineError, Result};
use crate::labels::{Labels, Prediction, top_k};
use crate::weights::TensorStore;

pub struct ImageClassifier {
    model: EfficientNetLite,
    labels: Labels,
    device: Device,
}

impl ImageClassifier {
    pub fn new(weights: &TensorStore, labels: Labels, device: &Device) -> Result<Self> {
        let model = EfficientNetLite::from_store(weights, device, BatchNormMode::Folded)?;
        Ok(Self {
            model,
            labels,
            device: device.clone(),
        })
    }

    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    pub fn model(&self) -> &EfficientNetLite {
        &self.model
    }

    pub fn device(&self) -> &Device {
        &self.device
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
        let x = Tensor::<4>::from_data(
            TensorData::new(input.to_vec(), [1, 3, INPUT_SIZE, INPUT_SIZE]),
            &self.device,
        );
        let data = self
            .model
            .forward(x)
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
