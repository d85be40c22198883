//! `cargo xtask bench [SUITE...]`: benchmarks that compare paths measured side by side in
//! one run, on this machine, so that the ratios mean something on a noisy host.
//!
//! Suites:
//! - `policy`: classification + decision time for an OLTP statement and a 2 KB analytic
//!   query, uncached and through the decision cache.
//! - `intercept`: connection rate (connect, 1-byte echo, close) and 1-byte round-trip
//!   latency on an open connection, direct vs through the proxy. Rounds alternate between
//!   the two paths; the median round of each is reported.

use std::{net::Ipv4Addr, time::Instant};

use portcullis_tests::{Daemon, Echo, Env, agents_and_target, probe};
use serde_json::Value;

const ROUNDS: usize = 5;
const RATE_SECS: &str = "2";
/// One client loop (setup latency bound) and four (CPU bound on a 2-core machine).
const RATE_CONC: [&str; 2] = ["1", "4"];
const RTT_COUNT: &str = "20000";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

fn intercept() {
    let env = Env::new();
    let agent = env.cgroup("agents/bench");
    let direct = env.cgroup("direct");
    let echo = Echo::start(Ipv4Addr::new(127, 0, 0, 2));
    let cfg = env.config(
        "",
        &agents_and_target(
            &[("bench", &format!("cgroup = \"{agent}\""))],
            &[format!("127.0.0.2:{}", echo.port)],
        ),
    );
    let daemon = Daemon::start(&cfg);
    let target = echo.addr4().to_string();
    let started = Instant::now();
    let (mut rate_d, mut rate_i) = (vec![Vec::new(); 2], vec![Vec::new(); 2]);
    let (mut p50_d, mut p50_i, mut p99_d, mut p99_i) = (vec![], vec![], vec![], vec![]);
    let mut failed = 0.0;
    for round in 0..ROUNDS {
        eprintln!("round {}/{ROUNDS}", round + 1);
        // Alternate which path goes first, so drift hits both alike.
        let order: [(&str, bool); 2] = if round % 2 == 0 {
            [(&direct, false), (&agent, true)]
        } else {
            [(&agent, true), (&direct, false)]
        };
        for (cg, intercepted) in order {
            for (i, conc) in RATE_CONC.iter().enumerate() {
                let r = probe(&env, cg, None, &["rate", &target, RATE_SECS, conc]);
                failed += f(&r, "failed");
                let rates = if intercepted {
                    &mut rate_i
                } else {
                    &mut rate_d
                };
                rates[i].push(f(&r, "per_sec"));
            }
            let l = probe(&env, cg, None, &["latency", &target, RTT_COUNT]);
            if intercepted {
                p50_i.push(f(&l, "p50_us"));
                p99_i.push(f(&l, "p99_us"));
            } else {
                p50_d.push(f(&l, "p50_us"));
                p99_d.push(f(&l, "p99_us"));
            }
        }
    }
    let redirected = daemon.counter("redirected");
    let (ld, li) = (median(p50_d), median(p50_i));
    let (qd, qi) = (median(p99_d), median(p99_i));
    println!();
    println!(
        "intercept: {ROUNDS} alternating rounds, {RATE_SECS}s per rate run, {RTT_COUNT} round \
         trips for latency; medians of rounds; {} cores; {:.0}s",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<34} {:>12} {:>12} {:>12}",
        "", "direct", "intercepted", "ratio/delta"
    );
    for (i, conc) in RATE_CONC.iter().enumerate() {
        let (rd, ri) = (median(rate_d[i].clone()), median(rate_i[i].clone()));
        println!(
            "{:<34} {:>12.0} {:>12.0} {:>11.2}x   (target >= 0.50x)",
            format!("connections/s, {conc} client(s)"),
            rd,
            ri,
            ri / rd
        );
    }
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>+10.1}us   (target <= +15us)",
        "1-byte round trip p50 (us)",
        ld,
        li,
        li - ld
    );
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>+10.1}us",
        "1-byte round trip p99 (us)",
        qd,
        qi,
        qi - qd
    );
    println!("kernel redirected {redirected} connections; {failed} client errors");
    assert_eq!(failed, 0.0, "clients saw errors");
}

/// A ~2 KB analytic query: CTEs, joins, window functions, CASE, aggregates.
const ANALYTIC: &str = "WITH monthly AS ( SELECT date_trunc('month', o.created_at) AS month, o.customer_id, \
sum(oi.quantity * oi.unit_price) AS revenue, count(DISTINCT o.id) AS orders FROM sales.orders o \
JOIN sales.order_items oi ON oi.order_id = o.id JOIN catalog.products p ON p.id = oi.product_id \
WHERE o.created_at >= now() - interval '2 years' AND o.status IN ('paid', 'shipped', 'delivered') \
AND p.category_id NOT IN (SELECT id FROM catalog.categories WHERE archived) GROUP BY 1, 2 ), \
ranked AS ( SELECT month, customer_id, revenue, orders, rank() OVER (PARTITION BY month ORDER BY \
revenue DESC) AS rnk, lag(revenue) OVER (PARTITION BY customer_id ORDER BY month) AS prev_revenue \
FROM monthly ), segments AS ( SELECT c.id, CASE WHEN c.created_at > now() - interval '90 days' THEN \
'new' WHEN EXISTS (SELECT 1 FROM sales.subscriptions s WHERE s.customer_id = c.id AND s.active) \
THEN 'subscriber' ELSE 'regular' END AS segment, coalesce(r.name, 'unknown') AS region FROM \
crm.customers c LEFT JOIN geo.regions r ON r.id = c.region_id ) SELECT r.month, s.segment, \
s.region, count(*) FILTER (WHERE r.rnk <= 10) AS top10, sum(r.revenue) AS revenue, avg(r.orders) AS \
avg_orders, sum(CASE WHEN r.prev_revenue IS NULL THEN 0 ELSE r.revenue - r.prev_revenue END) AS \
growth, percentile_cont(0.5) WITHIN GROUP (ORDER BY r.revenue) AS median_revenue, \
max(r.revenue) - min(r.revenue) AS spread, round(100.0 * sum(r.revenue) / nullif(sum(sum(r.revenue)) \
OVER (PARTITION BY r.month), 0), 2) AS share FROM ranked r JOIN segments s ON s.id = r.customer_id \
WHERE r.revenue > 0 AND s.region <> 'test' GROUP BY r.month, s.segment, s.region HAVING \
sum(r.revenue) > 1000 ORDER BY r.month DESC, revenue DESC LIMIT 500";

const OLTP: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";

/// Nanoseconds per call: the median of batches.
fn per_call(mut f: impl FnMut(), batch: usize, batches: usize) -> f64 {
    for _ in 0..batch {
        f();
    }
    let mut samples = Vec::with_capacity(batches);
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..batch {
            f();
        }
        samples.push(t.elapsed().as_nanos() as f64 / batch as f64);
    }
    median(samples)
}

fn policy() {
    use portcullis::{
        config::Config,
        policy::{PolicyStore, Verdict, model::Subject, sql::LexOptions, store::judge},
    };
    let cfg = Config::embedded().expect("default configuration");
    let store = PolicyStore::open(&cfg).expect("shipped policies");
    let set = store.current();
    let subject = Subject {
        agent: "local".into(),
        uid: 1000,
        ..Default::default()
    };
    let class = store.class_of(&subject, "postgres", "postgres");
    let lex = LexOptions::default();
    println!();
    println!(
        "policy: classify + decide with the shipped policies ({} rules); ns per call, median of 20 batches",
        set.rules.len()
    );
    println!("{:<34} {:>12} {:>12}   targets", "", "uncached", "cached");
    for (name, sql) in [
        ("pgbench OLTP select", OLTP),
        ("2 KB analytic query", ANALYTIC),
    ] {
        let j = judge(&set, &subject, "postgres", "postgres", sql, lex);
        assert!(
            j.classification.error.is_none(),
            "{name}: {:?}",
            j.classification.error
        );
        assert_eq!(j.decision.verdict, Verdict::Mask);
        let uncached = per_call(
            || {
                std::hint::black_box(judge(
                    &set,
                    &subject,
                    "postgres",
                    "postgres",
                    std::hint::black_box(sql),
                    lex,
                ));
            },
            200,
            20,
        );
        let cached = per_call(
            || {
                std::hint::black_box(store.judge_sql(
                    class,
                    &subject,
                    "postgres",
                    "postgres",
                    std::hint::black_box(sql),
                    lex,
                ));
            },
            20_000,
            20,
        );
        println!(
            "{:<34} {:>9.2} us {:>9.3} us   (sql len {} B; cached <= 1 us{})",
            name,
            uncached / 1000.0,
            cached / 1000.0,
            sql.len(),
            if sql == OLTP {
                ", uncached <= 20 us"
            } else {
                ""
            }
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let all = args.is_empty();
    let want = |s: &str| all || args.iter().any(|a| a == s);
    let mut ran = false;
    if want("policy") {
        policy();
        ran = true;
    }
    if want("intercept") {
        intercept();
        ran = true;
    }
    if !ran {
        eprintln!("unknown suite(s) {args:?}; available: policy, intercept");
        std::process::exit(2);
    }
}
