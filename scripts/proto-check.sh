#!/usr/bin/env bash
# Contract checks run by make test: buf lint, buf format, buf breaking against the committed
# baseline image, and drift between protos/ and the committed stubs in gen/.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=${BUF:-.venv/bin/buf}
"$BUF" lint
"$BUF" format -d --exit-code
"$BUF" breaking --against protos/baseline.binpb
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r gen "$tmp/gen.before"
scripts/proto.sh
if ! diff -r -x __pycache__ "$tmp/gen.before" gen >/dev/null; then
  echo "generated stubs are stale: run 'make proto' and commit gen/" >&2
  diff -r -x __pycache__ "$tmp/gen.before" gen | head -20 >&2
  exit 1
fi
echo "proto-check: lint, format, breaking and drift OK"
