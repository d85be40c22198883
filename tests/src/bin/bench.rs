//! `cargo xtask bench [SUITE...]`: benchmarks that compare paths measured side by side in
//! one run, on this machine, so that the ratios mean something on a noisy host.
//!
//! Suites:
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let all = args.is_empty();
    let want = |s: &str| all || args.iter().any(|a| a == s);
    let mut ran = false;
    if want("intercept") {
        intercept();
        ran = true;
    }
    if !ran {
        eprintln!("unknown suite(s) {args:?}; available: intercept");
        std::process::exit(2);
    }
}
