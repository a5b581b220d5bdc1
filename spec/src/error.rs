//! This crate's one error type.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SpecError {
    #[error("invalid setting: {0}")]
    Config(String),
}

pub type Result<T> = std::result::Result<T, SpecError>;
