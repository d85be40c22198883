//! Masking: what a masked value becomes, and which values to mask.
pub mod copies;
pub mod detect;
pub mod plan;
pub mod rows;
pub mod types;
pub mod value;
