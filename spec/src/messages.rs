//! Messages between the page and the model worker (serialised with serde-wasm-bindgen).
//! A classify request carries the image as a `Blob` next to the message, not inside it.

use crate::input::InputSpec;
use crate::recipe::Recipe;
use crate::report::{
    Evaluation, GraphSweepPoint, HeldOutReport, Prediction, SweepPoint, TrainLayers,
};
use crate::stats::{ChannelGrid, Histogram, LayerStats, ModelStats};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ToWorker {
    /// Load the model from `asset_base` (same origin) and pick a backend.
    /// A `SharedArrayBuffer` may be posted alongside: the page's cancel counter.
    Init {
        asset_base: String,
        force_cpu: Option<String>,
        /// Workers for batch work (evaluating a test set), this one included; None: one per
        /// core the browser reports (`?workers=N` in the page URL sets it, for comparisons).
        workers: Option<u32>,
    },
    /// Classify the blob posted alongside this message.
    Classify {
        id: u32,
        name: String,
    },
    /// Time `runs` warm runs of the model on the last classified image.
    Benchmark {
        runs: u32,
    },
    /// The device report: fp32, int8 W8A8, int4 weight-only and 50 % channels, each timed
    /// on WebGPU (when the page has it) and on the CPU fallback, on the last photo.
    DeviceReport {
        runs: u32,
    },
    /// Build the compressed variant from a recipe, evaluate it against the original and
    /// time both (`runs` warm runs each).
    Compress {
        recipe: Recipe,
        runs: u32,
    },
    /// The same from an exported model (the `.safetensors` blob posted alongside).
    LoadCompressed {
        name: String,
        runs: u32,
    },
    /// Send back the current variant as safetensors + its JSON recipe.
    Export,
    /// Send back the current variant as ONNX (QDQ activations, integer weights, pruned
    /// channels removed) + its JSON recipe: what other runtimes load.
    ExportOnnx,
    /// Fashion-MNIST: compress with `recipe` and measure accuracy on the whole test set,
    /// next to the original network.
    FashionCompress {
        recipe: Recipe,
    },
    /// Fashion-MNIST: every sweep case on the first `images` test images.
    FashionSweep {
        images: u32,
    },
    /// Distillation data: the image files posted alongside (an array of blobs), with
    /// their paths (`folder/…/file`: the parent folder's name is the label).
    DistilImages {
        paths: Vec<String>,
        target: DistilTarget,
    },
    /// Distillation data of the site: 1 000 labelled Fashion-MNIST training images, or
    /// the sample photos (unlabelled).
    DistilBuiltin {
        target: DistilTarget,
    },
    /// Fine-tune the network `recipe` compresses by distillation from the original.
    Distil {
        recipe: Recipe,
        settings: DistilSettings,
        target: DistilTarget,
    },
    DistilControl {
        action: DistilAction,
    },
    /// Time distillation training of the photo model at 224² (batches of `batch` crops of
    /// the last photo) next to its inference.
    BenchDistil {
        batch: u32,
        steps: u32,
    },
    /// "Your model": import the `.onnx` blob posted alongside (replaces any earlier one).
    UserModelLoad {
        name: String,
        /// The class names of a labels file the user gave (the model's own names, in its
        /// metadata, win): folder names are matched against these.
        class_names: Vec<String>,
    },
    /// Classify the image blob posted alongside with the user's model (and its compressed
    /// variant, when there is one), prepared as `spec` says.
    UserModelClassify {
        id: u32,
        name: String,
        spec: InputSpec,
        /// The folder the image came from, when a folder was dropped or picked: its name is
        /// the image's label where it names one of the model's classes.
        folder: Option<String>,
    },
    /// The class names of a labels file the user gave after the model: folder names are
    /// matched against these.
    UserModelClassNames {
        names: Vec<String>,
    },
    /// Compress the user's model; the images classified so far calibrate (the first half,
    /// and the first half of each labelled class) and measure agreement (the rest).
    UserModelCompress {
        recipe: Recipe,
        runs: u32,
    },
    /// Send back the compressed variant (or the original) as ONNX.
    UserModelExport,
    /// Fine-tune the compressed variant toward the original (distillation through its
    /// quantization, plus cross-entropy where a folder names an image's class) on the images
    /// that calibrated it (or the first half).
    UserModelFineTune {
        epochs: u32,
        learning_rate: f64,
        /// Layers (node names, as in the per-layer table) whose inputs the variant also
        /// learns to match to the original's (mean squared error, `feature_weight`).
        #[serde(default)]
        feature_layers: Vec<String>,
        #[serde(default)]
        feature_weight: f64,
    },
    /// Stop a fine-tune at its next step; the variant stays as it was before.
    UserModelStopTuning,
    /// Teach the user's model the classes its images' folders name (two or more): a new last
    /// layer fitted on the features the model computes for the first half of each folder's
    /// images, measured on the rest. The model then has those classes (any variant is gone).
    UserModelNewHead,
    /// Every sweep case (sparsity, channels, weight bits, W8A8) applied to the user's model
    /// in turn, each measured on the images classified so far that do not calibrate (the
    /// other half calibrates W8A8). The current variant stays as it is.
    UserModelSweep,
    /// Cancel the running long job at its next checkpoint. Sent only when the page could not
    /// share a counter with the worker (no cross-origin isolation): the shared counter works
    /// while the worker is busy, this message only when the job yields.
    CancelJob,
}

impl ToWorker {
    /// What a long request does, in words, or None for the quick ones (classifying, exporting,
    /// pause / cancel). The worker runs one long job at a time and answers a second one with
    /// "busy with …", so a benchmark never times a training step and a late result never
    /// overwrites a newer one.
    pub fn long_job(&self) -> Option<&'static str> {
        Some(match self {
            Self::Benchmark { .. } => "a benchmark",
            Self::DeviceReport { .. } => "the device report",
            Self::Compress { .. } | Self::LoadCompressed { .. } => "the photo lab",
            Self::FashionCompress { .. } => "the Fashion-MNIST lab",
            Self::FashionSweep { .. } => "the sweeps",
            Self::DistilImages { .. } | Self::DistilBuiltin { .. } => "reading training images",
            Self::Distil { .. } => "a fine-tune",
            Self::BenchDistil { .. } => "the training benchmark",
            Self::UserModelLoad { .. } => "loading your model",
            Self::UserModelCompress { .. } => "compressing your model",
            Self::UserModelFineTune { .. } => "fine-tuning your model",
            Self::UserModelSweep => "sweeping your model",
            Self::UserModelNewHead => "teaching your model your classes",
            Self::Init { .. }
            | Self::Classify { .. }
            | Self::Export
            | Self::ExportOnnx
            | Self::DistilControl { .. }
            | Self::UserModelClassify { .. }
            | Self::UserModelClassNames { .. }
            | Self::UserModelExport
            | Self::UserModelStopTuning
            | Self::CancelJob => return None,
        })
    }
}

/// Which network a distillation fine-tunes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum DistilTarget {
    #[default]
    Fashion,
    /// EfficientNet-Lite0 at 224².
    Photos,
}

impl DistilTarget {
    /// Most images the worker keeps for a run; a folder drop stops reading there.
    pub const fn max_images(self) -> usize {
        match self {
            Self::Fashion => 20_000,
            Self::Photos => 1_000,
        }
    }

    /// Largest training batch: the photo model's 224² activations take about 60 MB per
    /// image while training, so 32 is already 2 GB.
    pub const fn max_batch(self) -> usize {
        match self {
            Self::Fashion => 256,
            Self::Photos => 32,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub enum DistilAction {
    Pause,
    Resume,
    Cancel,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DistilSettings {
    pub temperature: f64,
    pub alpha: f64,
    pub learning_rate: f64,
    pub epochs: u32,
    pub batch_size: u32,
    pub layers: TrainLayers,
    /// Quantization-aware training (when the recipe quantizes weights).
    pub qat: bool,
    /// Photo model: MBConv blocks whose outputs are matched (mean squared error), and the
    /// weight of that term.
    #[serde(default)]
    pub feature_blocks: Vec<u8>,
    #[serde(default)]
    pub feature_weight: f64,
}

impl DistilSettings {
    /// Most epochs a run takes (the page's field and the engine use the same bound).
    pub const MAX_EPOCHS: usize = 50;

    /// Defaults that suit each network: the small CNN takes big batches and a high rate;
    /// the pretrained photo model small batches (224² activations) and a gentle rate.
    pub fn for_target(target: DistilTarget) -> Self {
        match target {
            DistilTarget::Fashion => Self {
                temperature: 4.0,
                alpha: 0.7,
                learning_rate: 1e-3,
                epochs: 3,
                batch_size: 32,
                layers: TrainLayers::All,
                qat: true,
                feature_blocks: Vec::new(),
                feature_weight: 1.0,
            },
            DistilTarget::Photos => Self {
                temperature: 2.0,
                alpha: 0.7,
                learning_rate: 2e-4,
                epochs: 3,
                batch_size: 8,
                layers: TrainLayers::All,
                qat: true,
                feature_blocks: Vec::new(),
                feature_weight: 1.0,
            },
        }
    }
}

/// Distillation training speed of the photo model, next to its inference.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DistilBench {
    pub backend: String,
    pub batch: u32,
    pub steps: u32,
    /// The first step (shader compilation on WebGPU), not counted below.
    pub first_step_ms: f64,
    pub training_images_per_s: f64,
    pub inference_images_per_s: f64,
}

/// The images the worker holds for distillation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DistilData {
    pub source: String,
    pub images: u32,
    /// Per class, then the unlabelled images last: training and held-out counts.
    pub train_counts: Vec<u32>,
    pub heldout_counts: Vec<u32>,
    /// Folder names that are not a Fashion-MNIST class (their images are unlabelled).
    pub unmatched: Vec<String>,
    /// Files that could not be read, with the reason (the first few).
    pub rejected: Vec<String>,
    pub rejected_count: u32,
    /// A few of the images as the network sees them (28×28 grey), with their labels.
    pub preview: Vec<(u8, ByteBuf)>,
    /// Photos: class names of the counts (without the unlabelled row; empty for
    /// Fashion-MNIST, whose classes are fixed), what the labels train, and thumbnails
    /// (label, side, RGB bytes).
    pub class_names: Vec<String>,
    pub label_mode: String,
    pub thumbs: Vec<(String, u32, ByteBuf)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DistilStep {
    /// Steps done (from 1) and in all.
    pub step: u32,
    pub total: u32,
    pub epoch: u32,
    pub epochs: u32,
    pub loss: f64,
    pub images_per_s: f64,
    pub eta_s: f64,
}

/// The held-out measurement after an epoch (epoch 0: before training).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DistilEpoch {
    pub epoch: u32,
    pub step: u32,
    pub train_loss: Option<f64>,
    pub heldout: HeldOutReport,
}

/// One network in the distillation before/after panel, as deployed (quantized weights,
/// CPU executor).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DistilSide {
    pub heldout_accuracy: Option<f64>,
    pub heldout_agreement: f64,
    /// Fashion-MNIST: on its 10 000 test images (photos have no test set).
    pub test_accuracy: Option<f64>,
    pub test_agreement: Option<f64>,
    pub ms_per_image: f64,
    pub stats: ModelStats,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DistilReport {
    pub recipe: Recipe,
    pub settings: DistilSettings,
    pub backend: String,
    pub train_images: u32,
    pub heldout_images: u32,
    pub seconds: f64,
    pub images_per_s: f64,
    /// Whether the student trained with fake-quantized weights.
    pub qat: bool,
    pub target: DistilTarget,
    /// What the labels trained (ImageNet classes, own classes, none).
    pub label_mode: String,
    pub teacher: DistilSide,
    pub before: DistilSide,
    pub after: DistilSide,
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
    /// WGSL language features (`navigator.gpu.wgslLanguageFeatures`).
    #[serde(default)]
    pub wgsl_features: Vec<String>,
}

/// The WGSL language feature the int8 kernel's `dot4I8Packed` needs.
pub const PACKED_DOT4: &str = "packed_4x8_integer_dot_product";

impl BackendInfo {
    /// Whether the int8 kernel can run on this adapter.
    pub fn has_packed_dot4(&self) -> bool {
        self.wgsl_features.iter().any(|f| f == PACKED_DOT4)
    }
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
    DeviceReportProgress {
        stage: String,
        fraction: f32,
    },
    DeviceReported(Box<DeviceReport>),
    DistilBenchmarked(DistilBench),
    BenchmarkFailed {
        message: String,
    },
    CompressProgress {
        stage: String,
        fraction: f32,
    },
    Compressed(Box<CompressReport>),
    CompressFailed {
        message: String,
    },
    Exported {
        #[serde(with = "serde_bytes")]
        weights: Vec<u8>,
        recipe_json: String,
        file_name: String,
    },
    FashionCompressed(Box<FashionReport>),
    SweepProgress {
        stage: String,
        done: u32,
        total: u32,
    },
    SweepPoint(SweepPoint),
    SweepDone,
    SweepFailed {
        message: String,
    },
    DistilLoading {
        done: u32,
        total: u32,
    },
    DistilData(DistilData),
    /// What a fine-tune is doing outside its training steps (fitting a head, measuring).
    DistilStage {
        text: String,
    },
    DistilStarted {
        total_steps: u32,
        backend: String,
    },
    DistilStep(DistilStep),
    DistilEpoch(DistilEpoch),
    DistilPaused {
        paused: bool,
    },
    DistilDone(Box<DistilReport>),
    /// Failed, or cancelled by the user.
    DistilStopped {
        message: String,
        cancelled: bool,
    },
    UserModelLoaded(Box<UserModelInfo>),
    UserModelClassified(UserClassification),
    UserModelCompressed(Box<UserCompressReport>),
    /// A fine-tuning step of the user's variant finished.
    UserModelTuning {
        done: usize,
        total: usize,
        loss: f64,
    },
    /// One sweep case of the user's model measured (`done` of `total`).
    UserSweepPoint {
        point: GraphSweepPoint,
        done: u32,
        total: u32,
    },
    UserSweepDone,
    /// The user's model has a new head for the folders' classes: what it now is, and how
    /// the head did.
    UserModelNewHead {
        info: Box<UserModelInfo>,
        report: NewHeadReport,
    },
    /// A load, compression or export of the user's model failed (`id`: the image, when
    /// classifying one failed).
    UserModelFailed {
        id: Option<u32>,
        message: String,
    },
    /// The worker stopped (a panic, or a trap such as running out of memory); it is unusable
    /// and the page replaces it.
    Crashed {
        message: String,
        cause: CrashCause,
    },
}

/// Why the worker stopped, which decides what the page does next.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum CrashCause {
    /// The WebGPU device was lost or a GPU call failed: the page goes on on the CPU fallback.
    Gpu,
    /// A bug, or an input the engine did not turn into an error: the page restarts the
    /// worker on the same backend and says which job failed.
    Panic,
    /// The worker stopped without a panic (a wasm trap: out of memory, or a stack
    /// overflow): restarted on the same backend as well.
    Trap,
}

impl CrashCause {
    /// The cause of a panic raised in `file` (its source location): the GPU stack (wgpu,
    /// cubecl, burn's WebGPU backend) fails when the device is lost or out of memory;
    /// anything else is a bug or an unhandled input, not the GPU's fault.
    pub fn of_panic_at(file: &str) -> Self {
        let gpu_crates = ["wgpu", "cubecl", "burn-cubecl", "burn-wgpu", "naga"];
        // Registry sources sit in `<crate>-<version>/` folders (`wgpu-core-27.0.1`).
        let in_gpu_crate = file.split(['/', '\\']).any(|folder| {
            gpu_crates.iter().any(|c| {
                folder
                    .strip_prefix(c)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
            })
        });
        if in_gpu_crate { Self::Gpu } else { Self::Panic }
    }
}

/// Every standard variant on every executor of this browser, timed side by side.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceReport {
    /// The WebGPU adapter as burn uses it (None: the page runs on the CPU fallback).
    pub adapter: Option<String>,
    /// The CPU executor and the cores the browser reports.
    pub cpu: String,
    /// The photo timed (the last one classified).
    pub photo: String,
    /// Warm runs per variant and executor, taken round-robin across the variants.
    pub runs: u32,
    pub rows: Vec<DeviceRow>,
}

/// One variant on one executor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceRow {
    /// "fp32", "int8 W8A8 per channel", …; the first row of each executor is fp32.
    pub variant: String,
    pub backend: BackendKind,
    pub latency: Latency,
    /// Stored size (packed integers, scales, zero points; what an export holds).
    pub weight_bytes: usize,
    /// What the running network's weights hold in memory (wasm heap or GPU buffers).
    pub held_bytes: usize,
    /// Which layers ran on which kernel, in words.
    pub ran: String,
}

/// Latency of one model on the worker's executor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// First run after the model was built (includes shader compilation on WebGPU).
    pub cold_ms: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub runs: u32,
}

/// One side of the before/after panel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VariantSummary {
    pub stats: ModelStats,
    /// What its weights hold while it runs on this backend (wasm heap on the CPU path, GPU
    /// buffers on WebGPU), next to the stored size in `stats`.
    pub held_bytes: usize,
    pub latency: Latency,
    /// Top-5 on the current photo.
    pub top5: Vec<Prediction>,
}

/// The compressed variant run on the other executor (WebGPU vs CPU) on the same photo.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CrossCheck {
    pub top1_same: bool,
    pub max_abs_diff: f32,
    pub kl: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CompressReport {
    pub recipe: Recipe,
    /// "recipe" or the name of the loaded file.
    pub source: String,
    pub executor: String,
    pub before: VariantSummary,
    pub after: VariantSummary,
    /// The photo the top-5 and latency are measured on.
    pub photo: String,
    /// Agreement over the sample photos and the user's photos that did not calibrate or
    /// train the variant.
    pub eval_images: usize,
    /// Photos left out of the agreement because they calibrated the variant's activations
    /// or (for a fine-tuned variant) trained it.
    pub excluded_images: usize,
    pub top1_agreement: usize,
    pub mean_kl: f64,
    pub build_ms: f64,
    pub layers: Vec<LayerStats>,
    /// Only on WebGPU: the variant's WebGPU output against its CPU output.
    pub cross_check: Option<CrossCheck>,
    /// What ran the variant's layers: integer kernels or float on dequantized weights.
    pub kernels: String,
}

/// One side of the Fashion-MNIST before/after panel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FashionSide {
    pub stats: ModelStats,
    pub eval: Evaluation,
    /// Wall time per test image, batched (100 images per GEMM), split across `workers`.
    pub ms_per_image: f64,
    /// How many workers evaluated the test set (this one and its helpers).
    pub workers: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FashionReport {
    pub recipe: Recipe,
    /// "recipe" or the name of the loaded file.
    pub source: String,
    pub before: FashionSide,
    pub after: FashionSide,
    /// Test images on which the compressed network predicts what the original does.
    pub same_prediction: usize,
    /// Layers running on the int8 kernel.
    pub integer_layers: usize,
    pub build_ms: f64,
    pub layers: Vec<LayerStats>,
    /// The first test images whose prediction compression changed.
    pub changed: Vec<ChangedPrediction>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChangedPrediction {
    /// Index in the test set.
    pub index: u32,
    pub label: u8,
    pub before: u8,
    pub after: u8,
    /// 28×28 grey pixels.
    #[serde(with = "serde_bytes")]
    pub pixels: Vec<u8>,
}

/// What the page shows about an imported model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserModelInfo {
    pub name: String,
    pub file_bytes: usize,
    pub producer: String,
    pub opset: i64,
    /// Declared dims, `?`-style names for unknown ones.
    pub input: Vec<String>,
    pub outputs: Vec<String>,
    pub nodes: usize,
    pub ops: Vec<(String, usize)>,
    pub parameters: usize,
    /// For one input of the declared size (batch 1); None when a size is unknown.
    pub macs: Option<u64>,
    /// Fixed input height and width, when the model declares them.
    pub input_size: Option<(usize, usize)>,
    /// Class names found in the model's metadata (empty when none).
    pub labels: Vec<String>,
    pub prunable_groups: usize,
    pub fixed_groups: usize,
}

/// A head fitted on the user's own classes (transfer learning): on how many images, and
/// how many it gets right of those it trained on and of the others.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NewHeadReport {
    /// The layer replaced (node name) and the classes it now computes, in order.
    pub layer: String,
    pub classes: Vec<String>,
    pub training: usize,
    pub training_right: usize,
    /// Labelled images that did not train the head, and how many it reads right.
    pub held_out: usize,
    pub held_out_right: usize,
    /// Images classified so far without a folder that names a class (not used).
    pub unlabelled: usize,
    pub ms: f64,
}

/// One image through the user's model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserClassification {
    pub id: u32,
    /// `(class, probability)`, best first (softmax of the outputs unless they already are
    /// probabilities).
    pub top: Vec<(usize, f32)>,
    pub ms: f64,
    /// Where it ran ("WebGPU", "CPU interpreter"); cold: the first run there (WebGPU
    /// compiles its shaders then).
    pub backend: String,
    pub cold: bool,
    pub variant_top: Option<Vec<(usize, f32)>>,
    pub variant_ms: Option<f64>,
    /// The model's outputs per image (what a folder's class number must stay below).
    pub classes: usize,
    /// The input as the model saw it (8-bit RGB, height × width), for the card.
    #[serde(with = "serde_bytes")]
    pub seen: Vec<u8>,
    pub seen_width: u32,
    pub seen_height: u32,
}

/// Top-1 right on held-out labelled images, for the original and the compressed model.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabelledAccuracy {
    pub images: usize,
    pub original: usize,
    pub variant: usize,
}

/// Size and compute of one side.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserSide {
    pub parameters: usize,
    /// Bytes to store the weights (what the export holds).
    pub weight_bytes: usize,
    pub macs: Option<u64>,
    /// Bytes of weights the runner keeps while the model is loaded (f32 on WebGPU, the
    /// integer kernels' own layouts on the CPU).
    pub held_bytes: usize,
    pub p50_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserLayer {
    pub node: String,
    pub op: String,
    pub shape: Vec<usize>,
    pub parameters: usize,
    pub zeros: usize,
    pub bits: Option<u8>,
    pub sqnr_db: Option<f64>,
    pub activation_bits: Option<u8>,
    /// The float weights before quantization, and the narrowest output channel on its grid.
    pub histogram: Histogram,
    pub narrowest_channel: Option<ChannelGrid>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserCompressReport {
    pub recipe: Recipe,
    pub before: UserSide,
    pub after: UserSide,
    /// Timing runs per side (interleaved, on the last image).
    pub runs: u32,
    pub calibration_images: usize,
    /// Images not used to calibrate, on which agreement is measured.
    pub held_out: usize,
    /// Held-out images whose top-1 class is unchanged (None: too few images).
    pub top1_same: Option<usize>,
    /// Accuracy on the held-out images whose folder names a class (None: no such image).
    pub labelled: Option<LabelledAccuracy>,
    pub layers: Vec<UserLayer>,
    /// What ran, in words (the interpreter, and that the arithmetic is float).
    pub executor: String,
    pub build_ms: f64,
    /// After a fine-tune: what it did, in words (steps, images, loss, time).
    pub fine_tuned: Option<String>,
}
