//! The page: drop zone, file picker, paste, sample photos, results with top-5 bars,
//! latency and the backend that ran. Model work happens in the worker (`worker.rs`);
//! this side only queues images and renders what the worker reports.

use std::cell::RefCell;
use std::collections::VecDeque;

use compresslab_spec::report::Prediction;
use js_sys::{Array, Reflect};
use leptos::ev;
use leptos::prelude::*;
use serde::Deserialize;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, spawn_local};
use web_sys::{Blob, MessageEvent, Response, Url, Worker, WorkerOptions, WorkerType};

use crate::device_panel::DeviceReportTable;
use crate::distil_panel::{DistilPanel, DistilState};
use crate::error::WebError;
use crate::fashion_panel::{SweepPanel, SweepState};
use crate::lab_panel::{LabPanel, LabState, ModelChoice};
use crate::user_model_panel::{self, UserModelPanel, UserModelState};
use compresslab_spec::messages::{
    BackendInfo, BackendKind, BenchReport, CrashCause, DeviceReport, DistilBench, DistilTarget,
    FromWorker, ModelReady, ToWorker,
};

/// At most this many images are taken from one drop, paste or pick.
pub const MAX_BATCH: usize = 50;

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Loading {
        stage: String,
        loaded: f64,
        total: Option<f64>,
    },
    Ready(ModelReady),
    Failed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub top5: Vec<Prediction>,
    pub preprocess_ms: f64,
    pub inference_ms: f64,
    pub cold: bool,
    pub backend: String,
    pub width: u32,
    pub height: u32,
    pub downscaled: bool,
    pub model_input: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ItemState {
    Queued,
    Running,
    Done(Outcome),
    Error(String),
}

#[derive(Debug, Clone)]
pub struct Item {
    pub id: u32,
    pub name: String,
    pub preview_url: Option<String>,
    pub state: RwSignal<ItemState>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BenchState {
    Idle,
    Running(u32),
    Done(BenchReport),
    /// Timing distillation training of the photo model.
    RunningTraining,
    TrainingDone(DistilBench),
    /// The device report (every variant on every executor).
    DeviceRunning {
        stage: String,
        fraction: f32,
    },
    DeviceDone(Box<DeviceReport>),
    Failed(String),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Sample {
    pub file: String,
    pub title: String,
}

/// Everything the page keeps outside the reactive graph (JS handles are not `Send`).
struct Controller {
    worker: Option<Worker>,
    queue: VecDeque<(u32, Blob)>,
    in_flight: Option<(u32, Blob)>,
    next_id: u32,
    on_cpu_because: Option<String>,
    /// Shared with the worker when the page is cross-origin isolated: Cancel raises it and
    /// the running job sees it at its next checkpoint, even inside synchronous engine code.
    cancel_counter: Option<js_sys::Int32Array>,
    status: RwSignal<Status>,
    items: RwSignal<Vec<Item>>,
    notice: RwSignal<Option<String>>,
    bench: RwSignal<BenchState>,
    lab: RwSignal<LabState>,
    sweep: RwSignal<SweepState>,
    /// Distillation panels: Fashion-MNIST and photos; the worker reports on the one it
    /// was last asked about.
    distil: RwSignal<DistilState>,
    photo_distil: RwSignal<DistilState>,
    distil_target: DistilTarget,
    user_model: RwSignal<UserModelState>,
    _handlers: Vec<Closure<dyn FnMut(JsValue)>>,
}

impl Controller {
    fn distil_state(&self) -> RwSignal<DistilState> {
        match self.distil_target {
            DistilTarget::Fashion => self.distil,
            DistilTarget::Photos => self.photo_distil,
        }
    }

    fn distilling(&self) -> bool {
        self.distil.get_untracked().running || self.photo_distil.get_untracked().running
    }
}

thread_local! {
    static CONTROLLER: RefCell<Option<Controller>> = const { RefCell::new(None) };
}

fn with_controller<R>(f: impl FnOnce(&mut Controller) -> R) -> Option<R> {
    CONTROLLER.with(|c| c.borrow_mut().as_mut().map(f))
}

fn asset_base() -> String {
    let base = web_sys::window()
        .and_then(|w| w.document())
        .and_then(|d| d.base_uri().ok().flatten())
        .unwrap_or_default();
    Url::new_with_base("assets", &base)
        .map(|u| u.href())
        .unwrap_or_else(|_| "assets".into())
}

/// A parameter of the page URL's query.
fn url_parameter(name: &str) -> Option<String> {
    let search = web_sys::window()?.location().search().ok()?;
    web_sys::UrlSearchParams::new_with_str(&search)
        .ok()?
        .get(name)
}

/// `?backend=cpu` in the page URL forces the CPU fallback (for comparisons and tests).
fn cpu_requested_in_url() -> Option<String> {
    (url_parameter("backend").as_deref() == Some("cpu"))
        .then(|| "CPU requested in the page URL (?backend=cpu)".to_string())
}

/// `?workers=N` in the page URL sets how many workers share batch work (for comparisons).
fn workers_requested_in_url() -> Option<u32> {
    url_parameter("workers")?.parse().ok()
}

/// The worker `index.html` started before the page's wasm loaded, with the events it
/// received meanwhile; taken once (a restarted worker is a new one).
fn take_early_worker() -> Option<(Worker, Array)> {
    let global = js_sys::global();
    let key = JsValue::from_str("compresslabEarlyWorker");
    let early = Reflect::get(&global, &key).ok()?;
    let _ = Reflect::delete_property(global.unchecked_ref::<js_sys::Object>(), &key);
    let worker = Reflect::get(&early, &"worker".into())
        .ok()?
        .dyn_into()
        .ok()?;
    let events = Reflect::get(&early, &"early".into())
        .ok()?
        .dyn_into()
        .ok()?;
    Some((worker, events))
}

fn spawn_worker(force_cpu: Option<String>) {
    let (worker, early_events) = match take_early_worker() {
        Some(early) => early,
        None => {
            let options = WorkerOptions::new();
            options.set_type(WorkerType::Classic);
            match Worker::new_with_options("./worker_loader.js", &options) {
                Ok(w) => (w, Array::new()),
                Err(e) => {
                    let msg = WebError::js("could not start the model worker", e).to_string();
                    with_controller(|c| c.status.set(Status::Failed(msg)));
                    return;
                }
            }
        }
    };
    let on_message = Closure::<dyn FnMut(JsValue)>::new(on_worker_event);
    let on_error = Closure::<dyn FnMut(JsValue)>::new(on_worker_event);
    worker.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    worker.set_onerror(Some(on_error.as_ref().unchecked_ref()));
    with_controller(|c| {
        if let Some(old) = c.worker.take() {
            // Its handlers are dropped below: nothing it still sends may reach them.
            old.set_onmessage(None);
            old.set_onerror(None);
            old.terminate();
        }
        c.worker = Some(worker);
        c.on_cpu_because = force_cpu;
        c._handlers = vec![on_message, on_error];
        c.status.set(Status::Loading {
            stage: "Starting the model worker".into(),
            loaded: 0.0,
            total: None,
        });
    });
    for event in early_events.iter() {
        on_worker_event(event);
    }
}

/// How long a worker's error event waits for the panic hook's message about the same crash.
const TRAP_GRACE_MS: i32 = 200;

/// A message or an error event from the worker.
fn on_worker_event(event: JsValue) {
    if let Some(error) = event.dyn_ref::<web_sys::ErrorEvent>() {
        // A panic posts its cause from the worker's panic hook and then traps, which raises
        // this event too, and the two may arrive in either order. Wait a moment: when the
        // cause arrives first it replaces the worker, and this late trap is then ignored.
        let message = error.message();
        let target = error.target();
        let trap = Closure::once_into_js(move || {
            let still_current = with_controller(|c| {
                c.worker
                    .as_ref()
                    .is_some_and(|w| target.as_ref().is_some_and(|t| js_sys::Object::is(w, t)))
            });
            if still_current == Some(true) {
                on_worker_message(FromWorker::Crashed {
                    message,
                    cause: CrashCause::Trap,
                });
            }
        });
        if let Some(w) = web_sys::window() {
            let _ = w.set_timeout_with_callback_and_timeout_and_arguments_0(
                trap.unchecked_ref(),
                TRAP_GRACE_MS,
            );
        }
        return;
    }
    let Some(event) = event.dyn_ref::<MessageEvent>() else {
        on_worker_message(FromWorker::Crashed {
            message: "the model worker stopped".into(),
            cause: CrashCause::Trap,
        });
        return;
    };
    match serde_wasm_bindgen::from_value::<FromWorker>(event.data()) {
        Ok(msg) => on_worker_message(msg),
        Err(e) => web_sys::console::error_1(&format!("bad worker message: {e}").into()),
    }
}

fn set_item(c: &Controller, id: u32, state: ItemState) {
    if let Some(item) = c.items.get_untracked().iter().find(|i| i.id == id) {
        item.state.set(state);
    }
}

fn on_worker_message(msg: FromWorker) {
    // Some(backend): replace the worker (None: on WebGPU, Some(why): on the CPU).
    let mut respawn: Option<Option<String>> = None;
    with_controller(|c| match msg {
        FromWorker::Started => {
            let init = ToWorker::Init {
                asset_base: asset_base(),
                force_cpu: c.on_cpu_because.clone(),
                workers: workers_requested_in_url(),
            };
            // A new counter for each worker: a cancel meant for the old one never reaches it.
            let shared = shared_cancel_counter();
            c.cancel_counter = shared
                .as_ref()
                .map(|buffer| js_sys::Int32Array::new(buffer));
            let parts = |msg: &JsValue| match &shared {
                Some(buffer) => js_sys::Array::of2(msg, buffer),
                None => js_sys::Array::of1(msg),
            };
            if let (Some(worker), Ok(msg)) = (&c.worker, serde_wasm_bindgen::to_value(&init))
                && let Err(e) = worker.post_message(&parts(&msg))
            {
                let msg = WebError::js("could not start the model", e).to_string();
                c.status.set(Status::Failed(msg));
            }
        }
        FromWorker::Progress {
            stage,
            loaded,
            total,
        } => c.status.set(Status::Loading {
            stage,
            loaded,
            total,
        }),
        FromWorker::Ready(ready) => c.status.set(Status::Ready(ready)),
        FromWorker::InitFailed { message, on_gpu } => {
            if on_gpu {
                respawn = Some(Some(format!("WebGPU failed to start: {message}")));
            } else {
                c.status.set(Status::Failed(message));
            }
        }
        FromWorker::Classified {
            id,
            top5,
            preprocess_ms,
            inference_ms,
            cold,
            width,
            height,
            downscaled,
            model_input,
        } => {
            let backend = match c.status.get_untracked() {
                Status::Ready(ready) => backend_label(&ready.backend),
                _ => String::new(),
            };
            set_item(
                c,
                id,
                ItemState::Done(Outcome {
                    top5,
                    preprocess_ms,
                    inference_ms,
                    cold,
                    backend,
                    width,
                    height,
                    downscaled,
                    model_input,
                }),
            );
            c.in_flight = None;
        }
        FromWorker::Failed { id, message } => {
            set_item(c, id, ItemState::Error(message));
            c.in_flight = None;
        }
        FromWorker::CompressProgress { stage, fraction } => {
            c.lab.set(LabState::Running { stage, fraction })
        }
        FromWorker::Compressed(report) => c.lab.set(LabState::Done(report)),
        FromWorker::FashionCompressed(report) => c.lab.set(LabState::FashionDone(report)),
        FromWorker::SweepProgress { stage, done, total } => c.sweep.update(|s| {
            s.running = Some((stage, done, total));
        }),
        FromWorker::SweepPoint(point) => c.sweep.update(|s| s.points.push(point)),
        FromWorker::SweepDone => c.sweep.update(|s| s.running = None),
        FromWorker::SweepFailed { message } => c.sweep.update(|s| {
            s.running = None;
            s.error = Some(message);
        }),
        FromWorker::CompressFailed { message } => c.lab.set(LabState::Failed(message)),
        FromWorker::DistilLoading { done, total } => {
            c.distil_state().update(|s| s.loading = Some((done, total)))
        }
        FromWorker::DistilData(data) => c.distil_state().update(|s| {
            s.loading = None;
            s.data = Some(data);
            s.message = None;
        }),
        FromWorker::DistilStarted {
            total_steps,
            backend,
        } => c.distil_state().update(|s| {
            s.running = true;
            s.total_steps = total_steps;
            s.backend = Some(backend);
        }),
        FromWorker::DistilStage { text } => c.distil_state().update(|s| s.stage = Some(text)),
        FromWorker::DistilStep(step) => c.distil_state().update(|s| {
            s.stage = None;
            s.losses.push((step.step, step.loss));
            s.step = Some(step);
        }),
        FromWorker::DistilEpoch(epoch) => c.distil_state().update(|s| s.epochs.push(epoch)),
        FromWorker::DistilPaused { paused } => c.distil_state().update(|s| s.paused = paused),
        FromWorker::DistilDone(report) => {
            c.distil_state().update(|s| {
                s.running = false;
                s.paused = false;
                s.stage = None;
                s.report = Some(*report);
            });
            // The lab panel shows the fine-tuned network's full report (posted just before).
        }
        FromWorker::DistilStopped { message, .. } => c.distil_state().update(|s| {
            s.running = false;
            s.stage = None;
            s.paused = false;
            s.loading = None;
            s.message = Some(message);
        }),
        FromWorker::Exported {
            weights,
            recipe_json,
            file_name,
        } => {
            download(&file_name, &weights, "application/octet-stream");
            download("recipe.json", recipe_json.as_bytes(), "application/json");
            c.user_model.update(|s| s.busy = None);
        }
        msg @ (FromWorker::UserModelLoaded(_)
        | FromWorker::UserModelClassified(_)
        | FromWorker::UserModelCompressed(_)
        | FromWorker::UserModelTuning { .. }
        | FromWorker::UserSweepPoint { .. }
        | FromWorker::UserSweepDone
        | FromWorker::UserModelNewHead { .. }
        | FromWorker::UserModelFailed { .. }) => user_model_panel::on_message(c.user_model, msg),
        FromWorker::Benchmarked(report) => c.bench.set(BenchState::Done(report)),
        FromWorker::DeviceReportProgress { stage, fraction } => {
            c.bench.set(BenchState::DeviceRunning { stage, fraction })
        }
        FromWorker::DeviceReported(report) => c.bench.set(BenchState::DeviceDone(report)),
        FromWorker::DistilBenchmarked(report) => c.bench.set(BenchState::TrainingDone(report)),
        FromWorker::BenchmarkFailed { message } => c.bench.set(BenchState::Failed(message)),
        FromWorker::Crashed { message, cause } => {
            let on_gpu = c.on_cpu_because.is_none();
            let starting = matches!(c.status.get_untracked(), Status::Loading { .. });
            // A GPU failure, or any crash while WebGPU starts, moves the page to the CPU; a
            // panic or trap after that restarts the worker on the same backend (the input
            // that caused it is reported, not retried).
            let to_cpu = on_gpu && (cause == CrashCause::Gpu || starting);
            let what = match cause {
                CrashCause::Gpu => "the WebGPU device was lost or failed",
                CrashCause::Panic => "the model worker panicked",
                CrashCause::Trap => "the model worker stopped (out of memory or a trap)",
            };
            let lost = format!("{what}: {message}");
            match c.in_flight.take() {
                Some(job) if to_cpu => c.queue.push_front(job),
                Some((id, _)) => set_item(c, id, ItemState::Error(lost.clone())),
                None => {}
            }
            reset_after_crash(c, &lost);
            if !on_gpu && starting {
                // The CPU fallback itself cannot start: restarting would loop.
                c.status.set(Status::Failed(lost));
                return;
            }
            c.notice.set(Some(if to_cpu {
                format!("{lost}. The page goes on on the CPU fallback.")
            } else {
                format!("{lost}. It was restarted on the same backend; what it held is gone.")
            }));
            respawn = Some(if to_cpu {
                Some(lost)
            } else {
                c.on_cpu_because.clone()
            });
        }
    });
    if let Some(backend) = respawn {
        spawn_worker(backend);
    }
    pump();
}

/// Brings the page in line with a new worker: whatever was running failed, and what the
/// old worker held (the lab's variant, training images, the visitor's model) is gone, so
/// nothing offers to export or train on it.
fn reset_after_crash(c: &Controller, lost: &str) {
    match c.lab.get_untracked() {
        LabState::Running { .. } => c.lab.set(LabState::Failed(lost.to_string())),
        LabState::Done(_) | LabState::FashionDone(_) => c.lab.set(LabState::Failed(format!(
            "{lost}. The variant it held is gone: apply or load it again."
        ))),
        LabState::Idle | LabState::Failed(_) => {}
    }
    if c.sweep.get_untracked().running.is_some() {
        c.sweep.update(|s| {
            s.running = None;
            s.error = Some(lost.to_string());
        });
    }
    if matches!(
        c.bench.get_untracked(),
        BenchState::Running(_) | BenchState::RunningTraining | BenchState::DeviceRunning { .. }
    ) {
        c.bench.set(BenchState::Failed(lost.to_string()));
    }
    for state in [c.distil, c.photo_distil] {
        let s = state.get_untracked();
        if s.running || s.loading.is_some() || s.data.is_some() {
            state.update(|s| {
                s.running = false;
                s.paused = false;
                s.loading = None;
                s.stage = None;
                s.data = None;
                s.message = Some(format!(
                    "{lost}. The training images it held are gone: add them again."
                ));
            });
        }
    }
    user_model_panel::on_worker_lost(c.user_model, lost);
}

fn backend_label(b: &BackendInfo) -> String {
    match b.kind {
        BackendKind::WebGpu => format!("WebGPU ({})", b.description),
        BackendKind::Cpu => "CPU fallback".into(),
    }
}

/// A `SharedArrayBuffer` of one counter, when the page is cross-origin isolated (the only
/// case in which a browser lets a page share memory with its worker).
fn shared_cancel_counter() -> Option<js_sys::SharedArrayBuffer> {
    let isolated = Reflect::get(&js_sys::global(), &"crossOriginIsolated".into())
        .ok()?
        .as_bool()?;
    isolated.then(|| js_sys::SharedArrayBuffer::new(4))
}

/// Cancels the worker's running long job (Apply, load, sweeps, benchmarks, your model's
/// compression); its panel then shows "Cancelled.". Training has its own Cancel.
pub fn cancel_long_job() {
    with_controller(|c| {
        if let Some(counter) = &c.cancel_counter {
            // Read by the worker between layers, images and runs: effective while it is busy.
            let _ = js_sys::Atomics::add(counter, 0, 1);
        } else if let (Some(worker), Ok(msg)) = (
            c.worker.as_ref(),
            serde_wasm_bindgen::to_value(&ToWorker::CancelJob),
        ) {
            // Read when the job next yields to the worker's event loop.
            let _ = worker.post_message(&js_sys::Array::of1(&msg));
        }
    });
}

/// Sends the next queued image when the worker is ready and idle.
fn pump() {
    with_controller(|c| {
        if c.in_flight.is_some()
            || !matches!(c.status.get_untracked(), Status::Ready(_))
            || matches!(c.lab.get_untracked(), LabState::Running { .. })
            || c.sweep.get_untracked().running.is_some()
        {
            return;
        }
        let (Some(worker), Some((id, blob))) = (c.worker.as_ref(), c.queue.pop_front()) else {
            return;
        };
        let name = c
            .items
            .get_untracked()
            .iter()
            .find(|i| i.id == id)
            .map(|i| i.name.clone())
            .unwrap_or_default();
        let Ok(msg) = serde_wasm_bindgen::to_value(&ToWorker::Classify { id, name }) else {
            return;
        };
        match worker.post_message(&js_sys::Array::of2(&msg, &blob)) {
            Ok(()) => {
                set_item(c, id, ItemState::Running);
                c.in_flight = Some((id, blob));
            }
            Err(e) => set_item(
                c,
                id,
                ItemState::Error(WebError::js("could not send the image", e).to_string()),
            ),
        }
    });
}

/// Sends a lab request (compress, load, export) when the model is idle.
pub fn send_lab(msg: ToWorker, blob: Option<Blob>) {
    with_controller(|c| {
        if c.in_flight.is_some() || !c.queue.is_empty() {
            c.lab.set(LabState::Failed(
                "wait until the queued photos are classified".into(),
            ));
            return;
        }
        if c.sweep.get_untracked().running.is_some() {
            c.lab
                .set(LabState::Failed("wait until the sweeps finish".into()));
            return;
        }
        if c.distilling() {
            c.lab
                .set(LabState::Failed("wait until the fine-tune finishes".into()));
            return;
        }
        let running = !matches!(msg, ToWorker::Export);
        let (Some(worker), Ok(js)) = (c.worker.as_ref(), serde_wasm_bindgen::to_value(&msg)) else {
            return;
        };
        let parts = match &blob {
            Some(b) => js_sys::Array::of2(&js, b),
            None => js_sys::Array::of1(&js),
        };
        match worker.post_message(&parts) {
            Ok(()) if running => c.lab.set(LabState::Running {
                stage: "Starting".into(),
                fraction: 0.0,
            }),
            Ok(()) => {}
            Err(e) => c.lab.set(LabState::Failed(
                WebError::js("could not reach the model worker", e).to_string(),
            )),
        }
    });
}

/// Sends a distillation request (images, start, pause / resume / cancel), with the image
/// files alongside when there are any.
pub fn send_distil(msg: ToWorker, files: Option<js_sys::Array>) {
    with_controller(|c| {
        if let ToWorker::DistilImages { target, .. }
        | ToWorker::DistilBuiltin { target }
        | ToWorker::Distil { target, .. } = &msg
        {
            // The worker reports on the last-asked network: never switch under a run.
            if c.distilling() && c.distil_target != *target {
                let asking = match target {
                    DistilTarget::Fashion => c.distil,
                    DistilTarget::Photos => c.photo_distil,
                };
                asking.update(|s| {
                    s.loading = None;
                    s.running = false;
                    s.message = Some(
                        "A fine-tune is running on the other tab: wait for it or cancel it first."
                            .into(),
                    );
                });
                return;
            }
            c.distil_target = *target;
        }
        let (Some(worker), Ok(js)) = (c.worker.as_ref(), serde_wasm_bindgen::to_value(&msg)) else {
            return;
        };
        let parts = match &files {
            Some(f) => js_sys::Array::of2(&js, f),
            None => js_sys::Array::of1(&js),
        };
        if let Err(e) = worker.post_message(&parts) {
            c.distil_state().update(|s| {
                s.running = false;
                s.loading = None;
                s.message = Some(WebError::js("could not reach the model worker", e).to_string());
            });
        }
    });
}

/// Sends a request about the visitor's own model, with its file alongside when there is one.
pub fn send_user_model(msg: ToWorker, blob: Option<Blob>) {
    with_controller(|c| {
        let (Some(worker), Ok(js)) = (c.worker.as_ref(), serde_wasm_bindgen::to_value(&msg)) else {
            return;
        };
        let parts = match &blob {
            Some(b) => js_sys::Array::of2(&js, b),
            None => js_sys::Array::of1(&js),
        };
        if let Err(e) = worker.post_message(&parts) {
            let message = WebError::js("could not reach the model worker", e).to_string();
            c.user_model.update(|s| {
                s.loading = None;
                s.busy = None;
                s.error = Some(message);
            });
        }
    });
}

/// Starts the Fashion-MNIST sweeps on the first `images` test images.
pub fn send_sweep(images: u32) {
    with_controller(|c| {
        let (Some(worker), Ok(js)) = (
            c.worker.as_ref(),
            serde_wasm_bindgen::to_value(&ToWorker::FashionSweep { images }),
        ) else {
            return;
        };
        match worker.post_message(&js_sys::Array::of1(&js)) {
            Ok(()) => c.sweep.set(SweepState {
                running: Some(("Starting".into(), 0, 1)),
                ..SweepState::default()
            }),
            Err(e) => c.sweep.update(|s| {
                s.error = Some(WebError::js("could not reach the model worker", e).to_string())
            }),
        }
    });
}

/// Offers `bytes` as a file download.
fn download(name: &str, bytes: &[u8], mime: &str) {
    let array = js_sys::Uint8Array::from(bytes);
    let options = web_sys::BlobPropertyBag::new();
    options.set_type(mime);
    let Ok(blob) =
        Blob::new_with_u8_array_sequence_and_options(&js_sys::Array::of1(&array), &options)
    else {
        return;
    };
    let Ok(url) = Url::create_object_url_with_blob(&blob) else {
        return;
    };
    let anchor = web_sys::window()
        .and_then(|w| w.document())
        .and_then(|d| d.create_element("a").ok())
        .and_then(|a| a.dyn_into::<web_sys::HtmlAnchorElement>().ok());
    if let Some(a) = anchor {
        a.set_href(&url);
        a.set_download(name);
        a.click();
    }
    // The download has started from the URL; it can be released on the next turn.
    let revoke = Closure::once_into_js(move || {
        let _ = Url::revoke_object_url(&url);
    });
    if let Some(w) = web_sys::window() {
        let _ =
            w.set_timeout_with_callback_and_timeout_and_arguments_0(revoke.unchecked_ref(), 1000);
    }
}

/// Starts an in-page benchmark of `runs` warm runs (when the model is idle).
pub fn start_benchmark(request: ToWorker) {
    with_controller(|c| {
        if c.in_flight.is_some() || !c.queue.is_empty() {
            c.bench.set(BenchState::Failed(
                "wait until the queued photos are classified".into(),
            ));
            return;
        }
        let running = match &request {
            ToWorker::Benchmark { runs } => BenchState::Running(*runs),
            ToWorker::DeviceReport { .. } => BenchState::DeviceRunning {
                stage: "Starting".into(),
                fraction: 0.0,
            },
            _ => BenchState::RunningTraining,
        };
        let (Some(worker), Ok(msg)) = (c.worker.as_ref(), serde_wasm_bindgen::to_value(&request))
        else {
            return;
        };
        match worker.post_message(&js_sys::Array::of1(&msg)) {
            Ok(()) => c.bench.set(running),
            Err(e) => c.bench.set(BenchState::Failed(
                WebError::js("could not start the benchmark", e).to_string(),
            )),
        }
    });
}

/// Queues images (files, pasted or fetched blobs); each gets its own card.
pub fn add_images(images: Vec<(String, Blob)>) {
    let total = images.len();
    with_controller(|c| {
        c.notice.set(
            (total > MAX_BATCH)
                .then(|| format!("{total} files at once: classifying the first {MAX_BATCH}.")),
        );
        let mut new_items = Vec::new();
        for (name, blob) in images.into_iter().take(MAX_BATCH) {
            let id = c.next_id;
            c.next_id += 1;
            let empty = blob.size() == 0.0;
            let state = if empty {
                ItemState::Error("the file is empty (0 bytes)".into())
            } else {
                ItemState::Queued
            };
            let preview_url = (!empty)
                .then(|| Url::create_object_url_with_blob(&blob).ok())
                .flatten();
            new_items.push(Item {
                id,
                name,
                preview_url,
                state: RwSignal::new(state),
            });
            if !empty {
                c.queue.push_back((id, blob));
            }
        }
        c.items.update(|items| {
            new_items.reverse();
            new_items.append(items);
            *items = new_items;
        });
    });
    pump();
}

/// Removes the finished cards and releases their previews' object URLs; queued and running
/// images keep theirs.
fn clear_results() {
    with_controller(|c| {
        c.items.update(|items| {
            items.retain(|item| {
                let finished = matches!(
                    item.state.get_untracked(),
                    ItemState::Done(_) | ItemState::Error(_)
                );
                if finished && let Some(url) = &item.preview_url {
                    let _ = Url::revoke_object_url(url);
                }
                !finished
            })
        });
        c.notice.set(None);
    });
}

fn files_to_images(files: Option<web_sys::FileList>) -> Vec<(String, Blob)> {
    let Some(files) = files else {
        return Vec::new();
    };
    (0..files.length())
        .filter_map(|i| files.get(i))
        .map(|f| (f.name(), f.unchecked_into::<Blob>()))
        .collect()
}

async fn fetch_blob(url: &str) -> Result<Blob, WebError> {
    let window = web_sys::window().ok_or_else(|| WebError::Message("no window".into()))?;
    let resp: Response = JsFuture::from(window.fetch_with_str(url))
        .await
        .map_err(|e| WebError::js("fetch", e))?
        .unchecked_into();
    if !resp.ok() {
        return Err(WebError::Http {
            url: url.into(),
            status: resp.status(),
        });
    }
    let blob = JsFuture::from(resp.blob().map_err(|e| WebError::js("fetch", e))?)
        .await
        .map_err(|e| WebError::js("fetch", e))?;
    Ok(blob.unchecked_into())
}

async fn load_samples() -> Result<Vec<Sample>, WebError> {
    let blob = fetch_blob("assets/samples/index.json").await?;
    let text = JsFuture::from(blob.text())
        .await
        .map_err(|e| WebError::js("samples", e))?
        .as_string()
        .unwrap_or_default();
    let value = js_sys::JSON::parse(&text).map_err(|e| WebError::js("samples", e))?;
    serde_wasm_bindgen::from_value(value).map_err(|e| WebError::Message(e.to_string()))
}

#[component]
pub fn App() -> impl IntoView {
    let status = RwSignal::new(Status::Loading {
        stage: "Starting".into(),
        loaded: 0.0,
        total: None,
    });
    let items: RwSignal<Vec<Item>> = RwSignal::new(Vec::new());
    let notice: RwSignal<Option<String>> = RwSignal::new(None);
    let samples: RwSignal<Vec<Sample>> = RwSignal::new(Vec::new());
    let dragging = RwSignal::new(false);
    let bench = RwSignal::new(BenchState::Idle);
    let lab = RwSignal::new(LabState::Idle);
    let sweep = RwSignal::new(SweepState::default());
    let distil = RwSignal::new(DistilState::default());
    let photo_distil = RwSignal::new(DistilState::default());
    let model = RwSignal::new(ModelChoice::Photos);
    let user_model = RwSignal::new(UserModelState::default());

    CONTROLLER.with(|c| {
        *c.borrow_mut() = Some(Controller {
            worker: None,
            queue: VecDeque::new(),
            in_flight: None,
            next_id: 1,
            on_cpu_because: None,
            cancel_counter: None,
            status,
            items,
            notice,
            bench,
            lab,
            sweep,
            distil,
            photo_distil,
            distil_target: DistilTarget::Fashion,
            user_model,
            _handlers: Vec::new(),
        })
    });
    spawn_worker(cpu_requested_in_url());
    spawn_local(async move {
        match load_samples().await {
            Ok(list) => samples.set(list),
            Err(e) => notice.set(Some(format!("Sample photos are unavailable: {e}"))),
        }
    });

    // The whole page is a drop zone.
    let _ = window_event_listener(ev::dragover, move |e| {
        e.prevent_default();
        dragging.set(true);
    });
    let _ = window_event_listener(ev::dragleave, move |e| {
        if e.related_target().is_none() {
            dragging.set(false);
        }
    });
    let _ = window_event_listener(ev::drop, move |e| {
        e.prevent_default();
        dragging.set(false);
        if model.get_untracked() == ModelChoice::Yours {
            // On "Your model", a drop is a model, class names, or images and folders of
            // images for it (the folder walk starts now, while the drop is live).
            let Some(dt) = e.data_transfer() else {
                return;
            };
            let dropped =
                crate::distil_panel::dropped_files(&dt, user_model_panel::MAX_IMAGES_PER_DROP);
            spawn_local(async move {
                match dropped.await {
                    Ok((files, stopped)) => {
                        let files = files
                            .into_iter()
                            .map(|(path, file)| (path, file.unchecked_into::<Blob>()))
                            .collect();
                        user_model_panel::take_files(user_model, files, stopped);
                    }
                    Err(_) => user_model.update(|s| {
                        s.error = Some("The browser could not read the dropped folder.".into())
                    }),
                }
            });
            return;
        }
        let files = e.data_transfer().and_then(|dt| dt.files());
        let images = files_to_images(files);
        if images.is_empty() {
            notice.set(Some(
                "Nothing to classify in that drop: drop image files.".into(),
            ));
        } else {
            add_images(images);
        }
    });
    let _ = window_event_listener(ev::paste, move |e| {
        let files = e.clipboard_data().and_then(|dt| dt.files());
        let images = files_to_images(files);
        if images.is_empty() {
            notice.set(Some("The clipboard holds no image to classify.".into()));
        } else {
            e.prevent_default();
            add_images(images);
        }
    });

    let on_pick = move |e: ev::Event| {
        let input: web_sys::HtmlInputElement = event_target(&e);
        add_images(files_to_images(input.files()));
        input.set_value("");
    };

    view! {
        <main class:dragging=move || dragging.get()>
            <header>
                <h1>"compresslab"</h1>
                <p class="tagline">
                    "EfficientNet-Lite0 running in your browser, on WebGPU when it can. "
                    "Drop a photo anywhere on the page, paste one, or pick a file: it never leaves your machine."
                </p>
            </header>
            <StatusBar status=status/>
            <nav class="model-tabs" role="tablist">
                <button id="model-photos" role="tab" class:active=move || model.get() == ModelChoice::Photos
                    on:click=move |_| model.set(ModelChoice::Photos)>"Photos · EfficientNet-Lite0"</button>
                <button id="model-fashion" role="tab" class:active=move || model.get() == ModelChoice::Fashion
                    on:click=move |_| model.set(ModelChoice::Fashion)>"Fashion-MNIST · exact accuracy"</button>
                <button id="model-yours" role="tab" class:active=move || model.get() == ModelChoice::Yours
                    on:click=move |_| model.set(ModelChoice::Yours)>"Your model · ONNX"</button>
            </nav>
            <Show when=move || model.get() == ModelChoice::Yours>
                <UserModelPanel state=user_model/>
            </Show>
            <Show when=move || model.get() == ModelChoice::Fashion>
                <section class="fashion-intro" id="fashion-intro">
                    <p>
                        "A small CNN (3 conv + BatchNorm + ReLU6 blocks, 2 linear layers; 390 k parameters) that we trained on Fashion-MNIST's "
                        "60 000 training images with our own burn training command. Here every compression setting is measured by real accuracy "
                        "on all 10 000 labelled test images, computed in your browser."
                    </p>
                </section>
                <SweepPanel sweep=sweep can_run=Signal::derive(move || {
                    matches!(status.get(), Status::Ready(_)) && !matches!(lab.get(), LabState::Running { .. })
                })/>
            </Show>
            <div class:hidden=move || model.get() != ModelChoice::Photos>
            <BenchPanel status=status bench=bench items=items/>
            <section class="inputs">
                <label class="picker">
                    "Choose images…"
                    <input id="file-input" type="file" accept="image/*" multiple on:change=on_pick/>
                </label>
                <span class="hint">"or drag & drop / paste (Ctrl+V)"</span>
                <div class="samples">
                    <For each=move || samples.get() key=|s| s.file.clone() let:sample>
                        <SampleButton sample=sample notice=notice/>
                    </For>
                </div>
            </section>
            <Show when=move || notice.get().is_some()>
                <p class="notice" id="notice">{move || notice.get().unwrap_or_default()}</p>
            </Show>
            <Show when=move || items.with(|v| v.iter().any(|i| matches!(i.state.get(), ItemState::Done(_) | ItemState::Error(_))))>
                <button id="clear-results" class="clear" on:click=move |_| clear_results()>"Clear finished results"</button>
            </Show>
            <section id="results" class="results">
                <For each=move || items.get() key=|i| i.id let:item>
                    <ResultCard item=item/>
                </For>
            </section>
            </div>
            <Show when=move || model.get() != ModelChoice::Yours>
                <LabPanel status=status lab=lab items=items model=model/>
            </Show>
            <Show when=move || model.get() == ModelChoice::Photos>
                <DistilPanel distil=photo_distil lab=lab target=DistilTarget::Photos can_run=Signal::derive(move || {
                    matches!(status.get(), Status::Ready(_))
                        && !matches!(lab.get(), LabState::Running { .. })
                        && !distil.get().running
                })/>
            </Show>
            <Show when=move || model.get() == ModelChoice::Fashion>
                <DistilPanel distil=distil lab=lab target=DistilTarget::Fashion can_run=Signal::derive(move || {
                    matches!(status.get(), Status::Ready(_))
                        && !matches!(lab.get(), LabState::Running { .. })
                        && sweep.get().running.is_none()
                        && !photo_distil.get().running
                })/>
            </Show>
            <div class="drop-overlay">"Drop images to classify"</div>
        </main>
    }
}

#[component]
fn SampleButton(sample: Sample, notice: RwSignal<Option<String>>) -> impl IntoView {
    let file = sample.file.clone();
    let title = sample.title.clone();
    let on_click = move |_| {
        let file = file.clone();
        spawn_local(async move {
            match fetch_blob(&format!("assets/samples/{file}")).await {
                Ok(blob) => add_images(vec![(file, blob)]),
                Err(e) => notice.set(Some(format!("Could not load the sample: {e}"))),
            }
        });
    };
    view! {
        <button class="sample" data-sample=sample.file.clone() on:click=on_click>
            <img src=format!("assets/samples/{}", sample.file) alt=title.clone() loading="lazy"/>
            <span>{title}</span>
        </button>
    }
}

/// A change handler for an `<input>` that stores its value in `signal` when it parses (a
/// half-typed number leaves the last good value).
pub(crate) fn set_parsed<T>(signal: RwSignal<T>) -> impl Fn(leptos::ev::Event) + Copy + 'static
where
    T: std::str::FromStr + Send + Sync + 'static,
{
    move |e| {
        if let Ok(v) = event_target_value(&e).parse::<T>() {
            signal.set(v);
        }
    }
}

fn megabytes(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1_048_576.0)
}

#[component]
fn StatusBar(status: RwSignal<Status>) -> impl IntoView {
    move || match status.get() {
        Status::Loading {
            stage,
            loaded,
            total,
        } => {
            let detail = match total {
                Some(t) if t > 0.0 => format!("{} of {}", megabytes(loaded), megabytes(t)),
                _ if loaded > 0.0 => megabytes(loaded),
                _ => String::new(),
            };
            let bar = match total {
                Some(t) if t > 0.0 => view! { <progress max=t value=loaded></progress> }.into_any(),
                _ => view! { <progress></progress> }.into_any(),
            };
            view! {
                <section id="status" class="status loading" data-state="loading">
                    <span class="stage">{stage}</span>
                    {bar}
                    <span class="detail">{detail}</span>
                </section>
            }
            .into_any()
        }
        Status::Ready(ModelReady {
            backend,
            parameters,
            weights_bytes,
            from_cache,
            load_ms,
        }) => {
            let kind = match backend.kind {
                BackendKind::WebGpu => "webgpu",
                BackendKind::Cpu => "cpu",
            };
            let badge = match backend.kind {
                BackendKind::WebGpu => "WebGPU".to_string(),
                BackendKind::Cpu => "CPU fallback".to_string(),
            };
            let reason = backend.fallback_reason.clone();
            let limits = backend
                .limits
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let features = backend.features.join(", ");
            let wgsl_features = if backend.wgsl_features.is_empty() {
                "WGSL language features: none reported".to_string()
            } else {
                format!(
                    "WGSL language features: {}",
                    backend.wgsl_features.join(", ")
                )
            };
            view! {
                <section id="status" class="status ready" data-state="ready" data-backend=kind>
                    <span class=format!("badge {kind}") id="backend-badge">{badge}</span>
                    <span class="adapter" id="adapter">{backend.description.clone()}</span>
                    {reason.map(|r| view! { <span class="reason" id="fallback-reason">"Why: " {r}</span> })}
                    <span class="model">
                        {format!(
                            "EfficientNet-Lite0 · {:.2} M parameters · {} weights {} · ready in {:.1} s",
                            parameters as f64 / 1e6,
                            megabytes(weights_bytes as f64),
                            if from_cache { "(from cache)" } else { "(downloaded)" },
                            load_ms / 1000.0
                        )}
                    </span>
                    {(!limits.is_empty()).then(|| view! {
                        <details class="limits">
                            <summary>"Adapter limits and features"</summary>
                            <p>{limits}</p>
                            <p>{features}</p>
                            <p id="wgsl-features">{wgsl_features}</p>
                        </details>
                    })}
                </section>
            }
            .into_any()
        }
        Status::Failed(message) => view! {
            <section id="status" class="status failed" data-state="failed">
                <span class="error">"The model could not be loaded: " {message}</span>
            </section>
        }
        .into_any(),
    }
}

#[component]
fn ResultCard(item: Item) -> impl IntoView {
    let state = item.state;
    let preview = item.preview_url.clone();
    view! {
        <article class="result" data-id=item.id data-state=move || match state.get() {
            ItemState::Queued => "queued",
            ItemState::Running => "running",
            ItemState::Done(_) => "done",
            ItemState::Error(_) => "error",
        }>
            <div class="thumb">
                {move || match (&preview, state.get()) {
                    (Some(url), ItemState::Done(_) | ItemState::Running | ItemState::Queued) => {
                        view! { <img src=url.clone() alt=""/> }.into_any()
                    }
                    _ => view! { <div class="no-preview">"✕"</div> }.into_any(),
                }}
            </div>
            <div class="body">
                <h3 class="name">{item.name.clone()}</h3>
                {move || match state.get() {
                    ItemState::Queued => view! { <p class="pending">"Waiting for the model…"</p> }.into_any(),
                    ItemState::Running => view! { <p class="pending">"Classifying…"</p> }.into_any(),
                    ItemState::Error(message) => view! { <p class="error">{message}</p> }.into_any(),
                    ItemState::Done(outcome) => view! { <OutcomeView outcome=outcome/> }.into_any(),
                }}
            </div>
        </article>
    }
}

#[component]
fn OutcomeView(outcome: Outcome) -> impl IntoView {
    let timing = format!(
        "{:.0} ms {} on {} · decode + preprocess {:.0} ms · {}×{}{}",
        outcome.inference_ms,
        match (outcome.cold, outcome.backend.starts_with("WebGPU")) {
            (true, true) => "(cold: first run, includes shader compilation and set-up)",
            (true, false) => "(cold: first run, includes memory set-up)",
            (false, _) => "(warm)",
        },
        outcome.backend,
        outcome.preprocess_ms,
        outcome.width,
        outcome.height,
        if outcome.downscaled {
            " (downsampled while decoding)"
        } else {
            ""
        }
    );
    let canvas = NodeRef::<leptos::html::Canvas>::new();
    let pixels = outcome.model_input.clone();
    Effect::new(move |_| {
        if let Some(canvas) = canvas.get() {
            draw_rgb(&canvas, &pixels, 224, 224);
        }
    });
    view! {
        <figure class="model-input">
            <canvas node_ref=canvas width="224" height="224" class="model-input-canvas"></canvas>
            <figcaption>"What the model sees (224×224)"</figcaption>
        </figure>
        <ol class="top5">
            {outcome
                .top5
                .into_iter()
                .map(|p| {
                    let pct = p.probability * 100.0;
                    view! {
                        <li class="prediction" data-class=p.class>
                            <span class="label">{p.label.clone()}</span>
                            <span class="bar"><span class="fill" style=format!("width: {pct:.1}%")></span></span>
                            <span class="prob">{format!("{pct:.1}%")}</span>
                        </li>
                    }
                })
                .collect_view()}
        </ol>
        <p class="timing" data-cold=outcome.cold.to_string() data-ms=format!("{:.1}", outcome.inference_ms)>{timing}</p>
    }
}

/// Developers' timing: warm p50/p95 of the model alone on the current backend.
#[component]
fn BenchPanel(
    status: RwSignal<Status>,
    bench: RwSignal<BenchState>,
    items: RwSignal<Vec<Item>>,
) -> impl IntoView {
    let runs = RwSignal::new(20u32);
    let can_run = move || {
        matches!(status.get(), Status::Ready(_))
            && !matches!(
                bench.get(),
                BenchState::Running(_)
                    | BenchState::RunningTraining
                    | BenchState::DeviceRunning { .. }
            )
            && items
                .get()
                .iter()
                .any(|i| matches!(i.state.get(), ItemState::Done(_)))
    };
    view! {
        <section class="bench" id="bench">
            <label>
                "Benchmark "
                <input id="bench-runs" type="number" min="1" max="1000"
                    prop:value=move || runs.get().to_string()
                    on:change=move |e| {
                        if let Ok(n) = event_target_value(&e).parse::<u32>() {
                            runs.set(n.clamp(1, 1000));
                        }
                    }/>
                " warm runs"
            </label>
            <button id="bench-run" disabled=move || !can_run() on:click=move |_| start_benchmark(ToWorker::Benchmark { runs: runs.get_untracked() })>
                "Run"
            </button>
            <button id="bench-distil" disabled=move || !can_run()
                on:click=move |_| start_benchmark(ToWorker::BenchDistil { batch: 2, steps: 2 })
                title="Distillation training steps at 224² (batch 2, random crops of the last photo) next to inference">
                "Time training"
            </button>
            <button id="device-report-run" disabled=move || !can_run()
                on:click=move |_| start_benchmark(ToWorker::DeviceReport { runs: runs.get_untracked().min(100) })
                title="fp32, int8, int4 and 50 % channels on every executor this browser has (WebGPU and the CPU fallback), timed side by side on the last photo">
                "Device report"
            </button>
            <button id="bench-cancel" class="cancel" disabled=move || !matches!(
                    bench.get(),
                    BenchState::Running(_) | BenchState::RunningTraining | BenchState::DeviceRunning { .. }
                )
                on:click=move |_| cancel_long_job()>"Cancel"</button>
            <span class="bench-result" id="bench-result" data-state=move || match bench.get() {
                BenchState::Idle => "idle",
                BenchState::Running(_) | BenchState::RunningTraining | BenchState::DeviceRunning { .. } => "running",
                BenchState::Done(_) | BenchState::TrainingDone(_) | BenchState::DeviceDone(_) => "done",
                BenchState::Failed(_) => "failed",
            }>
                {move || match bench.get() {
                    BenchState::Idle => "Times the model on the last photo (after one is classified); the device report times every compression on every executor here.".to_string(),
                    BenchState::Running(n) => format!("Running {n} warm runs…"),
                    BenchState::RunningTraining => "Timing distillation training at 224² (the first step compiles the training shaders)…".to_string(),
                    BenchState::TrainingDone(r) => format!(
                        "{}: distillation training {:.2} images/s vs inference {:.2} images/s ({:.1}× the time per image; batch {}, {} timed steps, first step {:.1} s)",
                        r.backend, r.training_images_per_s, r.inference_images_per_s,
                        r.inference_images_per_s / r.training_images_per_s.max(1e-9),
                        r.batch, r.steps, r.first_step_ms / 1000.0
                    ),
                    BenchState::DeviceRunning { stage, fraction } => {
                        format!("Device report: {stage} ({:.0} %)…", fraction * 100.0)
                    }
                    BenchState::DeviceDone(r) => format!(
                        "Device report: {} variants timed, {} warm runs each (table below)",
                        r.rows.len(), r.runs
                    ),
                    BenchState::Failed(m) => format!("Benchmark failed: {m}"),
                    BenchState::Done(r) => format!(
                        "{}: warm p50 {:.1} ms · p95 {:.1} ms · min {:.1} ms · mean {:.1} ms over {} runs",
                        r.backend, r.p50_ms, r.p95_ms, r.min_ms, r.mean_ms, r.runs
                    ),
                }}
            </span>
            {move || match bench.get() {
                BenchState::DeviceDone(report) => Some(view! { <DeviceReportTable report=*report/> }),
                _ => None,
            }}
        </section>
    }
}

/// Paints 8-bit RGB pixels onto a canvas.
pub(crate) fn draw_rgb(canvas: &web_sys::HtmlCanvasElement, rgb: &[u8], width: u32, height: u32) {
    if rgb.len() != (width * height * 3) as usize {
        return;
    }
    let rgba: Vec<u8> = rgb
        .chunks_exact(3)
        .flat_map(|p| [p[0], p[1], p[2], 255])
        .collect();
    let Ok(Some(ctx)) = canvas.get_context("2d") else {
        return;
    };
    let ctx: web_sys::CanvasRenderingContext2d = ctx.unchecked_into();
    if let Ok(data) = web_sys::ImageData::new_with_u8_clamped_array_and_sh(
        wasm_bindgen::Clamped(&rgba),
        width,
        height,
    ) {
        let _ = ctx.put_image_data(&data, 0.0, 0.0);
    }
}
