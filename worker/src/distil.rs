//! The worker's distillation: the user's images (or the site's training sample) become a
//! labelled / unlabelled set with a stratified held-out split; the network a recipe
//! compresses is fine-tuned from the original (burn autodiff, on WebGPU when the worker
//! runs there), step by step so the page can follow, pause and cancel; at the end it is
//! re-quantized with the recipe and measured as deployed.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use burn::prelude::*;
use compresslab::compress::{CompressedModel, Recipe, compress};
use compresslab::distill::{
    DistillConfig, Distiller, HELDOUT_FRACTION, HeldOutReport, SPLIT_SEED, StepReport, requantize,
    student_for,
};
use compresslab::fashion::{
    CLASSES, FashionSet, PIXELS, UNLABELLED, class_for_name, fitted_size, normalize,
    pixels_from_fitted,
};
use compresslab::fashion_cpu::{CpuFashionNet, EVAL_BATCH, predictions};
use compresslab::finetune_photo::PhotoFineTune;
use js_sys::Array;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    Blob, ImageBitmap, ImageBitmapOptions, OffscreenCanvas, OffscreenCanvasRenderingContext2d,
    ResizeQuality,
};

use crate::error::{WorkerError, WorkerResult};
use crate::fashion_lab::{self, FashionAssets, Original};
use crate::lab::{VARIANT, Variant};
use crate::worker::{Loaded, now, post, scope};
use compresslab_spec::messages::{
    DistilAction, DistilBench, DistilData, DistilEpoch, DistilReport, DistilSettings, DistilSide,
    DistilStep, DistilTarget, FashionReport, FromWorker,
};

/// At most this many images are kept (784 bytes each), however many are dropped.
pub const MAX_IMAGES: usize = DistilTarget::Fashion.max_images();
const REJECTIONS_LISTED: usize = 5;
const PREVIEW_IMAGES: usize = 12;

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Control {
    Run,
    Pause,
    Cancel,
}

struct UserData {
    source: String,
    set: FashionSet,
}

thread_local! {
    static DATA: RefCell<Option<Rc<UserData>>> = const { RefCell::new(None) };
    pub(crate) static CONTROL: Cell<Control> = const { Cell::new(Control::Run) };
    pub(crate) static RUNNING: Cell<bool> = const { Cell::new(false) };
}

/// The label a file's path gives: its parent folder's name, when that is a class.
fn label_of(path: &str) -> (u8, Option<String>) {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    match parts.len().checked_sub(2).and_then(|i| parts.get(i)) {
        Some(folder) => match class_for_name(folder) {
            Some(class) => (class, None),
            None => (UNLABELLED, Some(folder.to_string())),
        },
        None => (UNLABELLED, None),
    }
}

/// One image file as the network's 28×28 grey input (the browser decodes and scales).
async fn fashion_pixels(blob: &Blob) -> WorkerResult<Vec<u8>> {
    let bitmap: ImageBitmap = JsFuture::from(
        scope()
            .create_image_bitmap_with_blob(blob)
            .map_err(|e| WorkerError::js("createImageBitmap", e))?,
    )
    .await
    .map_err(|_| WorkerError::Decode {
        hint: " (not a supported image format, or a corrupt file)".into(),
    })?
    .unchecked_into();
    let (w, h) = fitted_size(bitmap.width() as usize, bitmap.height() as usize);
    bitmap.close();
    // A second decode scaled by the browser's high-quality resampler (no aliasing).
    let options = ImageBitmapOptions::new();
    options.set_resize_width(w as u32);
    options.set_resize_height(h as u32);
    options.set_resize_quality(ResizeQuality::High);
    let small: ImageBitmap = JsFuture::from(
        scope()
            .create_image_bitmap_with_blob_and_image_bitmap_options(blob, &options)
            .map_err(|e| WorkerError::js("createImageBitmap", e))?,
    )
    .await
    .map_err(|e| WorkerError::js("createImageBitmap", e))?
    .unchecked_into();
    let canvas =
        OffscreenCanvas::new(w as u32, h as u32).map_err(|e| WorkerError::js("canvas", e))?;
    let ctx: OffscreenCanvasRenderingContext2d = canvas
        .get_context("2d")
        .map_err(|e| WorkerError::js("canvas", e))?
        .ok_or_else(|| WorkerError::Message("no 2d canvas context".into()))?
        .unchecked_into();
    ctx.draw_image_with_image_bitmap(&small, 0.0, 0.0)
        .map_err(|e| WorkerError::js("canvas", e))?;
    small.close();
    let rgba = ctx
        .get_image_data(0.0, 0.0, w as f64, h as f64)
        .map_err(|e| WorkerError::js("canvas", e))?
        .data()
        .0;
    Ok(pixels_from_fitted(&rgba, w, h)?)
}

fn summary(
    data: &UserData,
    unmatched: Vec<String>,
    rejected: Vec<String>,
    rejected_count: usize,
) -> DistilData {
    let (train, heldout) = data.set.stratified_split(HELDOUT_FRACTION, SPLIT_SEED);
    let counts = |idx: &[usize]| -> Vec<u32> {
        let mut c = vec![0u32; CLASSES + 1];
        for &i in idx {
            c[usize::from(data.set.labels[i]).min(CLASSES)] += 1;
        }
        c
    };
    DistilData {
        source: data.source.clone(),
        images: data.set.len() as u32,
        train_counts: counts(&train),
        heldout_counts: counts(&heldout),
        unmatched,
        rejected,
        rejected_count: rejected_count as u32,
        class_names: Vec::new(),
        label_mode: String::new(),
        thumbs: Vec::new(),
        preview: (0..data.set.len().min(PREVIEW_IMAGES))
            .map(|i| {
                // Spread over the set, so several folders show.
                let j = i * data.set.len() / data.set.len().clamp(1, PREVIEW_IMAGES);
                (data.set.labels[j], data.set.image(j).to_vec().into())
            })
            .collect(),
    }
}

/// Decodes the dropped files into the distillation set.
pub async fn load_images(paths: Vec<String>, blobs: Array) -> WorkerResult<()> {
    if RUNNING.get() {
        return Err(WorkerError::Message(
            "a fine-tune is running: cancel it before changing the images".into(),
        ));
    }
    let total = paths.len().min(blobs.length() as usize);
    let mut set = FashionSet::default();
    let mut unmatched: Vec<String> = Vec::new();
    let (mut rejected, mut rejected_count) = (Vec::new(), 0);
    for (i, path) in paths.iter().take(total).enumerate() {
        if set.len() >= MAX_IMAGES {
            rejected_count += total - i;
            rejected.push(format!(
                "{} more files left out: at most {MAX_IMAGES} images are kept",
                total - i
            ));
            break;
        }
        if i % 16 == 0 {
            post(&FromWorker::DistilLoading {
                done: i as u32,
                total: total as u32,
            });
        }
        let blob: Blob = blobs.get(i as u32).unchecked_into();
        match fashion_pixels(&blob).await {
            Ok(pixels) => {
                let (label, folder) = label_of(path);
                if let Some(f) = folder
                    && !unmatched.contains(&f)
                {
                    unmatched.push(f);
                }
                set.labels.push(label);
                set.images.extend_from_slice(&pixels);
            }
            Err(e) => {
                rejected_count += 1;
                if rejected.len() < REJECTIONS_LISTED {
                    rejected.push(format!("{path}: {e}"));
                }
            }
        }
    }
    if set.is_empty() {
        return Err(WorkerError::Message(format!(
            "none of the {total} files could be read as an image"
        )));
    }
    let data = UserData {
        source: format!("{} dropped images", set.len()),
        set,
    };
    post(&FromWorker::DistilData(summary(
        &data,
        unmatched,
        rejected,
        rejected_count,
    )));
    DATA.with(|d| *d.borrow_mut() = Some(Rc::new(data)));
    Ok(())
}

/// Uses the site's labelled training sample (100 images per class).
pub async fn load_builtin(asset_base: &str) -> WorkerResult<()> {
    if RUNNING.get() {
        return Err(WorkerError::Message(
            "a fine-tune is running: cancel it before changing the images".into(),
        ));
    }
    let a = fashion_lab::assets(asset_base).await?;
    let data = UserData {
        source: format!("{} Fashion-MNIST training images", a.training_sample.len()),
        set: a.training_sample.clone(),
    };
    post(&FromWorker::DistilData(summary(
        &data,
        Vec::new(),
        Vec::new(),
        0,
    )));
    DATA.with(|d| *d.borrow_mut() = Some(Rc::new(data)));
    Ok(())
}

pub fn control(action: DistilAction) {
    if !RUNNING.get() {
        return;
    }
    CONTROL.set(match action {
        DistilAction::Pause => Control::Pause,
        DistilAction::Resume => Control::Run,
        DistilAction::Cancel => Control::Cancel,
    });
    // "Paused" is said by the run itself at its next step boundary (see `cancelled`), so no
    // step still on its way can arrive after it.
    if action == DistilAction::Resume {
        post(&FromWorker::DistilPaused { paused: false });
    }
}

/// Predictions of `net` on `set` (normalised in batches).
fn predict(net: &CpuFashionNet, set: &FashionSet) -> WorkerResult<Vec<usize>> {
    let mut out = Vec::with_capacity(set.len());
    for start in (0..set.len()).step_by(EVAL_BATCH) {
        let end = (start + EVAL_BATCH).min(set.len());
        out.extend(predictions(
            &net.forward(&normalize(&set.images[start * PIXELS..end * PIXELS]))?,
        ));
    }
    Ok(out)
}

/// Accuracy on the labelled images and agreement with `teacher`'s predictions.
fn heldout_scores(preds: &[usize], teacher: &[usize], set: &FashionSet) -> (Option<f64>, f64) {
    let labelled: Vec<usize> = (0..set.len())
        .filter(|&i| set.labels[i] != UNLABELLED)
        .collect();
    let accuracy = (!labelled.is_empty()).then(|| {
        labelled
            .iter()
            .filter(|&&i| preds[i] == usize::from(set.labels[i]))
            .count() as f64
            / labelled.len() as f64
    });
    let agree = preds.iter().zip(teacher).filter(|(a, b)| a == b).count();
    (accuracy, agree as f64 / preds.len().max(1) as f64)
}

/// The deployed network's numbers: held-out and whole test set.
async fn side(
    a: &FashionAssets,
    original: &Original,
    model: &CompressedModel,
    heldout: &FashionSet,
    teacher_heldout: &[usize],
) -> WorkerResult<(DistilSide, FashionReport)> {
    let net = CpuFashionNet::from_compressed(model, true)?;
    let (heldout_accuracy, heldout_agreement) =
        heldout_scores(&predict(&net, heldout)?, teacher_heldout, heldout);
    let report = fashion_lab::evaluate_variant(a, original, model, "distilled".into(), 0.0).await?;
    Ok((
        DistilSide {
            heldout_accuracy,
            heldout_agreement,
            test_accuracy: Some(report.after.eval.accuracy()),
            test_agreement: Some(report.same_prediction as f64 / a.test.len().max(1) as f64),
            ms_per_image: report.after.ms_per_image,
            stats: report.after.stats.clone(),
        },
        report,
    ))
}

pub(crate) fn stage(text: &str, fraction: f32) {
    post(&FromWorker::CompressProgress {
        stage: text.to_string(),
        fraction,
    });
}

/// Fine-tunes the network `recipe` compresses, from the original, on the loaded images.
pub async fn run(
    loaded: Rc<Loaded>,
    recipe: Recipe,
    settings: DistilSettings,
    target: DistilTarget,
) -> WorkerResult<()> {
    if RUNNING.replace(true) {
        return Err(WorkerError::Message(
            "a fine-tune is already running".into(),
        ));
    }
    CONTROL.set(Control::Run);
    let result = match target {
        DistilTarget::Fashion => train(&loaded, recipe, settings).await,
        DistilTarget::Photos => crate::distil_photo::train(&loaded, recipe, settings).await,
    };
    RUNNING.set(false);
    result
}

/// Waits while paused; true when the run was cancelled (after `done` of `total` steps,
/// which the page is told).
pub(crate) async fn cancelled(done: usize, total: u32) -> bool {
    let mut told = false;
    loop {
        match CONTROL.get() {
            Control::Run => return false,
            Control::Pause => {
                if !told {
                    post(&FromWorker::DistilPaused { paused: true });
                    told = true;
                }
                crate::worker::sleep_ms(100).await
            }
            Control::Cancel => {
                post(&FromWorker::DistilStopped {
                    message: format!(
                        "Cancelled after {done} of {total} steps; the compressed network is unchanged."
                    ),
                    cancelled: true,
                });
                return true;
            }
        }
    }
}

/// The engine's configuration for the page's settings, and whether it is
/// quantization-aware (when asked and the recipe quantizes weights).
pub(crate) fn engine_config(settings: &DistilSettings, recipe: &Recipe) -> (DistillConfig, bool) {
    let qat = settings.qat && recipe.weights.is_some();
    let cfg = DistillConfig {
        temperature: settings.temperature,
        alpha: settings.alpha,
        learning_rate: settings.learning_rate,
        epochs: settings.epochs as usize,
        batch_size: settings.batch_size as usize,
        seed: 7,
        layers: settings.layers,
        augment: true,
        weight_quant: if qat { recipe.weights } else { None },
        fp32_layers: recipe.keep_fp32.clone(),
        feature_blocks: settings
            .feature_blocks
            .iter()
            .map(|&b| usize::from(b))
            .collect(),
        feature_weight: settings.feature_weight,
    };
    (cfg, qat)
}

/// The autodiff device training runs on (the page's WebGPU device, else burn's Flex CPU
/// backend) and how the page names it.
pub(crate) fn training_device(loaded: &Loaded) -> (Device, String) {
    match &loaded.device {
        Some(d) => (
            d.clone().autodiff(),
            format!("WebGPU · {}", loaded.backend.description),
        ),
        None => (
            Device::flex().autodiff(),
            "CPU · burn Flex (wasm SIMD128)".to_string(),
        ),
    }
}

/// A fine-tune the worker drives one step at a time (either network).
pub(crate) trait StepwiseRun {
    fn is_done(&self) -> bool;
    fn steps_done(&self) -> usize;
    fn total_steps(&self) -> usize;
    async fn step(&mut self) -> compresslab::Result<StepReport>;
    /// The student on the held-out images.
    async fn evaluate(&self) -> compresslab::Result<HeldOutReport>;
}

/// The Fashion-MNIST distiller with its held-out set.
struct FashionRun {
    run: Distiller,
    heldout: FashionSet,
}

impl StepwiseRun for FashionRun {
    fn is_done(&self) -> bool {
        self.run.is_done()
    }
    fn steps_done(&self) -> usize {
        self.run.steps_done()
    }
    fn total_steps(&self) -> usize {
        self.run.total_steps()
    }
    async fn step(&mut self) -> compresslab::Result<StepReport> {
        self.run.step().await
    }
    async fn evaluate(&self) -> compresslab::Result<HeldOutReport> {
        self.run.evaluate(&self.heldout).await
    }
}

impl StepwiseRun for PhotoFineTune {
    fn is_done(&self) -> bool {
        PhotoFineTune::is_done(self)
    }
    fn steps_done(&self) -> usize {
        PhotoFineTune::steps_done(self)
    }
    fn total_steps(&self) -> usize {
        PhotoFineTune::total_steps(self)
    }
    async fn step(&mut self) -> compresslab::Result<StepReport> {
        PhotoFineTune::step(self).await
    }
    async fn evaluate(&self) -> compresslab::Result<HeldOutReport> {
        PhotoFineTune::evaluate(self).await
    }
}

/// What a finished run reports: wall-clock seconds and training images per second.
pub(crate) struct Trained {
    pub seconds: f64,
    pub images_per_s: f64,
}

/// Runs `run` to its end, posting the start, every step and every epoch's held-out
/// measurement (epoch 0: before training), pausing and yielding between steps. `None`
/// when the page cancelled it.
pub(crate) async fn drive(
    run: &mut impl StepwiseRun,
    epochs: u32,
    backend: &str,
) -> WorkerResult<Option<Trained>> {
    let total = run.total_steps() as u32;
    post(&FromWorker::DistilStarted {
        total_steps: total,
        backend: backend.to_string(),
    });
    post(&FromWorker::DistilEpoch(DistilEpoch {
        epoch: 0,
        step: 0,
        train_loss: None,
        heldout: run.evaluate().await?,
    }));
    let start = now();
    let (mut train_ms, mut images) = (0.0, 0usize);
    while !run.is_done() {
        if cancelled(run.steps_done(), total).await {
            return Ok(None);
        }
        let t0 = now();
        let r = run.step().await?;
        train_ms += now() - t0;
        images += r.images;
        let done = run.steps_done() as u32;
        let per_step = train_ms / f64::from(done.max(1));
        post(&FromWorker::DistilStep(DistilStep {
            step: done,
            total,
            epoch: r.epoch as u32 + 1,
            epochs,
            loss: r.loss,
            images_per_s: images as f64 / (train_ms / 1000.0).max(1e-9),
            eta_s: per_step * f64::from(total - done) / 1000.0,
        }));
        if r.epoch_done {
            post(&FromWorker::DistilEpoch(DistilEpoch {
                epoch: r.epoch as u32 + 1,
                step: done,
                train_loss: Some(r.epoch_loss),
                heldout: run.evaluate().await?,
            }));
        }
        // Lets pause / cancel messages in between steps.
        crate::worker::yield_now().await;
    }
    Ok(Some(Trained {
        seconds: (now() - start) / 1000.0,
        images_per_s: images as f64 / (train_ms / 1000.0).max(1e-9),
    }))
}

async fn train(loaded: &Loaded, recipe: Recipe, settings: DistilSettings) -> WorkerResult<()> {
    let data = DATA.with(|d| d.borrow().clone()).ok_or_else(|| {
        WorkerError::Message("choose images first (or use the training sample)".into())
    })?;
    let a = fashion_lab::assets(&loaded.asset_base).await?;
    let original = fashion_lab::original(&a).await?;
    let (train_idx, heldout_idx) = data.set.stratified_split(HELDOUT_FRACTION, SPLIT_SEED);
    if train_idx.is_empty() || heldout_idx.is_empty() {
        return Err(WorkerError::Message(format!(
            "{} images are too few: distillation needs some to train on and some to hold out (at least 2 per folder)",
            data.set.len()
        )));
    }
    let train = data.set.subset(&train_idx);
    let heldout = data.set.subset(&heldout_idx);

    let (student, masks) = student_for(&a.store, &recipe)?;
    let (cfg, qat) = engine_config(&settings, &recipe);
    let (device, backend) = training_device(loaded);
    let mut run = FashionRun {
        run: Distiller::new(&a.store, &student, masks, train, cfg, &device)?,
        heldout,
    };
    let Some(trained_run) = drive(&mut run, settings.epochs, &backend).await? else {
        return Ok(());
    };
    let heldout = run.heldout;
    let run = run.run;
    stage("Re-quantizing the fine-tuned network", 0.1);
    let trained = run.student().await?;
    let after_model = requantize(&trained, &recipe, &a.calibration)?;
    let before_model = compress(&a.store, &recipe, &a.calibration, &mut |_, _| Ok(()))?;

    stage("Measuring the networks as deployed", 0.3);
    let teacher_net = CpuFashionNet::from_store(&a.store)?;
    let teacher_heldout = predict(&teacher_net, &heldout)?;
    let (teacher_accuracy, _) = heldout_scores(&teacher_heldout, &teacher_heldout, &heldout);
    let teacher = DistilSide {
        heldout_accuracy: teacher_accuracy,
        heldout_agreement: 1.0,
        test_accuracy: Some(original.side.eval.accuracy()),
        test_agreement: Some(1.0),
        ms_per_image: original.side.ms_per_image,
        stats: original.side.stats.clone(),
    };
    let (before, _) = side(&a, &original, &before_model, &heldout, &teacher_heldout).await?;
    let (after, lab_report) = side(&a, &original, &after_model, &heldout, &teacher_heldout).await?;
    let report = DistilReport {
        recipe,
        settings,
        backend,
        train_images: train_idx.len() as u32,
        heldout_images: heldout_idx.len() as u32,
        seconds: trained_run.seconds,
        images_per_s: trained_run.images_per_s,
        qat,
        target: DistilTarget::Fashion,
        label_mode: if data.set.labels.iter().all(|&l| l == UNLABELLED) {
            "none: the teacher's outputs alone".into()
        } else {
            "Fashion-MNIST classes".into()
        },
        teacher,
        before,
        after,
    };
    // The fine-tuned network becomes the lab's current variant (its report, its export).
    VARIANT.with(|v| *v.borrow_mut() = Some(Variant { model: after_model }));
    post(&FromWorker::FashionCompressed(Box::new(lab_report)));
    post(&FromWorker::DistilDone(Box::new(report)));
    Ok(())
}

/// Times distillation training steps of the photo model (teacher and student both the
/// original, batches of random crops of the last photo) and its inference, on the
/// worker's backend.
pub async fn bench_photo(loaded: Rc<Loaded>, batch: u32, steps: u32) -> WorkerResult<()> {
    use compresslab::distill::NetworkDistiller;
    use compresslab::distill_photo::augment_photo;
    use compresslab::efficientnet::fold_batch_norms;
    use compresslab::fashion::SplitMix;
    use compresslab::preprocess::{CROP, RgbImage};
    let input = loaded.last_input()?;
    let (batch, steps) = (batch.clamp(1, 16) as usize, steps.clamp(1, 20) as usize);
    // Back to 8-bit RGB (the crop the model saw), to augment it.
    let plane = CROP * CROP;
    let pixels: Vec<u8> = (0..plane)
        .flat_map(|i| (0..3).map(move |c| (c, i)))
        .map(|(c, i)| {
            (input[c * plane + i] * 128.0 + 127.0)
                .round()
                .clamp(0.0, 255.0) as u8
        })
        .collect();
    let photo = RgbImage::new(CROP, CROP, pixels)?;
    let mut rng = SplitMix::new(5);
    let mut batch_of = || -> Vec<f32> {
        (0..batch)
            .flat_map(|_| augment_photo(&photo, &mut rng))
            .collect()
    };
    // Inference: warm runs of the page's own executor on this backend.
    loaded.original_logits(&input).await?;
    let start = now();
    for _ in 0..steps {
        crate::cancel::checkpoint().await?;
        loaded.classifier.logits(&input).await?;
    }
    let inference_images_per_s = steps as f64 / ((now() - start) / 1000.0).max(1e-9);
    let (device, backend) = match &loaded.device {
        Some(d) => (
            d.clone(),
            format!("WebGPU · {}", loaded.backend.description),
        ),
        None => (
            Device::flex(),
            "CPU · burn Flex (training), compresslab CPU kernels (inference)".to_string(),
        ),
    };
    let folded = fold_batch_norms(&loaded.store)?;
    let cfg = DistillConfig {
        batch_size: batch,
        ..DistillConfig::default()
    };
    let mut run = NetworkDistiller::new(
        &loaded.store,
        &folded,
        Vec::new(),
        None,
        cfg,
        steps + 1,
        &device.autodiff(),
    )?;
    let labels = vec![None; batch];
    crate::cancel::checkpoint().await?;
    let t0 = now();
    run.step(batch_of(), &labels).await?;
    let first_step_ms = now() - t0;
    let start = now();
    for _ in 0..steps {
        crate::cancel::checkpoint().await?;
        run.step(batch_of(), &labels).await?;
    }
    let training_images_per_s = (batch * steps) as f64 / ((now() - start) / 1000.0).max(1e-9);
    post(&FromWorker::DistilBenchmarked(DistilBench {
        backend,
        batch: batch as u32,
        steps: steps as u32,
        first_step_ms,
        training_images_per_s,
        inference_images_per_s,
    }));
    Ok(())
}
