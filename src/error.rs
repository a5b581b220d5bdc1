//! The engine's one error type.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("not a PyTorch legacy checkpoint: {0}")]
    TorchFormat(String),
    #[error("weights file is malformed: {0}")]
    Weights(String),
    #[error("tensor `{name}` is missing from the weights")]
    MissingTensor { name: String },
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("image is {width}×{height}: {reason}")]
    ImageSize {
        width: u32,
        height: u32,
        reason: &'static str,
    },
    #[error("pixel buffer has {found} bytes, expected {expected}")]
    PixelBuffer { found: usize, expected: usize },
    #[error("could not decode the image: {0}")]
    Decode(String),
    #[error("model execution failed: {0}")]
    Execution(String),
    #[error("labels file is malformed: {0}")]
    Labels(String),
    #[error("dataset is malformed: {0}")]
    Dataset(String),
    #[error("invalid setting: {0}")]
    Config(String),
    /// The caller's progress callback asked to stop (the page's Cancel).
    #[error("Cancelled.")]
    Cancelled,
    #[error("ONNX model: {0}")]
    Onnx(String),
    #[error("ONNX operator {op} (node `{node}`, opset {opset}) cannot be imported: {why}")]
    UnsupportedOp {
        op: String,
        node: String,
        opset: i64,
        why: String,
    },
    #[error(transparent)]
    Spec(#[from] compresslab_spec::SpecError),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, EngineError>;
