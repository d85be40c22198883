//! Makes cargo rebuild the programs when bpf-linker changes (aya-template's approach).
use which::which;

fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!(
            "cargo:warning=bpf-linker not found on PATH; run `cargo xtask setup` to build it"
        ),
    }
}
