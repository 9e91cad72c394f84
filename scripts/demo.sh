#!/usr/bin/env bash
# End-to-end demo on a fresh machine, CPU only, no model download:
#
#   1. scripts/setup.sh                      ONNX Runtime + the Qwen3 tokenizer into .cache/pio/ (once)
#   2. cargo build --release                 target/release/pio and target/release/pio-export
#   3. pio-export --synthetic                a small random-weight Qwen3 checkpoint with the real
#                                            tokenizer and chat template, exported to ONNX
#   4. pio run                               a chat prompt through the template, streamed answer
#
# Random weights produce random text: the demo shows the pipeline (export, ONNX Runtime, KV cache,
# sampling, chat template, streaming detokenization), not a model's answers. At the end it prints
# the commands that do the same with the real Qwen3-4B-Instruct-2507 checkpoint.
#
# Idempotent: setup skips what it already fetched, cargo rebuilds only what changed, and the
# synthetic checkpoint and its graphs are written again (--force) on every run (a few seconds).
#
# Usage: scripts/demo.sh [PROMPT]
# Environment:
#   PIO_DEMO_MAX_TOKENS   tokens to generate (default 48)
#   PIO_DEMO_SAMPLING     sampling flags for pio run (default: the checkpoint's defaults, seed 0)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PROMPT="${1:-Write a short poem about the sea.}"
MAX_TOKENS="${PIO_DEMO_MAX_TOKENS:-48}"
# The checkpoint's own sampling defaults (temperature 0.7, top-k 20, top-p 0.8), seeded so the
# demo prints the same random text every run.
SAMPLING="${PIO_DEMO_SAMPLING:---seed 0}"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
START=$SECONDS

step "1/4 scripts/setup.sh (ONNX Runtime and the Qwen3 tokenizer; skipped when already there)"
scripts/setup.sh

step "2/4 cargo build --release -p pio-cli -p pio-export"
cargo build --release -p pio-cli -p pio-export

step "3/4 pio-export: a synthetic Qwen3 checkpoint (2 layers, hidden 256, real 151,936-token vocabulary and tokenizer), exported to ONNX"
# pio-export prints the graph folder on stdout (logs go to stderr).
GRAPHS="$(target/release/pio-export --model qwen3-4b-instruct-2507 --synthetic \
  --layers 2 --hidden-size 256 --intermediate-size 512 --heads 4 --kv-heads 2 \
  --context-length 4096 --force)"
echo "graph folder: $GRAPHS"
ls -la "$GRAPHS"

step "4/4 pio run: \"$PROMPT\" (streamed, $MAX_TOKENS tokens)"
echo "note: random weights produce random text; this shows the pipeline working, not a trained model."
# shellcheck disable=SC2086 # SAMPLING is a list of flags
target/release/pio run --graphs "$GRAPHS" --prompt "$PROMPT" --max-tokens "$MAX_TOKENS" $SAMPLING

cat <<EOF

Done in $((SECONDS - START)) s.

Random weights produce random text. To talk to it interactively anyway:
  target/release/pio chat --graphs $GRAPHS

The same with the real Qwen3-4B-Instruct-2507 (about 8 GB download, 16 GB of fp32 graph on the CPU):
  target/release/pio-export --model qwen3-4b-instruct-2507      # downloads it into the Hugging Face cache first
  target/release/pio chat --graphs graphs/qwen3-4b-instruct-2507-fp32
EOF
