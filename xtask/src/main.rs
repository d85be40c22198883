//! `cargo xtask <task>`: everything that is not `cargo build`.
//!
//! - `setup`: nightly `rust-src` and a `bpf-linker` built against the nightly toolchain's
//!   own LLVM (idempotent).
//! - `run`: as root: setup if needed, build, run the daemon in the foreground with the
//!   default configuration (`config/portcullis.toml`, the text embedded in the binary).
//! - `test`: unit tests and the privileged end-to-end tests.
//! - `bench [policy|intercept|pg|masking|store]`: benchmarks, printing ratios measured side by side.
//! - `install [ARGS]`: build (release) and `portcullis install ARGS` on this host.
//! - `deb [--debug]`: build the `.deb` (target/debian/) from the files `portcullis install`
//!   lays down.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building needs: nightly rust-src and bpf-linker.
    Setup,
    /// Build everything (the eBPF object is built and embedded by gateway-user/build.rs).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build and run the daemon in the foreground with the default configuration (root).
    Run {
        #[arg(long)]
        release: bool,
        /// Use this configuration instead of the default one.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run the unit tests, the privileged end-to-end tests (root) and a short fuzz run of
    /// every fuzz target.
    Test {
        /// Skip the fuzz run.
        #[arg(long)]
        no_fuzz: bool,
        /// Seconds per fuzz target.
        #[arg(long, default_value_t = 20)]
        fuzz_seconds: u64,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz the decoders (cargo-fuzz, libFuzzer).
    Fuzz {
        /// Targets (default: all).
        targets: Vec<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Build (release) and install on this host: `portcullis install ARGS` (root).
    Install {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the Debian package (target/debian/portcullis_<version>_<arch>.deb).
    Deb {
        /// Package the debug build (what `cargo xtask test` checks) instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Run benchmarks (root): policy, intercept, pg (with masking), masking, store (all when none is named).
    Bench {
        /// Suites to run; all when empty.
        suites: Vec<String>,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command, failing with its command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Cargo's target directory (`CARGO_TARGET_DIR`, else `target/` in the workspace).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => workspace_root().join(d),
        None => workspace_root().join("target"),
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions. (Avoids a libc dependency for one call.)
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    unsafe { geteuid() == 0 }
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "{what} needs root (it loads eBPF programs and creates cgroups); run it with sudo \
             or as root"
        );
    }
    Ok(())
}

fn build(release: bool) -> Result<()> {
    setup::ensure()?;
    let mut c = cargo();
    c.args(["build", "--workspace", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

/// Stages what `portcullis install` lays down into target/deb-root and packages it with
/// `cargo deb --no-build`. Returns the package's path.
fn deb(release: bool) -> Result<PathBuf> {
    let root = workspace_root();
    let profile = if release { "release" } else { "debug" };
    // gateway-user/Cargo.toml's package assets point here, whatever the target directory.
    let stage = root.join("target/deb-root");
    let _ = std::fs::remove_dir_all(&stage);
    run(Command::new(target_dir().join(profile).join("portcullis"))
        .args(["install", "--root"])
        .arg(&stage))
    .context("staging the package's files")?;
    let out_dir = target_dir().join("debian");
    std::fs::create_dir_all(&out_dir)?;
    let path = out_dir.join(format!(
        "portcullis_{}_{profile}.deb",
        env!("CARGO_PKG_VERSION")
    ));
    let mut c = cargo();
    c.args([
        "deb",
        "-p",
        "gateway-user",
        "--no-build",
        "--no-strip",
        "--output",
    ])
    .arg(&path);
    run(&mut c).context("cargo deb (cargo xtask setup installs it)")?;
    Ok(path)
}

/// The repository's configuration (the embedded default), copied where only root may
/// change it: the daemon refuses a configuration file that someone else may change, and a
/// checkout usually belongs to a developer.
fn dev_config() -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let from = workspace_root().join("config/portcullis.toml");
    let dir = PathBuf::from("/run/portcullis-xtask");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    let to = dir.join("portcullis.toml");
    std::fs::copy(&from, &to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))?;
    Ok(to)
}

/// Fuzz targets in fuzz/fuzz_targets.
const FUZZ_TARGETS: [&str; 4] = ["pg_decode", "sql_classify", "oidc_token", "masking"];

fn fuzz(targets: &[String], seconds: u64) -> Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        FUZZ_TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    for t in targets {
        eprintln!("xtask: fuzzing {t} for {seconds}s");
        run(Command::new("cargo")
            .current_dir(workspace_root())
            .args(["+nightly", "fuzz", "run", t, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .arg("-rss_limit_mb=4096"))
        .with_context(|| {
            format!("fuzz target {t} failed (a crash input is in fuzz/artifacts/{t}/)")
        })?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::ensure(),
        Task::Build { release } => build(release),
        Task::Run { release, config } => {
            require_root("cargo xtask run")?;
            build(release)?;
            let profile = if release { "release" } else { "debug" };
            let bin = target_dir().join(profile).join("portcullis");
            let config = match config {
                Some(c) => c,
                None => dev_config()?,
            };
            eprintln!(
                "xtask: starting {} with {}\nxtask: in another terminal: sudo {} exec -- psql -h 127.0.0.1 ...",
                bin.display(),
                config.display(),
                bin.display()
            );
            let err = std::os::unix::process::CommandExt::exec(
                Command::new(&bin).arg("--config").arg(&config).arg("run"),
            );
            bail!("cannot run {}: {err}", bin.display())
        }
        Task::Test {
            no_fuzz,
            fuzz_seconds,
            args,
        } => {
            require_root("cargo xtask test")?;
            build(false)?;
            // The package test inspects a .deb of this build.
            let deb = deb(false)?;
            let mut c = cargo();
            c.args(["test", "--workspace", "--no-fail-fast"])
                .args(&args)
                .env("PORTCULLIS_DEB", &deb);
            let tests = run(&mut c);
            let fuzzed = if no_fuzz || !args.is_empty() {
                Ok(())
            } else {
                fuzz(&[], fuzz_seconds)
            };
            tests.and(fuzzed)
        }
        Task::Fuzz { targets, seconds } => {
            setup::ensure()?;
            fuzz(&targets, seconds)
        }
        Task::Install { args } => {
            require_root("cargo xtask install")?;
            build(true)?;
            run(Command::new(target_dir().join("release/portcullis"))
                .arg("install")
                .args(&args))
        }
        Task::Deb { debug } => {
            if !debug {
                build(true)?;
            }
            let path = deb(!debug)?;
            eprintln!("xtask: built {}", path.display());
            Ok(())
        }
        Task::Bench { suites } => {
            require_root("cargo xtask bench")?;
            build(true)?;
            let bin = target_dir().join("release/portcullis-bench");
            let mut c = Command::new(bin);
            c.current_dir(workspace_root()).args(&suites);
            run(&mut c)
        }
    }
}
