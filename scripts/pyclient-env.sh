#!/usr/bin/env bash
# Creates target/pyclient: a virtualenv holding the stock Python gRPC client (grpcio, with its
# health-checking and reflection packages) from the package index, for the tests that check that
# a client in another language works against metald with default options (tests/clients.rs).
# Idempotent, and safe to run from several tests at once.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/pyclient
mkdir -p target
exec 9>target/.pyclient.lock
flock 9
if [ -x "$venv/bin/python" ] &&
  "$venv/bin/python" -c "import grpc, grpc_health.v1, grpc_reflection.v1alpha" 2>/dev/null; then
  exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
# grpcio >= 1.57 sends a unix socket's path as the HTTP/2 :authority: the case that matters.
"$venv/bin/pip" install -q --disable-pip-version-check \
  "grpcio==1.85.3" "grpcio-health-checking==1.85.1" "grpcio-reflection==1.85.1"
