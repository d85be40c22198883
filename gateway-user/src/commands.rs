//! Client commands for sessions, replay, approvals and the audit log: each asks the daemon
//! over the admin API (which checks who is asking) and prints for people, or `--json`.

use std::{fmt::Write as _, path::PathBuf, process::ExitCode, time::Duration};

use crate::{
    admin::{
        client::{self, ClientError},
        proto::{self, Request},
    },
    cli::{AuditCommand, Cli, Command},
    replay::{Replay, clock},
    store::{
        self,
        query::{Record, SessionFilter, SessionSummary, Verification},
    },
};

fn json_out<T: serde::Serialize>(v: &T) -> Result<(), String> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn since_us(d: Option<Duration>) -> Option<i64> {
    d.map(|d| store::now_us() - d.as_micros() as i64)
}

/// Handles the commands of this module; `None` for the others.
pub fn run(
    cli: &Cli,
    socket: &dyn Fn() -> Result<PathBuf, String>,
) -> Result<Option<ExitCode>, String> {
    let call = |req: &Request| -> Result<serde_json::Value, String> {
        client::call::<serde_json::Value>(&socket()?, req).map_err(|e| e.to_string())
    };
    match &cli.command {
        Command::Sessions {
            agent,
            target,
            since,
            decision,
            sub,
            limit,
            json,
        } => {
            let f = SessionFilter {
                agent: agent.clone(),
                target: target.clone(),
                since_us: since_us(*since),
                decision: decision.clone(),
                sub: sub.clone(),
                limit: Some(*limit),
            };
            let v: Vec<SessionSummary> =
                serde_json::from_value(call(&Request::Sessions(f))?).map_err(|e| e.to_string())?;
            if *json {
                json_out(&v)?;
            } else {
                print!("{}", sessions_table(&v));
            }
        }
        Command::Replay {
            id,
            follow,
            speed,
            json,
        } => replay(&socket()?, *id, *follow, *speed, *json)?,
        Command::Approvals { history, json } => {
            let v: proto::ApprovalsView =
                serde_json::from_value(call(&Request::Approvals { history: *history })?)
                    .map_err(|e| e.to_string())?;
            if *json {
                json_out(&v)?;
            } else {
                print!("{}", approvals_text(&v));
            }
        }
        Command::Approve { id, for_, json } => {
            let v: proto::Approved = serde_json::from_value(call(&Request::Approve {
                id: id.clone(),
                grant_for_secs: for_.map(|d| d.as_secs().max(1)),
            })?)
            .map_err(|e| e.to_string())?;
            if *json {
                json_out(&v)?;
            } else {
                match &v.grant {
                    Some(g) => println!(
                        "approved {}; grant {} approves rule {} for agent {} on {} until {}",
                        v.id,
                        g.id,
                        g.rule,
                        g.agent,
                        g.target,
                        clock(g.expires_us)
                    ),
                    None => println!("approved {}", v.id),
                }
            }
        }
        Command::Deny { id, reason, json } => {
            let v = call(&Request::Deny {
                id: id.clone(),
                reason: reason.clone(),
            })?;
            if *json {
                json_out(&v)?;
            } else {
                println!("denied {id}");
            }
        }
        Command::Audit { command } => return audit(command, socket).map(Some),
        _ => return Ok(None),
    }
    Ok(Some(ExitCode::SUCCESS))
}

fn sessions_table(v: &[SessionSummary]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:>6}  {:<23}  {:<14}  {:<14}  {:>6} {:>6} {:>5} {:>6} {:>5}  {:<12}  token sub",
        "id", "started", "agent", "target", "stmts", "allow", "mask", "deny", "held", "end"
    );
    for s in v {
        let _ = writeln!(
            o,
            "{:>6}  {:<23}  {:<14}  {:<14}  {:>6} {:>6} {:>5} {:>6} {:>5}  {:<12}  {}",
            s.id,
            clock(s.started_us),
            s.agent,
            s.target,
            s.statements,
            s.allowed,
            s.masked,
            s.denied,
            s.held,
            s.end_reason
                .as_deref()
                .unwrap_or(if s.ended_us.is_none() { "open" } else { "" }),
            s.oidc_sub.as_deref().unwrap_or("-")
        );
    }
    if v.is_empty() {
        let _ = writeln!(o, "no sessions");
    }
    o
}

fn approvals_text(v: &proto::ApprovalsView) -> String {
    let mut o = String::new();
    if v.pending.is_empty() {
        let _ = writeln!(o, "no statements waiting for approval");
    }
    for p in &v.pending {
        let _ = writeln!(
            o,
            "{}  agent {} (uid {}) → {}  rule {}  expires {}\n    {}\n    approve: portcullis approve {}    deny: portcullis deny {} --reason '...'",
            p.id,
            p.agent,
            p.uid,
            p.target,
            p.rule,
            clock(p.expires_us),
            p.statement.trim(),
            p.id,
            p.id
        );
    }
    for g in &v.grants {
        let _ = writeln!(
            o,
            "grant {}: rule {} for agent {} on {} until {} (by {}, used {} time(s))",
            g.id,
            g.rule,
            g.agent,
            g.target,
            clock(g.expires_us),
            g.by,
            g.uses
        );
    }
    for h in &v.history {
        let _ = writeln!(
            o,
            "{}  {}  {:<10} agent {} rule {}{}",
            h.id,
            clock(h.created_us),
            h.state,
            h.agent,
            h.rule,
            h.decided_by
                .as_ref()
                .map(|b| format!(" by {b}"))
                .unwrap_or_default()
        );
    }
    o
}

fn replay(
    socket: &std::path::Path,
    id: i64,
    follow: bool,
    speed: Option<f64>,
    json: bool,
) -> Result<(), String> {
    let mut r = Replay::default();
    let mut after = 0i64;
    let mut last_at: Option<i64> = None;
    loop {
        let v: proto::SessionView = client::call(
            socket,
            &Request::Session {
                id,
                after_seq: after,
                limit: 1000,
            },
        )
        .map_err(|e| e.to_string())?;
        let mut ended = v.session.ended_us.is_some();
        for rec in &v.records {
            if let (Some(speed), Some(prev)) = (speed, last_at) {
                std::thread::sleep(crate::replay::pause(prev, rec.at_us, speed));
            }
            last_at = Some(rec.at_us);
            emit(&mut r, rec, json)?;
            after = rec.seq;
            if rec.kind == "session_end" {
                ended = true;
            }
        }
        if v.records.len() >= 1000 {
            continue;
        }
        if !follow || ended {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn emit(r: &mut Replay, rec: &Record, json: bool) -> Result<(), String> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let text = if json {
        format!(
            "{}\n",
            serde_json::to_string(rec).map_err(|e| e.to_string())?
        )
    } else {
        r.feed(rec)
    };
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())
}

fn audit(
    command: &AuditCommand,
    socket: &dyn Fn() -> Result<PathBuf, String>,
) -> Result<ExitCode, String> {
    match command {
        AuditCommand::Verify { store, json } => {
            let v: Verification = match store {
                Some(path) => {
                    let c = store::open_ro(path)
                        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                    store::query::verify(&c, None).map_err(|e| e.to_string())?
                }
                None => match client::call(&socket()?, &Request::AuditVerify) {
                    Ok(v) => v,
                    Err(e @ ClientError::Connect { .. }) => {
                        return Err(format!(
                            "{e}\nhint: `portcullis audit verify --store PATH` reads the file directly"
                        ));
                    }
                    Err(e) => return Err(e.to_string()),
                },
            };
            if *json {
                json_out(&v)?;
            } else if v.ok {
                let c = v.chain.clone().unwrap_or(store::chain::Verified {
                    records: 0,
                    first_seq: 1,
                    head_seq: None,
                    head_hash: None,
                });
                println!(
                    "ok: {} record(s) from #{} chain intact; head #{} {}",
                    c.records,
                    c.first_seq,
                    c.head_seq.map_or("-".into(), |s| s.to_string()),
                    c.head_hash.unwrap_or_default()
                );
                if let Some(path) = store {
                    println!(
                        "note: read from the file: records removed from the end are caught only \
                         by comparing with the daemon's head (run without --store)"
                    );
                    let spool = store::spool::path_for(path);
                    // Records the database already has may still be in the spool.
                    let held = c.head_seq.unwrap_or(0);
                    let waiting = store::spool::Spool::read(&spool)
                        .map_or(0, |d| d.rows.iter().filter(|r| r.seq > held).count());
                    if waiting > 0 {
                        println!(
                            "note: {waiting} record(s) in {} are not in the database yet; the \
                             daemon imports them when it starts",
                            spool.display()
                        );
                    }
                }
            } else {
                println!(
                    "TAMPERED: {} (first bad record: #{})",
                    v.problem.clone().unwrap_or_default(),
                    v.first_bad_seq.map_or("?".into(), |s| s.to_string())
                );
            }
            Ok(if v.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        AuditCommand::Export { since, format } => {
            if format != "jsonl" {
                return Err(format!(
                    "unknown format `{format}`; the only format is jsonl"
                ));
            }
            let since = since_us(*since).unwrap_or(0);
            let socket = socket()?;
            let mut after = 0;
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            loop {
                let page: Vec<Record> = client::call(
                    &socket,
                    &Request::AuditExport {
                        since_us: since,
                        after_seq: after,
                        limit: 5000,
                    },
                )
                .map_err(|e| e.to_string())?;
                for r in &page {
                    let line = serde_json::to_string(r).map_err(|e| e.to_string())?;
                    writeln!(out, "{line}").map_err(|e| e.to_string())?;
                    after = r.seq;
                }
                if page.len() < 5000 {
                    break;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
