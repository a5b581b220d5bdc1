//! Executors of a [`crate::graph::Graph`]: one interpreter per backend, not one forward per
//! network. `cpu` is the channels-last CPU interpreter (the browser's fallback).

pub mod cpu;

pub use cpu::CpuExecutor;
pub(crate) use cpu::tap_range;

/// A dense f32 tensor in row-major (NCHW for images) order: what executors take and return.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dims: Vec<usize>,
    pub data: Vec<f32>,
}

/// The most elements one activation may have: a crafted model (huge pads, a long Concat
/// chain) gets an error instead of exhausting the worker's memory (wasm32 has 4 GiB).
pub const MAX_ACTIVATION_ELEMENTS: usize = 1 << 27;
