#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests, the integration tests that boot
# real QEMU guests under TCG, and the lifecycle, detection and recovery suites a second time on
# the Firecracker driver. Installs what is missing first. Test parallelism is bounded because
# each test boots guests and these machines have two cores.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh
scripts/pyclient-env.sh
# The API: buf lint, and no breaking change against the committed baseline.
scripts/buf.sh
scripts/build-guest.sh

# The jailer copies only the firecracker binary into an empty chroot, so the jailer tests need
# a statically linked Firecracker stand-in (crates/fc-standin/tests/jailer.rs).
RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked -p fc-standin \
  --bin firecracker-standin --target x86_64-unknown-linux-gnu --target-dir target/static

cargo fmt --all -- --check
# The crash-point tests (crates/metald/tests/crash.rs) need metald built with its failpoints;
# they run last, on their own build: the other suites run the build without them, as shipped.
cargo clippy --workspace --all-targets --locked --features metald/failpoints -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked --no-fail-fast -- --test-threads="${METALD_TEST_THREADS:-2}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# The lifecycle, detection, recovery, guest and degraded suites again on the Firecracker driver: against the real
# binary when FIRECRACKER_BIN is set, otherwise against the labelled stand-in (crates/fc-standin).
METALD_TEST_VMM=firecracker cargo test --locked --no-fail-fast -p metald --test lifecycle \
  --test detection --test recovery --test guest --test degraded -- --test-threads="${METALD_TEST_THREADS:-2}" 2>&1 | tee -a "$log"
fc_status=${PIPESTATUS[0]}
[ "$status" -ne 0 ] || status=$fc_status
# metald killed at each crash point, on QEMU and on Firecracker.
for vmm in qemu firecracker; do
  METALD_TEST_VMM=$vmm cargo test --locked --no-fail-fast -p metald --features failpoints \
    --test crash -- --test-threads="${METALD_TEST_THREADS:-2}" 2>&1 | tee -a "$log"
  crash_status=${PIPESTATUS[0]}
  [ "$status" -ne 0 ] || status=$crash_status
done
set -e
# The Debian package: built, installed with dpkg into a scratch root and checked.
if ! scripts/package.sh >/dev/null; then
  echo "test.sh: scripts/package.sh failed" >&2
  status=1
fi
# cargo's last line is often a crate with no tests ("0 passed"); end with the whole run's total.
passed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) passed.*/\1/' | awk '{s+=$1} END {print s+0}')
failed=$(grep -E '^test result:' "$log" | sed -E 's/.* ([0-9]+) failed.*/\1/' | awk '{s+=$1} END {print s+0}')
echo "tests: ${passed:-0} passed, ${failed:-0} failed"
exit "$status"
