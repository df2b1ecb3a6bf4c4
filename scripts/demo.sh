#!/usr/bin/env bash
# Installs what is missing, builds metald, starts it, and boots a demo VM to METALD-GUEST-READY.
# metald keeps running afterwards (the VM with it); `scripts/demo.sh stop` removes both.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
state="${METALD_DEMO_DIR:-/tmp/metald-demo}"
sock="$state/metald.sock"
ctl() { "$root/target/release/metalctl" --endpoint "unix:$sock" "$@"; }

if [ "${1:-}" = "stop" ]; then
  if [ -S "$sock" ]; then ctl delete demo --force >/dev/null 2>&1 || true; fi
  pkill -TERM -f "metald --state-dir $state" 2>/dev/null || true
  rm -rf "$state"
  echo "demo stopped"
  exit 0
fi

scripts/deps.sh
scripts/build-guest.sh
cargo build --release --locked -p metald -p metalctl

mkdir -p "$state"
if ! [ -S "$sock" ] || ! ctl list >/dev/null 2>&1; then
  # No accelerator flag means KVM, as on production hosts; nested KVM does not work everywhere,
  # so the demo uses TCG unless METALD_ACCEL says otherwise.
  nohup "$root/target/release/metald" --state-dir "$state" --accel "${METALD_ACCEL:-tcg}" \
    --asset-dir "$root/target/guest" --log-format text > "$state/metald.log" 2>&1 &
  for _ in $(seq 1 100); do [ -S "$sock" ] && break; sleep 0.1; done
  [ -S "$sock" ] || { echo "metald did not start; see $state/metald.log" >&2; exit 1; }
fi

ctl delete demo --force >/dev/null 2>&1 || true
ctl create --id demo --customer demo --kernel "$root/target/guest/vmlinux" \
  --initrd "$root/target/guest/initrd.img" --cmdline "quiet panic=-1" --memory-mib 128
ctl boot demo
console=$(ctl info demo --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["vmm"]["console_log"])')
for _ in $(seq 1 600); do grep -q METALD-GUEST-READY "$console" 2>/dev/null && break; sleep 0.1; done
if ! grep -m1 METALD-GUEST-READY "$console"; then
  echo "demo VM did not reach METALD-GUEST-READY within 60 s; console:" >&2
  cat "$console" >&2
  exit 1
fi
ctl info demo
cat <<MSG

The demo VM is running under metald (state in $state, log in $state/metald.log).
Try:  target/release/metalctl --endpoint unix:$sock list
Stop: scripts/demo.sh stop
MSG
