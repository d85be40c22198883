use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(&Source::new("test.toml", text))
}

fn errors(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.diagnostics().iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn embedded_default_is_valid() {
    let c = Config::embedded().expect("embedded default parses");
    assert_eq!(c.agents.len(), 1);
    assert_eq!(c.agents[0].name, "local");
    assert_eq!(
        c.agents[0].selector.cgroup.as_deref(),
        Some("/portcullis/local")
    );
    assert_eq!(
        c.targets[0]
            .addrs()
            .next()
            .map(ToString::to_string)
            .unwrap_or_default(),
        "*:5432"
    );
    assert_eq!(
        c.proxy.listen_v4,
        Some("127.0.0.1:15001".parse().expect("addr"))
    );
    assert_eq!(
        c.proxy.listen_v6,
        Some("[::1]:15001".parse().expect("addr"))
    );
    assert_eq!(c.ebpf.fail_mode, FailMode::Closed);
}

#[test]
fn empty_file_gets_defaults() {
    let c = parse("").expect("empty is valid");
    assert!(c.agents.is_empty() && c.targets.is_empty());
    assert_eq!(c.proxy.upstream_mark, file::DEFAULT_MARK);
    assert_eq!(c.ebpf.pin_path, PathBuf::from("/sys/fs/bpf/portcullis"));
}

#[test]
fn unknown_keys_name_file_line_and_column() {
    let e = errors("[proxy]\nlisten = [\"127.0.0.1:1\"]\n  bogus = 1\n");
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("test.toml:3:3: "), "{e:?}");
    assert!(e[0].contains("bogus"), "{e:?}");

    let e = errors("[[agent]]\nname = \"a\"\nmatch = { uid = 1, colour = \"red\" }\n");
    assert!(e[0].starts_with("test.toml:3:"), "{e:?}");
    assert!(e[0].contains("colour"), "{e:?}");

    let e = errors("[nonsense]\n");
    assert!(e[0].starts_with("test.toml:1:2"), "{e:?}");
}

#[test]
fn syntax_errors_have_positions() {
    let e = errors("[proxy]\nlisten = [\n");
    assert!(e[0].starts_with("test.toml:"), "{e:?}");
}

#[test]
fn validation_reports_every_problem_with_its_place() {
    let e = errors(
        r#"
[proxy]
listen = ["10.0.0.1:15001", "127.0.0.1:1", "127.0.0.2:2"]
upstream_mark = 0

[[agent]]
name = "a"
match = { exe = "/bin/sh" }

[[agent]]
name = "a"
match = { cgroup = "relative/path" }

[[target]]
name = "t"
protocol = "tcp"
address = ["127.0.0.1", "127.0.0.1:5432"]

[[target]]
name = "u"
protocol = "tcp"
address = "127.0.0.1:5432"
"#,
    );
    let all = e.join("\n");
    for needle in [
        "test.toml:3:11: the proxy must listen on loopback",
        "test.toml:3:44: only one listener per address family",
        "test.toml:4:17: `upstream_mark` must not be 0",
        "test.toml:8:9: an agent needs `cgroup`, `unit`, `uid` or `user`",
        "test.toml:11:8: agent `a` is defined twice",
        "test.toml:12:20: `cgroup` must be an absolute path",
        "test.toml:17:12: `127.0.0.1` has no port",
        "test.toml:22:11: `127.0.0.1:5432` is already an address of target `t`",
    ] {
        assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
    }
    assert_eq!(e.len(), 8, "{all}");
}

#[test]
fn unknown_user_and_bad_protocol() {
    let e = errors("[[agent]]\nname = \"x\"\nmatch = { user = \"no-such-user-here\" }\n");
    assert!(e[0].contains("no such user `no-such-user-here`"), "{e:?}");
    let e = errors("[[target]]\nname = \"x\"\nprotocol = \"gopher\"\naddress = \"*:70\"\n");
    assert!(e[0].starts_with("test.toml:3:12"), "{e:?}");
    assert!(e[0].contains("gopher"), "{e:?}");
}

#[test]
fn user_resolves_to_uid() {
    let c = parse("[[agent]]\nname = \"r\"\nmatch = { user = \"root\" }\n").expect("root exists");
    assert_eq!(c.agents[0].selector.uid, Some(0));
    assert!(!c.agents[0].selector.kernel_by_cgroup());
}

#[test]
fn target_for_takes_the_longest_match() {
    let c = parse(
        r#"
[[target]]
name = "any"
protocol = "tcp"
address = "*:5432"
[[target]]
name = "lo"
protocol = "tcp"
address = ["127.0.0.0/8:5432", "[::1]:5432"]
[[target]]
name = "one"
protocol = "tcp"
address = "127.0.0.7:5432"
"#,
    )
    .expect("valid");
    let t = |s: &str| c.target_for(s.parse().expect(s)).map(|t| t.name.as_str());
    assert_eq!(t("127.0.0.7:5432"), Some("one"));
    assert_eq!(t("[::ffff:127.0.0.7]:5432"), Some("one"));
    assert_eq!(t("127.0.0.8:5432"), Some("lo"));
    assert_eq!(t("[::1]:5432"), Some("lo"));
    assert_eq!(t("192.0.2.1:5432"), Some("any"));
    assert_eq!(t("127.0.0.7:5433"), None);
}

#[test]
fn cgroup_paths_are_normalised() {
    assert_eq!(normalize_cgroup_path("/a//b/"), Some("/a/b".into()));
    assert_eq!(normalize_cgroup_path("/"), Some("/".into()));
    assert_eq!(normalize_cgroup_path("a/b"), None);
    assert_eq!(normalize_cgroup_path("/a/../b"), None);
}

#[test]
fn oidc_issuers_and_token_targets() {
    let ok = parse(
        r#"
[[oidc]]
issuer = "https://login.example.com/tenant"
audience = "portcullis"
groups_claim = "realm_access.roles"
claims = ["tenant"]
algorithms = ["RS256", "EdDSA"]
[[oidc.binding]]
sub = "svc-reporter"
bind = { unit = "reporter.service", uid = 1001 }

[[target]]
name = "pg"
protocol = "postgres"
address = "127.0.0.1:5432"
auth = "inject"
credentials = { user = "app", password_file = "/etc/secret" }
require_token = true
token_expiry = "continue"
"#,
    )
    .expect("valid");
    let i = &ok.oidc[0];
    assert_eq!(i.algorithms, ["RS256", "EdDSA"]);
    assert_eq!(i.leeway, std::time::Duration::from_secs(30));
    assert_eq!(i.bindings[0].process.uid, Some(1001));
    let pg = ok.targets[0].pg.as_ref().expect("pg");
    assert_eq!(
        (pg.token, pg.token_expiry),
        (TokenMode::Required, TokenExpiry::Continue)
    );

    let e = errors(
        r#"
[[oidc]]
issuer = "http://login.example.com"
audience = "p"
algorithms = ["HS256"]
[[oidc.binding]]
bind = { uid = 1 }
[[oidc.binding]]
sub = "x"
bind = {}

[[target]]
name = "pg"
protocol = "postgres"
address = "127.0.0.1:5432"
require_token = true
token_expiry = "never"
"#,
    )
    .join("\n");
    for want in [
        "must be https://",
        "algorithm `HS256` is not accepted",
        "names the tokens it binds",
        "names at least one of agent",
        "only `auth = \"inject\"` reads",
        "`token_expiry` is `end_session` or `continue`",
    ] {
        assert!(e.contains(want), "missing `{want}` in:\n{e}");
    }
    // Loopback issuers may use http (tests, a local identity agent); tokens need an issuer.
    let e = errors(
        "[[oidc]]\nissuer = \"http://127.0.0.1:9000\"\naudience = \"p\"\n\
         [[target]]\nname = \"t\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1:1\"\nrequire_token = true\n",
    );
    assert!(
        e.iter().any(|m| m.contains("is for postgres targets")),
        "{e:?}"
    );
    let e = errors(
        "[[target]]\nname = \"pg\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1:1\"\nauth = \"inject\"\n\
         credentials = { user = \"a\", password_file = \"/s\" }\naccept_token = true\n",
    );
    assert!(
        e.iter().any(|m| m.contains("add an [[oidc]] section")),
        "{e:?}"
    );
}

#[test]
fn a_webhook_takes_one_signing_key() {
    let c = parse(
        "[[webhook]]\nurl = \"https://hooks.example/x\"\nsecret_file = \"/etc/portcullis/hook.key\"\n",
    )
    .expect("valid");
    assert_eq!(
        c.webhooks[0].secret,
        Some(Secret::File("/etc/portcullis/hook.key".into()))
    );
    let e = errors(
        "[[webhook]]\nurl = \"https://hooks.example/x\"\nsecret_file = \"/k\"\nsecret_credential = \"k\"\n",
    );
    assert!(e[0].starts_with("test.toml:3:15"), "{e:?}");
    assert!(e[0].contains("not both"), "{e:?}");
}

#[test]
fn workers_default_to_the_cpus_and_are_bounded() {
    let c = parse("").expect("empty is valid");
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    assert_eq!(c.proxy.workers, cpus.min(MAX_WORKERS));
    let c = parse("[proxy]\nworkers = 3\n").expect("valid");
    assert_eq!(c.proxy.workers, 3);
    assert_eq!(
        errors("[proxy]\nworkers = 0\n"),
        ["test.toml:2:11: `workers` must be between 1 and 1024"]
    );
    assert_eq!(
        errors("[proxy]\nworkers = 5000\n"),
        ["test.toml:2:11: `workers` must be between 1 and 1024"]
    );
}

#[test]
fn the_log_queue_drops_by_default_and_has_a_floor() {
    let c = parse("").expect("defaults");
    assert_eq!(c.log.when_full, LogWhenFull::Drop);
    assert_eq!(c.log.queue_bytes, crate::telemetry::batch::MAX_PENDING);
    let c = parse("[log]\nqueue_bytes = 1048576\nwhen_full = \"wait\"\n").expect("valid");
    assert_eq!(
        (c.log.queue_bytes, c.log.when_full),
        (1 << 20, LogWhenFull::Wait)
    );
    assert_eq!(
        errors("[log]\nqueue_bytes = 100\n"),
        ["test.toml:2:15: `queue_bytes` must be at least 65536"]
    );
    let e = errors("[log]\nwhen_full = \"block\"\n");
    assert!(e[0].starts_with("test.toml:2:13"), "{e:?}");
}

#[test]
fn host_names_are_resolved_at_load_unless_lookups_are_skipped() {
    let text = "[[target]]\nname = \"db\"\nprotocol = \"tcp\"\naddress = [\"localhost:5432\", \"127.0.0.9:1\"]\n";
    let resolved = Config::parse(&Source::new("t.toml", text)).expect("valid");
    let t = &resolved.targets[0];
    assert_eq!(t.fixed.len(), 1);
    assert_eq!(t.hosts[0].name.to_string(), "localhost:5432");
    assert!(
        t.hosts[0]
            .addrs
            .iter()
            .any(|a| a.to_string() == "127.0.0.1:5432")
    );
    assert!(t.addrs().count() > 1);
    assert!(resolved.warnings().is_empty());
    // A client command's view: the name is kept, nothing is looked up.
    let skipped = Config::parse_with(&Source::new("t.toml", text), Lookups::Skip).expect("valid");
    let t = &skipped.targets[0];
    assert!(t.hosts[0].addrs.is_empty() && t.hosts[0].error.is_none());
    assert_eq!(t.addrs().count(), 1);
}

#[test]
fn loop_intervals_are_at_least_100ms_and_only_resolution_can_be_turned_off() {
    let e = errors("[ebpf]\nrescan_interval = \"0s\"\n");
    assert!(
        e.iter().any(|e| e.contains("test.toml:2:")
            && e.contains("`rescan_interval` must be at least 100ms, not 0s")),
        "{e:?}"
    );
    let e = errors("[ebpf]\nresolve_interval = \"10ms\"\n");
    assert!(e.iter().any(|e| e.contains("(or `0s`, off)")), "{e:?}");
    assert!(parse("[ebpf]\nresolve_interval = \"0s\"\n").is_ok());
    assert!(!errors("[store]\nprune_interval = \"1ms\"\n").is_empty());
    assert!(!errors("[policy]\nwatch_interval = \"0s\"\n").is_empty());
    let ok = parse("[ebpf]\nrescan_interval = \"100ms\"\n").expect("valid");
    assert_eq!(ok.ebpf.rescan_interval, Duration::from_millis(100));
}
