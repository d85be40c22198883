//! Command-line interface: clap definitions and dispatch. Output for people goes to stdout;
//! `--json` gives the same data for programs. Errors are one sentence plus what to do.

use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::{
    admin::{client, proto},
    config::{Config, DEFAULT_CONFIG_PATH, LogFormat},
    daemon, ebpf, exec, render, telemetry,
};

#[derive(Debug, Parser)]
#[command(
    name = "portcullis",
    version,
    about = "A policy gate between AI agents and the infrastructure they reach",
    long_about = None
)]
pub struct Cli {
    /// Configuration file (the embedded default is used when the default path is absent).
    #[arg(long, global = true, env = "PORTCULLIS_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (systemd runs this).
    Run {
        /// Log format, overriding `[log].format`.
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
    /// Run a command as a protected agent, in the agent's cgroup.
    Exec {
        /// Agent to run as (default: the first agent with a `cgroup` selector).
        #[arg(long)]
        agent: Option<String>,
        /// Drop privileges to this user after joining the cgroup.
        #[arg(long)]
        user: Option<String>,
        /// Run even if the daemon does not protect the cgroup.
        #[arg(long)]
        unprotected: bool,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<OsString>,
    },
    /// Show attached programs, counters, agents and targets.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Detach the pinned programs and remove pinned maps. Protection stops.
    Detach,
    /// Check policy files, or explain a decision.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// List recorded sessions, newest first.
    Sessions {
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        target: Option<String>,
        /// Sessions active within this long (`30m`, `2h`, `7d`).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Sessions with a statement of this decision: allow, mask, deny, require_approval.
        #[arg(long)]
        decision: Option<String>,
        /// Sessions whose OIDC token had this subject (`sub`).
        #[arg(long)]
        sub: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Show a recorded session as a transcript.
    Replay {
        /// Session id (from `portcullis sessions`).
        id: i64,
        /// Keep printing as the session goes on, until it ends.
        #[arg(long)]
        follow: bool,
        /// Replay with the recorded timing, this many times faster (1 = real time); a
        /// pause is at most 5 s.
        #[arg(long, value_parser = crate::replay::parse_speed)]
        speed: Option<f64>,
        /// The records as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Statements waiting for approval, and grants in force.
    Approvals {
        /// Also list past requests and how they ended.
        #[arg(long)]
        history: bool,
        #[arg(long)]
        json: bool,
    },
    /// Approve a held statement.
    Approve {
        id: String,
        /// Also approve the same rule for the same agent and target for this long.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        for_: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Deny a held statement.
    Deny {
        id: String,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Verify or export the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Check this host: kernel, BTF, cgroup v2, bpffs, capabilities, configuration,
    /// policies, targets, pinned state. Exits non-zero on any problem.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Install on this host: binary, systemd unit, configuration, policies, state directory,
    /// approver and auditor groups; then enable the service. Keeps existing configuration.
    Install {
        /// Install below this directory instead (no systemd calls).
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Also start the service.
        #[arg(long)]
        now: bool,
    },
    /// Stop and remove what `install` laid down, and detach the programs. The audit store
    /// stays unless `--purge`.
    Uninstall {
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Also remove the state directory (the audit store) and the groups.
        #[arg(long)]
        purge: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of the audit store: names the first record that was changed,
    /// removed, inserted or reordered. Asks the daemon; with `--store`, reads the file.
    Verify {
        /// Read this store file directly (the daemon need not run; root).
        #[arg(long)]
        store: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Print records as JSON lines, for a SIEM.
    Export {
        /// Records from within this long (`24h`).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        /// Output format (only `jsonl`).
        #[arg(long, default_value = "jsonl")]
        format: String,
    },
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files: unknown fields (file:line:column), unknown agent or target
    /// names, invalid kinds, rules shadowed by earlier ones. Exits non-zero on errors.
    Check {
        /// A policy file or directory (default: the configuration's, or the shipped ones).
        path: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Classify SQL and show the decision and the rule that made it.
    Explain {
        /// Agent name (from the configuration).
        #[arg(long)]
        agent: String,
        /// Target name (from the configuration).
        #[arg(long)]
        target: String,
        /// The caller's uid (default: the agent's `uid`, else 0).
        #[arg(long)]
        uid: Option<u32>,
        /// The caller's user name.
        #[arg(long)]
        user: Option<String>,
        /// The caller's systemd unit.
        #[arg(long)]
        unit: Option<String>,
        /// The caller's executable.
        #[arg(long)]
        exe: Option<String>,
        /// An OIDC group of the caller's token (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// The `sub` of the caller's token (with --group, --email, --claim: judge as if a
        /// valid token had been presented).
        #[arg(long)]
        sub: Option<String>,
        /// The `email` of the caller's token.
        #[arg(long)]
        email: Option<String>,
        /// An extra claim of the caller's token, `NAME=VALUE` (repeatable).
        #[arg(long = "claim", value_parser = parse_claim)]
        claims: Vec<(String, String)>,
        /// The token's issuer (default: the first `[[oidc]]` issuer).
        #[arg(long)]
        issuer: Option<String>,
        /// Judge as if standard_conforming_strings were off.
        #[arg(long)]
        non_standard_strings: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The SQL (one or more statements).
        sql: String,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

fn parse_claim(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{s}`: write NAME=VALUE"))
}

/// An error and its sources, joined: library errors keep the OS error in `source()`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_msg = s.to_string();
        if !msg.contains(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        cur = s.source();
    }
    msg
}

fn load_config(cli: &Cli) -> Result<Config, String> {
    load_config_with(cli, crate::config::Lookups::Resolve)
}

fn load_config_with(cli: &Cli, lookups: crate::config::Lookups) -> Result<Config, String> {
    let (path, explicit) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    Config::load_or_default_with(&path, explicit, lookups).map_err(|e| e.to_string())
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// The admin socket for client commands. When the configuration does not validate (the
/// daemon keeps running on the last good one), the socket is read from it leniently so the
/// daemon can still be asked, with a warning.
fn admin_socket(cli: &Cli) -> Result<PathBuf, String> {
    // Only the socket's path is needed: no name lookups.
    match load_config_with(cli, crate::config::Lookups::Skip) {
        Ok(cfg) => Ok(cfg.admin.socket),
        Err(e) => {
            let path = cli
                .config
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
            let text = std::fs::read_to_string(&path).map_err(|_| e.clone())?;
            let value: toml::Value = toml::from_str(&text).map_err(|_| e.clone())?;
            let socket = value
                .get("admin")
                .and_then(|a| a.get("socket"))
                .and_then(|s| s.as_str())
                .map_or_else(
                    || PathBuf::from("/run/portcullis/admin.sock"),
                    PathBuf::from,
                );
            eprintln!(
                "warning: the configuration has errors (the daemon keeps its last good one):\n{e}"
            );
            Ok(socket)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    if let Command::Status { json } = &cli.command {
        return status(cli.config.as_ref(), &admin_socket(&cli)?, *json, &cli);
    }
    if let Some(code) = crate::commands::run(&cli, &|| admin_socket(&cli))? {
        return Ok(code);
    }
    // These do not need a valid configuration (doctor reports on it).
    match &cli.command {
        Command::Doctor { json } => {
            let checks = crate::doctor::run(cli.config.as_deref());
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&checks).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", crate::doctor::render(&checks));
            }
            let failed = checks.iter().any(|c| c.level == crate::doctor::Level::Fail);
            return Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            });
        }
        Command::Install { root, now } => {
            let log = crate::install::install(&crate::install::InstallOptions {
                root: root.clone(),
                now: *now,
            })?;
            for l in log {
                println!("{l}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Uninstall { root, purge } => {
            let log = crate::install::uninstall(&crate::install::UninstallOptions {
                root: root.clone(),
                purge: *purge,
            })?;
            for l in log {
                println!("{l}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let cfg = load_config(&cli)?;
    match cli.command {
        Command::Run { log_format } => {
            let format = match log_format {
                Some(LogFormatArg::Json) => LogFormat::Json,
                Some(LogFormatArg::Text) => LogFormat::Text,
                None => cfg.log.format,
            };
            let _log_guard = telemetry::init(
                &cfg.log.level,
                format,
                telemetry::batch::Limits {
                    queue_bytes: cfg.log.queue_bytes,
                    when_full: cfg.log.when_full,
                },
            );
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                config = %cfg.path.as_ref().map_or_else(|| "<embedded default>".into(), |p| p.display().to_string()),
                "starting"
            );
            // The control plane (admin API, approvals, webhooks, reloads); connections are
            // served by the proxy's own workers (`[proxy] workers`).
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .thread_name("portcullis-ctl")
                .build()
                .map_err(|e| format!("cannot start the runtime: {e}"))?;
            rt.block_on(daemon::run(cfg)).map_err(|e| {
                let msg = error_chain(&e);
                tracing::error!(error = %msg, "daemon failed");
                msg
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Exec {
            agent,
            user,
            unprotected,
            command,
        } => {
            let req = exec::ExecRequest {
                agent: agent.as_deref(),
                user: user.as_deref(),
                unprotected,
                command: &command,
            };
            match exec::exec(&cfg, &req) {
                Ok(never) => match never {},
                Err(e) => Err(error_chain(&e)),
            }
        }
        Command::Status { .. }
        | Command::Sessions { .. }
        | Command::Replay { .. }
        | Command::Approvals { .. }
        | Command::Approve { .. }
        | Command::Deny { .. }
        | Command::Audit { .. }
        | Command::Doctor { .. }
        | Command::Install { .. }
        | Command::Uninstall { .. } => unreachable!("handled above"),
        Command::Policy { command } => policy_command(&cfg, command),
        Command::Detach => {
            ebpf::PinLayout::new(&cfg.ebpf.pin_path)
                .remove_all()
                .map_err(|e| error_chain(&e))?;
            println!(
                "detached: removed {}; protected processes now connect directly",
                cfg.ebpf.pin_path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn status(
    _config: Option<&PathBuf>,
    socket: &std::path::Path,
    json: bool,
    cli: &Cli,
) -> Result<ExitCode, String> {
    match client::call::<proto::Status>(socket, &proto::Request::Status) {
        Ok(status) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", render::status(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let mut msg = e.to_string();
            if let Ok(cfg) = load_config_with(cli, crate::config::Lookups::Skip) {
                let (links, maps) = ebpf::pinned_state(&cfg.ebpf.pin_path);
                if !links.is_empty() {
                    msg.push_str(&format!(
                        "\nnote: {} program link(s) are pinned under {}: protected \
                         connections are being refused until the daemon is back",
                        links.len(),
                        cfg.ebpf.pin_path.display()
                    ));
                } else if maps {
                    msg.push_str(
                        "\nnote: maps are pinned but no programs are attached: nothing is protected",
                    );
                }
            }
            Err(msg)
        }
    }
}

fn policy_command(cfg: &Config, command: PolicyCommand) -> Result<ExitCode, String> {
    use crate::policy::{self, model::Subject, sql::LexOptions};
    match command {
        PolicyCommand::Check { path, json } => {
            let sources = match &path {
                Some(p) => policy::load::read_dir(p),
                None => policy::load::sources(cfg),
            }
            .map_err(|d| d.to_string())?;
            let (set, mut report) = policy::load::load(&sources, cfg);
            if let Some(dir) = path.as_ref().or(cfg.policy.dir.as_ref()) {
                policy::load::check_files(dir, &sources, &mut report);
            }
            let rules = set.as_ref().map_or(0, |s| s.rules.len());
            let warnings: Vec<String> = cfg
                .warnings()
                .into_iter()
                .chain(report.warnings.iter().map(ToString::to_string))
                .collect();
            if json {
                let v = serde_json::json!({
                    "files": sources.iter().map(|s| s.path.display().to_string()).collect::<Vec<_>>(),
                    "rules": rules,
                    "errors": report.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "warnings": warnings,
                });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
                );
            } else {
                for e in &report.errors {
                    println!("error: {e}");
                }
                for w in &warnings {
                    println!("warning: {w}");
                }
                println!(
                    "{} file(s), {rules} rule(s): {} error(s), {} warning(s)",
                    sources.len(),
                    report.errors.len(),
                    warnings.len()
                );
            }
            Ok(if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        PolicyCommand::Explain {
            agent,
            target,
            uid,
            user,
            unit,
            exe,
            groups,
            sub,
            email,
            claims,
            issuer,
            non_standard_strings,
            json,
            sql,
        } => {
            let a = cfg
                .agent(&agent)
                .ok_or_else(|| format!("no agent named `{agent}` in the configuration"))?;
            let t = cfg
                .target(&target)
                .ok_or_else(|| format!("no target named `{target}` in the configuration"))?;
            let (set, warnings) = policy::store::load_set(cfg)
                .map_err(|e| format!("the policies do not load:\n{e}"))?;
            for w in warnings {
                eprintln!("warning: {w}");
            }
            let subject = Subject {
                agent: a.name.clone(),
                uid: uid.or(a.selector.uid).unwrap_or(0),
                user: user.or_else(|| a.selector.user.clone()),
                unit: unit.or_else(|| a.selector.unit.clone()),
                exe: exe.or_else(|| a.selector.exe.as_ref().map(|p| p.display().to_string())),
                cgroup: a.selector.cgroup.clone(),
                oidc: (sub.is_some()
                    || email.is_some()
                    || !groups.is_empty()
                    || !claims.is_empty())
                .then(|| {
                    let mut kept = std::collections::BTreeMap::<String, Vec<String>>::new();
                    for (k, v) in claims {
                        kept.entry(k).or_default().push(v);
                    }
                    std::sync::Arc::new(crate::oidc::OidcIdentity {
                        issuer: issuer
                            .or_else(|| cfg.oidc.first().map(|i| i.issuer.clone()))
                            .unwrap_or_default(),
                        sub: sub.unwrap_or_default(),
                        email,
                        groups,
                        claims: kept,
                        expires_at: 0,
                        issued_at: 0,
                    })
                }),
            };
            let lex = LexOptions {
                standard_conforming_strings: !non_standard_strings,
                ..LexOptions::default()
            };
            let j = policy::store::judge(&set, &subject, &t.name, t.protocol.as_str(), &sql, lex);
            if json {
                let v = serde_json::json!({
                    "classification": j.classification,
                    "decision": j.decision,
                });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", render::explain(&j, &set));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
