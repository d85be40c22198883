//! Approvals: statements held on the wire until a person decides.
//!
//! A `require_approval` decision becomes a request with a short id. The waiting client is
//! told the id and how to answer (a NoticeResponse in PostgreSQL); approvers list requests
//! and approve or deny them through the admin API (`portcullis approvals / approve /
//! deny`). `approve --for DUR` also creates a grant: until it expires, requests of the same
//! rule from the same agent to the same target are approved on arrival, each use recorded.
//!
//! Every step is a record in the audit store. A request ends exactly once: approved,
//! denied, expired, or withdrawn (the client went away, which drops the waiting future).
//! Requests live in memory: after a restart the store's writer records the ones left
//! pending as expired, and nothing can approve them.
//!
//! Who may answer is decided by the admin API ([`crate::admin`]); this module keeps the
//! requests and enforces that nobody answers a request their own uid caused.

pub mod webhook;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::oneshot;

use crate::{
    protocol::{
        BoxFuture,
        postgres::approval::{ApprovalOutcome, ApprovalRequest, Approver, Notify},
    },
    store::{Append, Json, Store, now_us},
};

/// A request as listed by `portcullis approvals`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingView {
    pub id: String,
    pub session: i64,
    pub agent: String,
    pub target: String,
    pub uid: u32,
    pub rule: String,
    pub message: Option<String>,
    pub statement: String,
    pub approvers: Vec<String>,
    pub created_us: i64,
    pub expires_us: i64,
}

/// A standing approval.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GrantView {
    pub id: String,
    pub rule: String,
    pub agent: String,
    pub target: String,
    pub by: String,
    pub expires_us: i64,
    pub uses: u64,
}

struct Pending {
    view: PendingView,
    answer: oneshot::Sender<ApprovalOutcome>,
}

struct Grant {
    view: GrantView,
    until: Instant,
}

/// Who answers, as the admin API identified them.
#[derive(Clone, Debug)]
pub struct Answerer {
    pub uid: u32,
    pub name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnswerError {
    #[error("no pending request {0} (it was answered, expired or withdrawn)")]
    Unknown(String),
    #[error("request {0} was caused by uid {1}: nobody approves their own request")]
    OwnRequest(String, u32),
    #[error("the audit store cannot record the answer: {0}")]
    Store(String),
}

pub struct Approvals {
    store: Arc<Store>,
    webhooks: webhook::Webhooks,
    default_timeout: Duration,
    pending: Mutex<HashMap<String, Pending>>,
    grants: Mutex<Vec<Grant>>,
}

/// An 8-hex-digit id, easy to type.
fn new_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

impl Approvals {
    pub fn new(
        store: Arc<Store>,
        webhooks: webhook::Webhooks,
        default_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            webhooks,
            default_timeout,
            pending: Mutex::new(HashMap::new()),
            grants: Mutex::new(Vec::new()),
        })
    }

    /// Webhook events delivered, failed (after retries) and dropped.
    pub fn webhook_counts(&self) -> [(&'static str, u64); 3] {
        let st = &self.webhooks.stats;
        let l = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        [
            ("delivered", l(&st.delivered)),
            ("failed", l(&st.failed)),
            ("dropped", l(&st.dropped)),
        ]
    }

    pub fn pending(&self) -> Vec<PendingView> {
        let mut v: Vec<PendingView> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|p| p.view.clone())
            .collect();
        v.sort_by_key(|p| p.created_us);
        v
    }

    pub fn get(&self, id: &str) -> Option<PendingView> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|p| p.view.clone())
    }

    pub fn grants(&self) -> Vec<GrantView> {
        let mut g = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        g.retain(|x| x.until > Instant::now());
        g.iter().map(|x| x.view.clone()).collect()
    }

    fn record(&self, session: i64, kind: &'static str, body: Json) {
        if let Err(e) = self.store.append(Append {
            session,
            kind,
            body,
            at_us: now_us(),
        }) {
            tracing::error!(error = %e, kind, "cannot record an approval event");
        }
    }

    /// Approves a pending request; with `grant_for`, also approves the same rule for the
    /// same agent and target until then.
    pub async fn approve(
        &self,
        id: &str,
        by: &Answerer,
        grant_for: Option<Duration>,
    ) -> Result<Option<GrantView>, AnswerError> {
        let view = self.check(id, by)?;
        let grant = grant_for.map(|d| GrantView {
            id: new_id(),
            rule: view.rule.clone(),
            agent: view.agent.clone(),
            target: view.target.clone(),
            by: by.name.clone(),
            expires_us: now_us() + d.as_micros() as i64,
            uses: 0,
        });
        let mut recs = Vec::new();
        if let Some(g) = &grant {
            recs.push(Append {
                session: view.session,
                kind: "grant_created",
                body: Json::of(g),
                at_us: now_us(),
            });
        }
        recs.push(Append {
            session: view.session,
            kind: "approval_decided",
            body: json!({"id": id, "outcome": "approved", "by": by.name, "uid": by.uid, "grant": grant.as_ref().map(|g| g.id.clone())}).into(),
            at_us: now_us(),
        });
        // The answer is on record before the statement can run.
        self.store
            .append_durable(recs)
            .await
            .map_err(|e| AnswerError::Store(e.to_string()))?;
        if let (Some(g), Some(d)) = (&grant, grant_for) {
            self.grants
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Grant {
                    view: g.clone(),
                    until: Instant::now() + d,
                });
        }
        self.finish(id, ApprovalOutcome::Approved);
        self.webhooks.send(
            "approval_decided",
            json!({"id": id, "outcome": "approved", "by": by.name, "agent": view.agent, "target": view.target, "rule": view.rule, "grant_for_secs": grant_for.map(|d| d.as_secs())}),
        );
        tracing::info!(target: "portcullis::audit", by = %by.name, approval.id = id, grant = ?grant.as_ref().map(|g| &g.id), "approved");
        Ok(grant)
    }

    pub async fn deny(&self, id: &str, by: &Answerer, reason: String) -> Result<(), AnswerError> {
        let view = self.check(id, by)?;
        self.store
            .append_durable(vec![Append {
                session: view.session,
                kind: "approval_decided",
                body: json!({"id": id, "outcome": "denied", "by": by.name, "uid": by.uid, "reason": reason}).into(),
                at_us: now_us(),
            }])
            .await
            .map_err(|e| AnswerError::Store(e.to_string()))?;
        self.finish(
            id,
            ApprovalOutcome::Denied {
                reason: format!("{reason} (by {})", by.name),
            },
        );
        self.webhooks.send(
            "approval_decided",
            json!({"id": id, "outcome": "denied", "by": by.name, "reason": reason, "agent": view.agent, "target": view.target, "rule": view.rule}),
        );
        tracing::info!(target: "portcullis::audit", by = %by.name, approval.id = id, reason = %reason, "denied");
        Ok(())
    }

    fn check(&self, id: &str, by: &Answerer) -> Result<PendingView, AnswerError> {
        let view = self
            .get(id)
            .ok_or_else(|| AnswerError::Unknown(id.to_owned()))?;
        if view.uid == by.uid {
            return Err(AnswerError::OwnRequest(id.to_owned(), by.uid));
        }
        Ok(view)
    }

    fn finish(&self, id: &str, outcome: ApprovalOutcome) {
        if let Some(p) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
        {
            let _ = p.answer.send(outcome);
        }
    }

    /// A grant covering this request, if one is in force (its use is recorded).
    fn granted(&self, req: &ApprovalRequest) -> Option<GrantView> {
        let mut g = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        g.retain(|x| x.until > now);
        let hit = g.iter_mut().find(|x| {
            x.view.rule == req.decision.rule
                && x.view.agent == req.agent
                && x.view.target == req.target
        })?;
        hit.view.uses += 1;
        Some(hit.view.clone())
    }

    /// The statement as records and webhooks carry it: without literals when the rule or
    /// `[store] redact_literals` says so. (The approver's own listing shows it whole: they
    /// cannot judge what they cannot read.)
    fn shown(&self, req: &ApprovalRequest) -> String {
        if req.decision.redact_literals || self.store.config().redact_literals {
            crate::store::redact::redact_literals(&req.statement)
        } else {
            req.statement.clone()
        }
    }

    async fn wait(self: Arc<Self>, req: ApprovalRequest, notify: Notify) -> ApprovalOutcome {
        let shown = self.shown(&req);
        if let Some(g) = self.granted(&req) {
            let r = self
                .store
                .append_durable(vec![Append {
                    session: req.session,
                    kind: "grant_used",
                    body: json!({"grant": g.id, "rule": g.rule, "statement": shown, "by": g.by})
                        .into(),
                    at_us: now_us(),
                }])
                .await;
            if let Err(e) = r {
                return ApprovalOutcome::Denied {
                    reason: format!("the audit store cannot record the grant's use: {e}"),
                };
            }
            tracing::info!(target: "portcullis::audit", rule = %g.rule, grant.id = %g.id, agent.name = %req.agent, "approved by grant");
            return ApprovalOutcome::Approved;
        }
        let timeout = req
            .decision
            .approval_timeout_secs
            .map_or(self.default_timeout, Duration::from_secs);
        let id = new_id();
        let view = PendingView {
            id: id.clone(),
            session: req.session,
            agent: req.agent.clone(),
            target: req.target.clone(),
            uid: req.uid,
            rule: req.decision.rule.clone(),
            message: req.decision.message.clone(),
            statement: req.statement.clone(),
            approvers: req.decision.approvers.clone(),
            created_us: now_us(),
            expires_us: now_us() + timeout.as_micros() as i64,
        };
        let (tx, rx) = oneshot::channel();
        let recorded = PendingView {
            statement: shown,
            ..view.clone()
        };
        let r = self
            .store
            .append_durable(vec![Append {
                session: req.session,
                kind: "approval_requested",
                body: Json::of(&recorded),
                at_us: now_us(),
            }])
            .await;
        if let Err(e) = r {
            return ApprovalOutcome::Denied {
                reason: format!("the audit store cannot record the request: {e}"),
            };
        }
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id.clone(),
                Pending {
                    view: view.clone(),
                    answer: tx,
                },
            );
        // Withdrawn if this future is dropped (the client went away) before an answer.
        let guard = Withdraw {
            approvals: self.clone(),
            id: id.clone(),
            session: req.session,
            began: Instant::now(),
        };
        self.webhooks.send(
            "approval_requested",
            serde_json::to_value(&recorded).unwrap_or_default(),
        );
        tracing::info!(
            target: "portcullis::audit",
            rule = %req.decision.rule,
            approval.id = %id,
            agent.name = %req.agent,
            target.name = %req.target,
            "statement held for approval"
        );
        notify(format!(
            "portcullis: this statement needs approval ({}). Request {id}: an approver runs \
             `portcullis approve {id}` or `portcullis deny {id}`. Waiting up to {}.",
            req.decision
                .message
                .clone()
                .unwrap_or_else(|| format!("rule {}", req.decision.rule)),
            humantime::format_duration(timeout)
        ));
        let began = Instant::now();
        let outcome = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(o)) => o,
            Ok(Err(_)) | Err(_) => {
                let was_pending = self
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id)
                    .is_some();
                if was_pending {
                    self.record(
                        req.session,
                        "approval_decided",
                        json!({"id": id, "outcome": "expired", "reason": format!("no decision within {}", humantime::format_duration(timeout))}).into(),
                    );
                    self.webhooks.send(
                        "approval_decided",
                        json!({"id": id, "outcome": "expired", "agent": req.agent, "target": req.target, "rule": req.decision.rule}),
                    );
                }
                ApprovalOutcome::TimedOut
            }
        };
        std::mem::forget(guard);
        let label = match &outcome {
            ApprovalOutcome::Approved => "approved",
            ApprovalOutcome::Denied { .. } => "denied",
            ApprovalOutcome::TimedOut => "expired",
        };
        crate::metrics::get()
            .approval_wait_seconds
            .with_label_values(&[label])
            .observe(began.elapsed().as_secs_f64());
        outcome
    }
}

/// Withdraws a request whose client is gone.
struct Withdraw {
    approvals: Arc<Approvals>,
    id: String,
    session: i64,
    began: Instant,
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        let removed = self
            .approvals
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id)
            .is_some();
        if removed {
            crate::metrics::get()
                .approval_wait_seconds
                .with_label_values(&["withdrawn"])
                .observe(self.began.elapsed().as_secs_f64());
            self.approvals.record(
                self.session,
                "approval_decided",
                json!({"id": self.id, "outcome": "withdrawn", "reason": "the client disconnected"})
                    .into(),
            );
            self.approvals.webhooks.send(
                "approval_decided",
                json!({"id": self.id, "outcome": "withdrawn"}),
            );
            tracing::info!(target: "portcullis::audit", outcome = "withdrawn", approval.id = %self.id, "approval request withdrawn: the client disconnected");
        }
    }
}

/// The engines' view of approvals.
pub struct Service(pub Arc<Approvals>);

impl Approver for Service {
    fn request(&self, req: ApprovalRequest, notify: Notify) -> BoxFuture<ApprovalOutcome> {
        Box::pin(self.0.clone().wait(req, notify))
    }
}
