//! Who may do what through the admin API, from the caller's peer credentials
//! (`SO_PEERCRED`: uid, gid and pid, given by the kernel, not claimed by the caller).
//!
//! | caller | may |
//! |---|---|
//! | root | everything |
//! | member of an approver group (`[policy] approvers`, or the rule's `approvers`) | list approvals; approve or deny requests whose rule names one of their groups |
//! | member of an auditor group (`[admin] auditors`) | list approvals, sessions, replays; verify and export the audit log |
//! | anyone else | nothing |
//!
//! A protected agent never approves or denies, whatever its uid (root included): a caller
//! whose uid an agent selects, or whose process is in an agent's cgroup, is refused. And
//! nobody answers a request their own uid caused ([`crate::approvals`] checks that).

use serde::{Deserialize, Serialize};

/// The caller.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub uid: u32,
    pub pid: Option<i32>,
    /// User name (or the uid as text).
    pub name: String,
    /// Group names the user is a member of (primary and supplementary).
    pub groups: Vec<String>,
    /// The caller is (or runs in the cgroup of) a protected agent.
    pub agent: Option<String>,
}

/// What an operation needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Approvers or auditors.
    SeeApprovals,
    /// Approvers of these groups (checked per request).
    Answer,
    /// Auditors.
    Audit,
    /// Root.
    Root,
}

impl Peer {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    fn in_any(&self, groups: &[String]) -> bool {
        self.groups.iter().any(|g| groups.contains(g))
    }

    /// Whether the caller may run an operation needing `need`. `approvers` are the approver
    /// groups in force (for `SeeApprovals` and `Answer`: the union over rules; for a single
    /// request, that request's), `auditors` the auditor groups.
    pub fn may(&self, need: Need, approvers: &[String], auditors: &[String]) -> Result<(), String> {
        if need == Need::Answer
            && let Some(agent) = &self.agent
        {
            return Err(format!(
                "permission denied: {} is protected agent `{agent}`; an agent never answers \
                 approval requests",
                self.name
            ));
        }
        if self.is_root() {
            return Ok(());
        }
        let ok = match need {
            Need::SeeApprovals => self.in_any(approvers) || self.in_any(auditors),
            Need::Answer => self.in_any(approvers),
            Need::Audit => self.in_any(auditors),
            Need::Root => false,
        };
        if ok {
            return Ok(());
        }
        let what = match need {
            Need::SeeApprovals => format!("a member of {}", list(approvers, auditors)),
            Need::Answer => format!("a member of {}", list(approvers, &[])),
            Need::Audit => format!("a member of {}", list(auditors, &[])),
            Need::Root => "root".into(),
        };
        Err(format!(
            "permission denied: {} (uid {}) is not {what}",
            self.name, self.uid
        ))
    }
}

fn list(a: &[String], b: &[String]) -> String {
    let all: Vec<String> = a.iter().chain(b).map(|g| format!("`{g}`")).collect();
    if all.is_empty() {
        "any permitted group (none is configured)".into()
    } else {
        all.join(" or ")
    }
}

/// The caller's name, groups and agent membership, from the system.
pub fn identify(
    uid: u32,
    gid: u32,
    pid: Option<i32>,
    agent_of: impl Fn(u32, Option<&str>) -> Option<String>,
) -> Peer {
    use nix::unistd::{Gid, Group, Uid, User};
    let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
    let name = user
        .as_ref()
        .map_or_else(|| uid.to_string(), |u| u.name.clone());
    let mut gids: Vec<Gid> = vec![Gid::from_raw(gid)];
    if let Some(u) = &user
        && let Ok(c) = std::ffi::CString::new(u.name.clone())
        && let Ok(list) = nix::unistd::getgrouplist(&c, Gid::from_raw(gid))
    {
        gids.extend(list);
    }
    gids.sort_unstable_by_key(|g| g.as_raw());
    gids.dedup();
    let groups = gids
        .into_iter()
        .filter_map(|g| Group::from_gid(g).ok().flatten().map(|g| g.name))
        .collect();
    let cgroup = pid.and_then(|p| {
        std::fs::read_to_string(format!("/proc/{p}/cgroup"))
            .ok()
            .and_then(|t| crate::cgroup::parse_proc_cgroup(&t))
    });
    Peer {
        uid,
        pid,
        name,
        groups,
        agent: agent_of(uid, cgroup.as_deref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, groups: &[&str], agent: Option<&str>) -> Peer {
        Peer {
            uid,
            pid: None,
            name: format!("u{uid}"),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            agent: agent.map(str::to_owned),
        }
    }

    #[test]
    fn roles() {
        let approvers = vec!["dba".to_owned()];
        let auditors = vec!["audit".to_owned()];
        let may = |p: &Peer, n| p.may(n, &approvers, &auditors);
        let root = peer(0, &[], None);
        assert!(may(&root, Need::Root).is_ok() && may(&root, Need::Answer).is_ok());
        let dba = peer(1000, &["dba"], None);
        assert!(may(&dba, Need::Answer).is_ok());
        assert!(may(&dba, Need::SeeApprovals).is_ok());
        assert!(may(&dba, Need::Audit).is_err());
        let aud = peer(1001, &["audit"], None);
        assert!(may(&aud, Need::Audit).is_ok() && may(&aud, Need::SeeApprovals).is_ok());
        assert!(may(&aud, Need::Answer).is_err());
        let nobody = peer(1002, &["users"], None);
        for n in [Need::SeeApprovals, Need::Answer, Need::Audit, Need::Root] {
            let e = may(&nobody, n).expect_err("refused");
            assert!(e.starts_with("permission denied"), "{e}");
        }
    }

    #[test]
    fn an_agent_never_answers_even_as_root_or_approver() {
        let approvers = vec!["dba".to_owned()];
        for p in [peer(0, &[], Some("bot")), peer(1000, &["dba"], Some("bot"))] {
            let e = p.may(Need::Answer, &approvers, &[]).expect_err("agent");
            assert!(e.contains("protected agent `bot`"), "{e}");
        }
    }
}
