//! The model worker: loads weights, picks WebGPU or the CPU fallback, and runs every job the
//! page sends (classification, the compression lab, sweeps, fine-tuning, "Your model").
//! Errors become messages to the page only here, at this boundary.

mod cancel;
mod device_report;
mod distil;
mod distil_photo;
mod error;
mod fashion_lab;
mod heap;
mod lab;
mod pool;
mod user_model;
mod worker;

#[global_allocator]
static ALLOCATOR: heap::CountingAllocator = heap::CountingAllocator;

#[cfg(target_family = "wasm")]
unsafe extern "C" {
    /// The linker's list of static constructors (cubecl registers its WGSL operations with
    /// `inventory`'s).
    fn __wasm_call_ctors();
}

fn main() {
    // Constructors run here, once. A module whose exports never call them is linked as a
    // "command", and then every export (each allocation, each closure the browser calls)
    // runs all ~4 900 of them first: 0.15–0.3 ms on every crossing from JS into the worker.
    #[cfg(target_family = "wasm")]
    // SAFETY: called once, first thing, before anything reads what they register (and
    // inventory's constructors are idempotent: each marks its entry registered).
    unsafe {
        __wasm_call_ctors();
    }
    console_error_panic_hook::set_once();
    worker::start();
}
