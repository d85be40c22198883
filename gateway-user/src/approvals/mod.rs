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
    /// An answer is being recorded: it, and nothing else (no timeout, no second answer, no
    /// withdrawal), ends the request.
    claimed: bool,
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
    #[error("request {0} is being answered by someone else")]
    Answering(String),
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
        let view = self.claim(id, by)?;
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
        self.record_answer(id, recs).await?;
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
        let view = self.claim(id, by)?;
        self.record_answer(
            id,
            vec![Append {
                session: view.session,
                kind: "approval_decided",
                body: json!({"id": id, "outcome": "denied", "by": by.name, "uid": by.uid, "reason": reason}).into(),
                at_us: now_us(),
            }],
        )
        .await?;
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

    /// Takes a pending request for `by` to answer. From here only [`Self::finish`] ends it:
    /// two approvers answering at once, or an answer racing the timeout, cannot both be
    /// recorded (a request ends exactly once).
    fn claim(&self, id: &str, by: &Answerer) -> Result<PendingView, AnswerError> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let p = pending
            .get_mut(id)
            .ok_or_else(|| AnswerError::Unknown(id.to_owned()))?;
        if p.view.uid == by.uid {
            return Err(AnswerError::OwnRequest(id.to_owned(), by.uid));
        }
        if p.claimed {
            return Err(AnswerError::Answering(id.to_owned()));
        }
        p.claimed = true;
        Ok(p.view.clone())
    }

    /// Records a claimed request's answer durably. If the store cannot take it the request
    /// ends denied (the statement must not run on an answer that is not on record).
    async fn record_answer(&self, id: &str, recs: Vec<Append>) -> Result<(), AnswerError> {
        if let Err(e) = self.store.append_durable(recs).await {
            let e = AnswerError::Store(e.to_string());
            self.finish(
                id,
                ApprovalOutcome::Denied {
                    reason: e.to_string(),
                },
            );
            return Err(e);
        }
        Ok(())
    }

    /// Removes a pending request nobody is answering (for the timeout or a withdrawal to
    /// end it); `false` if it is gone or claimed by an answer.
    fn take_unclaimed(&self, id: &str) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match pending.get(id) {
            Some(p) if !p.claimed => pending.remove(id).is_some(),
            _ => false,
        }
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
                    claimed: false,
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
        let mut rx = rx;
        let outcome = match tokio::time::timeout(timeout, &mut rx).await {
            Ok(Ok(o)) => o,
            // Ended without an answer (never happens: whatever ends a request answers it).
            Ok(Err(_)) => ApprovalOutcome::TimedOut,
            Err(_) => {
                // Expired, unless an answer is being recorded: then that answer ends it.
                if self.take_unclaimed(&id) {
                    self.record(
                        req.session,
                        "approval_decided",
                        json!({"id": id, "outcome": "expired", "reason": format!("no decision within {}", humantime::format_duration(timeout))}).into(),
                    );
                    self.webhooks.send(
                        "approval_decided",
                        json!({"id": id, "outcome": "expired", "agent": req.agent, "target": req.target, "rule": req.decision.rule}),
                    );
                    ApprovalOutcome::TimedOut
                } else {
                    // Claimed: its answer comes once it is on record (or the request ends
                    // denied if it cannot be recorded).
                    (&mut rx).await.unwrap_or(ApprovalOutcome::TimedOut)
                }
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
        // A request being answered is left to its answer, which ends it (on record) and
        // finds nobody to tell.
        if self.approvals.take_unclaimed(&self.id) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{Durability, StoreConfig},
        policy::model::{Decision, Verdict},
    };

    /// Approvals over a store in a temporary directory (kept while the test runs).
    fn approvals(timeout: Duration) -> (tempfile::TempDir, Arc<Approvals>) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = Store::open(&StoreConfig {
            path: dir.path().join("audit.db"),
            durability: Durability::Commit,
            queue: 1024,
            recording_limit: 1 << 20,
            retention: None,
            prune_interval: crate::config::Duration::from_secs(3600),
            redact_literals: false,
        })
        .expect("open the store");
        (
            dir,
            Approvals::new(store, webhook::Webhooks::none(), timeout),
        )
    }

    /// Holds a statement of uid 1001 and returns the waiting task and the request's id.
    async fn held(a: &Arc<Approvals>) -> (tokio::task::JoinHandle<ApprovalOutcome>, String) {
        let req = ApprovalRequest {
            session: 7,
            agent: "agent".into(),
            target: "db".into(),
            uid: 1001,
            statement: "DELETE FROM t".into(),
            decision: Decision {
                verdict: Verdict::RequireApproval,
                rule: "where-less".into(),
                message: None,
                approvers: Vec::new(),
                approval_timeout_secs: None,
                masks: Vec::new(),
                audit: Vec::new(),
                matched: Vec::new(),
                redact_literals: false,
            },
        };
        let waiting = tokio::spawn(a.clone().wait(req, Box::new(|_| {})));
        for _ in 0..500 {
            if let Some(p) = a.pending().pop() {
                return (waiting, p.id);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("the request never became pending");
    }

    /// The outcomes the store holds for the request, in order.
    async fn decided(a: &Approvals) -> Vec<String> {
        a.store.flush().await.expect("flush");
        a.store
            .read(|c| {
                c.prepare(
                    "SELECT json_extract(body, '$.outcome') FROM records \
                     WHERE kind = 'approval_decided' ORDER BY seq",
                )?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()
                .map_err(Into::into)
            })
            .expect("read the decisions")
    }

    fn approver(uid: u32) -> Answerer {
        Answerer {
            uid,
            name: format!("uid{uid}"),
        }
    }

    #[tokio::test]
    async fn an_answer_being_recorded_at_the_timeout_ends_the_request() {
        let (_dir, a) = approvals(Duration::from_millis(50));
        let (waiting, id) = held(&a).await;
        // An approver has taken the request; its record is not written yet.
        a.claim(&id, &approver(0)).expect("claim");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !waiting.is_finished(),
            "the timeout did not end a claimed request"
        );
        a.record_answer(&id, Vec::new()).await.expect("record");
        a.finish(&id, ApprovalOutcome::Approved);
        assert_eq!(waiting.await.expect("join"), ApprovalOutcome::Approved);
        assert!(a.pending().is_empty());
        assert!(decided(&a).await.is_empty(), "no expiry recorded");
    }

    #[tokio::test]
    async fn a_request_is_answered_once() {
        let (_dir, a) = approvals(Duration::from_secs(60));
        let (waiting, id) = held(&a).await;
        assert_eq!(
            a.approve(&id, &approver(1001), None).await,
            Err(AnswerError::OwnRequest(id.clone(), 1001))
        );
        let (root, other) = (approver(0), approver(1002));
        let (approved, denied) = tokio::join!(
            a.approve(&id, &root, None),
            a.deny(&id, &other, "no".into())
        );
        assert_eq!(approved, Ok(None));
        // Refused whether the approval is still being recorded or already done.
        assert!(
            matches!(&denied, Err(AnswerError::Answering(x) | AnswerError::Unknown(x)) if *x == id),
            "{denied:?}"
        );
        assert_eq!(waiting.await.expect("join"), ApprovalOutcome::Approved);
        assert_eq!(
            a.deny(&id, &approver(1002), "late".into()).await,
            Err(AnswerError::Unknown(id.clone()))
        );
        assert_eq!(decided(&a).await, ["approved"]);
    }

    #[tokio::test]
    async fn a_client_leaving_during_an_answer_is_not_a_second_end() {
        let (_dir, a) = approvals(Duration::from_secs(60));
        let (waiting, id) = held(&a).await;
        a.claim(&id, &approver(0)).expect("claim");
        assert_eq!(
            a.deny(&id, &approver(1002), "no".into()).await,
            Err(AnswerError::Answering(id.clone())),
            "a second answer while the first is being recorded"
        );
        waiting.abort();
        assert!(waiting.await.expect_err("aborted").is_cancelled());
        assert_eq!(a.pending().len(), 1, "left to the answer");
        a.finish(
            &id,
            ApprovalOutcome::Denied {
                reason: "no".into(),
            },
        );
        assert!(a.pending().is_empty());
        assert!(decided(&a).await.is_empty(), "no withdrawal recorded");

        // Without an answer in progress, leaving withdraws.
        let (waiting, _) = held(&a).await;
        waiting.abort();
        let _ = waiting.await;
        assert!(a.pending().is_empty());
        assert_eq!(decided(&a).await, ["withdrawn"]);
    }
}
