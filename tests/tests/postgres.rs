//! The PostgreSQL engine end to end: a real PostgreSQL server started by the test, real
//! clients in protected cgroups, the real daemon.

use std::process::{Command, Output};

use portcullis_tests::{pg::*, *};

struct Pgw {
    env: Env,
    agent: String,
    direct: String,
    pg: Pg,
    daemon: Daemon,
}

fn world(target_extra: &str) -> Pgw {
    let env = Env::new();
    let agent = env.cgroup("agents/a");
    let direct = env.cgroup("direct");
    let pg = Pg::start(&env);
    let cfg = env.config(
        "",
        &agents_and_pg(
            &[("a", &format!("cgroup = \"{agent}\""))],
            &pg.addr().to_string(),
            target_extra,
        ),
    );
    let daemon = Daemon::start(&cfg);
    Pgw {
        env,
        agent,
        direct,
        pg,
        daemon,
    }
}

/// psql as an unprivileged user in `cgroup`, over TCP to the server's address.
fn psql(w: &Pgw, cgroup: &str, sslmode: &str, sql: &str) -> Output {
    let mut cmd = Command::new(pg_bin().join("psql"));
    cmd.args([
        "-X",
        "-v",
        "ON_ERROR_STOP=0",
        "-h",
        "127.0.0.1",
        "-U",
        "app",
        "-d",
        "shop",
    ])
    .args(["-p", &w.pg.port.to_string(), "-c", sql])
    .env("PGPASSWORD", APP_PASSWORD)
    .env("PGSSLMODE", sslmode)
    .env("PGCONNECT_TIMEOUT", "10");
    in_cgroup(&mut cmd, &w.env.cg_dir(cgroup), Some(65534));
    cmd.output().expect("psql")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn psql_works_through_the_gate() {
    let w = world("");
    let o = psql(&w, &w.agent, "disable", "SELECT 1 AS one, 'x'::text AS t");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(" one | t"), "{}", text(&o));
    let rec = w.daemon.logs.wait_for(
        "the connection record",
        std::time::Duration::from_secs(10),
        |v| is_connection(v) && v["protocol"] == "postgres",
    );
    assert_eq!(rec["end"], "closed", "{rec}");
}
