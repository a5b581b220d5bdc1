//! The worker's distillation of the photo model (EfficientNet-Lite0 at 224²): the user's
//! photos (or the site's samples) become a set with a stratified held-out split; folder
//! names that are ImageNet classes train the 1000-way head, other folder names become the
//! user's own classes (a new head fitted on the teacher first), and without folders the
//! teacher's outputs are the only target. The student is the network the photo lab's
//! recipe compresses; it trains step by step (pause / cancel between steps), then is
//! re-quantized and measured as deployed on the CPU executor.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use burn::prelude::*;
use compresslab::classifier::ImageClassifier;
use compresslab::compress::CompressedModel;
use compresslab::finetune_photo::{LabelMode, PhotoFineTune, PhotoSet, folder_of, stored_photo};
use compresslab::labels::Labels;
use compresslab::preprocess::resize_and_crop;
use js_sys::Array;
use serde_bytes::ByteBuf;
use wasm_bindgen::JsCast;
use web_sys::Blob;

use crate::distil::{drive, engine_config, training_device};
use crate::error::{WorkerError, WorkerResult};
use crate::lab;
use crate::worker::{Loaded, decode_blob, now, post};
use compresslab_spec::messages::{
    DistilData, DistilReport, DistilSettings, DistilSide, DistilTarget, FromWorker,
};

/// At most this many photos are kept (256×256 RGB, 192 KiB each: 192 MiB in all).
pub const MAX_PHOTOS: usize = DistilTarget::Photos.max_images();
/// Side of the stored photos: the inference resize, so the held-out input is its centre.
const THUMB: usize = 48;
const PREVIEW: usize = 12;
const REJECTIONS_LISTED: usize = 5;

struct PhotoData {
    source: String,
    set: Arc<PhotoSet>,
    /// Each photo's file name (no folders), in the set's order: the lab leaves the training
    /// photos out of its agreement with a variant fine-tuned on them.
    file_names: Vec<String>,
}

thread_local! {
    static DATA: RefCell<Option<Rc<PhotoData>>> = const { RefCell::new(None) };
}

fn summary(
    data: &PhotoData,
    imagenet: &Labels,
    rejected: Vec<String>,
    rejected_count: usize,
) -> DistilData {
    let set = &data.set;
    let (train, heldout) = set.split();
    // The classes present, in order, then the unlabelled row.
    let mut classes: Vec<usize> = set.labels.iter().flatten().copied().collect();
    classes.sort_unstable();
    classes.dedup();
    let name = |c: usize| -> String {
        match set.own_classes() {
            Some(names) => names.get(c).cloned().unwrap_or_default(),
            None => imagenet.name(c).to_string(),
        }
    };
    let counts = |idx: &[usize]| -> Vec<u32> {
        let mut out = vec![0u32; classes.len() + 1];
        for &i in idx {
            let row = set.labels[i]
                .and_then(|c| classes.iter().position(|&k| k == c))
                .unwrap_or(classes.len());
            out[row] += 1;
        }
        out
    };
    let n = set.len();
    DistilData {
        source: data.source.clone(),
        images: n as u32,
        train_counts: counts(&train),
        heldout_counts: counts(&heldout),
        unmatched: Vec::new(),
        rejected,
        rejected_count: rejected_count as u32,
        preview: Vec::new(),
        class_names: classes.iter().map(|&c| name(c)).collect(),
        label_mode: set.mode.describe(),
        thumbs: (0..n.min(PREVIEW))
            .map(|i| {
                // Spread over the set, so several folders show.
                let j = i * n / n.clamp(1, PREVIEW);
                let thumb = resize_and_crop(&set.images[j], THUMB, THUMB);
                let label = set.labels[j].map_or_else(|| "unlabelled".into(), name);
                (label, THUMB as u32, ByteBuf::from(thumb.pixels))
            })
            .collect(),
    }
}

fn refuse_while_running() -> WorkerResult<()> {
    if crate::distil::RUNNING.get() {
        return Err(WorkerError::Message(
            "a fine-tune is running: cancel it before changing the images".into(),
        ));
    }
    Ok(())
}

fn keep(data: PhotoData, rejected: Vec<String>, rejected_count: usize) -> WorkerResult<()> {
    let imagenet = crate::worker::imagenet_labels()?;
    post(&FromWorker::DistilData(summary(
        &data,
        &imagenet,
        rejected,
        rejected_count,
    )));
    DATA.with(|d| *d.borrow_mut() = Some(Rc::new(data)));
    Ok(())
}

/// Decodes the dropped photos (the browser's decoder) into the distillation set.
pub async fn load_images(paths: Vec<String>, blobs: Array) -> WorkerResult<()> {
    refuse_while_running()?;
    let imagenet = crate::worker::imagenet_labels()?;
    let total = paths.len().min(blobs.length() as usize);
    let (mut images, mut folders, mut file_names) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rejected, mut rejected_count) = (Vec::new(), 0);
    for (i, path) in paths.iter().take(total).enumerate() {
        if images.len() >= MAX_PHOTOS {
            rejected_count += total - i;
            rejected.push(format!(
                "{} more files left out: at most {MAX_PHOTOS} photos are kept",
                total - i
            ));
            break;
        }
        post(&FromWorker::DistilLoading {
            done: i as u32,
            total: total as u32,
        });
        let blob: Blob = blobs.get(i as u32).unchecked_into();
        match decode_blob(&blob).await {
            Ok(decoded) => {
                images.push(stored_photo(&decoded.image));
                folders.push(folder_of(path));
                file_names.push(lab::file_name(path).to_string());
            }
            Err(e) => {
                rejected_count += 1;
                if rejected.len() < REJECTIONS_LISTED {
                    rejected.push(format!("{path}: {e}"));
                }
            }
        }
    }
    if images.is_empty() {
        return Err(WorkerError::Message(format!(
            "none of the {total} files could be read as an image"
        )));
    }
    let data = PhotoData {
        source: format!("{} dropped photos", images.len()),
        set: Arc::new(PhotoSet::from_folders(images, &folders, &imagenet)),
        file_names,
    };
    keep(data, rejected, rejected_count)
}

/// The site's sample photos, unlabelled (label-free distillation).
pub async fn load_samples(asset_base: &str) -> WorkerResult<()> {
    refuse_while_running()?;
    let names = lab::sample_names(asset_base).await?;
    let mut images = Vec::new();
    for (i, name) in names.iter().enumerate() {
        post(&FromWorker::DistilLoading {
            done: i as u32,
            total: names.len() as u32,
        });
        images.push(stored_photo(
            &lab::sample_photo(asset_base, name).await?.image,
        ));
    }
    let n = images.len();
    keep(
        PhotoData {
            source: format!("the site's {n} sample photos"),
            file_names: names,
            set: Arc::new(PhotoSet {
                images,
                labels: vec![None; n],
                mode: LabelMode::Unlabelled,
            }),
        },
        Vec::new(),
        0,
    )
}

/// Tells the panel what the run is doing between training steps (the lab panel's own
/// progress is left alone: with the user's own classes the lab variant does not change).
fn stage(text: &str) {
    post(&FromWorker::DistilStage {
        text: text.to_string(),
    });
}

/// One network's column of the before/after panel: held-out accuracy and agreement with
/// `teacher`'s predictions (with itself when `teacher` is empty), mean CPU time per photo.
async fn deployed_side(
    classifier: &ImageClassifier,
    run: &PhotoFineTune,
    teacher: &[usize],
    stats: compresslab::compress::ModelStats,
) -> WorkerResult<(DistilSide, Vec<usize>)> {
    let start = now();
    let preds = run.heldout_predictions(classifier).await?;
    let ms_per_image = (now() - start) / preds.len().max(1) as f64;
    let reference = if teacher.is_empty() { &preds } else { teacher };
    let (heldout_accuracy, heldout_agreement) = run.scores(&preds, reference);
    Ok((
        DistilSide {
            heldout_accuracy,
            heldout_agreement,
            test_accuracy: None,
            test_agreement: None,
            ms_per_image,
            stats,
        },
        preds,
    ))
}

/// Fine-tunes the network the photo lab's `recipe` compresses on the loaded photos.
pub async fn train(
    loaded: &Loaded,
    recipe: compresslab::compress::Recipe,
    settings: DistilSettings,
) -> WorkerResult<()> {
    let data = DATA.with(|d| d.borrow().clone()).ok_or_else(|| {
        WorkerError::Message("choose photos first (or use the sample photos)".into())
    })?;
    let (cfg, qat) = engine_config(&settings, &recipe);
    let (device, backend) = training_device(loaded);
    // The small head fit always runs on the CPU (a few hundred tiny steps).
    let cpu_training = Device::flex().autodiff();
    let mut run = PhotoFineTune::new(
        data.set.clone(),
        &loaded.store,
        &recipe,
        cfg,
        &device,
        &cpu_training,
        &mut |text| stage(text),
    )
    .await?;
    stage(
        "Measuring the student on the held-out photos (the first step then compiles the training shaders on WebGPU)",
    );
    let Some(trained_run) = drive(&mut run, settings.epochs, &backend).await? else {
        return Ok(());
    };
    let seconds = trained_run.seconds;

    stage("Re-quantizing the fine-tuned network");
    let (before_model, mut after_model) = run.finish(&recipe).await?;
    stage("Measuring the networks as deployed (CPU executor)");
    let own = data.set.own_classes().map(|n| n.to_vec());
    let labels = match &own {
        Some(names) => Labels::from_names(names.clone())?,
        None => crate::worker::imagenet_labels()?,
    };
    let teacher_net = ImageClassifier::new_cpu(run.teacher(), labels.clone())?;
    let original_stats = CompressedModel::original(run.teacher())?.stats()?;
    let (teacher, teacher_preds) = deployed_side(&teacher_net, &run, &[], original_stats).await?;
    let before_net = ImageClassifier::new_compressed_cpu(&before_model, labels.clone())?;
    let (before, _) =
        deployed_side(&before_net, &run, &teacher_preds, before_model.stats()?).await?;
    let after_net = ImageClassifier::new_compressed_cpu(&after_model, labels)?;
    let (after, _) = deployed_side(&after_net, &run, &teacher_preds, after_model.stats()?).await?;
    let report = DistilReport {
        recipe: recipe.clone(),
        settings,
        backend,
        train_images: run.train_images() as u32,
        heldout_images: run.heldout_images() as u32,
        seconds,
        images_per_s: trained_run.images_per_s,
        qat,
        target: DistilTarget::Photos,
        label_mode: data.set.mode.describe(),
        teacher,
        before,
        after,
    };
    post(&FromWorker::DistilDone(Box::new(report)));
    // With the 1000 ImageNet classes kept, the fine-tuned network becomes the photo lab's
    // variant (measured against the original like any other, exportable).
    if own.is_none() {
        // Agreement only on photos it was not fine-tuned on (by file name): the set's
        // held-out photos and the visitor's other photos count. The names go into the
        // export too, so a later load leaves them out as well.
        let (train, _) = data.set.split();
        after_model.seen_images.extend(
            train
                .iter()
                .filter_map(|&i| data.file_names.get(i).cloned()),
        );
        let measured = async {
            let (eval, trained_on) =
                lab::eval_images(loaded, &lab::progress, &after_model.seen_images).await?;
            lab::measure(
                loaded,
                after_model,
                "distilled".into(),
                // Timing runs: SwiftShader-like adapters take seconds per run.
                if loaded.device.is_some() { 3 } else { 20 },
                seconds * 1000.0,
                &eval,
                trained_on,
            )
            .await
        };
        // The fine-tune itself is done and reported: a cancel or failure from here on is
        // the lab's, and the lab panel (showing this step's progress) must hear it.
        if let Err(e) = measured.await {
            post(&FromWorker::CompressFailed {
                message: e.to_string(),
            });
        }
    }
    Ok(())
}
