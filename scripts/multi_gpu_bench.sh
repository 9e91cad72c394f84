#!/usr/bin/env bash
# Pipeline stages over several GPUs of one host (issue 14, "On a multi-GPU host"), in two parts,
# each within a 10-minute call (the work folder is reused between them on the same host):
#
#   glm    GLM-4.7 int4 at its real shape, all 92 layers (the MTP layer skipped), written straight to
#          int4 (pio-export --synthetic --direct-int4: no 700 GB bf16 checkpoint; parallel stage
#          writers), one stage per GPU (--stages N, --devices 0..N-1): batch-1 decode tok/s, time to
#          first token at 2,048 tokens, batch 8 and 32 throughput (pio bench, CUDA graphs on), the
#          pipeline report (each stage's busy time, the bubble), and each GPU's peak memory
#          (nvidia-smi, sampled every 0.5 s), next to the per-layer extrapolation of the one-GPU run
#          (about 63 tok/s at batch 1, README "Measured on an H100").
#   coder  Qwen3-Coder-30B-A3B bf16 (61 GB) as one graph on GPU 0, and in 2 stages on GPU 0 and on
#          GPUs 0,1: greedy tokens (pio run, 64 new tokens) must be the same, and pio bench at batch
#          1 and 8 gives the overhead of the split (the issue's target: at most 5%).
#   all    both (more than 10 minutes: split it in calls where calls are limited).
#
#   OUT=/path/to/results PIO_BIN_DIR=.gpu bash scripts/multi_gpu_bench.sh glm
#   OUT=/path/to/results PIO_BIN_DIR=.gpu bash scripts/multi_gpu_bench.sh coder
#
# Needs the release binaries `pio` and `pio-export` ($PIO_BIN_DIR, default target/release), ONNX
# Runtime's CUDA build (ORT_DYLIB_PATH, see README "GPU"), python3 (stdlib) and at least 2 GPUs.
# Room: GLM-4.7's int4 graphs are about 190 GB on the host (and as much GPU memory in all: 4 x H100
# or 2 x H200 at least); the Qwen3-Coder part holds its 61 GB checkpoint and one 61 GB export at a
# time (the one-graph export is removed before the staged one is written). PIO_MULTI_WORK (default
# /dev/shm/pio-multi) is the work folder, kept for the next run (exports there are reused);
# PIO_MULTI_CLEAN=1 removes the Qwen3-Coder checkpoint once both its exports are written.
# GPUS=0,1,.. picks the GPUs (default: all that nvidia-smi lists).
#
# Cut sizes for a dry run (not a measurement): GLM_LAYERS=N keeps N of GLM-4.7's layers (the first 3
# are dense), CODER_LAYERS=N of Qwen3-Coder's 48; EP=cpu runs both parts on the CPU on tiny shapes
# (fp32 for Qwen3-Coder; int4 weights with fp32 activations for GLM-4.7; the "devices" are all the
# CPU, no --devices, no CUDA graphs).
#
# Writes $OUT/<part>-summary.json, the bench reports, pio run's outputs, $OUT/steps.jsonl and a
# log per step.
set -uo pipefail
part=${1:-all}
case $part in glm | coder | all) ;; *) echo "usage: $0 glm|coder|all" >&2; exit 2 ;; esac
bin=${PIO_BIN_DIR:-target/release}
out=${OUT:-multi-gpu-out}
work=${PIO_MULTI_WORK:-/dev/shm/pio-multi}
ep=${EP:-cuda}
mkdir -p "$out" "$work"
out=$(cd "$out" && pwd)
export RUST_LOG=${RUST_LOG:-info,ort=warn} NO_COLOR=1
start=$(date +%s)
touch "$out/steps.jsonl"

step_tag=multi-gpu
# shellcheck source=scripts/gpu_steps.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu_steps.sh"

if [[ $ep == cpu ]]; then
  gpus=(cpu cpu)
  device_flags=()
  cuda_graph=off
else
  if [[ -n ${GPUS:-} ]]; then
    IFS=, read -r -a gpus <<< "$GPUS"
  else
    mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null)
  fi
  if (( ${#gpus[@]} < 2 )); then
    echo "[multi-gpu] needs at least 2 GPUs (found ${#gpus[@]}); EP=cpu runs a dry run" >&2
    exit 1
  fi
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$out/gpus.csv" 2>&1 || true
  cuda_graph=on
fi
echo "[multi-gpu] part=$part ep=$ep gpus=${gpus[*]} work=$work out=$out"
df -h "$work" > "$out/work-df.txt" 2>&1 || true

# Each GPU's used memory every 0.5 s into $1 while the command after it runs.
with_memory_log() {
  local log=$1; shift
  local sampler=
  if [[ $ep != cpu ]]; then
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$log" 2>/dev/null &
    sampler=$!
  fi
  "$@"
  local rc=$?
  [[ -n $sampler ]] && kill "$sampler" 2>/dev/null
  return $rc
}

greedy_tokens() {  # GRAPHS OUT_JSON [pio run flags...]
  local graphs=$1 json=$2; shift 2
  local prompt
  local vocab=150000
  [[ $ep == cpu ]] && vocab=4096  # the dry run's shapes
  prompt=$(python3 -c 'import sys; print(",".join(str((i * 7919 + 13) % int(sys.argv[1])) for i in range(64)))' "$vocab")
  "$bin/pio" run --graphs "$graphs" --ep "$ep" --prompt-ids "$prompt" --max-tokens "${TOKENS:-64}" --greedy \
    --ignore-eos --json "$@" > "$json"
}
export bin ep out work
export -f with_memory_log greedy_tokens

glm_part() {
  local n=${#gpus[@]} layers=() shape_tag=full timev=()
  [[ -n ${GLM_LAYERS:-} ]] && { layers=(--layers "$GLM_LAYERS"); shape_tag=l$GLM_LAYERS; }
  if [[ $ep == cpu ]]; then
    layers=(--layers "${GLM_LAYERS:-5}" --hidden-size 128 --intermediate-size 256 --heads 4 --kv-heads 2 \
      --head-dim 32 --experts 8 --moe-intermediate-size 64 --vocab-size 4096)
    shape_tag=cpu-dry-run
  fi
  local graphs=$work/glm-4-7-int4-$shape_tag-stages$n ck=$work/glm-4-7-direct-int4-$shape_tag
  local devices
  devices=$(IFS=,; echo "${gpus[*]}")
  [[ $ep == cpu ]] || device_flags=(--devices "$devices")
  if [[ ! -f $graphs/pio.json ]]; then
    # The checkpoint holds only what stays 16-bit (embeddings, lm_head, norms, routers); the
    # projections and experts are drawn as int4 codes by every stage's writer at once.
    [[ -x /usr/bin/time ]] && timev=(/usr/bin/time -v)  # the export's peak memory and wall time, in its log
    "${timev[@]}" "$bin/pio-export" --model glm-4-7 --synthetic --direct-int4 "${layers[@]}" --checkpoint-out "$ck" \
      --ep "$ep" --precision int4 --context-length 4096 --stages "$n" --out "$graphs" --force \
      > "$out/glm-export.log" 2>&1 || { echo "glm export failed: $out/glm-export.log"; return 1; }
  fi
  du -sb "$graphs" > "$out/glm-graphs-bytes.txt"
  local prompt_lens=2048 batches=1,8,32 decode_tokens=32
  [[ $ep == cpu ]] && { prompt_lens=64; batches=1,4; decode_tokens=4; }
  with_memory_log "$out/glm-memory.csv" "$bin/pio" bench --graphs "$graphs" --ep "$ep" "${device_flags[@]}" \
    --cuda-graph "$cuda_graph" --batches "$batches" --prompt-lens "$prompt_lens" --decode-prompt-len 128 \
    --decode-tokens "$decode_tokens" --repeats 1 --out "$out/glm-bench.json"
}

coder_part() {
  local layers=() shape_tag=full precision=bf16
  [[ -n ${CODER_LAYERS:-} ]] && { layers=(--layers "$CODER_LAYERS"); shape_tag=l$CODER_LAYERS; }
  if [[ $ep == cpu ]]; then
    layers=(--layers "${CODER_LAYERS:-4}" --hidden-size 128 --intermediate-size 256 --heads 4 --kv-heads 2 \
      --head-dim 32 --experts 8 --moe-intermediate-size 64 --vocab-size 4096)
    shape_tag=cpu-dry-run precision=fp32
  fi
  local ck=$work/qwen3-coder-30b-$shape_tag single=$work/qwen3-coder-30b-$shape_tag-$precision
  local staged=$work/qwen3-coder-30b-$shape_tag-$precision-stages2
  local two=()
  [[ $ep == cpu ]] || two=(--devices "${gpus[0]},${gpus[1]}")
  local bench=(--ep "$ep" --cuda-graph "$cuda_graph" --batches 1,8 --prompt-lens 2048 --decode-prompt-len 128
    --decode-tokens 64 --repeats 1)
  [[ $ep == cpu ]] && bench=(--ep cpu --cuda-graph off --batches 1,4 --prompt-lens 64 --decode-prompt-len 16
    --decode-tokens 8 --repeats 1)
  checkpoint() {
    [[ -f $ck/config.json ]] || "$bin/pio-export" --model qwen3-coder-30b --synthetic "${layers[@]}" --checkpoint-only \
      --checkpoint-out "$ck" > "$out/coder-checkpoint.log" 2>&1 || { echo "coder checkpoint failed"; return 1; }
  }
  # One graph on GPU 0 (unless this $OUT has its results), removed before the staged export: room for
  # one 61 GB export at a time.
  if [[ ! -f $out/coder-greedy-single.json || ! -f $out/coder-bench-single.json ]]; then
    checkpoint || return 1
    "$bin/pio-export" --checkpoint "$ck" --ep "$ep" --precision "$precision" --context-length 4096 --out "$single" \
      --force > "$out/coder-export-single.log" 2>&1 || { echo "coder export failed"; return 1; }
    greedy_tokens "$single" "$out/coder-greedy-single.json" || return 1
    with_memory_log "$out/coder-memory-single.csv" "$bin/pio" bench --graphs "$single" "${bench[@]}" \
      --out "$out/coder-bench-single.json" > "$out/coder-bench-single.log" 2>&1 || return 1
    rm -rf "$single"
  fi
  if [[ ! -f $staged/pio.json ]]; then
    checkpoint || return 1
    "$bin/pio-export" --checkpoint "$ck" --ep "$ep" --precision "$precision" --context-length 4096 --stages 2 \
      --out "$staged" --force > "$out/coder-export-stages.log" 2>&1 || { echo "coder staged export failed"; return 1; }
  fi
  [[ ${PIO_MULTI_CLEAN:-0} == 1 ]] && rm -rf "$ck"
  # 2 stages on one GPU, then on two.
  greedy_tokens "$staged" "$out/coder-greedy-stages-1gpu.json" || return 1
  with_memory_log "$out/coder-memory-stages-1gpu.csv" "$bin/pio" bench --graphs "$staged" "${bench[@]}" \
    --out "$out/coder-bench-stages-1gpu.json" > "$out/coder-bench-stages-1gpu.log" 2>&1 || return 1
  greedy_tokens "$staged" "$out/coder-greedy-stages-2gpu.json" "${two[@]}" || return 1
  with_memory_log "$out/coder-memory-stages-2gpu.csv" "$bin/pio" bench --graphs "$staged" "${bench[@]}" "${two[@]}" \
    --out "$out/coder-bench-stages-2gpu.json" > "$out/coder-bench-stages-2gpu.log" 2>&1
}
export -f glm_part coder_part
export GLM_LAYERS CODER_LAYERS TOKENS
export cuda_graph
# Arrays do not cross `bash -c`: the parts read the GPU list from this string.
gpu_list=$(IFS=,; echo "${gpus[*]}")
export gpu_list
run_part() { IFS=, read -r -a gpus <<< "$gpu_list"; device_flags=(); "$1"; }
export -f run_part

status=0
if [[ $part == glm || $part == all ]]; then
  run_step glm 580 run_part glm_part || status=1
fi
if [[ $part == coder || $part == all ]]; then
  run_step coder 580 run_part coder_part || status=1
fi

python3 "$(dirname "${BASH_SOURCE[0]}")/stages_summary.py" multi "$out" "$part" "$ep" | tee -a "$out/summary.txt"
echo "[multi-gpu] done in $(( $(date +%s) - start ))s; results in $out"
exit $status
