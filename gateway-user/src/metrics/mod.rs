//! Prometheus metrics. Two kinds:
//!
//! - **Event metrics** the data path updates as things happen (connections by agent and
//!   target, statements by decision, latency histograms, masked values): fields of
//!   [`Metrics`], reached through [`get`]. Updating one is an atomic add on a child looked
//!   up by label values; label values are agent, target, protocol, decision, detector and
//!   outcome names, all bounded by the configuration and the code, never pids or SQL.
//! - **Snapshot metrics** read at scrape time from counters the parts keep anyway (the
//!   kernel's per-CPU counters, the store's writer, the proxy's refusals, policy reloads,
//!   approvals pending): [`Snapshot`] fills them just before encoding.
//!
//! The HTTP side is in [`http`]. docs/metrics.md lists every metric.

pub mod http;

use std::sync::LazyLock;

use prometheus::{
    Encoder as _, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 50 µs to 10 s.
const LATENCY: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
/// Decision time: 1 µs to 10 ms.
const DECISION: &[f64] = &[
    0.000_001,
    0.000_002_5,
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.01,
];
/// Approval waits: a second to a day.
const WAIT: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14_400.0, 86_400.0,
];

pub struct Metrics {
    pub registry: Registry,
    // ---- event metrics
    pub connections: IntCounterVec,
    pub connections_active: IntGaugeVec,
    pub statements: IntCounterVec,
    /// Decisions by the rule that made them.
    pub rule_decisions: IntCounterVec,
    /// PostgreSQL sessions whose database role is a superuser, by target.
    pub pg_superuser_sessions: IntCounterVec,
    pub decision_seconds: Histogram,
    pub statement_seconds: HistogramVec,
    pub upstream_seconds: HistogramVec,
    pub upstream_connect_seconds: HistogramVec,
    pub masked_values: IntCounterVec,
    /// `masked_values{detector="column"}`: counted per value, so looked up once.
    pub masked_by_column: IntCounter,
    pub approval_wait_seconds: HistogramVec,
    /// OIDC tokens presented, by result (`accepted` or why not).
    pub tokens: IntCounterVec,
    /// Lookups of host names in target addresses, by result (`ok`, `error`).
    pub target_lookups: IntCounterVec,
    /// Addresses at which a local server of a target's port is reachable unseen.
    pub uncovered_addresses: IntGauge,
    pub audit_commit_seconds: Histogram,
    // ---- snapshot metrics (set at scrape time)
    pub connections_refused: IntCounterVec,
    pub upstream_failures: IntCounter,
    pub ebpf_events: IntCounterVec,
    pub ebpf_programs_attached: IntGauge,
    pub ebpf_in_flight: IntGauge,
    pub audit_records: IntCounter,
    pub audit_commits: IntCounter,
    pub audit_write_errors: IntCounter,
    pub audit_queue_full: IntCounter,
    pub audit_queue_depth: IntGauge,
    pub audit_statements_refused: IntCounter,
    pub policy_reloads: IntCounterVec,
    pub policy_rules: IntGauge,
    pub policy_cached_decisions: IntGauge,
    pub policy_cached_shape_decisions: IntGauge,
    pub approvals_pending: IntGauge,
    pub approval_grants: IntGauge,
    pub webhook_deliveries: IntCounterVec,
    pub ready: IntGauge,
    pub build_info: IntGaugeVec,
    pub log_lines_dropped: IntCounter,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    h
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    h
}

impl Metrics {
    /// Every metric, registered. Names and label sets are constants: a failure here is a
    /// programming error caught by the unit tests, hence the panics.
    fn new() -> Self {
        let r = Registry::new();
        let masked_values = counter_vec(
            &r,
            "portcullis_masked_values_total",
            "Values masked in results, by what matched (a detector name, or `column`).",
            &["detector"],
        );
        let m = Self {
            connections: counter_vec(
                &r,
                "portcullis_connections_total",
                "Intercepted connections handed to an engine.",
                &["agent", "target", "protocol"],
            ),
            connections_active: gauge_vec(
                &r,
                "portcullis_connections_active",
                "Intercepted connections open now.",
                &["agent", "target", "protocol"],
            ),
            statements: counter_vec(
                &r,
                "portcullis_statements_total",
                "Statements judged, by the decision made.",
                &["agent", "target", "decision"],
            ),
            rule_decisions: counter_vec(
                &r,
                "portcullis_rule_decisions_total",
                "Statements judged, by the rule that decided and its decision.",
                &["rule", "decision"],
            ),
            pg_superuser_sessions: counter_vec(
                &r,
                "portcullis_pg_superuser_sessions_total",
                "PostgreSQL sessions whose database role is a superuser (the server reported \
                 is_superuser = on): the policies are all that stands between them and the \
                 server's files, configuration and every database.",
                &["target"],
            ),
            decision_seconds: histogram(
                &r,
                "portcullis_decision_duration_seconds",
                "Time to classify a statement and decide (decision cache included).",
                DECISION,
            ),
            statement_seconds: histogram_vec(
                &r,
                "portcullis_statement_duration_seconds",
                "From a client's request arriving to the server's ReadyForQuery passing back \
                 (the gate, any approval wait, and the server).",
                &["target"],
                LATENCY,
            ),
            upstream_seconds: histogram_vec(
                &r,
                "portcullis_upstream_duration_seconds",
                "From forwarding a request to the server to its ReadyForQuery.",
                &["target"],
                LATENCY,
            ),
            upstream_connect_seconds: histogram_vec(
                &r,
                "portcullis_upstream_connect_duration_seconds",
                "Time to open the connection to the target.",
                &["target"],
                LATENCY,
            ),
            masked_by_column: masked_values.with_label_values(&["column"]),
            masked_values,
            tokens: counter_vec(
                &r,
                "portcullis_oidc_tokens_total",
                "OIDC tokens presented by agents, by result: accepted, or why they were refused.",
                &["result"],
            ),
            target_lookups: counter_vec(
                &r,
                "portcullis_target_lookups_total",
                "Lookups of host names in target addresses while the daemon runs, by result.",
                &["result"],
            ),
            approval_wait_seconds: histogram_vec(
                &r,
                "portcullis_approval_wait_duration_seconds",
                "How long held statements waited, by how the wait ended.",
                &["outcome"],
                WAIT,
            ),
            audit_commit_seconds: histogram(
                &r,
                "portcullis_audit_commit_duration_seconds",
                "Time to commit one group of audit records (and sync it, in strict mode).",
                LATENCY,
            ),
            connections_refused: counter_vec(
                &r,
                "portcullis_connections_refused_total",
                "Redirected connections refused, by reason.",
                &["reason"],
            ),
            upstream_failures: counter(
                &r,
                "portcullis_upstream_failures_total",
                "Connections whose target could not be reached.",
            ),
            ebpf_events: counter_vec(
                &r,
                "portcullis_ebpf_events_total",
                "The eBPF programs' per-CPU counters, summed.",
                &["event"],
            ),
            ebpf_programs_attached: gauge(
                &r,
                "portcullis_ebpf_programs_attached",
                "eBPF programs attached.",
            ),
            ebpf_in_flight: gauge(
                &r,
                "portcullis_ebpf_connections_in_flight",
                "Redirected connections established but not yet accepted by the proxy.",
            ),
            audit_records: counter(
                &r,
                "portcullis_audit_records_total",
                "Records committed to the audit store.",
            ),
            audit_commits: counter(
                &r,
                "portcullis_audit_commits_total",
                "Commit groups (transactions) of the audit store.",
            ),
            audit_write_errors: counter(
                &r,
                "portcullis_audit_write_errors_total",
                "Audit records whose write failed.",
            ),
            audit_queue_full: counter(
                &r,
                "portcullis_audit_queue_full_total",
                "Appends refused because the audit queue was full.",
            ),
            audit_queue_depth: gauge(
                &r,
                "portcullis_audit_queue_depth",
                "Requests waiting for the audit writer.",
            ),
            audit_statements_refused: counter(
                &r,
                "portcullis_audit_statements_refused_total",
                "Statements refused because they could not be recorded.",
            ),
            policy_reloads: counter_vec(
                &r,
                "portcullis_policy_reloads_total",
                "Policy reloads, by result.",
                &["result"],
            ),
            policy_rules: gauge(&r, "portcullis_policy_rules", "Rules in force."),
            policy_cached_decisions: gauge(
                &r,
                "portcullis_policy_cached_decisions",
                "Decisions in the decision cache.",
            ),
            policy_cached_shape_decisions: gauge(
                &r,
                "portcullis_policy_cached_shape_decisions",
                "Decisions kept by statement shape.",
            ),
            uncovered_addresses: gauge(
                &r,
                "portcullis_uncovered_addresses",
                "Addresses at which a local server of a target's port accepts connections that \
                 no target covers: ways around the gate (checked every 30 s).",
            ),
            approvals_pending: gauge(
                &r,
                "portcullis_approvals_pending",
                "Statements waiting for approval now.",
            ),
            approval_grants: gauge(&r, "portcullis_approval_grants_active", "Grants in force."),
            webhook_deliveries: counter_vec(
                &r,
                "portcullis_webhook_deliveries_total",
                "Webhook events, by result (delivered, failed after retries, dropped).",
                &["result"],
            ),
            ready: gauge(&r, "portcullis_ready", "1 when /readyz would answer ready."),
            log_lines_dropped: counter(
                &r,
                "portcullis_log_lines_dropped_total",
                "Log lines dropped because whatever reads stderr (journald) did not keep up \
                 ([log] when_full = \"drop\").",
            ),
            build_info: gauge_vec(
                &r,
                "portcullis_build_info",
                "Always 1; the version as a label.",
                &["version"],
            ),
            registry: r,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for these metric types.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

/// Sets a counter to a total kept elsewhere (snapshot metrics). Scrapes are serialised by
/// the metrics server, so reset-and-add is not observed half done.
pub fn set_counter(c: &IntCounter, total: u64) {
    let now = c.get();
    if total >= now {
        c.inc_by(total - now);
    } else {
        c.reset();
        c.inc_by(total);
    }
}

/// Values read at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub refused: Vec<(&'static str, u64)>,
    pub upstream_failures: u64,
    pub ebpf: Vec<(String, u64)>,
    pub programs_attached: usize,
    pub in_flight: usize,
    pub store: crate::store::StoreCounters,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub rules: usize,
    pub cached_decisions: usize,
    pub cached_shape_decisions: usize,
    pub approvals_pending: usize,
    pub grants: usize,
    pub webhooks: [(&'static str, u64); 3],
    pub ready: bool,
    pub log_lines_dropped: u64,
}

impl Snapshot {
    pub fn apply(&self, m: &Metrics) {
        for (reason, n) in &self.refused {
            set_counter(&m.connections_refused.with_label_values(&[*reason]), *n);
        }
        set_counter(&m.upstream_failures, self.upstream_failures);
        for (event, n) in &self.ebpf {
            set_counter(&m.ebpf_events.with_label_values(&[event.as_str()]), *n);
        }
        m.ebpf_programs_attached.set(self.programs_attached as i64);
        m.ebpf_in_flight.set(self.in_flight as i64);
        set_counter(&m.audit_records, self.store.written);
        set_counter(&m.audit_commits, self.store.groups);
        set_counter(&m.audit_write_errors, self.store.failed);
        set_counter(&m.audit_queue_full, self.store.queue_full);
        m.audit_queue_depth.set(self.store.queued as i64);
        set_counter(&m.audit_statements_refused, self.store.refused_statements);
        set_counter(
            &m.policy_reloads.with_label_values(&["ok"]),
            self.reloads_ok,
        );
        set_counter(
            &m.policy_reloads.with_label_values(&["failed"]),
            self.reloads_failed,
        );
        m.policy_rules.set(self.rules as i64);
        m.policy_cached_decisions.set(self.cached_decisions as i64);
        m.policy_cached_shape_decisions
            .set(self.cached_shape_decisions as i64);
        m.approvals_pending.set(self.approvals_pending as i64);
        m.approval_grants.set(self.grants as i64);
        for (result, n) in &self.webhooks {
            set_counter(&m.webhook_deliveries.with_label_values(&[*result]), *n);
        }
        m.ready.set(i64::from(self.ready));
        set_counter(&m.log_lines_dropped, self.log_lines_dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_and_encodes_with_conventional_names() {
        let m = get();
        m.connections
            .with_label_values(&["a", "pg", "postgres"])
            .inc();
        m.decision_seconds.observe(0.000_01);
        Snapshot {
            refused: vec![("no_agent", 3)],
            ebpf: vec![("redirected".into(), 7)],
            ready: true,
            ..Default::default()
        }
        .apply(m);
        let text = String::from_utf8(m.encode()).expect("utf-8");
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().expect("name"), parts.next().expect("type"));
            assert!(name.starts_with("portcullis_"), "{line}");
            match kind {
                "counter" => assert!(name.ends_with("_total"), "{line}"),
                "histogram" => assert!(name.ends_with("_seconds"), "{line}"),
                _ => assert!(!name.ends_with("_total"), "{line}"),
            }
        }
        assert!(text.contains(r#"portcullis_connections_refused_total{reason="no_agent"} 3"#));
        assert!(text.contains(r#"portcullis_ebpf_events_total{event="redirected"} 7"#));
        assert!(text.contains("portcullis_ready 1"));
        assert!(text.contains(r#"portcullis_build_info{version=""#));
    }

    /// `portcullis_...` names in a text, histogram series folded into their metric.
    fn names(text: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for (i, _) in text.match_indices("portcullis_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            // The bare prefix, as prose mentions it, is no metric.
            if base.len() > "portcullis_".len() {
                out.insert(base.to_owned());
            }
        }
        out
    }

    #[test]
    fn the_reference_and_the_dashboard_name_exactly_the_metrics_there_are() {
        let code = names(include_str!("mod.rs"));
        let doc = names(include_str!("../../../docs/metrics.md"));
        let dash = names(include_str!("../../../docs/grafana/portcullis.json"));
        for n in &code {
            assert!(doc.contains(n), "{n} is not in docs/metrics.md");
        }
        for n in doc.iter().chain(&dash) {
            assert!(
                code.contains(n),
                "{n} is documented or charted but does not exist"
            );
        }
    }

    #[test]
    fn snapshot_counters_follow_their_source_even_when_it_restarts() {
        let c = IntCounter::new("x_total", "x").expect("counter");
        set_counter(&c, 5);
        set_counter(&c, 9);
        assert_eq!(c.get(), 9);
        set_counter(&c, 2);
        assert_eq!(c.get(), 2);
    }
}
