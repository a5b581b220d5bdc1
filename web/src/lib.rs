//! compresslab's site: leptos components for the page, and the web worker that runs
//! the engine. Errors become UI text only here, at this boundary.

pub mod app;
pub mod distil;
pub mod distil_panel;
pub mod distil_photo;
pub mod error;
pub mod fashion_lab;
pub mod fashion_panel;
pub mod lab;
pub mod lab_panel;
pub mod messages;
pub mod user_model;
pub mod user_model_panel;
pub mod worker;
