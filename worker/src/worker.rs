//! The model worker. It owns the engine: downloads (and caches) the weights, brings up
//! WebGPU or the CPU fallback, decodes images with the browser's decoder and classifies
//! them. The page only ever talks to it through `messages`.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use burn::prelude::*;
use compresslab::classifier::ImageClassifier;
use compresslab::gpu_int::GpuFeatures;
use compresslab::labels::{Labels, top_k};
use compresslab::preprocess::{RgbImage, imagenet_crop, to_nchw};
use compresslab::weights::TensorStore;
use js_sys::{Array, Reflect, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, spawn_local};
use web_sys::{
    Blob, Cache, ColorSpaceConversion, DedicatedWorkerGlobalScope, ImageBitmap, ImageBitmapOptions,
    ImageOrientation, MessageEvent, OffscreenCanvas, OffscreenCanvasRenderingContext2d,
    PremultiplyAlpha, ResizeQuality, Response,
};

use crate::error::{WorkerError, WorkerResult};
use crate::lab::{self, EvalImage, percentile};
use crate::{distil, distil_photo, fashion_lab, user_model};
use compresslab_spec::messages::{
    BackendInfo, BackendKind, BenchReport, CrashCause, DistilTarget, FromWorker, ModelReady,
    ToWorker,
};

pub const WEIGHTS_FILE: &str = "efficientnet-lite0.safetensors";
pub const LABELS_FILE: &str = "imagenet-labels.json";
const CACHE_NAME: &str = "compresslab-models";
/// Above this many pixels the browser downsamples while decoding (shorter side → 1024).
const DECODE_PIXEL_LIMIT: u64 = 40_000_000;
const DOWNSCALED_SHORTER_SIDE: f64 = 1024.0;

pub struct Loaded {
    pub classifier: ImageClassifier,
    pub backend: BackendInfo,
    pub warm: Cell<bool>,
    /// The first run's latency (shader compilation on WebGPU).
    pub cold_ms: Cell<Option<f64>>,
    /// The last photo's name and preprocessed input, reused by benchmarks and the lab.
    pub last: RefCell<Option<(String, Vec<f32>)>>,
    /// The original weights, which every compression starts from.
    pub store: TensorStore,
    /// The WebGPU device (None on the CPU fallback).
    pub device: Option<Device>,
    pub asset_base: String,
    /// Photos for agreement checks (samples + the user's), with the original's logits.
    pub eval: RefCell<Vec<EvalImage>>,
    pub samples_added: Cell<bool>,
}

impl Loaded {
    /// The original's logits for `input`; the network's first run on this backend, wherever
    /// it happens (a classification, the lab's sample photos, a benchmark), is its cold run.
    /// Returns whether this run was it.
    pub async fn original_logits(&self, input: &[f32]) -> WorkerResult<(Vec<f32>, bool)> {
        let start = now();
        let logits = self.classifier.logits(input).await?;
        let cold = !self.warm.replace(true);
        if cold {
            self.cold_ms.set(Some(now() - start));
        }
        Ok((logits, cold))
    }

    /// The last classified photo's preprocessed input (benchmarks run on it).
    pub fn last_input(&self) -> WorkerResult<Vec<f32>> {
        self.last
            .borrow()
            .as_ref()
            .map(|(_, input)| input.clone())
            .ok_or_else(|| WorkerError::Message("classify a photo first".into()))
    }
}

thread_local! {
    static MODEL: RefCell<Option<Rc<Loaded>>> = const { RefCell::new(None) };
}

/// The ImageNet class names (once the model is loaded).
pub fn imagenet_labels() -> WorkerResult<compresslab::labels::Labels> {
    MODEL
        .with(|m| m.borrow().as_ref().map(|l| l.classifier.labels().clone()))
        .ok_or_else(|| WorkerError::Message("the model is not loaded yet".into()))
}

pub fn scope() -> DedicatedWorkerGlobalScope {
    js_sys::global().unchecked_into()
}

pub fn post(msg: &FromWorker) {
    match serde_wasm_bindgen::to_value(msg) {
        Ok(v) => {
            if let Err(e) = scope().post_message(&v) {
                web_sys::console::error_2(&"postMessage failed".into(), &e);
            }
        }
        Err(e) => web_sys::console::error_1(&format!("serialise: {e}").into()),
    }
}

pub fn now() -> f64 {
    scope().performance().map_or(0.0, |p| p.now())
}

/// Promise resolvers waiting for their replies, oldest first.
pub type Resolvers = Rc<RefCell<std::collections::VecDeque<js_sys::Function>>>;

thread_local! {
    /// The port [`yield_now`] posts to itself through, and the yields waiting for their
    /// message (a port delivers its messages in order).
    static YIELDS: RefCell<Option<(web_sys::MessagePort, Resolvers)>> = const { RefCell::new(None) };
}

/// Lets the worker's event loop handle the messages already queued (a cancel, a helper's
/// reply), then resumes. A message to itself, not a zero-delay timer: nested timers are
/// clamped to 4 ms, which cost a job that yields after every chunk ~4 % of its time.
pub async fn yield_now() {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        let posted = YIELDS.with(|y| {
            let mut y = y.borrow_mut();
            if y.is_none() {
                *y = self_channel();
            }
            let Some((port, waiting)) = y.as_ref() else {
                return false;
            };
            waiting.borrow_mut().push_back(resolve.clone());
            if port.post_message(&JsValue::UNDEFINED).is_ok() {
                return true;
            }
            waiting.borrow_mut().pop_back();
            false
        });
        if !posted {
            let _ = scope().set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, 0);
        }
    });
    let _ = JsFuture::from(promise).await;
}

/// A message channel whose second port resolves the oldest waiting yield per message.
fn self_channel() -> Option<(web_sys::MessagePort, Resolvers)> {
    let channel = web_sys::MessageChannel::new().ok()?;
    let waiting = Resolvers::default();
    let on_message = {
        let waiting = waiting.clone();
        Closure::<dyn FnMut(JsValue)>::new(move |_: JsValue| {
            let resolve = waiting.borrow_mut().pop_front();
            if let Some(resolve) = resolve {
                let _ = resolve.call0(&JsValue::NULL);
            }
        })
    };
    channel
        .port2()
        .set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    // The channel lives as long as the worker.
    on_message.forget();
    Some((channel.port1(), waiting))
}

/// Resolves after `ms` milliseconds, letting the worker handle other messages meanwhile.
pub async fn sleep_ms(ms: i32) {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        let _ = scope().set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, ms);
    });
    let _ = JsFuture::from(promise).await;
}

/// Installs the message handler. Long jobs run one at a time (a second one is answered
/// "busy"); quick requests (classifying, exporting, pause / cancel) are answered in between.
pub fn start() {
    if scope().name() == crate::pool::HELPER_NAME {
        crate::pool::serve();
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let message = info.to_string();
        web_sys::console::error_1(&message.clone().into());
        let cause = info
            .location()
            .map_or(CrashCause::Panic, |l| CrashCause::of_panic_at(l.file()));
        post(&FromWorker::Crashed { message, cause });
    }));
    let handler = Closure::<dyn FnMut(MessageEvent)>::new(|event: MessageEvent| {
        spawn_local(handle(event.data()));
    });
    scope().set_onmessage(Some(handler.as_ref().unchecked_ref()));
    handler.forget();
    post(&FromWorker::Started);
}

async fn handle(data: JsValue) {
    let parts: Array = data.unchecked_into();
    let msg: ToWorker = match serde_wasm_bindgen::from_value(parts.get(0)) {
        Ok(m) => m,
        Err(e) => {
            web_sys::console::error_1(&format!("bad message: {e}").into());
            return;
        }
    };
    let failure = Failure::of(&msg);
    let _job = match msg.long_job() {
        Some(what) => match LongJob::start(what) {
            Ok(job) => Some(job),
            Err(busy) => {
                failure.post(format!(
                    "the model worker is busy with {busy}: wait for it to finish, or cancel it"
                ));
                return;
            }
        },
        None => None,
    };
    if let Err(e) = run(msg, &parts).await {
        failure.post(e.to_string());
    }
}

thread_local! {
    /// The long job running now (see [`ToWorker::long_job`]).
    static LONG_JOB: Cell<Option<&'static str>> = const { Cell::new(None) };
}

/// Marks a long job as running until dropped: the worker runs one at a time.
struct LongJob;

impl LongJob {
    /// Err: what is running already.
    fn start(what: &'static str) -> Result<Self, &'static str> {
        LONG_JOB.with(|job| match job.get() {
            Some(busy) => Err(busy),
            None => {
                job.set(Some(what));
                crate::cancel::begin();
                Ok(Self)
            }
        })
    }
}

impl Drop for LongJob {
    fn drop(&mut self) {
        LONG_JOB.with(|job| job.set(None));
        crate::cancel::end();
    }
}

/// How a request's failure reaches the page: each panel listens for its own message.
#[derive(Clone, Copy)]
enum Failure {
    Init {
        on_gpu: bool,
    },
    Image(u32),
    Benchmark,
    Lab,
    Sweep,
    Distil,
    UserModel(Option<u32>),
    /// Pause / cancel / stop: nothing to report.
    Silent,
}

impl Failure {
    fn of(msg: &ToWorker) -> Self {
        match msg {
            ToWorker::Init { force_cpu, .. } => Self::Init {
                on_gpu: force_cpu.is_none(),
            },
            ToWorker::Classify { id, .. } => Self::Image(*id),
            ToWorker::Benchmark { .. }
            | ToWorker::DeviceReport { .. }
            | ToWorker::BenchDistil { .. } => Self::Benchmark,
            ToWorker::Compress { .. }
            | ToWorker::LoadCompressed { .. }
            | ToWorker::FashionCompress { .. }
            | ToWorker::Export
            | ToWorker::ExportOnnx => Self::Lab,
            ToWorker::FashionSweep { .. } => Self::Sweep,
            ToWorker::DistilImages { .. }
            | ToWorker::DistilBuiltin { .. }
            | ToWorker::Distil { .. } => Self::Distil,
            ToWorker::UserModelClassify { id, .. } => Self::UserModel(Some(*id)),
            ToWorker::UserModelLoad { .. }
            | ToWorker::UserModelCompress { .. }
            | ToWorker::UserModelFineTune { .. }
            | ToWorker::UserModelSweep
            | ToWorker::UserModelNewHead
            | ToWorker::UserModelExport => Self::UserModel(None),
            ToWorker::DistilControl { .. }
            | ToWorker::UserModelStopTuning
            | ToWorker::UserModelClassNames { .. }
            | ToWorker::CancelJob => Self::Silent,
        }
    }

    fn post(self, message: String) {
        let msg = match self {
            Self::Init { on_gpu } => FromWorker::InitFailed { message, on_gpu },
            Self::Image(id) => FromWorker::Failed { id, message },
            Self::Benchmark => FromWorker::BenchmarkFailed { message },
            Self::Lab => FromWorker::CompressFailed { message },
            Self::Sweep => FromWorker::SweepFailed { message },
            Self::Distil => FromWorker::DistilStopped {
                message,
                cancelled: false,
            },
            Self::UserModel(id) => FromWorker::UserModelFailed { id, message },
            Self::Silent => {
                web_sys::console::error_1(&message.into());
                return;
            }
        };
        post(&msg);
    }
}

/// Carries out one request (`parts[1]`: the blob or files posted alongside).
async fn run(msg: ToWorker, parts: &Array) -> WorkerResult<()> {
    let blob = || -> Blob { parts.get(1).unchecked_into() };
    match msg {
        ToWorker::Init {
            asset_base,
            force_cpu,
            workers,
        } => {
            crate::pool::configure(workers);
            crate::cancel::share(parts.get(1));
            init(&asset_base, force_cpu).await
        }
        ToWorker::Benchmark { runs } => benchmark(runs).await,
        ToWorker::DeviceReport { runs } => with_model(|m| crate::device_report::run(m, runs)).await,
        ToWorker::Compress { recipe, runs } => {
            with_model(|m| lab::run(m, Some(recipe), None, runs)).await
        }
        ToWorker::LoadCompressed { name, runs } => {
            let blob = blob();
            with_model(|m| lab::run(m, None, Some((name, blob)), runs)).await
        }
        ToWorker::FashionCompress { recipe } => {
            with_model(|m| async move { fashion_lab::run(&m.asset_base, Some(recipe), None).await })
                .await
        }
        ToWorker::FashionSweep { images } => {
            with_model(|m| async move { fashion_lab::sweep(&m.asset_base, images).await }).await
        }
        ToWorker::DistilImages { paths, target } => {
            let blobs: Array = parts.get(1).unchecked_into();
            match target {
                DistilTarget::Fashion => distil::load_images(paths, blobs).await,
                DistilTarget::Photos => distil_photo::load_images(paths, blobs).await,
            }
        }
        ToWorker::DistilBuiltin { target } => {
            with_model(|m| async move {
                match target {
                    DistilTarget::Fashion => distil::load_builtin(&m.asset_base).await,
                    DistilTarget::Photos => distil_photo::load_samples(&m.asset_base).await,
                }
            })
            .await
        }
        ToWorker::Distil {
            recipe,
            settings,
            target,
        } => with_model(|m| distil::run(m, recipe, settings, target)).await,
        ToWorker::DistilControl { action } => {
            distil::control(action);
            Ok(())
        }
        ToWorker::BenchDistil { batch, steps } => {
            with_model(|m| distil::bench_photo(m, batch, steps)).await
        }
        ToWorker::Export => lab::export(false),
        ToWorker::ExportOnnx => lab::export(true),
        ToWorker::UserModelLoad { name, class_names } => {
            user_model::load(name, class_names, &blob()).await
        }
        ToWorker::UserModelClassify {
            id, spec, folder, ..
        } => user_model::classify(id, spec, folder, &blob()).await,
        ToWorker::UserModelClassNames { names } => {
            user_model::set_class_names(names).await;
            Ok(())
        }
        ToWorker::UserModelCompress { recipe, runs } => user_model::compress(recipe, runs).await,
        ToWorker::UserModelFineTune {
            epochs,
            learning_rate,
            feature_layers,
            feature_weight,
        } => user_model::fine_tune(epochs, learning_rate, &feature_layers, feature_weight).await,
        ToWorker::UserModelStopTuning => {
            user_model::stop_tuning();
            Ok(())
        }
        ToWorker::UserModelExport => user_model::export(),
        ToWorker::UserModelSweep => user_model::sweep().await,
        ToWorker::UserModelNewHead => user_model::new_head().await,
        ToWorker::CancelJob => {
            crate::cancel::requested_by_message();
            Ok(())
        }
        ToWorker::Classify { id, name } => classify(id, &name, &blob()).await,
    }
}

/// The worker's wasm linear memory in bytes (it only grows, so a leak shows here): for the
/// memory test and for anyone checking from the browser's devtools
/// (`wasm_bindgen.worker_memory_bytes()` in the worker's console).
#[wasm_bindgen]
pub fn worker_memory_bytes() -> f64 {
    #[cfg(target_arch = "wasm32")]
    let pages = core::arch::wasm32::memory_size(0);
    // The worker only runs as wasm; the native build exists for clippy and tests.
    #[cfg(not(target_arch = "wasm32"))]
    let pages = 0_usize;
    pages as f64 * 65_536.0
}

/// Bytes the worker's heap holds live now (its wasm memory is the high-water mark of this,
/// fragmentation included).
#[wasm_bindgen]
pub fn worker_heap_live_bytes() -> f64 {
    crate::heap::live_bytes() as f64
}

/// The WebGPU device and its adapter's description, when the page runs on WebGPU.
pub fn webgpu() -> Option<(Device, String)> {
    MODEL.with(|m| {
        let loaded = m.borrow().clone()?;
        let device = loaded.device.clone()?;
        Some((device, loaded.backend.description.clone()))
    })
}

/// What the page's WebGPU adapter lets the integer kernels use (nothing without WebGPU).
pub fn webgpu_features() -> GpuFeatures {
    MODEL.with(|m| GpuFeatures {
        packed_dot4: m
            .borrow()
            .as_ref()
            .is_some_and(|l| l.device.is_some() && l.backend.has_packed_dot4()),
    })
}

/// Runs `f` on the loaded model (an error when it is not loaded yet).
async fn with_model<F, Fut>(f: F) -> WorkerResult<()>
where
    F: FnOnce(Rc<Loaded>) -> Fut,
    Fut: std::future::Future<Output = WorkerResult<()>>,
{
    let loaded = MODEL
        .with(|m| m.borrow().clone())
        .ok_or_else(|| WorkerError::Message("the model is not loaded yet".into()))?;
    f(loaded).await
}

async fn init(asset_base: &str, force_cpu: Option<String>) -> WorkerResult<()> {
    let start = now();
    let manifest = fetch_bytes(&format!("{asset_base}/models/manifest.json"), None).await?;
    let version = manifest_version(&manifest);
    let (weights, weights_cached) = fetch_cached(
        &format!("{asset_base}/models/{WEIGHTS_FILE}?v={version}"),
        "Downloading EfficientNet-Lite0 weights",
    )
    .await?;
    let (labels, _) = fetch_cached(
        &format!("{asset_base}/models/{LABELS_FILE}?v={version}"),
        "Downloading ImageNet labels",
    )
    .await?;
    post(&FromWorker::Progress {
        stage: "Initialising the backend".into(),
        loaded: 0.0,
        total: None,
    });
    let store = TensorStore::from_safetensors(&weights)?;
    let labels = Labels::from_json(&labels)?;
    let gpu = match force_cpu {
        Some(reason) => Err(reason),
        None => webgpu_backend().await,
    };
    let (classifier, backend, device) = match gpu {
        Ok((device, backend)) => (
            ImageClassifier::new(&store, labels, &device)?,
            backend,
            Some(device),
        ),
        Err(reason) => (
            ImageClassifier::new_cpu(&store, labels)?,
            cpu_backend(reason),
            None,
        ),
    };
    let parameters = store.parameter_count();
    MODEL.with(|m| {
        *m.borrow_mut() = Some(Rc::new(Loaded {
            classifier,
            backend: backend.clone(),
            warm: Cell::new(false),
            cold_ms: Cell::new(None),
            last: RefCell::new(None),
            store,
            device,
            asset_base: asset_base.to_string(),
            eval: RefCell::new(Vec::new()),
            samples_added: Cell::new(false),
        }))
    });
    post(&FromWorker::Ready(ModelReady {
        backend,
        parameters,
        weights_bytes: weights.len(),
        from_cache: weights_cached,
        load_ms: now() - start,
    }));
    Ok(())
}

/// The manifest's content hash of the weights, used to version the cache entry.
fn manifest_version(manifest: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Manifest {
        weights_sha256: String,
    }
    serde_json_lite(manifest)
        .map(|m: Manifest| m.weights_sha256.chars().take(16).collect())
        .unwrap_or_else(|| "unversioned".into())
}

fn serde_json_lite<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    let text = std::str::from_utf8(bytes).ok()?;
    let value = js_sys::JSON::parse(text).ok()?;
    serde_wasm_bindgen::from_value(value).ok()
}

fn cpu_backend(reason: String) -> BackendInfo {
    BackendInfo {
        kind: BackendKind::Cpu,
        description: "compresslab CPU kernels (channels-last, wasm SIMD128, 1 thread)".into(),
        fallback_reason: Some(reason),
        limits: Vec::new(),
        features: Vec::new(),
        wgsl_features: Vec::new(),
    }
}

/// The strings in the set-like `object[field]` (GPU features), sorted; empty when absent.
fn sorted_strings(object: &JsValue, field: &str) -> Vec<String> {
    let mut strings: Vec<String> = Reflect::get(object, &field.into())
        .ok()
        .and_then(|set| js_sys::try_iter(&set).ok().flatten())
        .map(|it| {
            it.filter_map(|v| v.ok().and_then(|v| v.as_string()))
                .collect()
        })
        .unwrap_or_default();
    strings.sort();
    strings
}

/// Brings up WebGPU, or says in one sentence why it could not.
async fn webgpu_backend() -> Result<(Device, BackendInfo), String> {
    let navigator = scope().navigator();
    let gpu = Reflect::get(&navigator, &"gpu".into()).unwrap_or(JsValue::UNDEFINED);
    if gpu.is_undefined() || gpu.is_null() {
        return Err("navigator.gpu is missing: this browser offers no WebGPU here".into());
    }
    // Ask for an adapter ourselves first: a clear reason beats a failure deep in wgpu.
    let request = Reflect::get(&gpu, &"requestAdapter".into())
        .ok()
        .and_then(|f| f.dyn_into::<js_sys::Function>().ok())
        .ok_or("navigator.gpu.requestAdapter is missing")?;
    let promise: js_sys::Promise = request
        .call0(&gpu)
        .map_err(|e| format!("requestAdapter threw: {}", WorkerError::js("WebGPU", e)))?
        .unchecked_into();
    let adapter = JsFuture::from(promise)
        .await
        .map_err(|e| format!("requestAdapter failed: {}", WorkerError::js("WebGPU", e)))?;
    if adapter.is_null() || adapter.is_undefined() {
        return Err(
            "WebGPU is present but offered no adapter (blocklisted or disabled GPU)".into(),
        );
    }
    let info = Reflect::get(&adapter, &"info".into()).unwrap_or(JsValue::UNDEFINED);
    let field = |name: &str| {
        Reflect::get(&info, &name.into())
            .ok()
            .and_then(|v| v.as_string())
            .filter(|s| !s.is_empty())
    };
    let description = [field("description"), field("vendor"), field("architecture")]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" · ");
    let limits_js = Reflect::get(&adapter, &"limits".into()).unwrap_or(JsValue::UNDEFINED);
    let limits = [
        "maxBufferSize",
        "maxStorageBufferBindingSize",
        "maxComputeWorkgroupStorageSize",
        "maxComputeInvocationsPerWorkgroup",
        "maxComputeWorkgroupSizeX",
        "maxStorageBuffersPerShaderStage",
    ]
    .iter()
    .filter_map(|name| {
        Reflect::get(&limits_js, &(*name).into())
            .ok()
            .and_then(|v| v.as_f64())
            .map(|v| (name.to_string(), v as u64))
    })
    .collect();
    let features = sorted_strings(&adapter, "features");
    let wgsl_features = sorted_strings(&gpu, "wgslLanguageFeatures");

    let (device, _setup) = Device::wgpu_options()
        .init_with_setup_async()
        .await
        .map_err(|e| format!("burn-wgpu could not start on the adapter: {e}"))?;
    Ok((
        device,
        BackendInfo {
            kind: BackendKind::WebGpu,
            description: if description.is_empty() {
                "WebGPU adapter (no description given)".into()
            } else {
                description
            },
            fallback_reason: None,
            limits,
            features,
            wgsl_features,
        },
    ))
}

pub async fn fetch_response(url: &str) -> WorkerResult<Response> {
    let resp = JsFuture::from(scope().fetch_with_str(url))
        .await
        .map_err(|e| WorkerError::js("fetch", e))?;
    let resp: Response = resp.unchecked_into();
    if !resp.ok() {
        return Err(WorkerError::Http {
            url: url.to_string(),
            status: resp.status(),
        });
    }
    Ok(resp)
}

/// Downloads `url`, reporting progress under `stage` when given.
async fn fetch_bytes(url: &str, stage: Option<&str>) -> WorkerResult<Vec<u8>> {
    let resp = fetch_response(url).await?;
    let total = resp
        .headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|v| v.parse::<f64>().ok());
    let Some(body) = resp.body() else {
        return Ok(Vec::new());
    };
    let reader: web_sys::ReadableStreamDefaultReader = body.get_reader().unchecked_into();
    let mut bytes = Vec::with_capacity(total.unwrap_or(0.0) as usize);
    let mut last_report = 0.0;
    loop {
        let chunk = JsFuture::from(reader.read())
            .await
            .map_err(|e| WorkerError::js("download", e))?;
        let done = Reflect::get(&chunk, &"done".into())
            .ok()
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        if done {
            break;
        }
        let value: Uint8Array = Reflect::get(&chunk, &"value".into())
            .map_err(|e| WorkerError::js("download", e))?
            .unchecked_into();
        let start = bytes.len();
        bytes.resize(start + value.length() as usize, 0);
        value.copy_to(&mut bytes[start..]);
        if let Some(stage) = stage {
            let t = now();
            if t - last_report > 100.0 {
                last_report = t;
                post(&FromWorker::Progress {
                    stage: stage.into(),
                    loaded: bytes.len() as f64,
                    total,
                });
            }
        }
    }
    Ok(bytes)
}

/// Serves `url` from the Cache API when present, else downloads and stores it.
/// Returns the bytes and whether they came from the cache.
async fn fetch_cached(url: &str, stage: &str) -> WorkerResult<(Vec<u8>, bool)> {
    let cache: Option<Cache> = match scope().caches() {
        Ok(storage) => JsFuture::from(storage.open(CACHE_NAME))
            .await
            .ok()
            .map(|c| c.unchecked_into()),
        Err(_) => None, // no Cache API (e.g. an insecure origin): just download
    };
    if let Some(cache) = &cache {
        let hit = JsFuture::from(cache.match_with_str(url)).await.ok();
        if let Some(resp) = hit.filter(|r| !r.is_undefined()) {
            let resp: Response = resp.unchecked_into();
            post(&FromWorker::Progress {
                stage: format!("{stage} (from cache)"),
                loaded: 0.0,
                total: None,
            });
            let buf = JsFuture::from(
                resp.array_buffer()
                    .map_err(|e| WorkerError::js("cache", e))?,
            )
            .await
            .map_err(|e| WorkerError::js("cache", e))?;
            return Ok((Uint8Array::new(&buf).to_vec(), true));
        }
    }
    let bytes = fetch_bytes(url, Some(stage)).await?;
    if let Some(cache) = &cache {
        let array = Uint8Array::from(bytes.as_slice());
        if let Ok(resp) = Response::new_with_opt_buffer_source(Some(&array)) {
            // A failed cache write (quota) only costs the next reload a download.
            let _ = JsFuture::from(cache.put_with_str(url, &resp)).await;
        }
    }
    Ok((bytes, false))
}

pub struct Decoded {
    pub image: RgbImage,
    pub width: u32,
    pub height: u32,
    pub downscaled: bool,
}

/// Decodes with the browser's own decoder (JPEG/PNG/WebP/AVIF/GIF first frame, EXIF
/// orientation). Colour management is off so pixels match the native decoder's.
pub async fn decode_blob(blob: &Blob) -> WorkerResult<Decoded> {
    if blob.size() == 0.0 {
        return Err(WorkerError::Decode {
            hint: ": the file is empty (0 bytes)".into(),
        });
    }
    let head = blob
        .slice_with_f64_and_f64(0.0, 1_048_576.0)
        .map_err(|e| WorkerError::js("read file", e))?;
    let head = JsFuture::from(head.array_buffer())
        .await
        .map_err(|e| WorkerError::js("read file", e))?;
    let head = Uint8Array::new(&head).to_vec();
    let header_dims = imagesize::blob_size(&head).ok();

    let options = ImageBitmapOptions::new();
    options.set_image_orientation(ImageOrientation::FromImage);
    options.set_color_space_conversion(ColorSpaceConversion::None);
    options.set_premultiply_alpha(PremultiplyAlpha::None);
    let mut downscaled = false;
    if let Some(size) = &header_dims {
        let (w, h) = (size.width as f64, size.height as f64);
        if w * h > DECODE_PIXEL_LIMIT as f64 {
            let scale = DOWNSCALED_SHORTER_SIDE / w.min(h);
            options.set_resize_width((w * scale).round().max(1.0) as u32);
            options.set_resize_height((h * scale).round().max(1.0) as u32);
            options.set_resize_quality(ResizeQuality::High);
            downscaled = true;
        }
    }
    let promise = scope()
        .create_image_bitmap_with_blob_and_image_bitmap_options(blob, &options)
        .map_err(|e| WorkerError::js("createImageBitmap", e))?;
    let bitmap: ImageBitmap = JsFuture::from(promise)
        .await
        .map_err(|_| WorkerError::Decode {
            hint: match &header_dims {
                Some(s) => format!(
                    " (its header says {}×{}, but the data is corrupt, truncated or too large)",
                    s.width, s.height
                ),
                None => " (not a supported image format, or a corrupt file)".into(),
            },
        })?
        .unchecked_into();
    let (width, height) = header_dims
        .map(|s| (s.width as u32, s.height as u32))
        .unwrap_or((bitmap.width(), bitmap.height()));
    let (bw, bh) = (bitmap.width(), bitmap.height());
    let rgba = draw_pixels(&bitmap, bw, bh);
    bitmap.close();
    let image = RgbImage::from_rgba(bw as usize, bh as usize, &rgba?)?;
    Ok(Decoded {
        image,
        width,
        height,
        downscaled,
    })
}

fn draw_pixels(bitmap: &ImageBitmap, w: u32, h: u32) -> WorkerResult<Vec<u8>> {
    let canvas = OffscreenCanvas::new(w, h).map_err(|e| WorkerError::js("canvas", e))?;
    let ctx: OffscreenCanvasRenderingContext2d = canvas
        .get_context("2d")
        .map_err(|e| WorkerError::js("canvas", e))?
        .ok_or_else(|| WorkerError::Js {
            context: "canvas",
            message: "no 2d context".into(),
        })?
        .unchecked_into();
    ctx.draw_image_with_image_bitmap(bitmap, 0.0, 0.0)
        .map_err(|e| WorkerError::js("canvas", e))?;
    let data = ctx
        .get_image_data(0.0, 0.0, w as f64, h as f64)
        .map_err(|e| WorkerError::js("canvas", e))?;
    Ok(data.data().0)
}

async fn classify(id: u32, name: &str, blob: &Blob) -> WorkerResult<()> {
    let loaded = MODEL
        .with(|m| m.borrow().clone())
        .ok_or_else(|| WorkerError::Message("the model is not loaded yet".into()))?;
    let t0 = now();
    let decoded = decode_blob(blob).await?;
    let crop = imagenet_crop(&decoded.image);
    let input = to_nchw(&crop);
    let t1 = now();
    let (logits, cold) = loaded.original_logits(&input).await?;
    let top5 = top_k(&logits, 5, loaded.classifier.labels());
    let t2 = now();
    lab::remember(&loaded, name, &crop, &logits);
    loaded.last.replace(Some((name.to_string(), input)));
    post(&FromWorker::Classified {
        id,
        top5,
        preprocess_ms: t1 - t0,
        inference_ms: t2 - t1,
        cold,
        width: decoded.width,
        height: decoded.height,
        downscaled: decoded.downscaled,
        model_input: crop.pixels,
    });
    Ok(())
}

/// Warm latency of the model alone (input upload, forward, result read-back).
async fn benchmark(runs: u32) -> WorkerResult<()> {
    let loaded = MODEL
        .with(|m| m.borrow().clone())
        .ok_or_else(|| WorkerError::Message("the model is not loaded yet".into()))?;
    let input = loaded.last_input()?;
    let runs = runs.clamp(1, 1000);
    loaded.original_logits(&input).await?;
    let mut times = Vec::with_capacity(runs as usize);
    for _ in 0..runs {
        crate::cancel::checkpoint().await?;
        let start = now();
        loaded.classifier.logits(&input).await?;
        times.push(now() - start);
    }
    times.sort_by(f64::total_cmp);
    post(&FromWorker::Benchmarked(BenchReport {
        runs,
        p50_ms: percentile(&times, 50.0),
        p95_ms: percentile(&times, 95.0),
        min_ms: times[0],
        mean_ms: times.iter().sum::<f64>() / times.len() as f64,
        backend: match loaded.backend.kind {
            BackendKind::WebGpu => format!("WebGPU ({})", loaded.backend.description),
            BackendKind::Cpu => "CPU fallback".into(),
        },
    }));
    Ok(())
}
