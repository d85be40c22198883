//! `portcullis exec [--agent NAME] [--user USER] -- CMD...`: run a command as a protected
//! agent by placing this process in the agent's cgroup, optionally dropping to a user, then
//! exec'ing the command (no fork: the command keeps our pid).
//!
//! Before running anything it checks, in the pinned maps, that the kernel really protects
//! that cgroup: a command that believes it is protected but is not would be worse than none.

use std::{convert::Infallible, ffi::OsString, os::unix::process::CommandExt as _};

use aya::maps::{HashMap as BpfHashMap, MapData};
use gateway_common::{AgentRef, map_names};

use crate::{
    cgroup::{CgroupError, Hierarchy},
    config::Config,
    ebpf::PinLayout,
};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("no agent named `{0}` in the configuration")]
    UnknownAgent(String),
    #[error(
        "agent `{0}` is not selected by `cgroup`, so there is no cgroup to run the command in; \
         give it `match = {{ cgroup = \"/portcullis/{0}\" }}`"
    )]
    NoCgroup(String),
    #[error("no agent with a `cgroup` selector in the configuration; add one or use --agent")]
    NoDefaultAgent,
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(
        "cgroup {cgroup} (id {id}) is not protected: {why}\nhint: start the daemon \
         (`portcullis run`) with this configuration, or pass --unprotected to run anyway"
    )]
    NotProtected {
        cgroup: String,
        id: u64,
        why: String,
    },
    #[error("no such user `{0}`")]
    UnknownUser(String),
    #[error("cannot switch to user `{user}`: {source}")]
    SetUser { user: String, source: nix::Error },
    #[error("cannot run `{cmd}`: {source}")]
    Exec { cmd: String, source: std::io::Error },
    #[error("no command given: portcullis exec -- CMD [ARGS...]")]
    NoCommand,
}

pub struct ExecRequest<'a> {
    pub agent: Option<&'a str>,
    pub user: Option<&'a str>,
    pub unprotected: bool,
    pub command: &'a [OsString],
}

pub fn exec(cfg: &Config, req: &ExecRequest<'_>) -> Result<Infallible, ExecError> {
    let (program, args) = req.command.split_first().ok_or(ExecError::NoCommand)?;
    let agent = match req.agent {
        Some(name) => cfg
            .agent(name)
            .ok_or_else(|| ExecError::UnknownAgent(name.to_owned()))?,
        None => cfg
            .agents
            .iter()
            .find(|a| a.selector.cgroup.is_some())
            .ok_or(ExecError::NoDefaultAgent)?,
    };
    let cgroup = agent
        .selector
        .cgroup
        .as_deref()
        .ok_or_else(|| ExecError::NoCgroup(agent.name.clone()))?;
    let h = Hierarchy::discover()?;
    let id = h.ensure(cgroup)?;
    if !req.unprotected {
        check_protected(cfg, id).map_err(|why| ExecError::NotProtected {
            cgroup: cgroup.to_owned(),
            id,
            why,
        })?;
    }
    h.join(cgroup, 0)?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    if let Some(name) = req.user {
        let user = nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .ok_or_else(|| ExecError::UnknownUser(name.to_owned()))?;
        let cname =
            std::ffi::CString::new(name).map_err(|_| ExecError::UnknownUser(name.into()))?;
        nix::unistd::initgroups(&cname, user.gid).map_err(|source| ExecError::SetUser {
            user: name.to_owned(),
            source,
        })?;
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        cmd.env("USER", name)
            .env("LOGNAME", name)
            .env("HOME", &user.dir);
    }
    let source = cmd.exec();
    Err(ExecError::Exec {
        cmd: program.to_string_lossy().into_owned(),
        source,
    })
}

/// Whether the pinned agent map holds `id` and programs are attached.
fn check_protected(cfg: &Config, id: u64) -> Result<(), String> {
    let layout = PinLayout::new(&cfg.ebpf.pin_path);
    if layout.pinned_links().is_empty() && cfg.ebpf.fail_mode == crate::config::FailMode::Closed {
        return Err(format!(
            "no programs are pinned under {}",
            layout.links().display()
        ));
    }
    let path = layout.map(map_names::AGENT_CGROUPS);
    let map =
        MapData::from_pin(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let map = aya::maps::Map::HashMap(map);
    let agents: BpfHashMap<_, u64, AgentRef> =
        BpfHashMap::try_from(map).map_err(|e| format!("{}: {e}", path.display()))?;
    match agents.get(&id, 0) {
        Ok(_) => Ok(()),
        Err(_) => Err("the daemon has not registered it (yet)".into()),
    }
}
