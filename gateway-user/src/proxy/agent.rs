//! Which configured agent a redirected connection belongs to.
//!
//! The kernel redirects a superset (any process its cgroup or uid selectors pick); here the
//! full selector is checked, agents in configuration order, first match wins. A redirected
//! connection that matches no agent is refused by the proxy (fail closed): e.g. an agent
//! `{ uid = 1000, exe = "/usr/bin/python3" }` has its uid selected in the kernel, and a
//! different executable run by that uid must not get a free pass.

use gateway_common::{Origin, SELECTED_BY_CGROUP};

use super::identity::{Identity, ProcessState};
use crate::{
    cgroup::is_within,
    config::{Agent, Config},
};

/// The first agent whose every condition holds for this connection.
pub fn identify<'a>(cfg: &'a Config, who: &Identity, origin: &Origin) -> Option<&'a Agent> {
    cfg.agents.iter().find(|a| matches(a, who, origin))
}

fn matches(agent: &Agent, who: &Identity, origin: &Origin) -> bool {
    let s = &agent.selector;
    // When the cgroup path is unknown (cgroup removed since), the kernel's word that this
    // agent's cgroup selected the process stands.
    let kernel_said_cgroup =
        origin.selected_by == SELECTED_BY_CGROUP && origin.agent_id == agent.id;
    if let Some(cg) = &s.cgroup {
        let ok = match &who.cgroup {
            Some(path) => is_within(path, cg),
            None => kernel_said_cgroup,
        };
        if !ok {
            return false;
        }
    }
    if let Some(unit) = &s.unit {
        let ok = match &who.cgroup {
            Some(path) => path.split('/').any(|c| c == unit),
            None => kernel_said_cgroup,
        };
        if !ok {
            return false;
        }
    }
    if s.uid.is_some_and(|uid| uid != who.uid) {
        return false;
    }
    if let Some(exe) = &s.exe {
        // An executable can only be vouched for while the process is verifiably the one
        // that connected.
        if who.process != ProcessState::Verified || who.exe.as_deref() != Some(exe.as_path()) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cgroup::CgroupInfo,
        config::{Config, Source},
    };

    fn cfg() -> Config {
        Config::parse(&Source::new(
            "t.toml",
            r#"
[[agent]]
name = "py"
match = { uid = 1000, exe = "/usr/bin/python3" }
[[agent]]
name = "local"
match = { cgroup = "/portcullis/local" }
[[agent]]
name = "svc"
match = { unit = "bot.service" }
[[agent]]
name = "svc-root"
match = { unit = "bot.service", uid = 0 }
"#,
        ))
        .expect("valid")
    }

    fn who(uid: u32, cgroup: Option<&str>, exe: &str) -> Identity {
        Identity {
            pid: 1,
            tid: 1,
            uid,
            gid: uid,
            user: None,
            comm: "x".into(),
            exe: Some(exe.into()),
            cmdline: vec![],
            cgroup_id: 9,
            cgroup: cgroup.map(str::to_owned),
            cgroup_info: CgroupInfo::default(),
            netns_cookie: 1,
            process: ProcessState::Verified,
        }
    }

    fn name(c: &Config, w: &Identity, o: &Origin) -> Option<String> {
        identify(c, w, o).map(|a| a.name.clone())
    }

    #[test]
    fn first_full_match_wins() {
        let c = cfg();
        let o = Origin::default();
        let n = |w: &Identity| name(&c, w, &o);
        assert_eq!(
            n(&who(1000, Some("/u"), "/usr/bin/python3")).as_deref(),
            Some("py")
        );
        assert_eq!(
            n(&who(1000, Some("/u"), "/tmp/python3")),
            None,
            "exe narrows"
        );
        assert_eq!(
            n(&who(1000, Some("/portcullis/local/x"), "/tmp/python3")).as_deref(),
            Some("local"),
            "descendant cgroup"
        );
        assert_eq!(n(&who(5, Some("/portcullis/localx"), "/bin/sh")), None);
        assert_eq!(
            n(&who(5, Some("/system.slice/bot.service"), "/bin/sh")).as_deref(),
            Some("svc")
        );
        assert_eq!(
            n(&who(0, Some("/system.slice/bot.service/sub"), "/bin/sh")).as_deref(),
            Some("svc")
        );
    }

    #[test]
    fn exe_needs_a_verified_process() {
        let c = cfg();
        let mut w = who(1000, None, "/usr/bin/python3");
        w.process = ProcessState::PidReused;
        assert_eq!(name(&c, &w, &Origin::default()), None);
    }

    #[test]
    fn kernel_cgroup_selection_stands_when_the_path_is_gone() {
        let c = cfg();
        let w = who(5, None, "/bin/sh");
        let o = Origin {
            agent_id: 1,
            selected_by: SELECTED_BY_CGROUP,
            ..Default::default()
        };
        assert_eq!(name(&c, &w, &o).as_deref(), Some("local"));
        assert_eq!(name(&c, &w, &Origin::default()), None);
    }
}
