//! Cancelling the running long job. When the page is cross-origin isolated it shares a
//! `SharedArrayBuffer` with the worker at start, and its Cancel button raises the counter in
//! it: the job reads it synchronously at its checkpoints (between compression stages and
//! between layers while quantizing, between calibration images, timing runs and evaluation
//! chunks), so a cancel takes effect
//! even while the worker is inside synchronous engine code, well within a second on the CPU.
//! Without isolation the page sends `CancelJob` instead, which raises a local counter when
//! the job next yields to the worker's event loop: [`checkpoint`] makes it yield at the
//! checkpoints where it may await (timing runs, evaluations, training steps), so a cancel
//! takes effect there too, though not inside synchronous compression.

use std::cell::{Cell, RefCell};

use compresslab::EngineError;
use js_sys::{Atomics, Int32Array, SharedArrayBuffer};
use wasm_bindgen::{JsCast, JsValue};

thread_local! {
    static SHARED: RefCell<Option<Int32Array>> = const { RefCell::new(None) };
    static BY_MESSAGE: Cell<i32> = const { Cell::new(0) };
    /// The counter when the running long job started (None: no long job runs).
    static AT_START: Cell<Option<i32>> = const { Cell::new(None) };
    /// When [`checkpoint`] last let the event loop run (`performance.now()` ms).
    static LAST_YIELD: Cell<f64> = const { Cell::new(0.0) };
}

/// Takes the page's shared counter (the value posted next to `Init`, when it is one).
pub fn share(value: JsValue) {
    if let Some(buffer) = value.dyn_ref::<SharedArrayBuffer>() {
        SHARED.with(|s| *s.borrow_mut() = Some(Int32Array::new(buffer)));
    }
}

/// The page's `CancelJob` message (the path without a shared counter).
pub fn requested_by_message() {
    BY_MESSAGE.with(|c| c.set(c.get().wrapping_add(1)));
}

fn counter() -> i32 {
    let shared = SHARED.with(|s| {
        s.borrow()
            .as_ref()
            .and_then(|a| Atomics::load(a, 0).ok())
            .unwrap_or(0)
    });
    shared.wrapping_add(BY_MESSAGE.with(Cell::get))
}

/// A long job starts: only a cancel from now on stops it.
pub fn begin() {
    AT_START.with(|s| s.set(Some(counter())));
}

/// The long job ended.
pub fn end() {
    AT_START.with(|s| s.set(None));
}

/// [`check`] at a point where a long job may await: without the shared counter the
/// page's `CancelJob` is only read when the job yields to the worker's event loop, and on
/// the CPU nothing else makes it yield (its runs complete without awaiting), so this
/// yields, at most every [`YIELD_EVERY_MS`].
pub async fn checkpoint() -> Result<(), EngineError> {
    let by_message = SHARED.with(|s| s.borrow().is_none());
    if by_message && AT_START.with(Cell::get).is_some() {
        let now = crate::worker::now();
        if now - LAST_YIELD.with(Cell::get) >= YIELD_EVERY_MS {
            crate::worker::yield_now().await;
            LAST_YIELD.with(|t| t.set(crate::worker::now()));
        }
    }
    check()
}

/// How long a long job runs between yields when cancels come by message: well under the
/// second a cancel may take, few enough yields that they cost nothing measurable.
const YIELD_EVERY_MS: f64 = 100.0;

/// `Err(Cancelled)` once the page has cancelled the running long job.
pub fn check() -> Result<(), EngineError> {
    match AT_START.with(Cell::get) {
        Some(start) if start != counter() => Err(EngineError::Cancelled),
        _ => Ok(()),
    }
}
