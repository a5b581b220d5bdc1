//! compresslab engine: models, preprocessing, weights I/O. No web dependencies; runs on any
//! burn device (WebGPU/Vulkan through wgpu, or the Flex CPU backend).

pub mod classifier;
pub mod compress;
#[cfg(feature = "native")]
pub mod decode;
pub mod distill;
pub mod distill_photo;
pub mod efficientnet;
pub mod efficientnet_graph;
pub mod error;
pub mod exec;
pub mod fashion;
pub mod fashion_cpu;
pub mod fashion_graph;
pub mod finetune_graph;
pub mod finetune_photo;
pub mod gpu_int;
pub mod graph;
pub mod graph_builder;
mod int4_cpu;
mod int8_cpu;
pub mod labels;
pub mod npy;
pub mod preprocess;
pub mod prune;
pub mod quant;
pub mod sweep;
pub mod torch_legacy;
pub mod weights;

pub use error::{EngineError, Result};
