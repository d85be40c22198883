//! Webhooks: approval events POSTed as JSON (or as Slack-compatible `{"text": ...}`) to the
//! configured URLs, with retries and exponential backoff.
//!
//! Never on the data path: events go into a bounded queue with `try_send` (a full queue
//! drops the event with a warning and a counter), and a background task delivers them.
//! Delivery uses `crate::http_client` (one POST per attempt, `Connection: close`). A hook
//! with a secret gets `X-Portcullis-Timestamp` and `X-Portcullis-Signature` (HMAC-SHA256 of
//! `"{timestamp}." + body`) on every attempt, so its receiver can tell our events from
//! forged ones and refuse old ones replayed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

use crate::{
    config::{Webhook, WebhookFormat},
    http_client::{post_json, tls_config},
};

/// Events waiting for delivery; more are dropped.
pub const QUEUE: usize = 1024;
/// Attempts per event and hook (the first and the retries).
pub const ATTEMPTS: u32 = 5;
/// First retry delay; doubled each time.
pub const BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct WebhookStats {
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

#[derive(Clone, Default)]
pub struct Webhooks {
    tx: Option<mpsc::Sender<(String, Value)>>,
    pub stats: Arc<WebhookStats>,
}

impl Webhooks {
    pub fn none() -> Self {
        Self::default()
    }

    /// Starts the delivery task (inside a tokio runtime).
    pub fn start(hooks: Vec<Webhook>) -> Self {
        if hooks.is_empty() {
            return Self::none();
        }
        for h in &hooks {
            if let Some(secret) = &h.secret
                && let Err(e) = crate::secret::read(secret)
            {
                // Not fatal (the key may be put in place later), but every event to this
                // hook fails until it is.
                tracing::warn!(url = %h.url, error = %e, "webhook signing key cannot be read");
            }
        }
        let stats = Arc::new(WebhookStats::default());
        let (tx, mut rx) = mpsc::channel::<(String, Value)>(QUEUE);
        let tls =
            Arc::new(tls_config(None).unwrap_or_else(|e| unreachable!("no CA file to read: {e}")));
        let hooks = Arc::new(hooks);
        let st = stats.clone();
        tokio::spawn(async move {
            let limit = Arc::new(Semaphore::new(16));
            while let Some((event, data)) = rx.recv().await {
                for hook in hooks.iter() {
                    if !hook.events.is_empty() && !hook.events.contains(&event) {
                        continue;
                    }
                    let body = payload(hook.format, &event, &data);
                    let (hook, tls, st) = (hook.clone(), tls.clone(), st.clone());
                    let Ok(permit) = limit.clone().acquire_owned().await else {
                        return;
                    };
                    tokio::spawn(async move {
                        deliver(&hook, &tls, &body, &st).await;
                        drop(permit);
                    });
                }
            }
        });
        Self {
            tx: Some(tx),
            stats,
        }
    }

    /// Queues an event; never waits.
    pub fn send(&self, event: &str, data: Value) {
        let Some(tx) = &self.tx else {
            return;
        };
        if tx.try_send((event.to_owned(), data)).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(event, "webhook queue full: event dropped");
        }
    }
}

/// The body for a hook's format.
pub fn payload(format: WebhookFormat, event: &str, data: &Value) -> Vec<u8> {
    let v = match format {
        WebhookFormat::Json => {
            let mut v = json!({"event": event, "source": "portcullis"});
            if let (Some(o), Some(d)) = (v.as_object_mut(), data.as_object()) {
                for (k, x) in d {
                    o.insert(k.clone(), x.clone());
                }
            }
            v
        }
        WebhookFormat::Slack => json!({"text": slack_text(event, data)}),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

fn slack_text(event: &str, d: &Value) -> String {
    let s = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
    match event {
        "approval_requested" => format!(
            ":hourglass: Portcullis: agent *{}* wants to run on *{}* (rule `{}`):\n```{}```\nApprove: `portcullis approve {}` · Deny: `portcullis deny {}`",
            s("agent"),
            s("target"),
            s("rule"),
            s("statement"),
            s("id"),
            s("id")
        ),
        _ => format!(
            "Portcullis: request {} {}{}",
            s("id"),
            s("outcome"),
            d.get("by")
                .and_then(Value::as_str)
                .map(|b| format!(" by {b}"))
                .unwrap_or_default()
        ),
    }
}

/// The signature header's value for a body sent at `timestamp` (seconds since the epoch):
/// `sha256=` and the hex HMAC-SHA256, under the hook's secret, of `"{timestamp}." + body`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    let mac = crate::digest::hmac_sha256(secret, &[ts.as_bytes(), b".", body]);
    format!("sha256={}", crate::digest::hex(&mac))
}

/// The headers of one attempt: none without a secret, else the attempt's time and the
/// signature over it and the body. A secret that cannot be read fails the attempt: an
/// unsigned POST to a receiver that checks signatures would only be refused.
fn signed_headers(hook: &Webhook, body: &[u8]) -> Result<Vec<(&'static str, String)>, String> {
    let Some(secret) = &hook.secret else {
        return Ok(Vec::new());
    };
    let key = crate::secret::read(secret).map_err(|e| e.to_string())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(vec![
        ("X-Portcullis-Timestamp", now.to_string()),
        (
            "X-Portcullis-Signature",
            signature(key.as_bytes(), now, body),
        ),
    ])
}

async fn deliver(hook: &Webhook, tls: &Arc<rustls::ClientConfig>, body: &[u8], st: &WebhookStats) {
    let mut delay = BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let sent = match signed_headers(hook, body) {
            Ok(headers) => {
                tokio::time::timeout(
                    hook.timeout.get(),
                    post_json(&hook.url, tls, &headers, body),
                )
                .await
            }
            Err(e) => Ok(Err(format!("cannot sign: {e}"))),
        };
        match sent {
            Ok(Ok(status)) if (200..300).contains(&status) => {
                st.delivered.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(Ok(status)) => {
                tracing::warn!(url = %hook.url, status, attempt, "webhook answered with an error")
            }
            Ok(Err(e)) => tracing::warn!(url = %hook.url, error = %e, attempt, "webhook failed"),
            Err(_) => tracing::warn!(url = %hook.url, attempt, "webhook timed out"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    st.failed.fetch_add(1, Ordering::Relaxed);
    tracing::error!(url = %hook.url, attempts = ATTEMPTS, "webhook event not delivered");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        let d = json!({"id": "abc", "agent": "a", "target": "pg", "rule": "r", "statement": "DELETE FROM t"});
        let j: Value =
            serde_json::from_slice(&payload(WebhookFormat::Json, "approval_requested", &d))
                .expect("json");
        assert_eq!(
            (j["event"].as_str(), j["id"].as_str()),
            (Some("approval_requested"), Some("abc"))
        );
        let s: Value =
            serde_json::from_slice(&payload(WebhookFormat::Slack, "approval_requested", &d))
                .expect("json");
        assert!(
            s["text"]
                .as_str()
                .is_some_and(|t| t.contains("portcullis approve abc"))
        );
    }

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently:
        //   printf '1700000000.what do ya want for nothing?' | openssl dgst -sha256 -hmac Jefe
        let sig = signature(b"Jefe", 1_700_000_000, b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=1cdd0650c8be1cb0974b1788d458b1e781206cfef59b85faafc582d2e182c57e"
        );
        assert_ne!(
            signature(b"Jefe", 1_700_000_001, b"what do ya want for nothing?"),
            sig,
            "the timestamp is signed"
        );
    }

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn delivery_retries_until_the_hook_answers() {
        use tokio::net::TcpListener;
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        // First connection: 500; second: 204.
        let server = tokio::spawn(async move {
            let mut bodies = Vec::new();
            for status in ["500 Oops", "204 No Content"] {
                let (mut s, _) = l.accept().await.expect("accept");
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.expect("read");
                bodies.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                s.write_all(format!("HTTP/1.1 {status}\r\n\r\n").as_bytes())
                    .await
                    .expect("write");
            }
            bodies
        });
        let hook = Webhook {
            url: format!("http://{addr}/hook"),
            format: WebhookFormat::Json,
            events: Vec::new(),
            timeout: crate::config::Duration::from_secs(5),
            secret: None,
        };
        let st = WebhookStats::default();
        let tls = Arc::new(tls_config(None).expect("tls"));
        deliver(&hook, &tls, b"{\"event\":\"x\"}", &st).await;
        assert_eq!(st.delivered.load(Ordering::Relaxed), 1);
        let bodies = server.await.expect("server");
        assert!(bodies[0].starts_with("POST /hook HTTP/1.1"));
        assert!(bodies[1].ends_with("{\"event\":\"x\"}"));
    }
}
