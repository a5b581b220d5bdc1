//! The engine's integration tests, as modules of one test binary: each test binary links the
//! whole of burn's generic code again, so one binary instead of five saves most of the native
//! build (see scripts/test.sh's timing lines).

use std::path::PathBuf;

use compresslab::weights::TensorStore;

/// Counts each thread's bytes, so the fuzz tests can bound what a crafted file makes the
/// engine hold.
#[global_allocator]
static ALLOCATOR: fuzz::TrackingAllocator = fuzz::TrackingAllocator;

mod compress;
mod efficientnet;
mod fashion;
mod fuzz;
mod gpu_kernels;
mod graph;
mod graph_compress;
mod graph_finetune;
mod quant;
mod worker_protocol;

/// `assets/`, written by scripts/setup.sh.
pub fn assets() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets");
    assert!(
        dir.join("models/manifest.json").exists(),
        "model assets missing: run scripts/setup.sh first"
    );
    dir
}

/// The converted EfficientNet-Lite0 weights.
pub fn store() -> TensorStore {
    let bytes = std::fs::read(assets().join("models/efficientnet-lite0.safetensors")).unwrap();
    TensorStore::from_safetensors(&bytes).unwrap()
}
