//! `cargo xtask bench [SUITE...]`: benchmarks that compare paths measured side by side in
//! one run, on this machine, so that the ratios mean something on a noisy host.
//!
//! Suites:
//! - `policy`: classification + decision time for an OLTP statement and a 2 KB analytic
//!   query, uncached and through the decision cache.
//! - `intercept`: connection rate (connect, 1-byte echo, close) and 1-byte round-trip
//!   latency on an open connection, direct vs through a plain user-space relay (`pc-probe
//!   relay`, the floor any proxy on this machine starts from) vs through the proxy. Rounds
//!   rotate between the paths; the median round of each is reported.
//! - `pg`: `pgbench -S` (simple and prepared protocol, 1 and 8 clients) direct, through
//!   Portcullis (shipped policies), through pgbouncer (session pooling) and through the
//!   plain relay, rounds rotating; then a 1,000,000-row SELECT with two masked columns against the same
//!   SELECT unmasked, both through Portcullis, with the daemon's RSS sampled meanwhile.
//! - `store`: the audit store's writer — records per second with group commit (64
//!   concurrent writers waiting for their records, and fire-and-forget appends), and the
//!   latency one waiting statement record adds, for `durability = "commit"` and
//!   `"strict"`, on the disk under `target/`; then `pgbench -S` direct and through
//!   Portcullis with recording in each mode.

use std::{net::Ipv4Addr, time::Instant};

use portcullis_tests::{
    Daemon, Echo, Env, Relay, agents_and_pg, agents_and_target, in_cgroup, metric_in, pg::*, probe,
    rss_kib, run_json, workspace_bin,
};
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

/// An echo server at 127.0.0.2 as the only target, and a daemon protecting the agent
/// cgroup `agents/bench`.
fn intercept_setup() -> (Env, String, Echo, Daemon) {
    let env = Env::new();
    let agent = env.cgroup("agents/bench");
    let echo = Echo::start(Ipv4Addr::new(127, 0, 0, 2));
    let cfg = env.config(
        "",
        &agents_and_target(
            &[("bench", &format!("cgroup = \"{agent}\""))],
            &[format!("127.0.0.2:{}", echo.port)],
        ),
    );
    let daemon = Daemon::start(&cfg);
    (env, agent, echo, daemon)
}

/// One line per target: whether Portcullis meets it and, when it does not, whether the
/// plain relay does — that is, whether any user-space proxy could on this host.
fn verdict(target: &str, portcullis: bool, relay: bool) {
    let v = match (portcullis, relay) {
        (true, _) => "met",
        (false, true) => "NOT MET; the plain relay meets it: the gap is Portcullis's own work",
        (false, false) => "NOT MET; the plain relay does not meet it either on this host",
    };
    println!("  {target:<46} {v}");
}

/// One way to reach the echo server, and what was measured on it, round by round.
struct Path<'a> {
    cgroup: &'a str,
    addr: String,
    rates: Vec<Vec<f64>>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

/// A path's medians over the rounds.
struct Medians {
    rates: Vec<f64>,
    p50: f64,
    p99: f64,
}

impl Path<'_> {
    fn medians(&self) -> Medians {
        Medians {
            rates: self.rates.iter().map(|r| median(r.clone())).collect(),
            p50: median(self.p50.clone()),
            p99: median(self.p99.clone()),
        }
    }
}

fn intercept() {
    let (env, agent, echo, daemon) = intercept_setup();
    let direct = env.cgroup("direct");
    let target = echo.addr4().to_string();
    let relay = Relay::start("127.0.0.3", &target);
    let path = |cgroup, addr: String| Path {
        cgroup,
        addr,
        rates: vec![Vec::new(); RATE_CONC.len()],
        p50: Vec::new(),
        p99: Vec::new(),
    };
    // Direct to the echo server; through the plain relay (the floor for any proxy on this
    // machine); intercepted by Portcullis.
    let mut paths = [
        path(&direct, target.clone()),
        path(&direct, relay.addr.to_string()),
        path(&agent, target.clone()),
    ];
    let started = Instant::now();
    let mut failed = 0.0;
    for round in 0..ROUNDS {
        eprintln!("round {}/{ROUNDS}", round + 1);
        // Rotate which path goes first, so drift hits all alike.
        for k in 0..paths.len() {
            let n = paths.len();
            let p = &mut paths[(round + k) % n];
            for (i, conc) in RATE_CONC.iter().enumerate() {
                let r = probe(&env, p.cgroup, None, &["rate", &p.addr, RATE_SECS, conc]);
                failed += f(&r, "failed");
                p.rates[i].push(f(&r, "per_sec"));
            }
            let l = probe(&env, p.cgroup, None, &["latency", &p.addr, RTT_COUNT]);
            p.p50.push(f(&l, "p50_us"));
            p.p99.push(f(&l, "p99_us"));
        }
    }
    let redirected = daemon.counter("redirected");
    let [d, r, p] = paths.each_ref().map(Path::medians);
    println!();
    println!(
        "intercept: {ROUNDS} rounds rotating direct, a plain user-space relay (pc-probe relay) \
         and Portcullis; {RATE_SECS}s per rate run, {RTT_COUNT} round trips for latency; \
         medians of rounds; {}; {:.0}s",
        host(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<32} {:>9} {:>12} {:>11} {:>13} {:>12}",
        "", "direct", "plain relay", "portcullis", "relay/direct", "portc/direct"
    );
    for (i, conc) in RATE_CONC.iter().enumerate() {
        println!(
            "{:<32} {:>9.0} {:>12.0} {:>11.0} {:>12.2}x {:>11.2}x   (target >= 0.50x)",
            format!("connections/s, {conc} client(s)"),
            d.rates[i],
            r.rates[i],
            p.rates[i],
            r.rates[i] / d.rates[i],
            p.rates[i] / d.rates[i]
        );
    }
    for (label, [ld, lr, lp], target) in [
        (
            "1-byte round trip p50 (us)",
            [d.p50, r.p50, p.p50],
            "   (target <= +15us)",
        ),
        ("1-byte round trip p99 (us)", [d.p99, r.p99, p.p99], ""),
    ] {
        println!(
            "{:<32} {:>9.1} {:>12.1} {:>11.1} {:>+11.1}us {:>+10.1}us{target}",
            label,
            ld,
            lr,
            lp,
            lr - ld,
            lp - ld
        );
    }
    println!("targets:");
    for (i, conc) in RATE_CONC.iter().enumerate() {
        verdict(
            &format!("connections/s >= 0.50x direct, {conc} client(s)"),
            p.rates[i] >= 0.5 * d.rates[i],
            r.rates[i] >= 0.5 * d.rates[i],
        );
    }
    verdict(
        "round trip p50 <= +15 us",
        p.p50 - d.p50 <= 15.0,
        r.p50 - d.p50 <= 15.0,
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
    // The simple protocol inlines values: every text is new, its shape is not.
    let mut n = 0u64;
    let inlined = per_call(
        || {
            n += 1;
            let text = format!("SELECT abalance FROM pgbench_accounts WHERE aid = {n}");
            std::hint::black_box(
                store.judge_sql(class, &subject, "postgres", "postgres", &text, lex),
            );
        },
        2_000,
        20,
    );
    println!(
        "{:<34} {:>9.2} us {:>12}   (a new literal each call: the shape's classification and decision are shared)",
        "pgbench select, inlined values",
        inlined / 1000.0,
        "-"
    );
}

/// One pgbench run; returns (tps, mean latency in ms).
fn pgbench(
    env: &Env,
    cgroup: &str,
    port: u16,
    mode: &str,
    clients: usize,
    secs: u32,
) -> (f64, f64) {
    let mut cmd = std::process::Command::new("pgbench");
    cmd.args(["-h", "127.0.0.1", "-U", "app", "-n", "-S", "-M", mode])
        .args(["-p", &port.to_string()])
        .args(["-c", &clients.to_string(), "-j", &clients.to_string()])
        .args(["-T", &secs.to_string(), "shop"])
        .env("PGPASSWORD", APP_PASSWORD)
        .env("PGSSLMODE", "disable");
    in_cgroup(&mut cmd, &env.cg_dir(cgroup), Some(65534));
    let out = cmd
        .output()
        .expect("pgbench (apt install postgresql-contrib)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let num = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} in pgbench output:\n{text}"))
    };
    (num("tps = "), num("latency average = "))
}

const PG_ROUNDS: usize = 3;
const PG_SECS: u32 = 5;

/// `pg-profile [simple|prepared] [clients] [secs]`: the Portcullis path only, for a
/// profiler; prints the daemon's pid and waits 3 s before starting. `PC_PROFILE_METRICS=1`
/// prints the mean time a statement spent in the gate and at the server.
fn pg_profile(args: &[String]) {
    let mode = args.first().map_or("simple", String::as_str);
    let clients: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1);
    let secs: u32 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20);
    let (env, agent, direct, pg, body) = pg_setup();
    // PC_PROFILE_PROTOCOL=tcp compares with the opaque relay.
    let body = match std::env::var("PC_PROFILE_PROTOCOL") {
        Ok(p) => body.replace("protocol = \"postgres\"", &format!("protocol = \"{p}\"")),
        Err(_) => body,
    };
    // The opaque relay takes no PostgreSQL keys; PC_PROFILE_NO_CREDENTIALS=1 leaves the
    // target without `credentials` (the catalog is then asked on each session's own
    // connection).
    let body = if body.contains("\"tcp\"") {
        body.replace("credentials = ", "# credentials = ")
            .replace("upstream_tls = ", "# upstream_tls = ")
    } else if std::env::var("PC_PROFILE_NO_CREDENTIALS").is_ok() {
        body.replace("credentials = ", "# credentials = ")
    } else {
        body
    };
    // PC_PROFILE_CONFIG is appended to the configuration (tables the harness does not
    // write, e.g. "[store]\nrecording_limit = 0").
    let body = match std::env::var("PC_PROFILE_CONFIG") {
        Ok(extra) => format!("{body}\n{}\n", extra.replace("\\n", "\n")),
        Err(_) => body,
    };
    // PC_PROFILE_PATH=pgbouncer profiles the reference path instead (same pid line).
    if std::env::var("PC_PROFILE_PATH").is_ok_and(|p| p == "pgbouncer") {
        let bouncer = Bouncer::start(&env, &pg);
        println!("daemon pid {}", bouncer.pid());
        std::thread::sleep(std::time::Duration::from_secs(3));
        let (tps, lat) = pgbench(&env, &direct, bouncer.port, mode, clients, secs);
        println!("pgbouncer {mode} {clients} client(s): {tps:.0} tps, {lat:.3} ms mean latency");
        return;
    }
    // PC_PROFILE_PATH=relay: the plain relay (no parsing, identity or records).
    if std::env::var("PC_PROFILE_PATH").is_ok_and(|p| p == "relay") {
        let relay = Relay::start("127.0.0.1", &pg.addr().to_string());
        let port = relay.addr.port();
        println!("daemon pid {}", relay.pid());
        std::thread::sleep(std::time::Duration::from_secs(3));
        let (tps, lat) = pgbench(&env, &direct, port, mode, clients, secs);
        println!("relay {mode} {clients} client(s): {tps:.0} tps, {lat:.3} ms mean latency");
        return;
    }
    // PC_PROFILE_WORKERS sets `[proxy] workers` (default: one per CPU).
    let workers =
        std::env::var("PC_PROFILE_WORKERS").map_or(String::new(), |n| format!("workers = {n}"));
    let daemon = Daemon::start(&env.config_with(&workers, "", &body));
    println!("daemon pid {}", daemon.child.id());
    std::thread::sleep(std::time::Duration::from_secs(3));
    let (tps, lat) = pgbench(&env, &agent, pg.port, mode, clients, secs);
    if std::env::var("PC_PROFILE_METRICS").is_ok() {
        let t = StatementTimes::read(&daemon);
        println!(
            "mean us per statement: in the daemon {:.1}, at the server {:.1}, gate {:.1}",
            t.statement_us(),
            t.upstream_us(),
            t.gate_us()
        );
    }
    println!("portcullis {mode} {clients} client(s): {tps:.0} tps, {lat:.3} ms mean latency");
}

/// `intercept-profile [rate|latency|connect] [clients|bytes] [secs]`: the intercepted path
/// only, for a profiler; prints the daemon's pid and waits 3 s before starting.
/// `relay-rate` and `relay-latency` put the same load through the plain relay instead.
/// `PC_PROFILE_LOG=1` prints the daemon's log at the end.
fn intercept_profile(args: &[String]) {
    let what = args.first().map_or("rate", String::as_str);
    let clients = args.get(1).map_or("1", String::as_str);
    let secs = args.get(2).map_or("10", String::as_str);
    let (env, agent, echo, daemon) = intercept_setup();
    let mut target = echo.addr4().to_string();
    // `relay-rate`, `relay-latency`: the same load through the reference relay instead,
    // from an unprotected cgroup; its pid is printed in the daemon's place.
    let (what, agent, _relay) = match what.strip_prefix("relay-") {
        Some(what) => {
            let relay = Relay::start("127.0.0.3", &target);
            target = relay.addr.to_string();
            println!("daemon pid {} (the reference relay)", relay.pid());
            (what, env.cgroup("direct"), Some(relay))
        }
        None => {
            println!("daemon pid {}", daemon.child.id());
            (what, agent, None)
        }
    };
    std::thread::sleep(std::time::Duration::from_secs(3));
    let r = if what == "connect" {
        probe(&env, &agent, None, &["connect", &target, clients])
    } else if what == "latency" {
        let n = (secs.parse::<u64>().unwrap_or(10) * 10_000).to_string();
        probe(&env, &agent, None, &["latency", &target, &n])
    } else {
        probe(&env, &agent, None, &["rate", &target, secs, clients])
    };
    if std::env::var("PC_PROFILE_LOG").is_ok() {
        std::thread::sleep(std::time::Duration::from_secs(1));
        eprintln!("{}", daemon.logs.tail());
    }
    println!("{r}");
}

/// Sums and counts of the daemon's statement histograms: from a request arriving to its
/// ReadyForQuery passing back, and from forwarding it to that ReadyForQuery arriving. Their
/// difference is what the gate itself adds to a statement (decode, judge, record, forward,
/// relay the answer), apart from the extra socket hops.
#[derive(Clone, Copy, Default)]
struct StatementTimes {
    statement_s: f64,
    upstream_s: f64,
    count: f64,
}

impl StatementTimes {
    fn read(daemon: &Daemon) -> Self {
        let (_, body) = daemon.http_get("/metrics");
        let total = |name: &str| metric_in(&body, name, &[]);
        Self {
            statement_s: total("portcullis_statement_duration_seconds_sum"),
            upstream_s: total("portcullis_upstream_duration_seconds_sum"),
            count: total("portcullis_statement_duration_seconds_count"),
        }
    }

    fn since(self, before: Self) -> Self {
        Self {
            statement_s: self.statement_s - before.statement_s,
            upstream_s: self.upstream_s - before.upstream_s,
            count: self.count - before.count,
        }
    }

    fn add(&mut self, d: Self) {
        self.statement_s += d.statement_s;
        self.upstream_s += d.upstream_s;
        self.count += d.count;
    }

    fn statement_us(self) -> f64 {
        self.statement_s / self.count * 1e6
    }

    fn upstream_us(self) -> f64 {
        self.upstream_s / self.count * 1e6
    }

    fn gate_us(self) -> f64 {
        self.statement_us() - self.upstream_us()
    }
}

/// CPU time spent so far, in clock ticks: by one process (all its threads, ended ones
/// included) and by the whole host. Read before and after a run, the differences divided by
/// the transactions give what one transaction cost the proxy and the machine: on a host
/// where the clients, the server and the proxy share the cores, that is what throughput
/// is traded for.
#[derive(Clone, Copy, Default)]
struct CpuTicks {
    process: f64,
    host: f64,
}

impl CpuTicks {
    fn read(pid: Option<u32>) -> Self {
        let process = pid.map_or(0.0, |pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
            // utime and stime.
            let ticks = |n| {
                portcullis::proxy::identity::stat_field(&stat, n)
                    .and_then(|f| f.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("field {n} of /proc/{pid}/stat: {stat}"))
            };
            ticks(14) + ticks(15)
        });
        let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
        let cpu: Vec<f64> = stat
            .lines()
            .next()
            .expect("the cpu line")
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        // user nice system idle iowait irq softirq steal: all but idle and iowait.
        let host = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6] + cpu.get(7).unwrap_or(&0.0);
        Self { process, host }
    }

    fn since(self, before: Self) -> Self {
        Self {
            process: self.process - before.process,
            host: self.host - before.host,
        }
    }

    /// Microseconds per transaction: (process, host).
    fn per(self, transactions: f64) -> (f64, f64) {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let us = |ticks: f64| ticks / hz * 1e6 / transactions;
        (us(self.process), us(self.host))
    }
}

/// A server with pgbench data (scale 10) and the configuration of a gate in front of it.
fn pg_setup() -> (Env, String, String, Pg, String) {
    let env = Env::new();
    let agent = env.cgroup("agents/bench");
    let direct = env.cgroup("direct");
    // Statement logging off: it would dominate the server's time.
    let pg = Pg::start_with(&env, "log_statement = 'none'");
    let init = std::process::Command::new("pgbench")
        .args(["-i", "-q", "-s", "10", "-U", "postgres", "-h"])
        .arg(&pg.socket_dir)
        .args(["-p", &pg.port.to_string(), "shop"])
        .output()
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    pg.sql("shop", "GRANT SELECT ON ALL TABLES IN SCHEMA public TO app");
    let secret = secret_file(&env);
    // The server leg in plaintext, like pgbench's own (PGSSLMODE=disable) and pgbouncer's
    // default: every path pays the same for transport.
    let target = format!(
        "upstream_tls = \"disable\"\ncredentials = {{ user = \"app\", password_file = \"{}\" }}",
        secret.display()
    );
    let body = agents_and_pg(
        &[("bench", &format!("cgroup = \"{agent}\""))],
        &pg.addr().to_string(),
        &target,
    );
    (env, agent, direct, pg, body)
}

fn pg() {
    let (env, agent, direct, pg, body) = pg_setup();
    let daemon = Daemon::start(&env.config("", &body));
    let bouncer = Bouncer::start(&env, &pg);
    let relay = Relay::start("127.0.0.1", &pg.addr().to_string());
    let relay_port = relay.addr.port();
    let started = Instant::now();
    let cases: [(&str, usize); 4] = [
        ("simple", 1),
        ("simple", 8),
        ("prepared", 1),
        ("prepared", 8),
    ];
    // The plain relay (`pc-probe relay`, no parsing) is the floor: what relaying through
    // any user-space process costs on this machine.
    let paths: [(&str, &str, u16); 4] = [
        ("direct", direct.as_str(), pg.port),
        ("portcullis", agent.as_str(), pg.port),
        ("pgbouncer", direct.as_str(), bouncer.port),
        ("plain relay", direct.as_str(), relay_port),
    ];
    let np = paths.len();
    // results[case][path] = (tps runs, latency runs)
    let mut results = vec![vec![(Vec::new(), Vec::new()); np]; 4];
    // gate[case] = the daemon's statement times over that case's Portcullis runs
    let mut gate = [StatementTimes::default(); 4];
    // cpu[case][path] = (proxy us, host us) per transaction, one per run; the process whose
    // CPU is counted for each path (none for direct).
    let mut cpu = vec![vec![(Vec::new(), Vec::new()); np]; 4];
    let pids = [
        None,
        Some(daemon.child.id()),
        Some(bouncer.pid()),
        Some(relay.pid()),
    ];
    for round in 0..PG_ROUNDS {
        eprintln!("pg round {}/{PG_ROUNDS}", round + 1);
        for (ci, (mode, clients)) in cases.iter().enumerate() {
            for k in 0..np {
                // Rotate the order so drift hits every path alike.
                let pi = (k + round) % np;
                let (name, cg, port) = paths[pi];
                let before = (name == "portcullis").then(|| StatementTimes::read(&daemon));
                let ticks = CpuTicks::read(pids[pi]);
                let (tps, lat) = pgbench(&env, cg, port, mode, *clients, PG_SECS);
                let (proxy_us, host_us) = CpuTicks::read(pids[pi])
                    .since(ticks)
                    .per(tps * f64::from(PG_SECS));
                cpu[ci][pi].0.push(proxy_us);
                cpu[ci][pi].1.push(host_us);
                if let Some(before) = before {
                    gate[ci].add(StatementTimes::read(&daemon).since(before));
                }
                results[ci][pi].0.push(tps);
                results[ci][pi].1.push(lat);
            }
        }
    }
    // medians[case] = (tps per path, mean latency per path)
    let medians: Vec<(Vec<f64>, Vec<f64>)> = results
        .iter()
        .map(|case| {
            (
                case.iter().map(|(t, _)| median(t.clone())).collect(),
                case.iter().map(|(_, l)| median(l.clone())).collect(),
            )
        })
        .collect();
    println!();
    println!(
        "pg: pgbench -S, scale 10, {PG_ROUNDS} rounds of {PG_SECS}s per case and path, medians; \
         Portcullis with the shipped policies; {}; {:.0}s",
        host(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<22} {:>10} {:>11} {:>10} {:>9} {:>10} {:>14} {:>9}",
        "case (tps)",
        "direct",
        "portcullis",
        "pgbouncer",
        "P/direct",
        "P/bouncer",
        "added mean lat",
        "gate"
    );
    for (ci, (mode, clients)) in cases.iter().enumerate() {
        let (tps, lat) = &medians[ci];
        println!(
            "{:<22} {:>10.0} {:>11.0} {:>10.0} {:>8.2}x {:>9.2}x {:>+11.1} us {:>6.1} us",
            format!("{mode}, {clients} client(s)"),
            tps[0],
            tps[1],
            tps[2],
            tps[1] / tps[0],
            tps[1] / tps[2],
            (lat[1] - lat[0]) * 1000.0,
            gate[ci].gate_us()
        );
    }
    println!(
        "targets: P/bouncer >= 1.00x in every case; P/direct >= 0.80x with 8 clients; added \
         mean latency <= +20 us with 1 client"
    );
    println!(
        "gate: the daemon's mean time per statement minus the server's (request in to \
         ReadyForQuery out, less forward to ReadyForQuery in): its own work, apart from the \
         two extra socket hops"
    );
    println!();
    println!(
        "{:<22} {:>10} {:>12} {:>9} {:>12} {:>10} {:>12}",
        "the floor (tps)",
        "direct",
        "plain relay",
        "R/direct",
        "bouncer/dir",
        "R added",
        "bouncer added"
    );
    for (ci, (mode, clients)) in cases.iter().enumerate() {
        let (tps, lat) = &medians[ci];
        println!(
            "{:<22} {:>10.0} {:>12.0} {:>8.2}x {:>11.2}x {:>+7.1} us {:>+9.1} us",
            format!("{mode}, {clients} client(s)"),
            tps[0],
            tps[3],
            tps[3] / tps[0],
            tps[2] / tps[0],
            (lat[3] - lat[0]) * 1000.0,
            (lat[2] - lat[0]) * 1000.0
        );
    }
    println!(
        "plain relay: accept, connect, copy both ways on the daemon's thread layout, no \
         parsing, identity or records"
    );
    println!();
    println!(
        "{:<22} {:>10} {:>12} {:>10} {:>12} | {:>8} {:>11} {:>10} {:>12}",
        "CPU per txn (us)",
        "portcullis",
        "plain relay",
        "pgbouncer",
        "P - relay",
        "host: dir",
        "portcullis",
        "pgbouncer",
        "plain relay"
    );
    for (ci, (mode, clients)) in cases.iter().enumerate() {
        let c: Vec<(f64, f64)> = cpu[ci]
            .iter()
            .map(|(p, h)| (median(p.clone()), median(h.clone())))
            .collect();
        println!(
            "{:<22} {:>10.1} {:>12.1} {:>10.1} {:>+12.1} | {:>8.1} {:>11.1} {:>10.1} {:>12.1}",
            format!("{mode}, {clients} client(s)"),
            c[1].0,
            c[3].0,
            c[2].0,
            c[1].0 - c[3].0,
            c[0].1,
            c[1].1,
            c[2].1,
            c[3].1
        );
    }
    println!(
        "CPU per txn: the proxy process's user+system time over the transactions pgbench \
         ran (left), and the whole host's (right: clients, server and proxy together); with \
         8 clients the cores are saturated, so tps follows the host figure"
    );
    println!("targets:");
    for (ci, (mode, clients)) in cases.iter().enumerate() {
        let (tps, lat) = &medians[ci];
        let case = format!("{mode}, {clients} client(s)");
        verdict(
            &format!(">= pgbouncer, {case}"),
            tps[1] >= tps[2],
            tps[3] >= tps[2],
        );
        if *clients == 8 {
            verdict(
                &format!(">= 0.80x direct, {case}"),
                tps[1] >= 0.8 * tps[0],
                tps[3] >= 0.8 * tps[0],
            );
        } else {
            verdict(
                &format!("<= +20 us added mean latency, {case}"),
                (lat[1] - lat[0]) * 1000.0 <= 20.0,
                (lat[3] - lat[0]) * 1000.0 <= 20.0,
            );
        }
    }
    drop(relay);
    drop(bouncer);
    drop(daemon);
    masking(&env, &agent, &pg, &body);
}

/// The masking targets: a million-row SELECT with two masked columns against the same rows
/// unmasked, both through Portcullis, and the daemon's RSS while it streams. Part of `pg`;
/// `masking` runs it alone.
fn masking(env: &Env, agent: &str, pg: &Pg, body: &str) {
    pg.sql(
        "shop",
        "CREATE TABLE big AS SELECT g AS id, 'user' || g || '@example.com' AS email, \
         '+1 415 555 ' || lpad((g % 10000)::text, 4, '0') AS phone, md5(g::text) AS name \
         FROM generate_series(1, 1000000) g; \
         CREATE TABLE big_plain AS TABLE big; \
         GRANT SELECT ON big, big_plain TO app",
    );
    let policies = env.dir.join("bench-policies");
    std::fs::create_dir_all(&policies).expect("policy dir");
    std::fs::write(
        policies.join("mask.toml"),
        "[[rule]]\nid = \"mask-big\"\nsql = { kinds = [\"select\"] }\naction = \"mask\"\n\
         mask = { columns = [\"big.email\", \"big.phone\"], strategy = \"redact\" }\n",
    )
    .expect("policy");
    let body = format!("[policy]\ndir = \"{}\"\n\n{body}", policies.display());
    let daemon = Daemon::start(&env.config("", &body));
    let run = |table: &str| -> (f64, Value) {
        let mut cmd = std::process::Command::new(workspace_bin("pc-pg"));
        cmd.arg(pg.addr().to_string())
            .args(["app", APP_PASSWORD, "shop", "distinct"])
            .arg(format!("SELECT id, email, phone, name FROM {table}"));
        let v = run_json(env, agent, Some(65534), cmd);
        assert_eq!(v["result"]["rows"], 1_000_000, "{v}");
        (f(&v["result"], "ms"), v["result"]["distinct"].clone())
    };
    let pid = daemon.child.id();
    let (mut masked, mut plain) = (Vec::new(), Vec::new());
    let mut rss_growth = 0u64;
    for round in 0..PG_ROUNDS {
        eprintln!("masking round {}/{PG_ROUNDS}", round + 1);
        let before = rss_kib(pid);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut max = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    max = max.max(rss_kib(pid));
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                max
            })
        };
        let (ms, distinct) = run("big");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let max = sampler.join().expect("sampler");
        rss_growth = rss_growth.max(max.saturating_sub(before));
        assert_eq!(distinct, serde_json::json!(["[REDACTED:email]"]), "masked");
        masked.push(ms);
        plain.push(run("big_plain").0);
    }
    let (m, p) = (median(masked), median(plain));
    println!();
    println!(
        "masking: SELECT of 1,000,000 rows x 4 columns (binary, tokio-postgres), through Portcullis; medians of {PG_ROUNDS}"
    );
    println!("{:<34} {:>10.0} ms", "unmasked", p);
    println!(
        "{:<34} {:>10.0} ms   {:.2}x   (target <= 1.30x)",
        "2 columns masked (redact)",
        m,
        m / p
    );
    println!(
        "{:<34} {:>10} KiB        (target < 20480 KiB)",
        "daemon RSS growth while streaming", rss_growth
    );
}

/// A statement record like the PostgreSQL engine writes.
fn stmt_record(n: u64) -> portcullis::store::Append {
    portcullis::store::Append {
        session: 1 + (n % 8) as i64,
        kind: "statement",
        body: serde_json::json!({
            "n": n, "via": "query", "sql": format!("SELECT abalance FROM pgbench_accounts WHERE aid = {n};"),
            "redacted": false, "name": null, "verdict": "mask", "rule": "mask-pii-columns",
            "kinds": ["select"], "masks": ["mask-pii-columns"], "refused": null,
        })
        .into(),
        at_us: portcullis::store::now_us(),
    }
}

fn store_config(dir: &std::path::Path, strict: bool) -> portcullis::config::StoreConfig {
    use portcullis::config::{Durability, StoreConfig};
    let _ = std::fs::remove_dir_all(dir);
    StoreConfig {
        path: dir.join("bench.db"),
        durability: if strict {
            Durability::Strict
        } else {
            Durability::Commit
        },
        queue: 65_536,
        recording_limit: 1 << 20,
        retention: None,
        prune_interval: portcullis::config::Duration::from_secs(3600),
        redact_literals: false,
    }
}

/// (records/s with 64 waiting writers, records/s fire-and-forget, single-writer latency
/// median and p99 in µs)
fn store_writer(dir: &std::path::Path, strict: bool) -> (f64, f64, f64, f64) {
    use portcullis::store::Store;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = Store::open(&store_config(dir, strict)).expect("store");
        // 64 writers, each waiting for its record before the next, like sessions do.
        let secs = 3.0;
        let t = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..64u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while t.elapsed().as_secs_f64() < secs {
                    store
                        .append_durable(vec![stmt_record(w << 32 | n)])
                        .await
                        .expect("append");
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("writer");
        }
        let waiting = total as f64 / t.elapsed().as_secs_f64();
        // Fire and forget (transcripts): queue as fast as the queue takes them.
        let t = Instant::now();
        let mut sent = 0u64;
        while t.elapsed().as_secs_f64() < 2.0 {
            match store.append(stmt_record(sent)) {
                Ok(()) => sent += 1,
                Err(_) => tokio::task::yield_now().await,
            }
        }
        // The queue is full now: wait until the writer has drained it.
        while store.flush().await.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let queued = sent as f64 / t.elapsed().as_secs_f64();
        // One writer alone: what a statement waits for its record.
        let mut lat = Vec::new();
        for n in 0..2000u64 {
            let t = Instant::now();
            store
                .append_durable(vec![stmt_record(n)])
                .await
                .expect("append");
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        lat.sort_by(f64::total_cmp);
        let p99 = lat[lat.len() * 99 / 100];
        let med = median(lat);
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.close())
            .await
            .expect("close");
        (waiting, queued, med, p99)
    })
}

/// The host facts that decide what a hop costs: cores, and on a virtual machine whose idle
/// CPUs halt through `haltpoll`, whether they poll before halting. With polling off, each
/// wake-up of an idle virtual CPU is an exit to the hypervisor (tens of microseconds), so
/// every path is bound by its wake-ups and one with extra hops pays for each.
fn host() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let poll = std::fs::read_to_string("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    match poll {
        Some(0) => {
            format!("{cores} cores; guest halt polling off: wake-ups exit to the hypervisor")
        }
        Some(ns) => format!("{cores} cores; guest halt polling up to {} us", ns / 1000),
        None => format!("{cores} cores"),
    }
}

fn store_bench() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-store");
    println!();
    println!(
        "store: audit writer on {} ({}); medians of {PG_ROUNDS} rounds",
        dir.display(),
        host()
    );
    println!(
        "{:<10} {:>22} {:>22} {:>18} {:>14}",
        "durability", "records/s (64 waiting)", "records/s (no wait)", "wait median", "wait p99"
    );
    for strict in [false, true] {
        let runs: Vec<_> = (0..PG_ROUNDS).map(|_| store_writer(&dir, strict)).collect();
        let col = |i: usize| median(runs.iter().map(|r| [r.0, r.1, r.2, r.3][i]).collect());
        println!(
            "{:<10} {:>22.0} {:>22.0} {:>15.1} us {:>11.1} us",
            if strict { "strict" } else { "commit" },
            col(0),
            col(1),
            col(2),
            col(3)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    if std::env::var_os("PC_STORE_WRITER_ONLY").is_some() {
        return;
    }

    // pgbench with recording in each mode, against direct, rounds alternating.
    let (env, agent, direct, pg, body) = pg_setup();
    let cases: [(&str, usize); 2] = [("simple", 1), ("simple", 8)];
    // results[case][path]: direct, commit, strict
    let mut results = vec![vec![Vec::new(); 3]; 2];
    for round in 0..PG_ROUNDS {
        eprintln!("store pgbench round {}/{PG_ROUNDS}", round + 1);
        for (ci, (mode, clients)) in cases.iter().enumerate() {
            results[ci][0].push(pgbench(&env, &direct, pg.port, mode, *clients, PG_SECS).0);
        }
        for (pi, durability) in [(1, "commit"), (2, "strict")] {
            let cfg = env.config(
                "",
                &format!("{body}\n[store]\ndurability = \"{durability}\"\n"),
            );
            let daemon = Daemon::start(&cfg);
            for (ci, (mode, clients)) in cases.iter().enumerate() {
                results[ci][pi].push(pgbench(&env, &agent, pg.port, mode, *clients, PG_SECS).0);
            }
            drop(daemon);
        }
    }
    println!();
    println!(
        "store: pgbench -S through Portcullis with every statement recorded before it is \
         forwarded; {PG_ROUNDS} rounds of {PG_SECS}s, medians"
    );
    println!(
        "{:<22} {:>10} {:>12} {:>12} {:>10} {:>10}",
        "case (tps)", "direct", "P commit", "P strict", "commit/d", "strict/d"
    );
    for (ci, (mode, clients)) in cases.iter().enumerate() {
        let t: Vec<f64> = (0..3).map(|p| median(results[ci][p].clone())).collect();
        println!(
            "{:<22} {:>10.0} {:>12.0} {:>12.0} {:>9.2}x {:>9.2}x",
            format!("{mode}, {clients} client(s)"),
            t[0],
            t[1],
            t[2],
            t[1] / t[0],
            t[2] / t[0]
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
    if want("pg") {
        pg();
        ran = true;
    }
    if want("store") {
        store_bench();
        ran = true;
    }
    if !all && want("masking") && !want("pg") {
        let (env, agent, _direct, pg, body) = pg_setup();
        masking(&env, &agent, &pg, &body);
        ran = true;
    }
    if args.first().is_some_and(|a| a == "pg-profile") {
        pg_profile(&args[1..]);
        ran = true;
    }
    if args.first().is_some_and(|a| a == "intercept-profile") {
        intercept_profile(&args[1..]);
        ran = true;
    }
    if !ran {
        eprintln!(
            "unknown suite(s) {args:?}; available: policy, intercept, pg (with masking), masking, store"
        );
        std::process::exit(2);
    }
}
