//! The `portcullis` binary: everything lives in the library.

/// mimalloc instead of glibc's allocator: the proxy's path allocates many small, short-lived
/// values on several threads (parsed statements, records, frames), where glibc spent an
/// eighth of the daemon's time under load (README, "Dependencies and why").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    portcullis::cli::main()
}
