#!/usr/bin/env bash
# Checks the metald.v1 API with buf (https://buf.build): `buf lint` (the standard rules) and
# `buf breaking` against the committed baseline image, proto/baseline.binpb, so that no change
# breaks a client built against an earlier metald. buf comes from the npm registry
# (@bufbuild/buf) into target/buf, installed on first use.
# `scripts/buf.sh baseline` rewrites the baseline (only for a deliberate, announced break).
set -euo pipefail
cd "$(dirname "$0")/.."
buf=target/buf/node_modules/.bin/buf
if [ ! -x "$buf" ]; then
  mkdir -p target/buf
  npm install --silent --prefix target/buf @bufbuild/buf@1.75.0 >/dev/null
fi
cd proto
if [ "${1:-}" = baseline ]; then
  "../$buf" build -o baseline.binpb
  echo "buf: baseline rewritten"
  exit 0
fi
"../$buf" lint
"../$buf" breaking --against baseline.binpb
echo "buf: lint and breaking checks passed"
