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
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
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
    let (path, explicit) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    Config::load_or_default(&path, explicit).map_err(|e| e.to_string())
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

fn run(cli: Cli) -> Result<ExitCode, String> {
    let cfg = load_config(&cli)?;
    match cli.command {
        Command::Run { log_format } => {
            let format = match log_format {
                Some(LogFormatArg::Json) => LogFormat::Json,
                Some(LogFormatArg::Text) => LogFormat::Text,
                None => cfg.log.format,
            };
            let _log_guard = telemetry::init(&cfg.log.level, format);
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                config = %cfg.path.as_ref().map_or_else(|| "<embedded default>".into(), |p| p.display().to_string()),
                "starting"
            );
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("portcullis")
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
        Command::Status { json } => {
            match client::call::<proto::Status>(&cfg.admin.socket, &proto::Request::Status) {
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
                    let (links, maps) = ebpf::pinned_state(&cfg.ebpf.pin_path);
                    let mut msg = e.to_string();
                    if !links.is_empty() {
                        msg.push_str(&format!(
                            "\nnote: {} program link(s) are pinned under {}: protected \
                             connections are being refused until the daemon is back",
                            links.len(),
                            cfg.ebpf.pin_path.display()
                        ));
                    } else if maps {
                        msg.push_str("\nnote: maps are pinned but no programs are attached: nothing is protected");
                    }
                    Err(msg)
                }
            }
        }
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
