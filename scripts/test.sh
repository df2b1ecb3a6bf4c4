#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests, and the integration tests that boot
# real QEMU guests under TCG. Installs what is missing first. Test parallelism is bounded because
# each test boots guests and these machines have two cores.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
scripts/build-guest.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked -- --test-threads="${METALD_TEST_THREADS:-2}"
