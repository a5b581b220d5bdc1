//! Accuracy sweeps on the Fashion-MNIST network: one compression setting varied at a time
//! (unstructured sparsity, channel ratio, weight bit width × granularity), each point
//! measured on the labelled test set. The page plots them; `compresslab sweep` prints them.

pub use compresslab_spec::report::{SweepAxis, SweepPoint};

use crate::compress::{CompressedModel, Observer, Progress, Recipe, compress};
use crate::error::Result;
use crate::fashion::Evaluation;
use crate::fashion::{FashionSet, PIXELS, normalize};
use crate::fashion_cpu::{CpuFashionNet, EVAL_BATCH, evaluate_range};
use crate::prune::{ChannelPruning, ChannelRanking, MagnitudePruning, PruneScope};
use crate::quant::{Granularity, QuantScheme};
use crate::weights::TensorStore;

#[derive(Debug, Clone, PartialEq)]
pub struct SweepCase {
    pub axis: SweepAxis,
    pub label: String,
    pub x: f32,
    pub recipe: Recipe,
}

/// Sparsity and channel ratios swept, in %.
pub const SWEEP_PERCENTS: [u32; 12] = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 93, 95];

/// Every case, in the order they are run.
pub fn sweep_cases() -> Vec<SweepCase> {
    let mut cases = Vec::new();
    for axis in [SweepAxis::Sparsity, SweepAxis::Channels] {
        for &p in &SWEEP_PERCENTS {
            let f = p as f32 / 100.0;
            let (label, recipe) = match axis {
                SweepAxis::Sparsity => (
                    format!("{p} % zero weights"),
                    Recipe {
                        magnitude_pruning: Some(MagnitudePruning {
                            sparsity: f,
                            scope: PruneScope::PerLayer,
                            exclude: Vec::new(),
                            exclude_ends: false,
                        }),
                        ..Recipe::default()
                    },
                ),
                _ => (
                    format!("{p} % channels removed"),
                    Recipe {
                        channel_pruning: Some(ChannelPruning {
                            ratio: f,
                            ranking: ChannelRanking::L2,
                        }),
                        ..Recipe::default()
                    },
                ),
            };
            cases.push(SweepCase {
                axis,
                label,
                x: p as f32,
                recipe,
            });
        }
    }
    let granularities = [
        ("per-tensor", Granularity::PerTensor),
        ("per-channel", Granularity::PerChannel),
        ("per-block 32", Granularity::PerBlock(32)),
    ];
    for bits in [8u8, 4] {
        for (name, granularity) in granularities {
            cases.push(SweepCase {
                axis: SweepAxis::Quantization,
                label: format!("int{bits} {name}"),
                x: bits as f32,
                recipe: Recipe {
                    weights: Some(QuantScheme {
                        bits,
                        symmetric: true,
                        granularity,
                    }),
                    ..Recipe::default()
                },
            });
        }
    }
    cases.push(SweepCase {
        axis: SweepAxis::Quantization,
        label: "W8A8 per-channel".into(),
        x: 8.0,
        recipe: Recipe::w8a8(Granularity::PerChannel, Observer::MinMax),
    });
    cases
}

/// Calibration batches (normalised images, [`EVAL_BATCH`] per entry) from a labelled set.
pub fn calibration_batches(set: &FashionSet) -> Vec<Vec<f32>> {
    set.images
        .chunks(EVAL_BATCH * PIXELS)
        .map(normalize)
        .collect()
}

/// Accuracy of a compressed model on the first `images` of `test` (integer kernels on).
pub fn evaluate_model(
    model: &CompressedModel,
    test: &FashionSet,
    images: usize,
) -> Result<Evaluation> {
    evaluate_in_batches(model, test, images, &mut |_, _| Ok(()))
}

/// [`evaluate_model`], telling `progress` before every batch (its error stops the run).
fn evaluate_in_batches(
    model: &CompressedModel,
    test: &FashionSet,
    images: usize,
    progress: Progress,
) -> Result<Evaluation> {
    let net = CpuFashionNet::from_compressed(model, true)?;
    let n = images.min(test.len());
    let mut eval = Evaluation::new();
    for start in (0..n).step_by(EVAL_BATCH) {
        progress("evaluating", start as f32 / n.max(1) as f32)?;
        evaluate_range(&net, test, start..(start + EVAL_BATCH).min(n), &mut eval)?;
    }
    Ok(eval)
}

/// Compresses `original` with the case's recipe and measures it; `progress` hears about
/// compression (first half) and every batch of test images (second half), and its error
/// stops the case.
pub fn run_case(
    original: &TensorStore,
    case: &SweepCase,
    calibration: &[Vec<f32>],
    test: &FashionSet,
    images: usize,
    progress: Progress,
) -> Result<SweepPoint> {
    let model = compress(original, &case.recipe, calibration, &mut |stage, f| {
        progress(stage, 0.5 * f)
    })?;
    let eval = evaluate_in_batches(&model, test, images, &mut |stage, f| {
        progress(stage, 0.5 + 0.5 * f)
    })?;
    let stats = model.stats()?;
    Ok(SweepPoint {
        axis: case.axis,
        label: case.label.clone(),
        x: case.x,
        accuracy: eval.accuracy(),
        images: eval.images,
        weight_bytes: stats.weight_bytes,
        macs: stats.nonzero_macs,
    })
}
