//! Portcullis: a host agent that puts a policy gate between autonomous agents and the
//! infrastructure they reach. See `docs/ARCHITECTURE.md` for the map of this crate.

pub mod admin;
pub mod approvals;
pub mod cgroup;
pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod digest;
pub mod doctor;
pub mod ebpf;
pub mod exec;
pub mod http_client;
pub mod install;
pub mod instance;
pub mod masking;
pub mod metrics;
pub mod oidc;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod render;
pub mod replay;
pub mod sdnotify;
pub mod secret;
pub mod store;
pub mod target_names;
pub mod tcp_listeners;
pub mod telemetry;
pub mod unix_sockets;
pub mod utc;
