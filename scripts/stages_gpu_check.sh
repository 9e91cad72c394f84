#!/usr/bin/env bash
# Pipeline stages on ONE GPU (issue 14, "On one GPU"): the synthetic Qwen3-4B at its real shape,
# bf16, exported as one graph and in 2 stages (pio-export --stages 2), both run on the same device.
#
#   1. greedy equality: `pio run --greedy` over 64 new tokens from the same prompt, one graph
#      against 2 stages (the tokens must be the same; the first divergence is reported if not);
#   2. the cost of a stage boundary: `pio bench` on both graphs side by side with CUDA graphs
#      (decode tok/s at batch 1 and 8, time to first token at 128 and 1,024 tokens), and the
#      staged run's pipeline report (each stage's busy time, the bubble).
#
#   OUT=/path/to/results PIO_BIN_DIR=.gpu bash scripts/stages_gpu_check.sh
#
# About 3-4 minutes on one H200 (PIO_CHECK_BUDGET, default 240 s; a step that would start after
# the budget is skipped and logged). Needs the release binaries `pio` and `pio-export`
# ($PIO_BIN_DIR, default target/release), ONNX Runtime's CUDA build (ORT_DYLIB_PATH, see README
# "GPU") and python3 (stdlib). The checkpoint and both exports go to $PIO_SHM (default /dev/shm/pio,
# about 24 GB), named as scripts/synthetic_qwen3.sh names them, so they are shared with
# engine_gpu_check.sh and serve_gpu_bench.sh (reused when there). LAYERS=N exports N of the 36
# layers at real width.
# EP=cpu runs the same steps on a tiny fp32 Qwen3 (2 layers, hidden 64; no CUDA graphs, fewer
# tokens): a dry run of this script, not a measurement.
#
# Writes $OUT/summary.json (the verdict and the numbers side by side), $OUT/bench.json (pio bench's
# report), $OUT/greedy-*.json (pio run's output), $OUT/steps.jsonl and a log per step.
set -uo pipefail
bin=${PIO_BIN_DIR:-target/release}
out=${OUT:-stages-check-out}
shm=${PIO_SHM:-/dev/shm/pio}
ep=${EP:-cuda}
budget=${PIO_CHECK_BUDGET:-240}
mkdir -p "$out" "$shm"
out=$(cd "$out" && pwd)
export RUST_LOG=${RUST_LOG:-info,ort=warn} NO_COLOR=1
start=$(date +%s)
: > "$out/steps.jsonl"
left() { echo $(( budget - ($(date +%s) - start) )); }

step_tag=stages-check
# shellcheck source=scripts/gpu_steps.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_steps.sh"
# step NAME MAX_SECONDS CMD...: run_step with a timeout of min(MAX_SECONDS, time left); skipped when
# the budget is spent. The next step runs whatever this one returned.
step() {
  local name=$1 max=$2 remaining t; shift 2
  remaining=$(left)
  t=$(( max < remaining ? max : remaining ))
  if (( t < 5 )); then
    echo "{\"step\":\"$name\",\"skipped\":\"out of time\"}" >> "$out/steps.jsonl"
    echo "[$step_tag] $name: skipped (out of time)"
    return 0
  fi
  run_step "$name" "$t" "$@" || true
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1 || true

# The synthetic checkpoint's shape flags: the real shape (or LAYERS of its layers) on the GPU.
shape_flags() {
  if [[ $ep == cpu ]]; then
    echo --layers 2 --hidden-size 64 --intermediate-size 128 --heads 2 --kv-heads 1 --head-dim 32
  elif [[ -n ${LAYERS:-} ]]; then
    echo --layers "$LAYERS"
  fi
}

# 1. The checkpoint, then the one graph and the 2 stages (balanced by bytes: stage 0 holds the
#    embeddings, stage 1 the lm_head) exported side by side. The folder names are those of
#    scripts/synthetic_qwen3.sh, so a one-graph export or checkpoint from engine_gpu_check.sh or
#    serve_gpu_bench.sh is reused (and the staged one is used by the next run).
if [[ $ep == cpu ]]; then
  # Two layers, so that there is a boundary to cut at.
  tag=cpu-stages-dry-run precision=fp32
  tokens=16 batches=1,4 prompt_lens=16,64 decode_prompt=16 decode_tokens=8 cuda_graph=off
else
  tag=full precision=bf16
  [[ -n ${LAYERS:-} ]] && tag=l$LAYERS
  tokens=64 batches=1,8 prompt_lens=128,1024 decode_prompt=128 decode_tokens=64 cuda_graph=on
fi
ck=$shm/qwen3-4b-synthetic-$tag
single=$shm/qwen3-4b-graphs-$tag-$precision
staged=$single-stages2
checkpoint() {
  if [[ -f $single/pio.json && -f $staged/pio.json ]]; then echo "both exports are there"; return 0; fi
  if [[ -f $ck/config.json ]]; then echo "reusing $ck"; return 0; fi
  # shellcheck disable=SC2086
  "$bin/pio-export" --model qwen3-4b-instruct-2507 --synthetic $(shape_flags) --checkpoint-only --checkpoint-out "$ck"
}
exports() {
  local context=() pid=
  # A reused one-graph export sets the context length, so that both graphs differ only by the cut.
  [[ -f $single/pio.json ]] && context=(--context-length "$(python3 -c \
    'import json,sys; print(json.load(open(sys.argv[1]))["dims"]["context_length"])' "$single/pio.json")")
  if [[ ! -f $single/pio.json ]]; then
    "$bin/pio-export" --checkpoint "$ck" --ep "$ep" --precision "$precision" --out "$single" --force &
    pid=$!
  fi
  local rc=0
  if [[ ! -f $staged/pio.json ]]; then
    "$bin/pio-export" --checkpoint "$ck" --ep "$ep" --precision "$precision" "${context[@]}" --stages 2 \
      --out "$staged" --force || rc=1
  fi
  if [[ -n $pid ]]; then wait "$pid" || rc=1; fi
  return $rc
}
export bin ep shm ck single staged precision tag LAYERS
export -f shape_flags checkpoint exports
step checkpoint 70 checkpoint
step exports 110 exports

# 3. Greedy equality over $tokens new tokens, the same prompt through both.
prompt=$(python3 -c 'print(",".join(str((i * 7919 + 13) % 150000) for i in range(48)))')
greedy() {
  "$bin/pio" run --graphs "$1" --ep "$ep" --prompt-ids "$prompt" --max-tokens "$tokens" --greedy --ignore-eos \
    --json > "$2"
}
export prompt tokens
export -f greedy
step greedy_single 60 greedy "$single" "$out/greedy-single.json"
step greedy_stages 60 greedy "$staged" "$out/greedy-stages.json"

# 4. The boundary's cost: both graphs in one pio bench (same device, same settings), then the staged
#    one's pipeline report is in the same bench.json.
graphs=()
for g in "$single" "$staged"; do [[ -f $g/pio.json ]] && graphs+=(--graphs "$g"); done
if (( ${#graphs[@]} > 0 )); then
  step bench 150 "$bin/pio" bench "${graphs[@]}" --ep "$ep" --cuda-graph "$cuda_graph" --batches "$batches" \
    --prompt-lens "$prompt_lens" --decode-prompt-len "$decode_prompt" --decode-tokens "$decode_tokens" --repeats 1 \
    --out "$out/bench.json"
fi

# 5. The summary.
python3 "$(dirname "${BASH_SOURCE[0]}")/stages_summary.py" one-gpu "$out" "$single" "$staged" \
  "$(( $(date +%s) - start ))" "$ep" | tee "$out/summary.txt"
echo "[stages-check] done in $(( $(date +%s) - start ))s; results in $out"
