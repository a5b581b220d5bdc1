//! The model worker: loads weights, picks WebGPU or the CPU fallback, classifies images.

fn main() {
    console_error_panic_hook::set_once();
    compresslab_web::worker::start();
}
