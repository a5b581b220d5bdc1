//! The device report: what each standard compression buys on the visitor's own machine.
//! fp32, int8 W8A8 per channel, int4 weight-only per block of 32 and 50 % of the channels
//! removed, each built on WebGPU (when the page runs there) and on the CPU fallback, and
//! timed on the last photo: one cold run each, then warm runs taken round-robin across the
//! variants of an executor, so a slow spell of the machine hits all of them alike.

use std::rc::Rc;

use compresslab::classifier::ImageClassifier;
use compresslab::compress::{CompressedModel, Observer, Recipe, compress};
use compresslab::gpu_int::GpuFeatures;
use compresslab::prune::{ChannelPruning, ChannelRanking};
use compresslab::quant::{Granularity, QuantScheme};

use crate::error::{WorkerError, WorkerResult};
use crate::lab::{EvalImage, KernelPlace, eval_images, kernels_summary, latency};
use crate::worker::{Loaded, now, post};
use compresslab_spec::messages::{BackendKind, DeviceReport, DeviceRow, FromWorker};

/// The variants, by name (None: the original network).
fn variants() -> Vec<(&'static str, Option<Recipe>)> {
    vec![
        ("fp32", None),
        (
            "int8 W8A8 per channel",
            Some(Recipe::w8a8(Granularity::PerChannel, Observer::MinMax)),
        ),
        (
            "int4 weight-only per block of 32",
            Some(Recipe {
                weights: Some(QuantScheme {
                    bits: 4,
                    symmetric: true,
                    granularity: Granularity::PerBlock(32),
                }),
                ..Recipe::default()
            }),
        ),
        (
            "50 % channels removed (L1)",
            Some(Recipe {
                channel_pruning: Some(ChannelPruning {
                    ratio: 0.5,
                    ranking: ChannelRanking::L1,
                }),
                ..Recipe::default()
            }),
        ),
    ]
}

/// One built row before timing: its name, stored and held bytes, and what runs it.
struct Built {
    variant: String,
    weight_bytes: usize,
    held_bytes: usize,
    ran: String,
    classifier: ImageClassifier,
    cold_ms: f64,
    times: Vec<f64>,
}

impl Built {
    fn new(
        variant: String,
        weight_bytes: usize,
        held_bytes: usize,
        ran: String,
        classifier: ImageClassifier,
    ) -> Self {
        Built {
            variant,
            weight_bytes,
            held_bytes,
            ran,
            classifier,
            cold_ms: 0.0,
            times: Vec::new(),
        }
    }
}

fn progress(stage: String, fraction: f32) {
    post(&FromWorker::DeviceReportProgress { stage, fraction });
}

/// Builds every variant, times it on every executor and posts the report.
pub async fn run(loaded: Rc<Loaded>, runs: u32) -> WorkerResult<()> {
    let runs = runs.clamp(1, 100);
    let (photo, input) = loaded
        .last
        .borrow()
        .clone()
        .ok_or_else(|| WorkerError::Message("classify a photo first".into()))?;
    progress("Compressing the variants".into(), 0.0);
    // W8A8 calibrates its activations on the photos the lab compares with.
    let calibration: Vec<Vec<f32>> =
        eval_images(&loaded, &|stage, f| progress(stage.into(), f), &[])
            .await?
            .0
            .iter()
            .map(EvalImage::input)
            .collect();
    let mut models = Vec::new();
    for (name, recipe) in variants() {
        let model = match &recipe {
            None => CompressedModel::original(&loaded.store)?,
            Some(r) => compress(&loaded.store, r, &calibration, &mut |_, _| {
                crate::cancel::check()
            })?,
        };
        models.push((name, recipe.is_none(), model));
    }
    let labels = loaded.classifier.labels().clone();
    let mut executors = Vec::new();
    if let Some(device) = &loaded.device {
        executors.push((BackendKind::WebGpu, Some(device)));
    }
    executors.push((BackendKind::Cpu, None));
    let packed_dot4 = loaded.backend.has_packed_dot4();
    let mut rows = Vec::new();
    for (e, (kind, device)) in executors.iter().enumerate() {
        let on = match kind {
            BackendKind::WebGpu => "WebGPU",
            BackendKind::Cpu => "the CPU",
        };
        let share = |step: f32| (e as f32 + step) / executors.len() as f32;
        let mut built: Vec<Built> = Vec::new();
        for (i, (name, original, model)) in models.iter().enumerate() {
            progress(
                format!("Building {name} on {on}"),
                share(0.3 * i as f32 / models.len() as f32),
            );
            crate::cancel::checkpoint().await?;
            let classifier = match (device, original) {
                (Some(d), true) => ImageClassifier::new(&loaded.store, labels.clone(), d)?,
                (Some(d), false) => ImageClassifier::new_compressed(
                    model,
                    labels.clone(),
                    d,
                    Some(GpuFeatures { packed_dot4 }),
                )?,
                (None, true) => ImageClassifier::new_cpu(&loaded.store, labels.clone())?,
                (None, false) => ImageClassifier::new_compressed_cpu(model, labels.clone())?,
            };
            built.push(Built::new(
                name.to_string(),
                model.stats()?.weight_bytes,
                classifier.held_weight_bytes(),
                kernels_summary(
                    model,
                    classifier.integer_layers(),
                    KernelPlace::new(device.is_some(), packed_dot4),
                ),
                classifier,
            ));
        }
        for b in built.iter_mut() {
            let start = now();
            b.classifier.logits(&input).await?;
            b.cold_ms = now() - start;
        }
        for r in 0..runs {
            progress(
                format!("Timing on {on}: run {} of {runs}", r + 1),
                share(0.3 + 0.7 * r as f32 / runs as f32),
            );
            crate::cancel::checkpoint().await?;
            for b in built.iter_mut() {
                let start = now();
                b.classifier.logits(&input).await?;
                b.times.push(now() - start);
            }
        }
        for b in built {
            rows.push(DeviceRow {
                variant: b.variant,
                backend: kind.clone(),
                latency: latency(b.cold_ms, b.times),
                weight_bytes: b.weight_bytes,
                held_bytes: b.held_bytes,
                ran: b.ran,
            });
        }
    }
    let cores = crate::worker::scope().navigator().hardware_concurrency();
    post(&FromWorker::DeviceReported(Box::new(DeviceReport {
        adapter: loaded
            .device
            .as_ref()
            .map(|_| loaded.backend.description.clone()),
        cpu: format!(
            "compresslab CPU kernels (wasm SIMD128, 1 thread; this browser reports {cores} logical cores)"
        ),
        photo,
        runs,
        rows,
    })));
    Ok(())
}
