//! Messages between the page and the model worker (serialised with serde-wasm-bindgen).
//! A classify request carries the image as a `Blob` next to the message, not inside it.

use compresslab::labels::Prediction;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ToWorker {
    /// Load the model from `asset_base` (same origin) and pick a backend.
    Init {
        asset_base: String,
        force_cpu: Option<String>,
    },
    /// Classify the blob posted alongside this message.
    Classify { id: u32 },
    /// Time `runs` warm runs of the model on the last classified image.
    Benchmark { runs: u32 },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum BackendKind {
    WebGpu,
    Cpu,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendInfo {
    pub kind: BackendKind,
    /// The adapter's description (WebGPU), or the CPU backend's name.
    pub description: String,
    /// Why we are on the CPU, when we are.
    pub fallback_reason: Option<String>,
    /// Selected adapter limits, as (name, value).
    pub limits: Vec<(String, u64)>,
    pub features: Vec<String>,
}

/// The loaded model and where it runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelReady {
    pub backend: BackendInfo,
    pub parameters: usize,
    pub weights_bytes: usize,
    pub from_cache: bool,
    pub load_ms: f64,
}

/// Warm latency of the model alone over `runs` runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BenchReport {
    pub runs: u32,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub backend: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum FromWorker {
    /// The worker's wasm is up and listening (messages sent before this are lost).
    Started,
    Progress {
        stage: String,
        loaded: f64,
        total: Option<f64>,
    },
    Ready(ModelReady),
    /// Loading failed on WebGPU; the page restarts the worker on the CPU.
    InitFailed {
        message: String,
        on_gpu: bool,
    },
    Classified {
        id: u32,
        top5: Vec<Prediction>,
        /// Decode + preprocess time.
        preprocess_ms: f64,
        /// Model run time, including reading the result back.
        inference_ms: f64,
        /// First run on this backend (includes shader compilation on WebGPU).
        cold: bool,
        width: u32,
        height: u32,
        downscaled: bool,
        /// The 224×224 RGB crop the model saw.
        #[serde(with = "serde_bytes")]
        model_input: Vec<u8>,
    },
    Failed {
        id: u32,
        message: String,
    },
    Benchmarked(BenchReport),
    BenchmarkFailed {
        message: String,
    },
    /// The worker panicked; it is unusable and the page replaces it.
    Crashed {
        message: String,
    },
}
