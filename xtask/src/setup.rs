//! `cargo xtask setup`: the nightly toolchain's `rust-src` (for `-Z build-std=core`) and a
//! `bpf-linker` linked against the nightly toolchain's own libLLVM.
//!
//! bpf-linker cannot be downloaded prebuilt here, and it must use the same LLVM as the
//! nightly rustc that emits the bitcode. The recipe: a directory `D/lib` with a symlink
//! `libLLVM.so` (and one under the library's SONAME) to the sysroot's real library (`lib/libLLVM.so.<major>.<minor>-rust-...`;
//! the `libLLVM-<major>-rust-...so` next to it is a linker script that fails to link), then
//! `LLVM_PREFIX=D cargo install bpf-linker --no-default-features --features llvm-<major>`.
//! The binary's rpath points into `D`, so `D` lives under `$CARGO_HOME`, not in /tmp. A
//! stamp file in `D` records which toolchain it was built for, so reruns are no-ops until
//! the nightly toolchain changes.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

const TOOLCHAIN: &str = "nightly";

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// Makes sure everything is installed; prints what it does.
pub fn ensure() -> Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"])).context(
        "rustup is needed to manage the nightly toolchain that builds the eBPF programs; \
         install it from https://rustup.rs",
    )?;
    if !installed.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("xtask setup: installing the nightly toolchain");
        crate::run(Command::new("rustup").args([
            "toolchain",
            "install",
            TOOLCHAIN,
            "--profile",
            "minimal",
        ]))
        .context("cannot install the nightly toolchain")?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        TOOLCHAIN,
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask setup: adding rust-src to the nightly toolchain");
        crate::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            TOOLCHAIN,
        ]))
        .context("cannot add rust-src to the nightly toolchain (needed for -Z build-std)")?;
    }
    ensure_bpf_linker()?;
    ensure_cargo_fuzz()?;
    ensure_cargo_deb()
}

/// cargo-deb, for `cargo xtask deb` (and the package test of `cargo xtask test`).
fn ensure_cargo_deb() -> Result<()> {
    let present = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask setup: installing cargo-deb");
    crate::run(Command::new("cargo").args(["install", "cargo-deb", "--locked"]))
        .context("cannot install cargo-deb (needs crates.io access)")
}

/// cargo-fuzz, for `cargo xtask fuzz` and the short fuzz run of `cargo xtask test`.
fn ensure_cargo_fuzz() -> Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask setup: installing cargo-fuzz");
    crate::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
        .context("cannot install cargo-fuzz (needs crates.io access)")
}

fn ensure_bpf_linker() -> Result<()> {
    let version = output(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "--version"]))?;
    let sysroot = PathBuf::from(output(
        Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"]),
    )?);
    let libdir = sysroot.join("lib");
    let llvm = fs::read_dir(&libdir)
        .with_context(|| format!("cannot list {}", libdir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: this nightly toolchain does not ship its LLVM as a \
                 shared library",
                libdir.display()
            )
        })?;
    // libLLVM.so.22.1-rust-1.97.0-nightly -> 22
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()) && !m.is_empty())
        .with_context(|| format!("cannot read the LLVM version from {llvm}"))?
        .to_owned();
    let prefix = cargo_home().join("portcullis-llvm").join(&llvm);
    let stamp = prefix.join("bpf-linker.stamp");
    let want = format!("{version}\n{llvm}\n");
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if linker_ok && fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(());
    }
    eprintln!(
        "xtask setup: building bpf-linker against {} (LLVM {major}); this takes a few minutes",
        libdir.join(&llvm).display()
    );
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    // `libLLVM.so` is what the build links against; the SONAME-named link is what the
    // dynamic loader looks for through bpf-linker's RUNPATH when it runs outside
    // `rustup run` (which would otherwise supply LD_LIBRARY_PATH).
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(libdir.join(&llvm), &link)
            .with_context(|| format!("cannot create {}", link.display()))?;
    }
    crate::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )
    .context(
        "cannot build bpf-linker; it needs a C/C++ toolchain (gcc, g++) and crates.io access",
    )?;
    let works = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !works {
        bail!(
            "bpf-linker was installed but does not run; is {} on PATH?",
            cargo_home().join("bin").display()
        );
    }
    fs::write(&stamp, want).with_context(|| format!("cannot write {}", stamp.display()))?;
    eprintln!("xtask setup: bpf-linker ready");
    Ok(())
}
