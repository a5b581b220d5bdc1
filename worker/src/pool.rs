//! Helper workers for batch work, so evaluating a test set uses every core: data parallel,
//! no shared memory (wasm threads need a nightly build). A helper is this same worker
//! binary started under the name [`HELPER_NAME`]; it loads no model of its own and answers
//! [`HelperJob`]s with the serialized network and the images it is sent.
//!
//! The pool is started lazily (when a batch job's assets start downloading) and kept. A
//! helper that fails is dropped and its share computed here, so a pool problem costs speed,
//! never a result.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use compresslab::compress::CompressedModel;
use compresslab::fashion::{PIXELS, normalize};
use compresslab::fashion_cpu::{CpuFashionNet, EVAL_BATCH, predictions};
use compresslab::weights::TensorStore;
use js_sys::{Array, Function, Promise, Uint8Array};
use serde::{Deserialize, Serialize};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{MessageEvent, Worker, WorkerOptions, WorkerType};

use crate::error::{WorkerError, WorkerResult};
use crate::worker::{Resolvers, scope};

/// The name a helper is started under (how it knows it is one).
pub const HELPER_NAME: &str = "compresslab-helper";
/// At most this many workers in all (this one included), whatever the browser reports.
const MAX_WORKERS: u32 = 8;

/// A network for a helper: serialized as the lab stores it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum ModelFormat {
    /// Plain weights (`TensorStore::to_safetensors`), the original network.
    Weights,
    /// A compressed export (`CompressedModel::to_safetensors`), run with its integer kernels.
    Compressed,
}

/// Page-invisible messages between this worker and its helpers.
#[derive(Debug, Serialize, Deserialize)]
enum HelperJob {
    /// Build the Fashion-MNIST network posted after this message (kept for the predictions).
    FashionLoad { format: ModelFormat },
    /// The predicted class of each Fashion-MNIST image posted after this message (raw 28×28
    /// bytes), by the last loaded network.
    FashionPredict,
}

#[derive(Debug, Serialize, Deserialize)]
enum HelperReply {
    Started,
    Loaded,
    Predictions {
        #[serde(with = "serde_bytes")]
        classes: Vec<u8>,
    },
    Failed {
        message: String,
    },
}

struct Helper {
    worker: Worker,
    /// Resolvers of the jobs posted and not answered yet (a helper answers its messages in
    /// order).
    waiting: Resolvers,
    alive: Rc<Cell<bool>>,
    /// Whether it computed a chunk of the current job.
    used: Cell<bool>,
    _handlers: [Closure<dyn FnMut(JsValue)>; 2],
}

impl Helper {
    /// Starts a helper; the returned promise resolves with its first reply (`Started`).
    fn spawn() -> WorkerResult<(Self, Promise)> {
        let options = WorkerOptions::new();
        options.set_type(WorkerType::Classic);
        options.set_name(HELPER_NAME);
        let worker = Worker::new_with_options("./worker_loader.js", &options)
            .map_err(|e| WorkerError::js("start a helper worker", e))?;
        let waiting = Resolvers::default();
        let alive = Rc::new(Cell::new(true));
        let on_message = {
            let waiting = waiting.clone();
            Closure::<dyn FnMut(JsValue)>::new(move |event: JsValue| {
                let data = event
                    .dyn_ref::<MessageEvent>()
                    .map_or(JsValue::UNDEFINED, MessageEvent::data);
                let resolve = waiting.borrow_mut().pop_front();
                if let Some(resolve) = resolve {
                    let _ = resolve.call1(&JsValue::NULL, &data);
                }
            })
        };
        let on_error = {
            let (waiting, alive) = (waiting.clone(), alive.clone());
            Closure::<dyn FnMut(JsValue)>::new(move |event: JsValue| {
                alive.set(false);
                let message = event
                    .dyn_ref::<web_sys::ErrorEvent>()
                    .map_or_else(|| "the helper stopped".to_string(), |e| e.message());
                // Every job in flight fails with the helper.
                let pending: Vec<Function> = waiting.borrow_mut().drain(..).collect();
                if let Ok(reply) = serde_wasm_bindgen::to_value(&HelperReply::Failed { message }) {
                    for resolve in pending {
                        let _ = resolve.call1(&JsValue::NULL, &Array::of1(&reply));
                    }
                }
            })
        };
        worker.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        worker.set_onerror(Some(on_error.as_ref().unchecked_ref()));
        let helper = Self {
            worker,
            waiting,
            alive,
            used: Cell::new(false),
            _handlers: [on_message, on_error],
        };
        let started = helper.next_reply();
        Ok((helper, started))
    }

    /// A promise of the reply to the message posted next.
    fn next_reply(&self) -> Promise {
        let waiting = self.waiting.clone();
        Promise::new(&mut |resolve, _| waiting.borrow_mut().push_back(resolve))
    }

    /// Posts `job` with `bytes` (copied) and returns its reply's promise.
    fn post(&self, job: &HelperJob, bytes: &[&[u8]]) -> WorkerResult<Promise> {
        let message = Array::new();
        message.push(
            &serde_wasm_bindgen::to_value(job).map_err(|e| WorkerError::Message(e.to_string()))?,
        );
        let transfer = Array::new();
        for b in bytes {
            let array = Uint8Array::from(*b);
            transfer.push(&array.buffer());
            message.push(&array);
        }
        self.worker
            .post_message_with_transfer(&message, &transfer)
            .map_err(|e| WorkerError::js("post to a helper worker", e))?;
        Ok(self.next_reply())
    }
}

/// Reads a helper's reply (the first element of the posted array).
fn read_reply(value: JsValue) -> HelperReply {
    let first = value
        .dyn_ref::<Array>()
        .map_or(JsValue::UNDEFINED, |a| a.get(0));
    serde_wasm_bindgen::from_value(first).unwrap_or_else(|e| HelperReply::Failed {
        message: format!("unreadable reply: {e}"),
    })
}

enum PoolState {
    /// Not started yet; the size to start (this worker included).
    Idle(u32),
    Starting(Vec<(Helper, Promise)>),
    Ready(Vec<Rc<Helper>>),
}

thread_local! {
    static POOL: RefCell<PoolState> = const { RefCell::new(PoolState::Idle(0)) };
    /// In a helper: the network of the batch job in progress.
    static HELPER_NET: RefCell<Option<CpuFashionNet>> = const { RefCell::new(None) };
}

/// Sets the pool's size (this worker included): `requested`, or one per core the browser
/// reports; at most [`MAX_WORKERS`]. Called once, at start-up.
pub fn configure(requested: Option<u32>) {
    let cores = scope().navigator().hardware_concurrency() as u32;
    let size = requested.unwrap_or(cores).clamp(1, MAX_WORKERS);
    POOL.with(|p| *p.borrow_mut() = PoolState::Idle(size));
}

/// Starts the helpers (without waiting for them) if they are not started yet.
pub fn warm_up() {
    POOL.with(|p| {
        let mut state = p.borrow_mut();
        if let PoolState::Idle(size) = *state {
            let mut starting = Vec::new();
            for _ in 1..size {
                match Helper::spawn() {
                    Ok(h) => starting.push(h),
                    Err(e) => {
                        web_sys::console::warn_1(&format!("no helper worker: {e}").into());
                        break;
                    }
                }
            }
            *state = PoolState::Starting(starting);
        }
    });
}

/// The started helpers (empty when the pool is one worker or none could start).
async fn helpers() -> Vec<Rc<Helper>> {
    warm_up();
    let starting = POOL.with(|p| match &mut *p.borrow_mut() {
        PoolState::Starting(s) => Some(std::mem::take(s)),
        _ => None,
    });
    if let Some(starting) = starting {
        let mut ready = Vec::new();
        for (helper, started) in starting {
            match JsFuture::from(started).await.map(read_reply) {
                Ok(HelperReply::Started) => ready.push(Rc::new(helper)),
                Ok(HelperReply::Failed { message }) => {
                    web_sys::console::warn_1(
                        &format!("a helper worker failed to start: {message}").into(),
                    );
                }
                _ => web_sys::console::warn_1(&"a helper worker failed to start".into()),
            }
        }
        POOL.with(|p| *p.borrow_mut() = PoolState::Ready(ready));
    }
    POOL.with(|p| match &mut *p.borrow_mut() {
        PoolState::Ready(helpers) => {
            // A helper that failed is stopped, so its wasm memory goes with it.
            helpers.retain(|h| {
                if !h.alive.get() {
                    h.worker.terminate();
                }
                h.alive.get()
            });
            helpers.clone()
        }
        _ => Vec::new(),
    })
}

/// Images per chunk of work: one evaluation batch (~0.1 s here), so the workers finish
/// within two batches of each other (a helper holds up to two chunks); a chunk's messages
/// (its pixels there, its classes back) cost well under a millisecond.
const CHUNK: usize = EVAL_BATCH;

/// The work of one batch job: chunks not yet taken, and each chunk's result.
struct Chunks {
    ranges: Vec<std::ops::Range<usize>>,
    next: usize,
    /// Chunks a failed helper gave back.
    returned: Vec<usize>,
    results: Vec<Option<Vec<usize>>>,
    done_images: usize,
    /// Helpers that computed at least one chunk.
    helpers_used: u32,
}

impl Chunks {
    fn take(&mut self) -> Option<usize> {
        self.returned.pop().or_else(|| {
            let c = self.next;
            (c < self.ranges.len()).then(|| {
                self.next += 1;
                c
            })
        })
    }
}

/// The pool's helpers, each loading the network posted to it.
pub struct Loading {
    helpers: Vec<(Rc<Helper>, Promise)>,
}

/// Posts the network `serialized` to the pool's helpers (starting them if they are not
/// yet) and returns without waiting for them to build it: they build theirs while this
/// worker builds its own.
pub async fn load_network(serialized: (ModelFormat, &[u8])) -> Loading {
    let (format, bytes) = serialized;
    let helpers = helpers()
        .await
        .into_iter()
        .filter_map(|helper| {
            helper.used.set(false);
            let loaded = helper
                .post(&HelperJob::FashionLoad { format }, &[bytes])
                .ok()?;
            Some((helper, loaded))
        })
        .collect();
    Loading { helpers }
}

/// The predicted class of each raw Fashion-MNIST image in `pixels` by `net`, with the
/// helpers of `loading` (given the same network) taking chunks as they finish their last
/// (this worker computes too, yielding between chunks so the helpers' replies are read).
/// `progress` gets the fraction done.
pub async fn fashion_predictions(
    net: &CpuFashionNet,
    loading: Loading,
    pixels: &[u8],
    progress: &mut dyn FnMut(f32),
) -> WorkerResult<PoolRun> {
    let count = pixels.len() / PIXELS;
    let ranges: Vec<_> = (0..count)
        .step_by(CHUNK)
        .map(|from| from..(from + CHUNK).min(count))
        .collect();
    let chunks = Rc::new(RefCell::new(Chunks {
        results: vec![None; ranges.len()],
        ranges,
        next: 0,
        returned: Vec::new(),
        done_images: 0,
        helpers_used: 0,
    }));
    let pixels: Rc<[u8]> = Rc::from(pixels);
    // The clock starts once this worker has its network, as with no helpers: starting
    // them is a one-time cost of the page, and the time a helper still needs to build its
    // network after this worker built its own is counted.
    let start = crate::worker::now();
    let running = Rc::new(Cell::new(0u32));
    for (helper, loaded) in loading.helpers {
        running.set(running.get() + 1);
        let (chunks, pixels, running) = (chunks.clone(), pixels.clone(), running.clone());
        wasm_bindgen_futures::spawn_local(async move {
            match JsFuture::from(loaded).await.map(read_reply) {
                Ok(HelperReply::Loaded) => {
                    // Two chunks in flight per helper: it starts the next one while this
                    // worker, busy with its own chunk, has not read the last reply yet.
                    running.set(running.get() + 1);
                    let (second, chunks2, pixels2, running2) = (
                        helper.clone(),
                        chunks.clone(),
                        pixels.clone(),
                        running.clone(),
                    );
                    wasm_bindgen_futures::spawn_local(async move {
                        helper_loop(&second, &chunks2, &pixels2).await;
                        running2.set(running2.get() - 1);
                    });
                    helper_loop(&helper, &chunks, &pixels).await
                }
                other => {
                    web_sys::console::warn_1(
                        &format!("a helper worker could not load the network: {other:?}").into(),
                    );
                    helper.alive.set(false);
                }
            }
            running.set(running.get() - 1);
        });
    }
    // Our share: chunk by chunk until none is left, then whatever a helper gave back.
    loop {
        if let Err(cancelled) = crate::cancel::check() {
            stop_helpers(&chunks, &running).await;
            return Err(cancelled.into());
        }
        let next = chunks.borrow_mut().take();
        match next {
            Some(c) => {
                let range = chunks.borrow().ranges[c].clone();
                let classes = match predict_range(net, &pixels, range.clone()) {
                    Ok(classes) => classes,
                    Err(e) => {
                        stop_helpers(&chunks, &running).await;
                        return Err(e);
                    }
                };
                {
                    let mut all = chunks.borrow_mut();
                    all.results[c] = Some(classes);
                    all.done_images += range.len();
                    progress(all.done_images as f32 / count.max(1) as f32);
                }
                // Let the helpers' replies in (they are tasks of this worker's event loop).
                crate::worker::yield_now().await;
            }
            None if running.get() == 0 => break,
            // Only helpers are computing: wait for their replies without spinning.
            None => crate::worker::sleep_ms(1).await,
        }
    }
    // The helpers' last chunks count too.
    progress(chunks.borrow().done_images as f32 / count.max(1) as f32);
    let workers = 1 + chunks.borrow().helpers_used;
    let results = std::mem::take(&mut chunks.borrow_mut().results);
    let mut classes = Vec::with_capacity(count);
    for r in results {
        classes.extend(r.ok_or_else(|| WorkerError::Message("a chunk was lost".into()))?);
    }
    Ok(PoolRun {
        classes,
        workers,
        ms: crate::worker::now() - start,
    })
}

/// A batch job's result.
pub struct PoolRun {
    pub classes: Vec<usize>,
    /// How many workers computed it (this one included).
    pub workers: u32,
    /// Wall time from this worker having its network to the last result.
    pub ms: f64,
}

/// Ends a batch job early: no new chunks for anyone, and the helpers' chunks in flight
/// finish first, so the pool is idle for the next job.
async fn stop_helpers(chunks: &RefCell<Chunks>, running: &Cell<u32>) {
    {
        let mut all = chunks.borrow_mut();
        all.next = all.ranges.len();
        all.returned.clear();
    }
    while running.get() > 0 {
        crate::worker::sleep_ms(1).await;
    }
}

/// Hands `helper` chunks until none is left; a failed chunk goes back to the queue and the
/// helper is not used again.
async fn helper_loop(helper: &Helper, chunks: &RefCell<Chunks>, pixels: &[u8]) {
    while helper.alive.get() {
        // Taken in its own statement: no borrow may live across the await below.
        let next = chunks.borrow_mut().take();
        let Some(c) = next else { return };
        let range = chunks.borrow().ranges[c].clone();
        let share = &pixels[range.start * PIXELS..range.end * PIXELS];
        let reply = match helper.post(&HelperJob::FashionPredict, &[share]) {
            Ok(reply) => JsFuture::from(reply).await.map(read_reply),
            Err(e) => Ok(HelperReply::Failed {
                message: e.to_string(),
            }),
        };
        match reply {
            Ok(HelperReply::Predictions { classes }) if classes.len() == range.len() => {
                let mut all = chunks.borrow_mut();
                all.results[c] = Some(classes.into_iter().map(usize::from).collect());
                all.done_images += range.len();
                if !helper.used.replace(true) {
                    all.helpers_used += 1;
                }
            }
            other => {
                let why = match other {
                    Ok(HelperReply::Failed { message }) => message,
                    _ => "an unexpected reply".into(),
                };
                web_sys::console::warn_1(
                    &format!("a helper worker failed ({why}); its chunk is computed here").into(),
                );
                helper.alive.set(false);
                chunks.borrow_mut().returned.push(c);
                return;
            }
        }
    }
}

/// `net`'s classes for the images `range` of `pixels`, batch by batch.
fn predict_range(
    net: &CpuFashionNet,
    pixels: &[u8],
    range: std::ops::Range<usize>,
) -> WorkerResult<Vec<usize>> {
    let mut classes = Vec::with_capacity(range.len());
    for from in range.clone().step_by(EVAL_BATCH) {
        let to = (from + EVAL_BATCH).min(range.end);
        let images = normalize(&pixels[from * PIXELS..to * PIXELS]);
        classes.extend(predictions(&net.forward(&images)?));
    }
    Ok(classes)
}

/// The helper's side: answers jobs until the pool's owner terminates it.
pub fn serve() {
    std::panic::set_hook(Box::new(|info| {
        reply(&HelperReply::Failed {
            message: info.to_string(),
        });
    }));
    let handler = Closure::<dyn FnMut(MessageEvent)>::new(|event: MessageEvent| {
        let answer = answer(event.data()).unwrap_or_else(|e| HelperReply::Failed {
            message: e.to_string(),
        });
        reply(&answer);
    });
    scope().set_onmessage(Some(handler.as_ref().unchecked_ref()));
    handler.forget();
    reply(&HelperReply::Started);
}

fn reply(message: &HelperReply) {
    if let Ok(value) = serde_wasm_bindgen::to_value(message) {
        let _ = scope().post_message(&Array::of1(&value));
    }
}

fn answer(data: JsValue) -> WorkerResult<HelperReply> {
    let parts: Array = data
        .dyn_into()
        .map_err(|_| WorkerError::Message("a helper job must be an array".into()))?;
    let job: HelperJob = serde_wasm_bindgen::from_value(parts.get(0))
        .map_err(|e| WorkerError::Message(format!("bad helper job: {e}")))?;
    let bytes = |i: u32| -> WorkerResult<Vec<u8>> {
        parts
            .get(i)
            .dyn_into::<Uint8Array>()
            .map(|a| a.to_vec())
            .map_err(|_| WorkerError::Message("a helper job is missing its bytes".into()))
    };
    match job {
        HelperJob::FashionLoad { format } => {
            let model = bytes(1)?;
            let net = match format {
                ModelFormat::Weights => {
                    CpuFashionNet::from_store(&TensorStore::from_safetensors(&model)?)?
                }
                ModelFormat::Compressed => CpuFashionNet::from_compressed(
                    &CompressedModel::from_safetensors(&model)?,
                    true,
                )?,
            };
            HELPER_NET.with(|n| *n.borrow_mut() = Some(net));
            Ok(HelperReply::Loaded)
        }
        HelperJob::FashionPredict => {
            let pixels = bytes(1)?;
            let count = pixels.len() / PIXELS;
            let classes = HELPER_NET.with(|n| match n.borrow().as_ref() {
                Some(net) => predict_range(net, &pixels, 0..count),
                None => Err(WorkerError::Message("no network loaded".into())),
            })?;
            Ok(HelperReply::Predictions {
                classes: classes.into_iter().map(|c| c as u8).collect(),
            })
        }
    }
}
