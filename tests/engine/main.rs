//! The engine's integration tests, as modules of one test binary: each test binary links the
//! whole of burn's generic code again, so one binary instead of five saves most of the native
//! build (see scripts/test.sh's timing lines).

use std::path::PathBuf;

use compresslab::compress::Recipe;
use compresslab::prune::{ChannelPruning, ChannelRanking, MagnitudePruning, PruneScope};
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

/// A recipe that only zeroes `sparsity` of each layer's weights, by magnitude.
pub fn zeroed_per_layer(sparsity: f32) -> Recipe {
    Recipe {
        magnitude_pruning: Some(MagnitudePruning {
            sparsity,
            scope: PruneScope::PerLayer,
            exclude: Vec::new(),
            exclude_ends: false,
        }),
        ..Recipe::default()
    }
}

/// A recipe that only removes `ratio` of the channels, ranked by `ranking`.
pub fn channels_removed(ratio: f32, ranking: ChannelRanking) -> Recipe {
    Recipe {
        channel_pruning: Some(ChannelPruning { ratio, ranking }),
        ..Recipe::default()
    }
}

/// Feature matching's claim, per tapped place: the distance to the original after training
/// with it (`matched`) is below the compressed model's (`before`) and below what training on
/// the outputs alone reaches (`outputs_only`).
pub fn assert_feature_matching_helps<T: PartialOrd + std::fmt::Debug>(
    tag: &str,
    places: &[impl std::fmt::Debug],
    before: &[T],
    outputs_only: &[T],
    matched: &[T],
) {
    for (i, place) in places.iter().enumerate() {
        assert!(
            matched[i] < before[i],
            "{tag} {place:?}: {before:?} → {matched:?}"
        );
        assert!(
            matched[i] < outputs_only[i],
            "{tag} {place:?}: outputs only {outputs_only:?}, matched {matched:?}"
        );
    }
}

/// The converted EfficientNet-Lite0 weights.
pub fn store() -> TensorStore {
    let bytes = std::fs::read(assets().join("models/efficientnet-lite0.safetensors")).unwrap();
    TensorStore::from_safetensors(&bytes).unwrap()
}

/// The photo model on the graph engine's CPU interpreter, as the tests run it.
pub struct PhotoNet(compresslab::exec::CpuExecutor);

impl PhotoNet {
    /// The float network.
    pub fn float(store: &TensorStore) -> compresslab::Result<Self> {
        let graph = compresslab::graph_builder::network_graph(store)?;
        Ok(Self(compresslab::exec::CpuExecutor::from_graph(graph)?))
    }

    /// A compressed variant: with `integer_kernels` its quantized layers run on the integer
    /// kernels (what the page runs); without, it is the float fake-quant reference (dequantized
    /// weights, activations rounded to their grids).
    pub fn compressed(
        model: &compresslab::compress::CompressedModel,
        integer_kernels: bool,
    ) -> compresslab::Result<Self> {
        let (graph, weights) = compresslab::graph_builder::compressed_network_graph(model)?;
        Ok(Self(if integer_kernels {
            compresslab::exec::CpuExecutor::quantized(graph, &weights)?
        } else {
            compresslab::exec::CpuExecutor::from_graph(graph)?
        }))
    }

    /// Logits for one `[3, 224, 224]` input.
    pub fn forward(&self, input: &[f32]) -> compresslab::Result<Vec<f32>> {
        let tensor = compresslab::exec::Tensor {
            dims: vec![1, 3, 224, 224],
            data: input.to_vec(),
        };
        Ok(self.0.run(&tensor)?.remove(0).data)
    }

    pub fn kernel_use(&self) -> compresslab::exec::KernelUse {
        self.0.kernel_use()
    }

    pub fn weight_bytes(&self) -> usize {
        self.0.weight_bytes()
    }
}
