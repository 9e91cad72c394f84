#!/usr/bin/env bash
# `pio serve` on a GPU: the serving figures of issue 10, from one `pio bench serve` run over a
# synthetic Qwen3-4B in bf16 (CUDA, CUDA graphs on unless CUDA_GRAPH=0):
#
#   1. offline reference: `pio bench`'s decode at batch 32 (128-token prompts, 256 new tokens),
#      in the same process, before the server starts;
#   2. 1, 8, 32 and 64 concurrent streams of 128-token prompts generating 256 tokens each:
#      at 32, the aggregate decode rate (every stream running) against the offline batch-32
#      rate (target >= 85%) and p99 inter-token latency against the batch-32 step (<= 2x);
#   3. a shared 2,048-token prefix: time to first token on a prefix hit against a cold prefix
#      (target <= 25%);
#   4. 31 streams decoding while a 4,096-token prompt is prefilled: their p99 inter-token
#      latency during the prefill against the decode step (target < 3x);
#   5. Poisson arrivals at 1, 2, 4, ..., 64 requests/s for 6 s each, prompts of 64 to 4,096
#      tokens, 128 new tokens: goodput (TTFT <= 2 s and mean ITL <= 100 ms), TTFT and ITL per rate.
#
#   scripts/serve_gpu_bench.sh          (results in $OUT, default serve-bench-out/)
#
# Needs the release binaries (cargo build --release: target/release/pio, pio-export; or
# PIO_BIN_DIR) and ONNX Runtime's CUDA build (ORT_DYLIB_PATH, or .cache/pio/ort-gpu from
# scripts/setup.sh --gpu; see README "GPU"). About 5 minutes on an H100 (the export about 1.5 of
# them; `pio bench serve --max-duration` bounds the load at 400 s).
#
# ENGINE_CHECK=auto (default) then runs scripts/engine_gpu_check.sh on the same export if at
# least 200 s of an 8-minute budget are left, bounded by what is left (1: always, unbounded;
# 0: never). Its summary comes back as engine-check.json.
#
# EP=cpu runs the same steps on the CPU on a tiny fp32 Qwen3 (1 layer, hidden 64) with small
# sizes: a dry run of this script, not a measurement. LAYERS=N cuts the model to N layers. The
# export goes to $PIO_SHM (default /dev/shm/pio) and is reused (scripts/synthetic_qwen3.sh).
#
# $OUT gets at most 6 files: serve-bench.json (the report: every section, and "checks" with the
# targets' ratios), serve-bench.log, export.log, gpu.csv, and with the engine check
# engine-check.json and engine-check.log.
set -euo pipefail
start=$SECONDS
bin=${PIO_BIN_DIR:-target/release}
out=${OUT:-serve-bench-out}
shm=${PIO_SHM:-/dev/shm/pio}
mkdir -p "$out" "$shm"
export RUST_LOG=${RUST_LOG:-info,ort=warn} NO_COLOR=1
log() { echo "[$(date +%T)] $*" | tee -a "$out/serve-bench.log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1 || true
ep=${EP:-cuda}
if [[ $ep == cpu ]]; then
  # Small sizes: the same sections, in seconds.
  sizes=(
    --max-seqs 8 --max-model-len 640 --concurrency 1,4 --prompt-len 16 --max-tokens 16 --offline-batch 4
    --prefix-len 256 --prefix-suffix 16 --prefix-requests 2 --long-prompt 512 --long-streams 3
    --long-stream-tokens 64 --rates 4,8 --sweep-duration 1 --sweep-prompt-lens 16..512 --sweep-max-tokens 8
  )
else
  # 64 slots of 4,352 tokens (a 4,096-token prompt and 256 new): 41 GB of KV in bf16.
  sizes=(
    --max-seqs 64 --max-model-len 4352 --concurrency 1,8,32,64 --prompt-len 128 --max-tokens 256
    --offline-batch 32 --prefix-len 2048 --prefix-suffix 64 --prefix-requests 5
    --long-prompt 4096 --long-streams 31 --long-stream-tokens 256
    --rates 1,2,4,8,16,32,64 --sweep-duration 6 --sweep-prompt-lens 64..4096 --sweep-max-tokens 128
  )
fi
# shellcheck source=scripts/synthetic_qwen3.sh
source "$(dirname "${BASH_SOURCE[0]}")/synthetic_qwen3.sh"
log "the synthetic Qwen3-4B for $ep (exported once into $shm)"
export_synthetic_qwen3 "$ep" qwen3-4b-graphs "$out/export.log"
g=$graphs

bench=("$bin/pio" bench serve --graphs "$g" --ep "$ep" "${sizes[@]}" --max-duration 400 --out "$out/serve-bench.json")
graphs_option=()
[[ ${CUDA_GRAPH:-1} == 1 && $ep == cuda ]] && graphs_option=(--ep-option cuda_graph=1)
log "pio bench serve on $ep (${graphs_option[*]:-no CUDA graphs})"
if ! "${bench[@]}" "${graphs_option[@]}" >> "$out/serve-bench.log" 2>&1; then
  if [[ ${#graphs_option[@]} -gt 0 ]]; then
    log "failed with CUDA graphs (see above); once more without them"
    "${bench[@]}" >> "$out/serve-bench.log" 2>&1
  else
    exit 1
  fi
fi
log "serve bench done after $((SECONDS - start)) s"

check=${ENGINE_CHECK:-auto}
left=$((480 - (SECONDS - start)))
if [[ $check == 1 || ($check == auto && $left -ge 200) ]]; then
  limit=()
  [[ $check == auto ]] && limit=(timeout $((left - 10)))
  log "the engine's GPU check on the same export (${limit[*]:-unbounded})"
  engine_out=$(mktemp -d)
  if "${limit[@]}" env OUT="$engine_out" EP="$ep" PIO_BIN_DIR="$bin" PIO_SHM="$shm" \
    bash "$(dirname "${BASH_SOURCE[0]}")/engine_gpu_check.sh" \
    > "$out/engine-check.log" 2>&1; then
    cp "$engine_out/engine-check.json" "$out/"
  else
    log "the engine check did not finish (see engine-check.log)"
  fi
  cat "$engine_out/steps.log" >> "$out/engine-check.log" 2>/dev/null || true
  rm -rf "$engine_out"
else
  log "engine check skipped (ENGINE_CHECK=$check, $left s of the budget left)"
fi
log "done after $((SECONDS - start)) s: $out/serve-bench.json"
python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["checks"], indent=2))' "$out/serve-bench.json" || true
