//! The lab's shared vocabulary: what a user asks for (a [`recipe::Recipe`], an
//! [`input::InputSpec`]), what comes back ([`stats`], [`report`]) and the page ↔ worker
//! [`messages`]. Plain serde data with no burn dependency: the engine re-exports these types
//! where they have always lived, and the page links this crate alone, not the engine.

pub mod error;
pub mod input;
pub mod labels;
pub mod messages;
pub mod recipe;
pub mod report;
pub mod stats;

pub use error::SpecError;
