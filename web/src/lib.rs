//! compresslab's page: leptos components. It links no engine code: the model worker
//! (`worker/`) runs every job, and the two exchange `compresslab_spec::messages`.

pub mod app;
pub mod device_panel;
pub mod distil_panel;
pub mod error;
pub mod fashion_panel;
pub mod lab_panel;
pub mod user_model_panel;
