//! Executors of a [`crate::graph::Graph`]: one interpreter per backend, not one forward per
//! network. `cpu` is the channels-last CPU interpreter (the browser's fallback); `burn` runs
//! the same graph as burn tensor ops on any device (WebGPU, wgpu, Flex) and trains it.

pub mod burn;
pub mod cpu;

pub use burn::{ChannelKernel, GraphModel, Output, ste_fake_quant};
pub use cpu::{CpuExecutor, KernelUse};

/// A dense f32 tensor in row-major (NCHW for images) order: what executors take and return.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dims: Vec<usize>,
    pub data: Vec<f32>,
}

/// The most elements one activation may have: a crafted model (huge pads, a long Concat
/// chain) gets an error instead of exhausting the worker's memory (wasm32 has 4 GiB).
pub const MAX_ACTIVATION_ELEMENTS: usize = 1 << 27;

/// Every value's dims for the last input size an executor saw: shape inference runs once per
/// size, not once per run.
#[derive(Debug, Default)]
pub(crate) struct ShapeCache(
    std::sync::Mutex<Option<(Vec<usize>, std::sync::Arc<crate::graph::Shapes>)>>,
);

impl ShapeCache {
    pub(crate) fn get(
        &self,
        graph: &crate::graph::Graph,
        dims: &[usize],
    ) -> crate::error::Result<std::sync::Arc<crate::graph::Shapes>> {
        let mut cache = self
            .0
            .lock()
            .map_err(|_| crate::error::EngineError::Execution("an earlier run panicked".into()))?;
        if let Some((cached, shapes)) = cache.as_ref()
            && cached == dims
        {
            return Ok(shapes.clone());
        }
        let shapes = std::sync::Arc::new(graph.shapes(&crate::graph::known_dims(dims))?);
        *cache = Some((dims.to_vec(), shapes.clone()));
        Ok(shapes)
    }
}

/// Checks an input's dims against the graph's declared input: its rank and every dim the
/// model fixes.
pub(crate) fn check_input_dims(
    graph: &crate::graph::Graph,
    dims: &[usize],
) -> crate::error::Result<()> {
    let info = graph.input()?;
    if dims.len() != info.dims.len() {
        return Err(crate::error::EngineError::Execution(format!(
            "the model takes a rank-{} input, got {dims:?}",
            info.dims.len()
        )));
    }
    for (axis, (want, got)) in info.dims.iter().zip(dims).enumerate() {
        if let Some(want) = want.known()
            && want != *got
        {
            return Err(crate::error::EngineError::Execution(format!(
                "input dim {axis} must be {want}, got {got} (input {dims:?})"
            )));
        }
    }
    Ok(())
}
