//! `portcullis install` and `portcullis uninstall`: lay the daemon down on a host (binary,
//! systemd unit, configuration, policies, state directory, approver and auditor groups) and
//! take it away again. `--root DIR` installs into a directory tree instead of the running
//! system (for packaging and tests): nothing outside it is touched and systemd is not asked.
//!
//! Existing configuration and policy files are never overwritten: an upgrade replaces the
//! binary and the unit and keeps what the operator edited.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{config::DEFAULT_CONFIG, policy::load::BUILTIN};

/// The unit file, as shipped.
pub const UNIT: &str = include_str!("../../packaging/systemd/portcullis.service");
pub const UNIT_NAME: &str = "portcullis.service";
/// Groups whose members approve held statements, and read the audit log.
pub const GROUPS: [&str; 2] = ["portcullis-approvers", "portcullis-auditors"];

/// Where things go, below a root.
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }
    fn at(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }
    pub fn binary(&self) -> PathBuf {
        self.at("/usr/bin/portcullis")
    }
    pub fn unit(&self) -> PathBuf {
        self.at("/etc/systemd/system/portcullis.service")
    }
    pub fn config_dir(&self) -> PathBuf {
        self.at("/etc/portcullis")
    }
    pub fn config(&self) -> PathBuf {
        self.at("/etc/portcullis/portcullis.toml")
    }
    pub fn policies(&self) -> PathBuf {
        self.at("/etc/portcullis/policies")
    }
    pub fn state(&self) -> PathBuf {
        self.at("/var/lib/portcullis")
    }
    fn is_system(&self) -> bool {
        self.root == Path::new("/")
    }
}

/// The configuration an installed host starts with: the embedded default, with the
/// policies read from `/etc/portcullis/policies` so operators can edit them.
pub fn installed_config() -> String {
    DEFAULT_CONFIG.replacen(
        "# dir = \"/etc/portcullis/policies\"",
        "dir = \"/etc/portcullis/policies\"",
        1,
    )
}

fn io(what: &Path, e: std::io::Error) -> String {
    format!("{}: {e}", what.display())
}

fn write_new(path: &Path, text: &str, mode: u32, log: &mut Vec<String>) -> Result<(), String> {
    if path.exists() {
        log.push(format!("kept     {} (exists)", path.display()));
        return Ok(());
    }
    write(path, text.as_bytes(), mode)?;
    log.push(format!("created  {}", path.display()));
    Ok(())
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    // Written beside and renamed: a running binary is replaced, not modified.
    let tmp = path.with_extension("portcullis-new");
    fs::write(&tmp, bytes).map_err(|e| io(&tmp, e))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(|e| io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io(path, e))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether `group` is in `<root>/etc/group`.
fn has_group(l: &Layout, group: &str) -> bool {
    fs::read_to_string(l.at("/etc/group"))
        .unwrap_or_default()
        .lines()
        .any(|line| line.split(':').next() == Some(group))
}

fn group_cmd(l: &Layout, tool: &str) -> Command {
    let mut c = Command::new(tool);
    if !l.is_system() {
        c.arg("--prefix").arg(&l.root);
    }
    c
}

pub struct InstallOptions {
    pub root: PathBuf,
    /// Start the service too (system installs).
    pub now: bool,
}

/// Installs; returns what was done, one line per step.
pub fn install(o: &InstallOptions) -> Result<Vec<String>, String> {
    let l = Layout::new(&o.root);
    let mut log = Vec::new();
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this binary: {e}"))?;
    let target = l.binary();
    if fs::canonicalize(&exe).ok() != fs::canonicalize(&target).ok() {
        let bytes = fs::read(&exe).map_err(|e| io(&exe, e))?;
        write(&target, &bytes, 0o755)?;
        log.push(format!("installed {}", target.display()));
    }
    write(&l.unit(), UNIT.as_bytes(), 0o644)?;
    log.push(format!("installed {}", l.unit().display()));
    write_new(&l.config(), &installed_config(), 0o644, &mut log)?;
    // Readable by root alone: an agent must not read the rules it is judged by (the
    // daemon warns about policy files every user may read, see config::trust).
    for (name, text) in BUILTIN {
        write_new(&l.policies().join(name), text, 0o640, &mut log)?;
    }
    let state = l.state();
    fs::create_dir_all(&state).map_err(|e| io(&state, e))?;
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).map_err(|e| io(&state, e))?;
    log.push(format!("state    {} (0700)", state.display()));
    if l.at("/etc/group").exists() {
        for g in GROUPS {
            if has_group(&l, g) {
                log.push(format!("kept     group {g}"));
            } else {
                run(group_cmd(&l, "groupadd").args(["--system", g]))?;
                log.push(format!("created  group {g}"));
            }
        }
    } else {
        log.push(format!(
            "skipped  groups: no {} (create {} yourself)",
            l.at("/etc/group").display(),
            GROUPS.join(", ")
        ));
    }
    if l.is_system() {
        run(Command::new("systemctl").arg("daemon-reload"))?;
        let mut enable = Command::new("systemctl");
        enable.args(["enable", UNIT_NAME]);
        if o.now {
            enable.arg("--now");
        }
        run(&mut enable)?;
        log.push(format!(
            "enabled  {UNIT_NAME}{}",
            if o.now {
                " and started it"
            } else {
                "; start it with `systemctl start portcullis`"
            }
        ));
    }
    Ok(log)
}

pub struct UninstallOptions {
    pub root: PathBuf,
    /// Also remove the state directory (the audit store) and the groups.
    pub purge: bool,
}

/// Uninstalls; returns what was done.
pub fn uninstall(o: &UninstallOptions) -> Result<Vec<String>, String> {
    let l = Layout::new(&o.root);
    let mut log = Vec::new();
    if l.is_system() {
        // Stopped first; errors are fine (not installed, not running).
        let _ = run(Command::new("systemctl").args(["disable", "--now", UNIT_NAME]));
        log.push(format!("stopped and disabled {UNIT_NAME}"));
        // The pinned programs outlive the daemon (fail closed): remove them, or protected
        // processes could not connect at all.
        let pin = crate::config::Config::load_or_default(&l.config(), false)
            .map(|c| c.ebpf.pin_path)
            .unwrap_or_else(|_| PathBuf::from("/sys/fs/bpf/portcullis"));
        if pin.exists() {
            crate::ebpf::PinLayout::new(&pin)
                .remove_all()
                .map_err(|e| format!("cannot detach {}: {e}", pin.display()))?;
            log.push(format!("detached {} (protection is off)", pin.display()));
        }
    }
    for p in [l.unit(), l.binary()] {
        match fs::remove_file(&p) {
            Ok(()) => log.push(format!("removed  {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&p, e)),
        }
    }
    if l.config_dir().exists() {
        fs::remove_dir_all(l.config_dir()).map_err(|e| io(&l.config_dir(), e))?;
        log.push(format!("removed  {}", l.config_dir().display()));
    }
    if l.is_system() {
        let _ = run(Command::new("systemctl").arg("daemon-reload"));
    }
    if o.purge {
        if l.state().exists() {
            fs::remove_dir_all(l.state()).map_err(|e| io(&l.state(), e))?;
            log.push(format!(
                "removed  {} (the audit store)",
                l.state().display()
            ));
        }
        for g in GROUPS {
            if has_group(&l, g) {
                run(group_cmd(&l, "groupdel").arg(g))?;
                log.push(format!("removed  group {g}"));
            }
        }
    } else if l.state().exists() {
        log.push(format!(
            "kept     {} (the audit store; --purge removes it)",
            l.state().display()
        ));
    }
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_installed_configuration_reads_policies_from_etc_and_validates() {
        let text = installed_config();
        assert!(
            text.contains("\ndir = \"/etc/portcullis/policies\""),
            "{text}"
        );
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("portcullis.toml");
        fs::write(&p, text.replace("/etc/portcullis/policies", "policies")).expect("write");
        let pol = dir.path().join("policies");
        fs::create_dir_all(&pol).expect("dir");
        for (name, text) in BUILTIN {
            fs::write(pol.join(name), text).expect("policy");
        }
        crate::config::Config::load(&p).expect("the installed configuration is valid");
    }

    #[test]
    fn the_unit_names_the_installed_paths() {
        assert!(UNIT.contains(
            "ExecStart=/usr/bin/portcullis --config /etc/portcullis/portcullis.toml run"
        ));
        assert!(UNIT.contains("Type=notify"));
        assert!(UNIT.contains("Restart=always"));
    }
}
