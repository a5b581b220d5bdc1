//! The worker's compression lab: builds the compressed variant (from a recipe or an
//! exported file), runs it next to the original on the same executor, and reports size,
//! latency, agreement and per-layer statistics to the page.

use std::cell::RefCell;
use std::collections::HashSet;

use compresslab::classifier::{ImageClassifier, max_abs_diff};
use compresslab::compress::{CompressedModel, Recipe, agreement, compress};
use compresslab::fashion::is_fashion;
use compresslab::gpu_int::GpuFeatures;
use compresslab::labels::top_k;
use compresslab::preprocess::{RgbImage, imagenet_crop, to_nchw};
use js_sys::Uint8Array;
use serde::Deserialize;
use wasm_bindgen_futures::JsFuture;
use web_sys::Blob;

use crate::error::{WorkerError, WorkerResult};
use crate::worker::{Decoded, Loaded, decode_blob, fetch_response, now, post};
use compresslab_spec::messages::{CompressReport, CrossCheck, FromWorker, Latency, VariantSummary};

/// A photo used to compare the variant with the original.
#[derive(Clone)]
pub struct EvalImage {
    pub name: String,
    /// The model's 224×224 crop as 8-bit RGB: a quarter of the memory of the float input,
    /// which matters with 32 photos remembered.
    pub crop: RgbImage,
    /// The original model's logits for it.
    pub logits: Vec<f32>,
}

impl EvalImage {
    /// The model input (NCHW floats).
    pub fn input(&self) -> Vec<f32> {
        to_nchw(&self.crop)
    }
}

/// The current compressed variant (kept for export).
pub struct Variant {
    pub model: CompressedModel,
}

/// Photos kept for agreement: the samples plus the most recent user photos.
const MAX_EVAL_IMAGES: usize = 32;
/// On WebGPU (SwiftShader here: seconds per run) fewer photos are compared.
const MAX_EVAL_IMAGES_GPU: usize = 8;

thread_local! {
    pub static VARIANT: RefCell<Option<Variant>> = const { RefCell::new(None) };
}

pub(crate) fn progress(stage: &str, fraction: f32) {
    post(&FromWorker::CompressProgress {
        stage: stage.to_string(),
        fraction,
    });
}

/// Remembers a classified photo (and the original's logits) for agreement checks, newest
/// last. A photo seen again, or the oldest once the set is full, gives up its slot and its
/// buffers are refilled in place: the set's memory is allocated once, and 1 000 photos
/// leave the heap as it was after 32 (a set rotating fresh buffers fragments it).
pub fn remember(loaded: &Loaded, name: &str, crop: &RgbImage, logits: &[f32]) {
    let mut eval = loaded.eval.borrow_mut();
    let reused = eval
        .iter()
        .position(|e| e.name == name)
        .or_else(|| (eval.len() >= MAX_EVAL_IMAGES).then_some(0));
    let entry = match reused {
        Some(slot) => {
            let mut e = eval.remove(slot);
            e.name.clear();
            e.name.push_str(name);
            e.crop.width = crop.width;
            e.crop.height = crop.height;
            e.crop.pixels.clear();
            e.crop.pixels.extend_from_slice(&crop.pixels);
            e.logits.clear();
            e.logits.extend_from_slice(logits);
            e
        }
        None => EvalImage {
            name: name.to_string(),
            crop: crop.clone(),
            logits: logits.to_vec(),
        },
    };
    eval.push(entry);
}

#[derive(Deserialize)]
struct SampleEntry {
    file: String,
}

/// The file names of the site's sample photos (`samples/index.json`).
pub(crate) async fn sample_names(base: &str) -> WorkerResult<Vec<String>> {
    let resp = fetch_response(&format!("{base}/samples/index.json")).await?;
    let json = JsFuture::from(resp.json().map_err(|e| WorkerError::js("samples", e))?)
        .await
        .map_err(|e| WorkerError::js("samples", e))?;
    let entries: Vec<SampleEntry> =
        serde_wasm_bindgen::from_value(json).map_err(|e| WorkerError::Message(e.to_string()))?;
    Ok(entries.into_iter().map(|e| e.file).collect())
}

/// One of the site's sample photos, decoded.
pub(crate) async fn sample_photo(base: &str, name: &str) -> WorkerResult<Decoded> {
    let resp = fetch_response(&format!("{base}/samples/{name}")).await?;
    let blob: Blob = JsFuture::from(resp.blob().map_err(|e| WorkerError::js("samples", e))?)
        .await
        .map_err(|e| WorkerError::js("samples", e))?
        .into();
    decode_blob(&blob).await
}

/// Adds the site's sample photos to the evaluation set (once), telling `report` how far it is.
async fn ensure_samples(loaded: &Loaded, report: &dyn Fn(&str, f32)) -> WorkerResult<()> {
    if loaded.samples_added.replace(true) {
        return Ok(());
    }
    let names = sample_names(&loaded.asset_base).await?;
    for (i, name) in names.iter().enumerate() {
        report(
            &format!("Preparing sample photos ({}/{})", i + 1, names.len()),
            0.02 * i as f32 / names.len().max(1) as f32,
        );
        let decoded = sample_photo(&loaded.asset_base, name).await?;
        let crop = imagenet_crop(&decoded.image);
        let (logits, _) = loaded.original_logits(&to_nchw(&crop)).await?;
        remember(loaded, name, &crop, &logits);
    }
    Ok(())
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latency from a cold run and the sorted-or-not warm runs.
pub(crate) fn latency(cold_ms: f64, mut times: Vec<f64>) -> Latency {
    times.sort_by(f64::total_cmp);
    Latency {
        cold_ms,
        p50_ms: percentile(&times, 50.0),
        p95_ms: percentile(&times, 95.0),
        runs: times.len() as u32,
    }
}

/// Times the original and the variant the same way: the variant's cold run is its first
/// after building, the original's its first on this backend (`original_cold_ms`, the page's
/// first classification); then `runs` warm runs of each, interleaved and alternating which
/// goes first, so a slow spell of the machine or a warming cache hits both alike.
/// Returns (original, variant, the variant's logits).
pub(crate) async fn time_side_by_side(
    original: &ImageClassifier,
    original_cold_ms: Option<f64>,
    variant: &ImageClassifier,
    input: &[f32],
    runs: u32,
) -> WorkerResult<(Latency, Latency, Vec<f32>)> {
    let start = now();
    let logits = variant.logits(input).await?;
    let variant_cold = now() - start;
    let original_cold = match original_cold_ms {
        Some(ms) => ms,
        None => {
            let start = now();
            original.logits(input).await?;
            now() - start
        }
    };
    let mut original_times = Vec::with_capacity(runs as usize);
    let mut variant_times = Vec::with_capacity(runs as usize);
    for run in 0..runs {
        crate::cancel::checkpoint().await?;
        let order = if run % 2 == 0 {
            [
                (original, &mut original_times),
                (variant, &mut variant_times),
            ]
        } else {
            [
                (variant, &mut variant_times),
                (original, &mut original_times),
            ]
        };
        for (classifier, times) in order {
            let start = now();
            classifier.logits(input).await?;
            times.push(now() - start);
        }
    }
    Ok((
        latency(original_cold, original_times),
        latency(variant_cold, variant_times),
        logits,
    ))
}

async fn blob_bytes(blob: &Blob) -> WorkerResult<Vec<u8>> {
    let buf = JsFuture::from(blob.array_buffer())
        .await
        .map_err(|e| WorkerError::js("read file", e))?;
    Ok(Uint8Array::new(&buf).to_vec())
}

/// Builds the variant from `recipe` or from an exported file, then measures it.
pub async fn run(
    loaded: std::rc::Rc<Loaded>,
    recipe: Option<Recipe>,
    file: Option<(String, Blob)>,
    runs: u32,
) -> WorkerResult<()> {
    let runs = runs.clamp(1, 200);
    let start = now();
    let loaded = &*loaded;
    // Read an uploaded file first: a Fashion-MNIST export goes to its own lab, without
    // running the photo model on the sample photos (seconds each on SwiftShader).
    let exported = match &file {
        Some((name, blob)) => {
            progress(&format!("Reading {name}"), 0.05);
            let model = CompressedModel::from_safetensors(&blob_bytes(blob).await?)?;
            if is_fashion(&model.store) {
                return crate::fashion_lab::run(
                    &loaded.asset_base,
                    None,
                    Some((name.clone(), model)),
                )
                .await;
            }
            Some((name.clone(), model))
        }
        None => None,
    };
    let (model, source, measured, seen) = match (recipe, exported) {
        (_, Some((name, model))) => {
            // A loaded export lists the photos it saw: it is measured on the others.
            let (measured, seen) = eval_images(loaded, &progress, &model.seen_images).await?;
            (model, name, measured, seen)
        }
        (Some(recipe), None) => {
            let (mut eval, _) = eval_images(loaded, &progress, &[]).await?;
            // Calibrated activations: the older half of the photos (the samples) calibrates,
            // the newer half (the visitor's own first) measures agreement, so the figure
            // comes from photos the variant did not see.
            let calibrating = match recipe.activations {
                Some(_) => eval.split_off(eval.len() / 2),
                None => Vec::new(),
            };
            let calibration: Vec<Vec<f32>> = calibrating.iter().map(EvalImage::input).collect();
            let mut model = compress(&loaded.store, &recipe, &calibration, &mut |stage, f| {
                progress(&format!("Compressing: {stage}"), 0.05 + 0.4 * f);
                crate::cancel::check()
            })?;
            model.seen_images = calibrating
                .iter()
                .map(|e| file_name(&e.name).to_string())
                .collect();
            let seen = calibrating.len();
            (model, "recipe".to_string(), eval, seen)
        }
        (None, None) => return Err(WorkerError::Message("nothing to compress".into())),
    };
    let elapsed = now() - start;
    measure(loaded, model, source, runs, elapsed, &measured, seen).await
}

/// `folder/…/name.jpg` → `name.jpg`.
pub(crate) fn file_name(path: &str) -> &str {
    path.rsplit(['/', '\\']).next().unwrap_or(path)
}

/// The photos a variant is compared on: the newest first (the user's own come after the
/// samples), fewer on WebGPU, leaving out those named in `seen` (a variant calibrated or
/// trained on them; matched by file name) before the cap. Also returns how many were left
/// out. `report` hears about preparing the samples (the first time).
pub async fn eval_images(
    loaded: &Loaded,
    report: &dyn Fn(&str, f32),
    seen: &[String],
) -> WorkerResult<(Vec<EvalImage>, usize)> {
    ensure_samples(loaded, report).await?;
    let cap = if loaded.device.is_some() {
        MAX_EVAL_IMAGES_GPU
    } else {
        MAX_EVAL_IMAGES
    };
    let seen: HashSet<&str> = seen.iter().map(|s| file_name(s)).collect();
    let eval = loaded.eval.borrow();
    let (kept, left_out): (Vec<&EvalImage>, Vec<&EvalImage>) = eval
        .iter()
        .rev()
        .partition(|e| !seen.contains(file_name(&e.name)));
    Ok((
        kept.into_iter().take(cap).cloned().collect(),
        left_out.len(),
    ))
}

/// Builds `model` on the page's executor, times it next to the original, compares them on
/// `eval` (photos that did not calibrate or train it; `excluded` others did), makes it the
/// current variant and reports it to the page.
#[allow(clippy::too_many_arguments)]
pub async fn measure(
    loaded: &Loaded,
    model: CompressedModel,
    source: String,
    runs: u32,
    build_ms: f64,
    eval: &[EvalImage],
    excluded: usize,
) -> WorkerResult<()> {
    let on_gpu = loaded.device.is_some();
    let labels = loaded.classifier.labels().clone();
    progress("Building the compressed model on this backend", 0.5);
    let variant = match &loaded.device {
        Some(device) => ImageClassifier::new_compressed(
            &model,
            labels.clone(),
            device,
            Some(GpuFeatures {
                packed_dot4: loaded.backend.has_packed_dot4(),
            }),
        )?,
        None => ImageClassifier::new_compressed_cpu(&model, labels.clone())?,
    };
    let (photo, input) = match loaded.last.borrow().clone() {
        Some((name, input)) => (name, input),
        // Timing needs a photo, not a held-out one: any remembered photo will do.
        None => eval
            .first()
            .or(loaded.eval.borrow().last())
            .map(|e| (e.name.clone(), e.input()))
            .ok_or_else(|| WorkerError::Message("no photo to measure on".into()))?,
    };
    progress(
        "Timing the original and the compressed model, interleaved",
        0.55,
    );
    let (before_latency, after_latency, after_logits) = time_side_by_side(
        &loaded.classifier,
        loaded.cold_ms.get(),
        &variant,
        &input,
        runs,
    )
    .await?;
    let before_logits = loaded.classifier.logits(&input).await?;
    let mut agree = 0;
    let mut kl_sum = 0.0;
    for (i, e) in eval.iter().enumerate() {
        progress(
            &format!("Comparing with the original ({}/{})", i + 1, eval.len()),
            0.8 + 0.15 * i as f32 / eval.len().max(1) as f32,
        );
        crate::cancel::checkpoint().await?;
        let logits = variant.logits(&e.input()).await?;
        let (same, kl) = agreement(&e.logits, &logits);
        agree += same as usize;
        kl_sum += kl;
    }
    let cross_check = if on_gpu {
        progress("Checking WebGPU against the CPU", 0.96);
        let cpu = ImageClassifier::new_compressed_cpu(&model, labels.clone())?;
        let cpu_logits = cpu.logits(&input).await?;
        let (top1_same, kl) = agreement(&cpu_logits, &after_logits);
        Some(CrossCheck {
            top1_same,
            max_abs_diff: max_abs_diff(&cpu_logits, &after_logits),
            kl,
        })
    } else {
        None
    };
    let original = CompressedModel::original(&loaded.store)?;
    let executor = match &loaded.device {
        Some(_) => format!("WebGPU ({})", loaded.backend.description),
        None => "CPU fallback".to_string(),
    };
    let kernels = kernels_summary(
        &model,
        variant.integer_layers(),
        KernelPlace::new(on_gpu, loaded.backend.has_packed_dot4()),
    );
    let report = CompressReport {
        recipe: model.recipe.clone(),
        source,
        executor,
        before: VariantSummary {
            stats: original.stats()?,
            held_bytes: loaded.classifier.held_weight_bytes(),
            latency: before_latency,
            top5: top_k(&before_logits, 5, &labels),
        },
        after: VariantSummary {
            stats: model.stats()?,
            held_bytes: variant.held_weight_bytes(),
            latency: after_latency,
            top5: top_k(&after_logits, 5, &labels),
        },
        photo,
        eval_images: eval.len(),
        excluded_images: excluded,
        top1_agreement: agree,
        mean_kl: kl_sum / eval.len().max(1) as f64,
        build_ms,
        layers: model.layer_stats()?,
        cross_check,
        kernels,
    };
    VARIANT.with(|v| *v.borrow_mut() = Some(Variant { model }));
    post(&FromWorker::Compressed(Box::new(report)));
    Ok(())
}

/// Posts the current variant as the lab's safetensors, or as ONNX for other runtimes.
pub fn export(onnx: bool) -> WorkerResult<()> {
    let (weights, recipe_json, file_name) =
        VARIANT.with(|v| -> WorkerResult<(Vec<u8>, String, String)> {
            let v = v.borrow();
            let variant = v
                .as_ref()
                .ok_or_else(|| WorkerError::Message("apply a compression first".into()))?;
            let model = &variant.model;
            let stem = if is_fashion(&model.store) {
                "compressed-fashion-mnist-cnn"
            } else {
                "compressed-efficientnet-lite0"
            };
            let (bytes, extension) = if onnx {
                (model.to_onnx()?, "onnx")
            } else {
                (model.to_safetensors()?, "safetensors")
            };
            Ok((bytes, model.recipe.to_json(), format!("{stem}.{extension}")))
        })?;
    post(&FromWorker::Exported {
        weights,
        recipe_json,
        file_name,
    });
    Ok(())
}

/// Where a variant's layers run, for [`layer_kernels`]' words.
#[derive(Clone, Copy)]
pub(crate) enum KernelPlace {
    /// WebGPU; `no_dot4`: the adapter lacks WGSL's `packed_4x8_integer_dot_product`.
    Gpu {
        no_dot4: bool,
    },
    Cpu,
}

impl KernelPlace {
    /// On WebGPU when `gpu`, else on the CPU.
    pub(crate) fn new(gpu: bool, has_packed_dot4: bool) -> Self {
        if gpu {
            Self::Gpu {
                no_dot4: !has_packed_dot4,
            }
        } else {
            Self::Cpu
        }
    }
}

/// Which of `model`'s layers ran on an integer kernel and which as float, in words.
pub(crate) fn kernels_summary(
    model: &CompressedModel,
    (int8, int4): (usize, usize),
    place: KernelPlace,
) -> String {
    let total = model.layers.len();
    let quantized = model.layers.iter().filter(|l| l.weights.is_some()).count();
    layer_kernels(total, quantized, (int8, int4), place)
}

/// [`kernels_summary`] from counts: `total` layers with weights, `quantized` of them
/// quantized, `int8` and `int4` of those on integer kernels.
fn layer_kernels(
    total: usize,
    quantized: usize,
    (int8, int4): (usize, usize),
    place: KernelPlace,
) -> String {
    if quantized == 0 {
        return format!("all {total} layers in float32 (no quantized weights)");
    }
    let mut text =
        format!("{int8} of {total} layers on the int8 kernel, {int4} on the int4 kernel");
    if int4 > 0 && matches!(place, KernelPlace::Cpu) {
        text += " (1×1 and Gemm as integer products with each pixel's inputs rounded to 16 bits, the others unpacked to float)";
    }
    let float = quantized.saturating_sub(int8 + int4);
    match float {
        0 => {}
        1 => text += "; 1 quantized layer ran as float on its dequantized weights",
        _ => {
            text += &format!("; {float} quantized layers ran as float on their dequantized weights")
        }
    }
    if let KernelPlace::Gpu { no_dot4: true } = place {
        text += &format!(
            " (this adapter lacks WGSL {}, which the int8 kernel needs)",
            compresslab_spec::messages::PACKED_DOT4
        );
    }
    text
}
