//! Results the worker reports: predictions, accuracies, sweep points, held-out checks.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub class: usize,
    pub label: String,
    pub probability: f32,
}

pub const CLASSES: usize = 10;

pub const CLASS_NAMES: [&str; CLASSES] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Accuracy, per-class accuracy and the confusion matrix of a set of predictions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub images: usize,
    pub correct: usize,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<u32>>,
}

impl Evaluation {
    pub fn new() -> Self {
        Self {
            images: 0,
            correct: 0,
            confusion: vec![vec![0; CLASSES]; CLASSES],
        }
    }

    pub fn add(&mut self, label: u8, predicted: usize) {
        self.images += 1;
        self.correct += (label as usize == predicted) as usize;
        self.confusion[label as usize][predicted] += 1;
    }

    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.images.max(1) as f64
    }

    pub fn class_accuracy(&self) -> Vec<f64> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(c, row)| row[c] as f64 / row.iter().sum::<u32>().max(1) as f64)
            .collect()
    }
}

impl Default for Evaluation {
    fn default() -> Self {
        Self::new()
    }
}

/// Which layers a fine-tune updates; the others keep their values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TrainLayers {
    #[default]
    All,
    /// The fully connected layers (fc1 and fc2).
    Classifier,
    /// fc2 alone.
    LastLayer,
    /// The last N blocks (conv blocks here, MBConv blocks of the photo model) and
    /// everything after them.
    LastBlocks(u8),
}

/// Which setting a sweep varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SweepAxis {
    /// Unstructured magnitude pruning, per-layer threshold (x = sparsity %).
    Sparsity,
    /// Structured channel pruning, L2 ranking (x = % of channels removed).
    Channels,
    /// Weight quantization (label = bits × granularity; W8A8 adds int8 activations).
    Quantization,
}

/// One measured point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    pub axis: SweepAxis,
    pub label: String,
    pub x: f32,
    pub accuracy: f64,
    pub images: usize,
    pub weight_bytes: usize,
    pub macs: u64,
}

/// One sweep case on any model (the "Your model" tab): its top-1 against the original's on
/// held-out images, and against their labels where folders name them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GraphSweepPoint {
    pub axis: SweepAxis,
    pub label: String,
    pub x: f32,
    /// Held-out images, and on how many the compressed model's top-1 is the original's.
    pub images: usize,
    pub same: usize,
    /// Held-out images a folder labels, and how many of them the compressed model gets right
    /// (the original's count is the same for every case: see `original_right`).
    pub labelled: usize,
    pub right: usize,
    pub original_right: usize,
    pub weight_bytes: usize,
    /// Multiply-accumulates of one image (zeroed weights included); None when a size is open.
    pub macs: Option<u64>,
}

/// The student measured on a set of images, next to the teacher.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeldOutReport {
    pub images: usize,
    /// The distillation loss (same T, α) without augmentation.
    pub loss: f64,
    /// On the labelled images, when there are any.
    pub accuracy: Option<f64>,
    pub teacher_accuracy: Option<f64>,
    /// Share of images where the student's top-1 is the teacher's.
    pub agreement: f64,
}
