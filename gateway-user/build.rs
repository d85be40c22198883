//! Builds the eBPF object (`gateway-ebpf`) with the nightly toolchain and bpf-linker, and
//! leaves it in OUT_DIR for `include_bytes_aligned!`. `cargo xtask setup` installs both.
use std::process::ExitCode;

fn main() -> ExitCode {
    let package = aya_build::Package {
        name: "gateway-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway-ebpf"),
        ..Default::default()
    };
    println!("cargo:rerun-if-changed=../gateway-common/src");
    match aya_build::build_ebpf([package], aya_build::Toolchain::default()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!(
                "error: building the eBPF programs failed: {err:#}\n\
                 hint: run `cargo xtask setup` (nightly rust-src and bpf-linker), then build again"
            );
            ExitCode::FAILURE
        }
    }
}
