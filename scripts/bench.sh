#!/usr/bin/env bash
# Runs a benchmark on real QEMU guests, prints its figures, and saves them to bench/results/ and
# bench/RESULTS.md. Usage: scripts/bench.sh [lifecycle|detection|chaos|guest] [options]
# (default: lifecycle; `target/release/metald-bench help SUBCOMMAND` lists the options)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build-guest.sh
cargo build --release --locked -p metald -p metalctl -p metald-bench
exec target/release/metald-bench --root . "${1:-lifecycle}" "${@:2}"
