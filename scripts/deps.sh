#!/usr/bin/env bash
# Installs what metald, its tests and its test guest need on a Debian host, if missing:
# QEMU (qemu-system-x86), busybox-static, the tools that build the guest image, and Prometheus
# (its server and promtool test the shipped alert rules). The Rust
# toolchain must already be on the machine (rustup); Debian's packaged Rust is too old for
# edition 2024.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
  echo "deps: cargo is not installed; install a Rust toolchain (>= 1.85) with rustup first" >&2
  exit 1
fi

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
# npm fetches the buf CLI that checks the API (scripts/buf.sh).
command -v npm >/dev/null 2>&1 || need+=(npm)
for p in busybox-static cpio lz4 gzip python3 python3-venv prometheus; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "deps: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
