#!/usr/bin/env bash
# Runs a benchmark on real QEMU guests, prints its figures, and saves them to bench/results/ and
# bench/RESULTS.md. Usage: scripts/bench.sh [lifecycle|detection|chaos|guest|jailer|degraded|scale|fuzz|migrate] [options]
# (default: lifecycle; `target/release/metald-bench help SUBCOMMAND` lists the options)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build-guest.sh
cargo build --release --locked -p metald -p metalctl -p metald-bench -p fc-standin
# The degraded benchmark kills metald at its named crash points: a debug build with them.
cargo build --locked -p metald --features failpoints
# The jailer copies only the firecracker binary into its chroot: the jailer benchmark needs the
# Firecracker stand-in statically linked.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked -p fc-standin \
  --bin firecracker-standin --target x86_64-unknown-linux-gnu --target-dir target/static
exec target/release/metald-bench --root . "${1:-lifecycle}" "${@:2}"
