//! What the kernel selects: target prefixes, agent cgroups and agent uids, computed from the
//! configuration and the live cgroup tree.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use ipnet::{IpNet, Ipv4Net};

use aya::maps::lpm_trie::Key;
use gateway_common::{
    AgentRef, SELECTED_BY_CGROUP, SELECTED_BY_UID, TargetKey, TargetValue, UnixName,
};
use serde::{Deserialize, Serialize};

use crate::{
    cgroup::Hierarchy,
    config::{Config, TargetAddr},
};

/// How deep below the cgroup root a unit's cgroup is looked for
/// (`/user.slice/user-1000.slice/user@1000.service/app.slice/x.service` is 5).
pub const UNIT_SEARCH_DEPTH: usize = 8;

/// The contents of the selection maps.
#[derive(Clone, Default)]
pub struct Selection {
    pub targets: Vec<(Key<TargetKey>, TargetValue)>,
    pub cgroups: HashMap<u64, AgentRef>,
    pub uids: HashMap<u32, AgentRef>,
    /// Unix socket names that lead to a target ([`crate::unix_sockets::guarded_names`]).
    pub unix_names: HashMap<UnixName, u32>,
}

/// Where an agent was found, for status and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentBinding {
    pub agent: String,
    /// cgroups selected in the kernel: (path, id).
    pub cgroups: Vec<(String, u64)>,
    pub uids: Vec<u32>,
    /// Why the agent selects nothing right now (e.g. its unit is not running).
    pub note: Option<String>,
    /// How its processes can leave its cgroup ([`crate::cgroup::escape_route`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escape: Option<String>,
}

impl Selection {
    /// Builds the selection. Creates the cgroups of `cgroup` selectors when absent (so that
    /// `portcullis exec` and units can be placed in them); looks up the current cgroups of
    /// `unit` selectors.
    pub fn build(cfg: &Config, h: &Hierarchy) -> (Self, Vec<AgentBinding>) {
        let mut sel = Self {
            targets: target_entries(cfg),
            unix_names: crate::unix_sockets::guarded_names(cfg, &crate::unix_sockets::is_local)
                .into_iter()
                .filter_map(|(name, id)| Some((UnixName::new(name.as_bytes())?, id)))
                .collect(),
            ..Self::default()
        };
        let mut bindings = Vec::new();
        for agent in &cfg.agents {
            let s = &agent.selector;
            let mut b = AgentBinding {
                agent: agent.name.clone(),
                ..Default::default()
            };
            let by_cgroup = AgentRef {
                agent_id: agent.id,
                selected_by: SELECTED_BY_CGROUP,
            };
            if let Some(path) = &s.cgroup {
                match h.ensure(path) {
                    Ok(id) => b.cgroups.push((path.clone(), id)),
                    Err(e) => b.note = Some(e.to_string()),
                }
            }
            if let Some(unit) = &s.unit {
                let found = h.find_named(unit, UNIT_SEARCH_DEPTH);
                if found.is_empty() {
                    b.note = Some(format!("unit {unit} has no cgroup (not running?)"));
                }
                b.cgroups.extend(found);
            }
            if s.kernel_by_cgroup() {
                b.escape = escape_of(h, b.cgroups.iter().map(|(path, _)| path.as_str()));
                for (_, id) in &b.cgroups {
                    sel.cgroups.entry(*id).or_insert(by_cgroup);
                }
            } else if let Some(uid) = s.uid {
                b.uids.push(uid);
                sel.uids.entry(uid).or_insert(AgentRef {
                    agent_id: agent.id,
                    selected_by: SELECTED_BY_UID,
                });
            }
            bindings.push(b);
        }
        (sel, bindings)
    }
}

/// Trie entries that refuse protected processes' connects to the daemon's own endpoints
/// ([`gateway_common::TARGET_DAEMON`]): each address, and for one bound to every address
/// (`0.0.0.0`, `::`) the loopback ranges of its family, where local clients reach it.
pub fn daemon_entries(endpoints: &[SocketAddr]) -> Vec<(Key<TargetKey>, TargetValue)> {
    let value = TargetValue {
        target_id: gateway_common::TARGET_DAEMON,
        _pad: 0,
    };
    let loopback4 = |port| TargetAddr {
        net: Some(IpNet::V4(Ipv4Net::new_assert(
            Ipv4Addr::new(127, 0, 0, 0),
            8,
        ))),
        port,
    };
    endpoints
        .iter()
        .flat_map(|e| match e.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => vec![loopback4(e.port())],
            IpAddr::V6(v6) if v6.is_unspecified() => vec![
                loopback4(e.port()),
                TargetAddr::host(IpAddr::V6(Ipv6Addr::LOCALHOST), e.port()),
            ],
            ip => vec![TargetAddr::host(ip, e.port())],
        })
        .map(|a| (Key::new(a.trie_prefix(), a.trie_key()), value))
        .collect()
}

/// The way out of the first of an agent's cgroups that has one, as [`escape_note`] says it.
pub fn escape_of<'a>(h: &Hierarchy, cgroups: impl IntoIterator<Item = &'a str>) -> Option<String> {
    cgroups
        .into_iter()
        .find_map(|path| Some(escape_note(path, &h.escape_route(path)?)))
}

/// What `status`, the log and `doctor` say about an [`Escape`](crate::cgroup::Escape).
fn escape_note(path: &str, e: &crate::cgroup::Escape) -> String {
    let fix = match e.writer {
        crate::cgroup::Writer::Uid(uid) => format!("add an agent that selects `uid = {uid}`"),
        _ => "make those cgroups root's, or select the agent's processes by uid".to_owned(),
    };
    format!(
        "{} may write {}/cgroup.procs, so they can move themselves out of {path} (a delegated \
         cgroup tree, such as a systemd user manager's, which also starts units for its user \
         anywhere in it) and connect unselected: {fix}",
        e.writer,
        e.ancestor.trim_end_matches('/')
    )
}

/// Trie entries for every target address.
pub fn target_entries(cfg: &Config) -> Vec<(Key<TargetKey>, TargetValue)> {
    cfg.targets
        .iter()
        .flat_map(|t| {
            t.addrs().map(|a| {
                (
                    Key::new(a.trie_prefix(), a.trie_key()),
                    TargetValue {
                        target_id: t.id,
                        _pad: 0,
                    },
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Source;

    #[test]
    fn selection_follows_the_configuration() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("system.slice/bot.service")).expect("mkdir");
        let h = Hierarchy {
            mount: root.path().to_owned(),
        };
        let cfg = Config::parse(&Source::new(
            "t.toml",
            r#"
[[agent]]
name = "local"
match = { cgroup = "/portcullis/local" }
[[agent]]
name = "bot"
match = { unit = "bot.service", uid = 0 }
[[agent]]
name = "ghost"
match = { unit = "ghost.service" }
[[agent]]
name = "root"
match = { uid = 0 }
[[target]]
name = "pg"
protocol = "tcp"
address = ["127.0.0.1:5432", "*:6432"]
"#,
        ))
        .expect("valid");
        let (sel, bindings) = Selection::build(&cfg, &h);
        assert!(
            root.path().join("portcullis/local").is_dir(),
            "cgroup created"
        );
        assert_eq!(sel.cgroups.len(), 2);
        assert_eq!(bindings[0].cgroups[0].0, "/portcullis/local");
        assert_eq!(bindings[1].cgroups[0].0, "/system.slice/bot.service");
        assert!(
            bindings[1].uids.is_empty(),
            "cgroup selection wins in the kernel"
        );
        assert!(
            bindings[2]
                .note
                .as_deref()
                .is_some_and(|n| n.contains("not running"))
        );
        assert_eq!(sel.uids.get(&0).map(|a| a.agent_id), Some(3));
        assert_eq!(sel.targets.len(), 2);
        assert_eq!(sel.targets[1].0.prefix_len(), 16);
    }

    #[test]
    fn the_daemons_endpoints_refuse_at_their_address_or_at_loopback_when_bound_to_all() {
        let shown = |e: &[&str]| -> Vec<(u32, u32)> {
            let addrs: Vec<SocketAddr> = e.iter().map(|a| a.parse().expect(a)).collect();
            daemon_entries(&addrs)
                .iter()
                .map(|(k, v)| {
                    assert_eq!(v.target_id, gateway_common::TARGET_DAEMON);
                    (k.prefix_len(), u32::from(u16::from_be_bytes(k.data().port)))
                })
                .collect()
        };
        assert_eq!(shown(&["127.0.0.1:9477"]), [(144, 9477)]);
        assert_eq!(shown(&["[::1]:9477"]), [(144, 9477)]);
        assert_eq!(shown(&["0.0.0.0:9477"]), [(120, 9477)]);
        assert_eq!(shown(&["[::]:9477"]), [(120, 9477), (144, 9477)]);
        assert!(shown(&[]).is_empty());
    }
}
