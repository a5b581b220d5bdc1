//! The worker's Fashion-MNIST lab: the trained network, its 10 000 test images and a
//! calibration subset of the training set (fetched once), accuracy of the original and of
//! each compressed variant on the whole test set, and the accuracy sweeps. Everything
//! runs on the CPU executor (batched GEMMs, int8 kernels where quantized).

use std::cell::RefCell;
use std::rc::Rc;

use compresslab::compress::{CompressedModel, Recipe, compress};
use compresslab::fashion::{Evaluation, FashionSet};
use compresslab::fashion_cpu::CpuFashionNet;
use compresslab::sweep::{calibration_batches, run_case, sweep_cases};
use compresslab::weights::TensorStore;

use crate::error::{WorkerError, WorkerResult};
use crate::lab::{VARIANT, Variant};
use crate::pool::{self, ModelFormat};
use crate::worker::{fetch_response, now, post};
use compresslab_spec::messages::{ChangedPrediction, FashionReport, FashionSide, FromWorker};

pub const WEIGHTS_FILE: &str = "fashion-mnist-cnn.safetensors";
/// Test images with a changed prediction shown on the page.
const MAX_CHANGED_SHOWN: usize = 16;

pub(crate) struct FashionAssets {
    pub store: TensorStore,
    /// `store` as downloaded, for the pool's helpers.
    pub weights_bytes: Vec<u8>,
    pub test: FashionSet,
    /// 100 labelled training images per class.
    pub training_sample: FashionSet,
    pub calibration: Vec<Vec<f32>>,
}

/// The original network's results, computed once.
pub(crate) struct Original {
    pub side: FashionSide,
    pub predictions: Vec<usize>,
}

thread_local! {
    static ASSETS: RefCell<Option<Rc<FashionAssets>>> = const { RefCell::new(None) };
    static ORIGINAL: RefCell<Option<Rc<Original>>> = const { RefCell::new(None) };
}

fn progress(stage: &str, fraction: f32) {
    post(&FromWorker::CompressProgress {
        stage: stage.to_string(),
        fraction,
    });
}

async fn fetch_all(url: &str) -> WorkerResult<Vec<u8>> {
    let resp = fetch_response(url).await?;
    let buf = wasm_bindgen_futures::JsFuture::from(
        resp.array_buffer()
            .map_err(|e| WorkerError::js("download", e))?,
    )
    .await
    .map_err(|e| WorkerError::js("download", e))?;
    Ok(js_sys::Uint8Array::new(&buf).to_vec())
}

pub(crate) async fn assets(asset_base: &str) -> WorkerResult<Rc<FashionAssets>> {
    if let Some(a) = ASSETS.with(|a| a.borrow().clone()) {
        return Ok(a);
    }
    progress("Downloading the Fashion-MNIST network and test set", 0.01);
    pool::warm_up();
    let base = format!("{asset_base}/fashion");
    let weights_bytes = fetch_all(&format!("{base}/{WEIGHTS_FILE}")).await?;
    let store = TensorStore::from_safetensors(&weights_bytes)?;
    let test = FashionSet::from_bytes(&fetch_all(&format!("{base}/test.bin")).await?)?;
    let training_sample =
        FashionSet::from_bytes(&fetch_all(&format!("{base}/calibration.bin")).await?)?;
    let calibration = calibration_batches(&training_sample);
    let a = Rc::new(FashionAssets {
        store,
        weights_bytes,
        test,
        training_sample,
        calibration,
    });
    ASSETS.with(|s| *s.borrow_mut() = Some(a.clone()));
    Ok(a)
}

/// The test set's accuracy, predictions and wall time per image with `net` (with the pool's
/// helpers of `loading`), reporting progress in `[from, to]`; and how many workers shared it.
async fn run_test_set(
    net: &CpuFashionNet,
    loading: pool::Loading,
    test: &FashionSet,
    what: &str,
    (from, to): (f32, f32),
) -> WorkerResult<TestSetRun> {
    let total = test.len();
    let mut last_shown = 0.0;
    let run = pool::fashion_predictions(net, loading, &test.images, &mut |done| {
        // Progress in steps of about 5 % (the fraction counts every worker's chunks).
        if done - last_shown >= 0.05 || done >= 1.0 {
            last_shown = done;
            progress(
                &format!("Evaluating {what} on the {total} test images"),
                from + (to - from) * done,
            );
        }
    })
    .await?;
    let mut eval = Evaluation::new();
    for (&label, &pred) in test.labels.iter().zip(&run.classes) {
        eval.add(label, pred);
    }
    Ok(TestSetRun {
        eval,
        ms_per_image: run.ms / total.max(1) as f64,
        predictions: run.classes,
        workers: run.workers,
    })
}

struct TestSetRun {
    eval: Evaluation,
    predictions: Vec<usize>,
    ms_per_image: f64,
    workers: u32,
}

pub(crate) async fn original(a: &FashionAssets) -> WorkerResult<Rc<Original>> {
    if let Some(o) = ORIGINAL.with(|o| o.borrow().clone()) {
        return Ok(o);
    }
    let loading = pool::load_network((ModelFormat::Weights, &a.weights_bytes)).await;
    let net = CpuFashionNet::from_store(&a.store)?;
    let run = run_test_set(&net, loading, &a.test, "the original", (0.05, 0.4)).await?;
    let o = Rc::new(Original {
        side: FashionSide {
            stats: CompressedModel::original(&a.store)?.stats()?,
            eval: run.eval,
            ms_per_image: run.ms_per_image,
            workers: run.workers,
        },
        predictions: run.predictions,
    });
    ORIGINAL.with(|s| *s.borrow_mut() = Some(o.clone()));
    Ok(o)
}

/// Compresses with `recipe` (or takes a loaded export) and reports accuracy before/after.
pub async fn run(
    asset_base: &str,
    recipe: Option<Recipe>,
    loaded: Option<(String, CompressedModel)>,
) -> WorkerResult<()> {
    let a = assets(asset_base).await?;
    let before = original(&a).await?;
    let start = now();
    let (model, source) = match (recipe, loaded) {
        (_, Some((name, model))) => (model, name),
        (Some(recipe), None) => {
            let model = compress(&a.store, &recipe, &a.calibration, &mut |stage, f| {
                progress(&format!("Compressing: {stage}"), 0.4 + 0.1 * f);
                crate::cancel::check()
            })?;
            (model, "recipe".to_string())
        }
        (None, None) => return Err(WorkerError::Message("nothing to compress".into())),
    };
    let report = evaluate_variant(&a, &before, &model, source, now() - start).await?;
    VARIANT.with(|v| *v.borrow_mut() = Some(Variant { model }));
    post(&FromWorker::FashionCompressed(Box::new(report)));
    Ok(())
}

/// The whole test set through `model`, next to the original network.
pub(crate) async fn evaluate_variant(
    a: &FashionAssets,
    before: &Original,
    model: &CompressedModel,
    source: String,
    build_ms: f64,
) -> WorkerResult<FashionReport> {
    let loading = pool::load_network((ModelFormat::Compressed, &model.to_safetensors()?)).await;
    let net = CpuFashionNet::from_compressed(model, true)?;
    let run = run_test_set(
        &net,
        loading,
        &a.test,
        "the compressed network",
        (0.5, 0.98),
    )
    .await?;
    let preds = run.predictions;
    let same_prediction = preds
        .iter()
        .zip(&before.predictions)
        .filter(|(a, b)| a == b)
        .count();
    let changed = preds
        .iter()
        .zip(&before.predictions)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .take(MAX_CHANGED_SHOWN)
        .map(|(i, (&after, &before))| ChangedPrediction {
            index: i as u32,
            label: a.test.labels[i],
            before: before as u8,
            after: after as u8,
            pixels: a.test.image(i).to_vec(),
        })
        .collect();
    Ok(FashionReport {
        recipe: model.recipe.clone(),
        source,
        before: before.side.clone(),
        after: FashionSide {
            stats: model.stats()?,
            eval: run.eval,
            ms_per_image: run.ms_per_image,
            workers: run.workers,
        },
        same_prediction,
        integer_layers: net.integer_layers(),
        build_ms,
        layers: model.layer_stats()?,
        changed,
    })
}

/// Every sweep case on the first `images` test images, one point at a time.
pub async fn sweep(asset_base: &str, images: u32) -> WorkerResult<()> {
    let a = assets(asset_base).await?;
    let cases = sweep_cases();
    let total = cases.len() as u32;
    for (i, case) in cases.iter().enumerate() {
        post(&FromWorker::SweepProgress {
            stage: case.label.clone(),
            done: i as u32,
            total,
        });
        let point = run_case(
            &a.store,
            case,
            &a.calibration,
            &a.test,
            images as usize,
            &mut |_, _| crate::cancel::check(),
        )?;
        post(&FromWorker::SweepPoint(point));
    }
    post(&FromWorker::SweepDone);
    Ok(())
}
