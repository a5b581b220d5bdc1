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

fn main() {
    console_error_panic_hook::set_once();
    worker::start();
}
