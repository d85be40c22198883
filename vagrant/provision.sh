#!/usr/bin/env bash
# Provisions the developer VM: the packages `.ci/run` installs, rustup with the stable and
# nightly toolchains, bpf-linker and the cargo tools (`cargo xtask setup`). Idempotent: run
# `vagrant provision` again after pulling changes that need more.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

apt-get update -qq
# The same list as .ci/run, plus git and curl for rustup.
apt-get install -y -qq --no-install-recommends \
    build-essential ca-certificates curl git iproute2 util-linux procps \
    postgresql postgresql-client python3 python3-psycopg pgbouncer sqlite3 prometheus \
    systemd >/dev/null
# The packaged PostgreSQL and Prometheus servers are not needed (the tests start their own).
systemctl disable --now postgresql prometheus prometheus-node-exporter 2>/dev/null || true

# bpffs where the daemon expects it (systemd mounts it on Debian; make sure).
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

# Rust for root (the tests run as root).
if ! command -v rustup >/dev/null && [ ! -x /root/.cargo/bin/rustup ]; then
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable
fi
export PATH="/root/.cargo/bin:$PATH"
rustup component add rustfmt clippy
grep -q CARGO_TARGET_DIR /root/.profile || {
    echo 'export PATH="/root/.cargo/bin:$PATH"'
    echo 'export CARGO_TARGET_DIR=/var/tmp/portcullis-target'
} >>/root/.profile
export CARGO_TARGET_DIR=/var/tmp/portcullis-target

# Nightly rust-src, bpf-linker against nightly's LLVM, cargo-fuzz, cargo-deb.
cd /portcullis
cargo xtask setup

cat <<'MSG'
portcullis-dev is ready:
  vagrant ssh, then: sudo -i; cd /portcullis
  cargo xtask test     # unit + privileged end-to-end tests
  cargo xtask run      # the daemon with the default configuration
MSG
