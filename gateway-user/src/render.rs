//! Human-readable output of the CLI.

use std::fmt::Write as _;

use crate::admin::proto::Status;

fn duration(secs: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

pub fn status(s: &Status) -> String {
    let mut o = String::new();
    let k = &s.kernel;
    let _ = writeln!(
        o,
        "portcullis {}  pid {}  up {}  config {}",
        s.version,
        s.pid,
        duration(s.uptime_secs),
        s.config
    );
    let _ = writeln!(
        o,
        "\nprograms   attached to cgroup {} ({}), fail-{}, pinned under {}",
        k.attach_cgroup,
        k.attach_path.display(),
        match k.fail_mode {
            crate::config::FailMode::Closed => "closed",
            crate::config::FailMode::Open => "open",
        },
        k.pin_path.display()
    );
    for p in &k.programs {
        let link = p.link_pin.as_ref().map_or_else(
            || "held by the daemon".to_owned(),
            |l| l.display().to_string(),
        );
        let _ = writeln!(o, "  {:<12} id {:<6} link {}", p.name, p.id, link);
    }
    let _ = writeln!(
        o,
        "maps       {} pinned; {} target prefixes, {} agent cgroups, {} agent uids, {} connections in flight",
        k.pinned_maps.len(),
        k.target_prefixes,
        k.cgroup_selectors,
        k.uid_selectors,
        k.in_flight
    );
    let counters: Vec<String> = k.counters.iter().map(|(n, v)| format!("{n} {v}")).collect();
    let _ = writeln!(o, "kernel     {}", counters.join("  "));
    let p = &s.proxy;
    let listeners: Vec<String> = p.listeners.iter().map(ToString::to_string).collect();
    let _ = writeln!(o, "\nlisteners  {}", listeners.join("  "));
    let _ = writeln!(
        o,
        "proxy      accepted {}  active {}  refused: no origin {}, no target {}, no agent {}  upstream failures {}",
        p.accepted,
        p.active,
        p.refused_no_origin,
        p.refused_no_target,
        p.refused_no_agent,
        p.upstream_failures
    );
    let _ = writeln!(o, "\nagents");
    for a in &s.agents {
        let mut sel: Vec<String> = a
            .binding
            .cgroups
            .iter()
            .map(|(p, id)| format!("{p} (id {id})"))
            .collect();
        sel.extend(a.binding.uids.iter().map(|u| format!("uid {u}")));
        let where_ = if sel.is_empty() {
            "nothing selected".to_owned()
        } else {
            sel.join(", ")
        };
        let _ = writeln!(o, "  {:<16} {:<32} {}", a.name, a.selector, where_);
        if let Some(n) = &a.binding.note {
            let _ = writeln!(o, "  {:<16} note: {n}", "");
        }
    }
    let _ = writeln!(o, "\ntargets");
    for t in &s.targets {
        let _ = writeln!(
            o,
            "  {:<16} {:<8} {}",
            t.name,
            t.protocol,
            t.addresses.join(", ")
        );
    }
    o
}
