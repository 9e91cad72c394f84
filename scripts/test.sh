#!/usr/bin/env bash
# Fetch the runtime dependencies (ONNX Runtime, Qwen3 tokenizer) if needed, then run the test suite.
#
# Usage: scripts/test.sh [cargo test args...]
#   scripts/test.sh                              # cargo test --workspace
#   scripts/test.sh -- --nocapture               # extra args go to cargo test
#   scripts/test.sh -p pio-runtime ort_lib       # with -p/--package, --workspace is left out
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

scope=(--workspace)
for arg in "$@"; do
  case "$arg" in
    --) break ;;
    -p | -p* | --package | --package=* | --workspace | --all | --manifest-path | --manifest-path=*) scope=() ;;
  esac
done

echo "[test] cargo test ${scope[*]:+${scope[*]} }$*"
exec cargo test "${scope[@]}" "$@"
