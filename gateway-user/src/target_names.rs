//! Host names in target addresses, followed while the daemon runs.
//!
//! `address = "db.internal:5432"` is resolved when the configuration loads. A name's
//! addresses change (a managed database fails over, a load balancer moves), and an agent
//! that connects to the new address while the kernel still selects only the old one would
//! reach the server without passing the gate. So the daemon looks the names up again every
//! `[ebpf] resolve_interval` and adds what they resolve to now.
//!
//! Dropping an address is the risky direction: an agent may still hold the old answer (a
//! resolver cache, a pool that reconnects), and an address the kernel no longer selects is
//! reached directly. So an address stays until successful lookups have not returned it for
//! `[ebpf] resolve_keep`; a lookup that fails changes nothing, however long it keeps failing.
//!
//! This module is the bookkeeping, pure and clocked by the caller: [`Sightings`] remembers
//! what each name resolved to and when, [`apply`] writes the addresses that are current into
//! a configuration. The daemon does the lookups and swaps the configuration in.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use crate::config::{Config, HostPort, TargetAddr};

/// What each name resolved to, and when.
#[derive(Debug, Default)]
pub struct Sightings {
    names: HashMap<HostPort, Seen>,
}

#[derive(Debug)]
struct Seen {
    /// The last lookup that returned addresses.
    last_ok: Instant,
    /// Each address, with the last successful lookup that returned it.
    addrs: BTreeMap<TargetAddr, Instant>,
    /// Why the lookups fail, while they do.
    failing: Option<String>,
}

/// How one lookup changed what is known of a name (for the daemon's log).
#[derive(Debug, PartialEq, Eq)]
pub enum Observed {
    /// Resolved, as before (or for the first time).
    Ok,
    /// The lookup failed and the one before did not: say so once.
    Failed,
    /// It failed again.
    StillFailing,
    /// Resolved after failing.
    Recovered,
}

impl Sightings {
    /// Records a lookup of `name` at `now`.
    pub fn observe(
        &mut self,
        name: &HostPort,
        result: Result<Vec<TargetAddr>, String>,
        now: Instant,
    ) -> Observed {
        match result {
            Ok(addrs) => {
                let seen = self.names.entry(name.clone()).or_insert_with(|| Seen {
                    last_ok: now,
                    addrs: BTreeMap::new(),
                    failing: None,
                });
                seen.last_ok = now;
                for a in addrs {
                    seen.addrs.insert(a, now);
                }
                if seen.failing.take().is_some() {
                    Observed::Recovered
                } else {
                    Observed::Ok
                }
            }
            Err(why) => match self.names.get_mut(name) {
                Some(seen) => match seen.failing.replace(why) {
                    Some(_) => Observed::StillFailing,
                    None => Observed::Failed,
                },
                // Never resolved: nothing to keep, but remember that it fails.
                None => {
                    self.names.insert(
                        name.clone(),
                        Seen {
                            last_ok: now,
                            addrs: BTreeMap::new(),
                            failing: Some(why),
                        },
                    );
                    Observed::Failed
                }
            },
        }
    }

    /// Records what the names of a freshly loaded configuration resolved to.
    pub fn observe_config(&mut self, cfg: &Config, now: Instant) {
        for h in cfg.targets.iter().flat_map(|t| &t.hosts) {
            let result = match &h.error {
                None => Ok(h.addrs.clone()),
                Some(e) => Err(e.clone()),
            };
            self.observe(&h.name, result, now);
        }
    }

    /// The addresses `name` stands for: those that successful lookups returned within
    /// `keep` of the last one.
    pub fn current(&self, name: &HostPort, keep: Duration) -> Vec<TargetAddr> {
        let Some(seen) = self.names.get(name) else {
            return Vec::new();
        };
        seen.addrs
            .iter()
            .filter(|(_, at)| seen.last_ok.saturating_duration_since(**at) <= keep)
            .map(|(a, _)| *a)
            .collect()
    }

    /// Why the lookups of `name` fail, while they do.
    pub fn failing(&self, name: &HostPort) -> Option<&str> {
        self.names.get(name)?.failing.as_deref()
    }

    /// Forgets names the configuration no longer has, and addresses past `keep`.
    pub fn retain(&mut self, cfg: &Config, keep: Duration) {
        let wanted: HashSet<&HostPort> = cfg
            .targets
            .iter()
            .flat_map(|t| t.hosts.iter().map(|h| &h.name))
            .collect();
        self.names.retain(|name, _| wanted.contains(name));
        for seen in self.names.values_mut() {
            let last_ok = seen.last_ok;
            seen.addrs
                .retain(|_, at| last_ok.saturating_duration_since(*at) <= keep);
        }
    }
}

/// A change [`apply`] made or refused, for the daemon's log.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Added {
        target: String,
        name: HostPort,
        addr: TargetAddr,
    },
    Dropped {
        target: String,
        name: HostPort,
        addr: TargetAddr,
    },
    /// The name now resolves to an address another target already has (as written, or
    /// through a name of its own): the address stays that target's.
    Claimed {
        target: String,
        name: HostPort,
        addr: TargetAddr,
        by: String,
    },
}

/// `cfg` with every name's current addresses, or `None` when they are what it has; and
/// what changed.
pub fn apply(cfg: &Config, seen: &Sightings, keep: Duration) -> (Option<Config>, Vec<Change>) {
    // Who has each pattern: every fixed pattern, then names' addresses in target order, the
    // ones a target already has first (so that a name cannot take an address from another).
    let mut owner: HashMap<TargetAddr, String> = HashMap::new();
    for t in &cfg.targets {
        for a in &t.fixed {
            owner.entry(*a).or_insert_with(|| t.name.clone());
        }
    }
    for t in &cfg.targets {
        for a in t.hosts.iter().flat_map(|h| &h.addrs) {
            owner.entry(*a).or_insert_with(|| t.name.clone());
        }
    }
    let mut changes = Vec::new();
    let mut next = cfg.clone();
    for t in &mut next.targets {
        for h in &mut t.hosts {
            let mut now: Vec<TargetAddr> = Vec::new();
            for a in seen.current(&h.name, keep) {
                match owner.get(&a) {
                    Some(by) if *by != t.name => changes.push(Change::Claimed {
                        target: t.name.clone(),
                        name: h.name.clone(),
                        addr: a,
                        by: by.clone(),
                    }),
                    _ => {
                        owner.insert(a, t.name.clone());
                        now.push(a);
                    }
                }
            }
            // Nothing resolved yet (or ever): keep what the configuration had.
            if now.is_empty() && !h.addrs.is_empty() {
                continue;
            }
            for a in now.iter().filter(|a| !h.addrs.contains(a)) {
                changes.push(Change::Added {
                    target: t.name.clone(),
                    name: h.name.clone(),
                    addr: *a,
                });
            }
            for a in h.addrs.iter().filter(|a| !now.contains(a)) {
                changes.push(Change::Dropped {
                    target: t.name.clone(),
                    name: h.name.clone(),
                    addr: *a,
                });
            }
            if !now.is_empty() {
                h.error = None;
            }
            h.addrs = now;
        }
    }
    let changed = next.targets != cfg.targets;
    (changed.then_some(next), changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP: Duration = Duration::from_secs(3600);

    fn config(addresses: &[&[&str]]) -> Config {
        let mut body = String::new();
        for (i, list) in addresses.iter().enumerate() {
            let list: Vec<String> = list.iter().map(|a| format!("\"{a}\"")).collect();
            body.push_str(&format!(
                "[[target]]\nname = \"t{i}\"\nprotocol = \"tcp\"\naddress = [{}]\n",
                list.join(", ")
            ));
        }
        Config::parse(&crate::config::Source::new("test.toml", body)).expect("config")
    }

    fn name(s: &str) -> HostPort {
        match crate::config::Pattern::parse(s).expect(s) {
            crate::config::Pattern::Host(h) => h,
            other => panic!("{s} is {other:?}"),
        }
    }

    fn addrs(list: &[&str]) -> Vec<TargetAddr> {
        list.iter()
            .flat_map(|a| TargetAddr::parse(a).expect(a))
            .collect()
    }

    /// A configuration with these targets, and what its names resolved to at load.
    fn loaded(addresses: &[&[&str]]) -> (Config, Sightings, Instant) {
        let cfg = config(addresses);
        let t0 = Instant::now();
        let mut seen = Sightings::default();
        seen.observe_config(&cfg, t0);
        (cfg, seen, t0)
    }

    fn shown(cfg: &Config, target: usize) -> Vec<String> {
        cfg.targets[target]
            .addrs()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_new_address_is_added_and_an_old_one_kept_until_keep_runs_out() {
        let (cfg, mut seen, t0) = loaded(&[&["localhost:5432"]]);
        let local = name("localhost:5432");
        let at_load = shown(&cfg, 0);
        assert!(
            at_load.contains(&"127.0.0.1:5432".to_owned()),
            "{at_load:?}"
        );

        // The name moves to 127.0.0.9: added at once, the old addresses stay.
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(
            seen.observe(&local, Ok(addrs(&["127.0.0.9:5432"])), t1),
            Observed::Ok
        );
        let (next, changes) = apply(&cfg, &seen, KEEP);
        let next = next.expect("changed");
        assert!(shown(&next, 0).contains(&"127.0.0.9:5432".to_owned()));
        assert!(shown(&next, 0).contains(&"127.0.0.1:5432".to_owned()));
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(
            matches!(&changes[0], Change::Added { addr, .. } if addr.to_string() == "127.0.0.9:5432")
        );

        // Nothing new: no change.
        assert!(apply(&next, &seen, KEEP).0.is_none());

        // An hour of successful lookups without the old ones: they go.
        let t2 = t1 + KEEP + Duration::from_secs(1);
        seen.observe(&local, Ok(addrs(&["127.0.0.9:5432"])), t2);
        let (last, changes) = apply(&next, &seen, KEEP);
        assert_eq!(shown(&last.expect("changed"), 0), ["127.0.0.9:5432"]);
        assert!(changes.iter().all(|c| matches!(c, Change::Dropped { .. })));
        assert!(!changes.is_empty());
    }

    #[test]
    fn failing_lookups_drop_nothing_however_long_they_fail() {
        let (cfg, mut seen, t0) = loaded(&[&["localhost:5432"]]);
        let local = name("localhost:5432");
        let later = t0 + KEEP * 3;
        assert_eq!(
            seen.observe(&local, Err("timed out".into()), later),
            Observed::Failed
        );
        assert_eq!(
            seen.observe(&local, Err("timed out".into()), later),
            Observed::StillFailing
        );
        assert!(apply(&cfg, &seen, KEEP).0.is_none());
        seen.retain(&cfg, KEEP);
        assert_eq!(
            seen.current(&local, KEEP).len(),
            cfg.targets[0].hosts[0].addrs.len()
        );
        assert_eq!(
            seen.observe(&local, Ok(addrs(&["127.0.0.1:5432"])), later),
            Observed::Recovered
        );
    }

    #[test]
    fn a_name_that_did_not_resolve_at_load_gets_its_addresses_later() {
        // As if `localhost` had not resolved at load (tests resolve nothing but
        // /etc/hosts names: an unknown one would be asked of the DNS server).
        let mut cfg = config(&[&["127.0.0.1:1", "localhost:5432"]]);
        cfg.targets[0].hosts[0].addrs.clear();
        cfg.targets[0].hosts[0].error = Some("no such host".into());
        let h = &cfg.targets[0].hosts[0];
        let t0 = Instant::now();
        let mut seen = Sightings::default();
        seen.observe_config(&cfg, t0);
        assert!(apply(&cfg, &seen, KEEP).0.is_none());
        seen.observe(
            &h.name,
            Ok(addrs(&["127.0.0.7:5432"])),
            t0 + Duration::from_secs(1),
        );
        let next = apply(&cfg, &seen, KEEP).0.expect("changed");
        assert_eq!(shown(&next, 0), ["127.0.0.1:1", "127.0.0.7:5432"]);
        assert_eq!(next.targets[0].hosts[0].error, None);
        assert_eq!(
            next.target_for("127.0.0.7:5432".parse().expect("addr"))
                .map(|t| t.name.as_str()),
            Some("t0")
        );
    }

    #[test]
    fn an_address_another_target_has_stays_that_targets() {
        let (cfg, mut seen, t0) = loaded(&[&["127.0.0.5:5432"], &["localhost:5432"]]);
        seen.observe(
            &name("localhost:5432"),
            Ok(addrs(&["127.0.0.5:5432"])),
            t0 + Duration::from_secs(1),
        );
        let (next, changes) = apply(&cfg, &seen, KEEP);
        assert!(next.is_none(), "nothing the kernel selects changes");
        assert!(matches!(
            &changes[..],
            [Change::Claimed { by, .. }] if by == "t0"
        ));
        let dst = "127.0.0.5:5432".parse().expect("addr");
        assert_eq!(cfg.target_for(dst).map(|t| t.name.as_str()), Some("t0"));
    }

    #[test]
    fn names_leave_with_the_configuration() {
        let cfg = config(&[&["localhost:5432"]]);
        let mut seen = Sightings::default();
        seen.observe_config(&cfg, Instant::now());
        seen.retain(&config(&[&["127.0.0.1:1"]]), KEEP);
        assert!(seen.current(&name("localhost:5432"), KEEP).is_empty());
    }
}
