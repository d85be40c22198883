//! The policy engine: policy files (who, where, what → action), SQL classification, pure
//! evaluation with explained decisions, a decision cache and hot reload.
//!
//! - [`sql`]: what a SQL message does (the security boundary);
//! - [`model`]: rules, requests, decisions;
//! - [`file`] / [`load`]: policy files and their validation;
//! - [`eval`]: the decision function;
//! - [`cache`] / [`store`]: the live, reloadable set.

pub mod cache;
pub mod eval;
pub mod file;
pub mod glob;
pub mod load;
pub mod model;
pub mod sql;
pub mod store;

pub use self::{
    cache::Judgement,
    eval::PolicySet,
    model::{Decision, Request, Subject, Verdict},
    store::PolicyStore,
};
#[cfg(test)]
mod tests;
