use thiserror::Error;

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("{0}")]
    Engine(#[from] compresslab::EngineError),
    #[error("{context}: {message}")]
    Js {
        context: &'static str,
        message: String,
    },
    #[error("download of {url} failed: HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("the browser could not decode this file as an image{hint}")]
    Decode { hint: String },
    /// Something the person can act on, said in plain words ("classify a photo first").
    #[error("{0}")]
    Message(String),
}

impl WorkerError {
    /// Wraps a thrown JS value with what we were doing when it was thrown.
    pub fn js(context: &'static str, value: wasm_bindgen::JsValue) -> Self {
        let message = value
            .dyn_ref::<js_sys::Error>()
            .map(|e| String::from(e.message()))
            .or_else(|| value.as_string())
            .unwrap_or_else(|| format!("{value:?}"));
        WorkerError::Js { context, message }
    }
}

use wasm_bindgen::JsCast;

pub type WorkerResult<T> = Result<T, WorkerError>;
