//! The hook through which a `require_approval` decision holds a statement: the engine asks
//! an [`Approver`] and waits for its answer before forwarding or refusing.

use std::sync::Arc;

use crate::{policy::Decision, protocol::BoxFuture};

/// A statement waiting for a person.
#[derive(Clone, Debug)]
pub struct ApprovalRequest {
    /// The audit store's session id.
    pub session: i64,
    pub agent: String,
    pub target: String,
    pub uid: u32,
    pub statement: String,
    pub decision: Decision,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApprovalOutcome {
    Approved,
    Denied { reason: String },
    TimedOut,
}

/// Tells the waiting client what is going on (a NoticeResponse in PostgreSQL).
pub type Notify = Box<dyn FnOnce(String) + Send>;

pub trait Approver: Send + Sync {
    fn request(&self, req: ApprovalRequest, notify: Notify) -> BoxFuture<ApprovalOutcome>;
}

/// Refuses every held statement: approvals need the approval service.
pub struct NoApprovals;

impl Approver for NoApprovals {
    fn request(&self, _req: ApprovalRequest, _notify: Notify) -> BoxFuture<ApprovalOutcome> {
        Box::pin(async {
            ApprovalOutcome::Denied {
                reason: "it needs approval and no approval service is running".into(),
            }
        })
    }
}

pub fn none() -> Arc<dyn Approver> {
    Arc::new(NoApprovals)
}
