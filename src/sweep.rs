//! Sweeps: one compression setting varied at a time (unstructured sparsity, channel ratio,
//! weight bit width × granularity, W8A8), each point measured. On the Fashion-MNIST network
//! against the labelled test set (the page plots them; `compresslab sweep` prints them); on
//! any graph ([`GraphSweep`], the "Your model" tab) against the original's top-1 on held-out
//! inputs, and their labels where known.

pub use compresslab_spec::report::{GraphSweepPoint, SweepAxis, SweepPoint};

use crate::compress::{CompressedModel, Observer, Progress, Recipe, compress};
use crate::error::{EngineError, Result};
use crate::exec::{CpuExecutor, Tensor};
use crate::fashion::Evaluation;
use crate::fashion::{FashionSet, PIXELS, normalize};
use crate::fashion_cpu::{CpuFashionNet, EVAL_BATCH, evaluate_range};
use crate::graph::{Dim, Graph, compress_graph};
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

/// Index of the largest of the first output's values.
fn top1(outputs: &[Tensor]) -> Result<usize> {
    let first = outputs
        .first()
        .ok_or_else(|| EngineError::Execution("the model has no output".into()))?;
    Ok(crate::distill::argmax(&first.data))
}

/// The sweep of one model: the original's top-1 on each held-out input (the CPU interpreter,
/// as every case runs), the calibration inputs for the cases that quantize activations.
pub struct GraphSweep<'a> {
    graph: &'a Graph,
    calibration: Vec<Tensor>,
    held_out: Vec<Tensor>,
    /// Per held-out input: the original's top-1, and the true class where known.
    reference: Vec<usize>,
    truths: Vec<Option<usize>>,
    /// One input's dims with a batch of one, for MACs.
    fed: Vec<Dim>,
}

impl<'a> GraphSweep<'a> {
    /// `held_out`: the inputs every case is measured on (one image each), with their class
    /// where known; `calibration`: other inputs, for the cases that quantize activations.
    pub fn new(
        graph: &'a Graph,
        calibration: Vec<Tensor>,
        held_out: Vec<(Tensor, Option<usize>)>,
    ) -> Result<Self> {
        let Some((first, _)) = held_out.first() else {
            return Err(EngineError::Config(
                "a sweep needs images to measure on that did not calibrate".into(),
            ));
        };
        let fed = std::iter::once(Dim::Known(1))
            .chain(first.dims.iter().skip(1).map(|&d| Dim::Known(d)))
            .collect();
        let original = CpuExecutor::new(graph)?;
        let mut reference = Vec::with_capacity(held_out.len());
        for (input, _) in &held_out {
            reference.push(top1(&original.run(input)?)?);
        }
        let (held_out, truths) = held_out.into_iter().unzip();
        Ok(Self {
            graph,
            calibration,
            held_out,
            reference,
            truths,
            fed,
        })
    }

    /// The cases this model can run: all of [`sweep_cases`], less those that quantize
    /// activations when there is nothing to calibrate on.
    pub fn cases(&self) -> Vec<SweepCase> {
        sweep_cases()
            .into_iter()
            .filter(|c| c.recipe.activations.is_none() || !self.calibration.is_empty())
            .collect()
    }

    /// Compresses the model with the case's recipe (integer kernels where they fit, as the
    /// lab runs it) and measures it; `progress` hears about the compression, and its error
    /// stops the case.
    pub fn run(&self, case: &SweepCase, progress: Progress) -> Result<GraphSweepPoint> {
        let compressed = compress_graph(self.graph, &case.recipe, &self.calibration, progress)?;
        let variant = CpuExecutor::compressed(&compressed)?;
        let (mut same, mut labelled, mut right, mut original_right) = (0, 0, 0, 0);
        let n = self.held_out.len();
        for (i, ((input, &reference), truth)) in
            (0..).zip(self.held_out.iter().zip(&self.reference).zip(&self.truths))
        {
            progress("measuring", i as f32 / n as f32)?;
            let top = top1(&variant.run(input)?)?;
            same += usize::from(top == reference);
            if let Some(truth) = *truth {
                labelled += 1;
                right += usize::from(top == truth);
                original_right += usize::from(reference == truth);
            }
        }
        let stats = compressed.graph.stats_at(&self.fed, &compressed.weights)?;
        Ok(GraphSweepPoint {
            axis: case.axis,
            label: case.label.clone(),
            x: case.x,
            images: self.held_out.len(),
            same,
            labelled,
            right,
            original_right,
            weight_bytes: stats.weight_bytes,
            macs: stats.macs,
        })
    }
}
