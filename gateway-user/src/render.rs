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
        "maps       {} pinned; {} target prefixes, {} agent cgroups, {} agent uids, {} connections in flight, {} processes known",
        k.pinned_maps.len(),
        k.target_prefixes,
        k.cgroup_selectors,
        k.uid_selectors,
        k.in_flight,
        k.processes
    );
    let _ = match &k.unix_guard {
        crate::ebpf::UnixGuard::Active => writeln!(
            o,
            "unix       connects by {} target socket name(s) refused (a link under another name is not)",
            k.unix_names
        ),
        crate::ebpf::UnixGuard::Unavailable(why) => {
            writeln!(
                o,
                "unix       connects to targets' sockets not refused: {why}"
            )
        }
    };
    let counters: Vec<String> = k.counters.iter().map(|(n, v)| format!("{n} {v}")).collect();
    let _ = writeln!(o, "kernel     {}", counters.join("  "));
    let pol = &s.policy;
    let _ = writeln!(
        o,
        "\npolicies   {} rules from {} ({} files), generation {}, reloads ok {} failed {}, default {}, on parse error {}, {} cached decisions, {} by shape",
        pol.rules,
        pol.source,
        pol.files.len(),
        pol.generation,
        pol.reloads_ok,
        pol.reloads_failed,
        pol.default,
        pol.on_parse_error,
        pol.cached_decisions,
        pol.cached_shape_decisions
    );
    let p = &s.proxy;
    let listeners: Vec<String> = p.listeners.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        o,
        "\nlisteners  {}  ({} connection workers)",
        listeners.join("  "),
        p.workers
    );
    let _ = writeln!(
        o,
        "proxy      accepted {}  active {}  refused: no origin {}, no target {}, no agent {}, store {}  upstream failures {}",
        p.accepted,
        p.active,
        p.refused_no_origin,
        p.refused_no_target,
        p.refused_no_agent,
        p.refused_store,
        p.upstream_failures
    );
    let st = &s.store;
    let _ = writeln!(
        o,
        "store      {} ({})  head {}  written {} in {} groups  saved {}  in spool {}  queued {}  failed {}  queue full {}  statements refused {}",
        st.path,
        st.durability,
        st.head_seq,
        st.counters.written,
        st.counters.groups,
        st.counters.saved,
        st.counters.unsaved,
        st.counters.queued,
        st.counters.failed,
        st.counters.queue_full,
        st.counters.refused_statements
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
        if let Some(e) = &a.binding.escape {
            let _ = writeln!(o, "  {:<16} warning: {e}", "");
        }
    }
    let _ = writeln!(o, "\ntargets");
    for t in &s.targets {
        let _ = writeln!(
            o,
            "  {:<16} {:<8} {}{}",
            t.name,
            t.protocol,
            t.addresses.join(", "),
            t.token
                .as_ref()
                .map(|m| format!(" · OIDC token {m}"))
                .unwrap_or_default()
        );
        for h in &t.hosts {
            let now = if h.addresses.is_empty() {
                "nothing yet".to_owned()
            } else {
                h.addresses.join(", ")
            };
            let failing = h
                .error
                .as_ref()
                .map(|e| format!(" · lookups fail: {e}"))
                .unwrap_or_default();
            let _ = writeln!(o, "  {:<16} {} → {now}{failing}", "", h.name);
        }
    }
    if !s.uncovered.is_empty() {
        let _ = writeln!(o, "\naround the gate");
        for u in &s.uncovered {
            let _ = writeln!(o, "  {u}");
        }
    }
    if !s.oidc.is_empty() {
        let _ = writeln!(o, "\noidc issuers");
        for i in &s.oidc {
            let keys = if i.key_ids.is_empty() {
                "no keys yet".to_owned()
            } else {
                format!("keys {}", i.key_ids.join(", "))
            };
            let _ = writeln!(
                o,
                "  {} (audience {}) · {keys} · {} fetch(es){}",
                i.issuer,
                i.audience,
                i.fetches,
                i.last_error
                    .as_ref()
                    .map(|e| format!(" · last fetch failed: {e}"))
                    .unwrap_or_default()
            );
        }
    }
    o
}

fn list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let v: Vec<String> = items.into_iter().map(|x| x.to_string()).collect();
    if v.is_empty() {
        "-".to_owned()
    } else {
        v.join(", ")
    }
}

/// `portcullis policy explain`.
pub fn explain(j: &crate::policy::Judgement, set: &crate::policy::PolicySet) -> String {
    let mut o = String::new();
    let c = &j.classification;
    for (i, s) in c.statements.iter().enumerate() {
        let _ = writeln!(o, "statement {}: {}", i + 1, s.kind);
        let _ = writeln!(o, "  kinds            {}", list(&s.kinds));
        let _ = writeln!(o, "  tables read      {}", list(&s.tables_read));
        let _ = writeln!(o, "  tables written   {}", list(&s.tables_written));
        let _ = writeln!(o, "  functions        {}", list(&s.functions));
        if !s.dangerous.is_empty() {
            let _ = writeln!(
                o,
                "  dangerous        {}",
                list(
                    s.dangerous
                        .iter()
                        .map(|(f, d)| format!("{f} ({})", d.as_str()))
                )
            );
        }
        if matches!(
            s.kind,
            crate::policy::sql::Kind::Update
                | crate::policy::sql::Kind::Delete
                | crate::policy::sql::Kind::Merge
        ) || s.missing_where
        {
            let _ = writeln!(
                o,
                "  missing WHERE    {}",
                if s.missing_where { "yes" } else { "no" }
            );
        }
        if s.dynamic_sql {
            let _ = writeln!(o, "  dynamic SQL      yes");
        }
    }
    if c.statements.is_empty() && c.error.is_none() {
        let _ = writeln!(o, "no statements");
    }
    if let Some(e) = &c.error {
        let _ = writeln!(o, "not classified: {e}");
    }
    let d = &j.decision;
    let source = set
        .rules
        .iter()
        .find(|r| r.id == d.rule)
        .map(|r| format!(" ({})", r.source))
        .unwrap_or_default();
    let _ = writeln!(o, "\ndecision: {} by rule {}{source}", d.verdict, d.rule);
    if let Some(m) = &d.message {
        let _ = writeln!(o, "  message          {m}");
    }
    if !d.approvers.is_empty() {
        let _ = writeln!(
            o,
            "  approvers        {} (timeout {})",
            d.approvers.join(", "),
            d.approval_timeout_secs.map_or_else(String::new, duration)
        );
    }
    for m in &d.masks {
        let what: Vec<String> = m.columns.iter().chain(&m.detectors).cloned().collect();
        let _ = writeln!(
            o,
            "  mask             {} ({}): {:?}",
            m.rule,
            what.join(", "),
            m.strategy
        );
    }
    if !d.audit.is_empty() {
        let _ = writeln!(o, "  audit            {}", d.audit.join(", "));
    }
    let _ = writeln!(o, "  matched rules    {}", list(&d.matched));
    o
}
