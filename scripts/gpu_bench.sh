#!/usr/bin/env bash
# The GPU benchmark run behind the README's numbers, for a machine with an NVIDIA GPU, CUDA 13
# and ONNX Runtime 1.31.1's CUDA build (ORT_DYLIB_PATH set; see README "GPU").
#
#   scripts/gpu_bench.sh [smoke|full|switches|extras|moe]   (results and logs in $OUT, default bench-out/)
#
# smoke: a 2-layer model at Qwen3-4B width, to check every path starts.
# full:  Qwen3-4B-Instruct-2507 at its real shape with synthetic weights: bf16 and int4 on CUDA
#        (CUDA graphs off and on), TensorRT (a row saying why when its libraries are missing),
#        the transformers baseline; then the runtime switches on the same graphs: greedy tokens
#        from host logits, whole-prompt prefill, int4 through the generic MatMulNBits kernels.
# switches: at real width with 12 of the 36 layers, each graph switch on and off, the CPU row,
#        and accuracy against the fp32 CPU graph.
# extras: the later runs on Qwen3-4B: peak memory by prefill chunk, memory pattern and arena
#        shrinkage; tunable GEMMs and int4 block sizes; the int8 KV cache at 8,192 tokens; the
#        CUDA-graph replay check; `pio serve` with and without prefix caching (needs
#        PIO_TOKENIZER_DIR, a folder with Qwen3's tokenizer.json, for the chat template).
# moe:   Qwen3-Coder-30B-A3B at real shape in int4, and GLM-4.7 at real width cut to 3 and 4
#        layers (its 3 dense layers, then one MoE layer) to measure the cost of an MoE layer.
set -uo pipefail
mode=${1:-full}
case $mode in smoke | full | switches | extras | moe) ;; *) echo "usage: scripts/gpu_bench.sh [smoke|full|switches|extras|moe]" >&2; exit 2 ;; esac
bin=${PIO_BIN_DIR:-target/release}
out=${OUT:-bench-out}
mkdir -p "$out"
export RUST_LOG=${RUST_LOG:-info,ort=warn}
log() { echo "[$(date +%T)] $*" | tee -a "$out/steps.log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$out/gpu.csv" 2>&1
log "GPU: $(tail -n 1 "$out/gpu.csv")"

if [[ $mode == moe ]]; then
  # Checkpoints of these sizes do not fit the disk next to their graphs: they go to RAM.
  shm=${PIO_SHM:-/dev/shm/pio}
  mkdir -p "$shm"
  df -h "$shm" /  | tee -a "$out/steps.log"
  log "Qwen3-Coder-30B-A3B, real shape, int4 experts (QMoE)"
  "$bin/pio" bench --model qwen3-coder-30b --synthetic --checkpoint-out "$shm/coder" --ep cuda --precision int4 \
    --prompt-lens 128,2048 --batches 1,8 --decode-tokens 128 --repeats 3 \
    --out "$out/coder-int4.json" 2>&1 | tee "$out/coder-int4.log"
  rm -rf "$shm/coder" graphs/qwen3-coder-30b-synthetic-*
  for layers in 3 4; do
    log "GLM-4.7 at real width, $layers layers (3 dense + $((layers - 3)) MoE)"
    "$bin/pio" bench --model glm-4-7 --synthetic --layers "$layers" --checkpoint-out "$shm/glm-l$layers" --ep cuda \
      --precision int4,bf16 --prompt-lens 128,2048 --batches 1,8 --decode-tokens 64 --repeats 3 \
      --out "$out/glm-l$layers.json" 2>&1 | tee "$out/glm-l$layers.log"
    rm -rf "$shm/glm-l$layers" graphs/glm-4-7-synthetic-*
  done
  log "done"
  exit 0
fi

if [[ $mode == smoke ]]; then
  log "smoke: 2-layer model, bf16 + int4, cuda graph off/on, tensorrt row"
  "$bin/pio" bench --model qwen3-4b-instruct-2507 --synthetic --layers 2 --ep cuda,tensorrt \
    --precision bf16,int4 --prompt-lens 128,2048 --batches 1,8 --decode-tokens 32 --repeats 1 \
    --out "$out/smoke.json" 2>&1 | tee "$out/smoke.log"
  exit 0
fi

shm=${PIO_SHM:-/dev/shm/pio}
mkdir -p "$shm"
if [[ $mode == extras ]]; then
  ck=$shm/qwen3-4b-synthetic
  g=$shm/graphs
  "$bin/pio-export" --model qwen3-4b-instruct-2507 --synthetic --checkpoint-out "$ck" --ep cuda --precision bf16 \
    --out "$g/bf16" --force > "$out/export.log" 2>&1
  for b in 32 64 128; do
    "$bin/pio-export" --checkpoint "$ck" --ep cuda --precision int4 --int4-block-size $b --out "$g/int4-b$b" --force >> "$out/export.log" 2>&1
  done
  "$bin/pio-export" --checkpoint "$ck" --ep cuda --precision bf16 --kv-cache-int8 --out "$g/kv-int8" --force >> "$out/export.log" 2>&1
  log "peak memory: prefill chunk, memory pattern, arena shrinkage"
  mem="--graphs $g/bf16 --ep cuda --cuda-graph off --prompt-lens 2048,8192 --batches 1,32 --decode-tokens 64 --repeats 2"
  "$bin/pio" bench $mem --prefill-chunk 512,1024,2048 --out "$out/mem-default.json" > "$out/mem-default.log" 2>&1
  "$bin/pio" bench $mem --prefill-chunk 512,2048 --ep-option memory_pattern=0 --out "$out/mem-nopattern.json" > "$out/mem-nopattern.log" 2>&1
  "$bin/pio" bench $mem --prefill-chunk 512,2048 --ep-option shrink_arena=1 --out "$out/mem-shrink.json" > "$out/mem-shrink.log" 2>&1
  "$bin/pio" bench $mem --prefill-chunk 1024,2048 --ep-option shrink_arena=1 --ep-option memory_pattern=0 \
    --out "$out/mem-lean.json" > "$out/mem-lean.log" 2>&1
  log "tunable GEMMs (bf16) and int4 block sizes"
  "$bin/pio" bench --graphs "$g/bf16" --ep cuda --cuda-graph on --prompt-lens 128,2048 --batches 1,32 \
    --out "$out/tunable-baseline.json" > "$out/tunable-baseline.log" 2>&1
  "$bin/pio" bench --graphs "$g/bf16" --ep cuda --cuda-graph on --prompt-lens 128,2048 --batches 1,32 --ep-option tunable_op=1 \
    --out "$out/tunable-on.json" > "$out/tunable-on.log" 2>&1
  "$bin/pio" bench --graphs "$g/int4-b32" --graphs "$g/int4-b64" --graphs "$g/int4-b128" --ep cuda --cuda-graph both \
    --prompt-lens 128,2048 --batches 1,32 --out "$out/int4-blocks.json" > "$out/int4-blocks.log" 2>&1
  log "the int8 KV cache at 8,192 tokens, batches up to 64"
  "$bin/pio" bench --graphs "$g/bf16" --graphs "$g/kv-int8" --ep cuda --cuda-graph on --prompt-lens 8192 \
    --decode-prompt-len 8192 --batches 1,16,32,64 --decode-tokens 32 --repeats 1 --out "$out/kv-long.json" > "$out/kv-long.log" 2>&1
  rm -rf "$ck" "$g"
  log "CUDA-graph replay check and pio serve, 12 layers"
  tok=()
  [[ -n ${PIO_TOKENIZER_DIR:-} ]] && tok=(--tokenizer "$PIO_TOKENIZER_DIR")
  "$bin/pio" bench --model qwen3-4b-instruct-2507 --synthetic --layers 12 --checkpoint-out "$shm/l12" --graphs-dir "$g" \
    --ep cuda --precision bf16,int4 --cuda-graph both --prompt-lens 128,4096 --batches 1,32 --decode-tokens 64 \
    --out "$out/graph-check.json" > "$out/graph-check.log" 2>&1
  if [[ ${#tok[@]} -gt 0 ]]; then
    "$bin/pio-export" --model qwen3-4b-instruct-2507 --synthetic --layers 12 "${tok[@]}" --checkpoint-out "$shm/l12-tok" \
      --ep cuda --precision bf16 --out "$g/serve" --force >> "$out/export.log" 2>&1
    python3 scripts/serve_check.py "$bin/pio" "$g/serve" > "$out/serve-check.json"
  else
    log "skipped the pio serve check: set PIO_TOKENIZER_DIR"
  fi
  rm -rf "$shm/l12" "$shm/l12-tok" "$g"
  log "done"
  exit 0
fi
if [[ $mode == full ]]; then
  ck=$shm/qwen3-4b-synthetic
  g=$shm/graphs
  log "full model: bf16 + int4 on cuda (graphs off/on), tensorrt, transformers baseline"
  "$bin/pio" bench --model qwen3-4b-instruct-2507 --synthetic --checkpoint-out "$ck" --graphs-dir "$g" \
    --ep cuda,tensorrt --precision bf16,int4 \
    --prompt-lens 128,512,2048,8192 --batches 1,8,32 --decode-tokens 128 --repeats 3 \
    --hf-baseline "$ck" --out "$out/qwen3-4b.json" 2>&1 | tee "$out/qwen3-4b.log"
  bf16=$g/qwen3-4b-instruct-2507-synthetic-cuda-bf16-default
  int4=$g/qwen3-4b-instruct-2507-synthetic-cuda-int4-default
  log "greedy tokens from host logits instead of the graph's argmax"
  "$bin/pio" bench --graphs "$bf16" --ep cuda --cuda-graph both --argmax host --prompt-lens 128 --batches 1,32 \
    --decode-tokens 128 --out "$out/host-argmax.json" 2>&1 | tee "$out/host-argmax.log"
  log "whole-prompt against chunked prefill: memory, and the logits both ways"
  "$bin/pio" bench --graphs "$bf16" --ep cuda --cuda-graph off --prefill-chunk 0,2048 --check-chunked-prefill \
    --prompt-lens 128,8192 --batches 1 --decode-tokens 32 --out "$out/prefill-chunk.json" 2>&1 | tee "$out/prefill-chunk.log"
  log "int4 through the CUTLASS weight-only kernels (fpa_intb_gemm=1)"
  "$bin/pio" bench --graphs "$int4" --ep cuda --cuda-graph both --ep-option fpa_intb_gemm=1 \
    --prompt-lens 128,2048,8192 --batches 1,8,32 --decode-tokens 128 --out "$out/int4-cutlass.json" 2>&1 | tee "$out/int4-cutlass.log"
  rm -rf "$ck" "$g"
  log "done"
  exit 0
fi

# switches: 12 of the 36 layers at real width.
ck=$shm/qwen3-4b-synthetic-l12
log "12 layers at real width: switches on/off, accuracy vs fp32 CPU"
"$bin/pio-export" --model qwen3-4b-instruct-2507 --synthetic --layers 12 --checkpoint-out "$ck" \
  --out "$shm/l12-cpu-fp32-all-logits" --ep cpu --precision fp32 --all-logits --context-length 1024 --force \
  2>&1 | tee "$out/export-reference.log"
"$bin/pio" bench --model qwen3-4b-instruct-2507 --synthetic --layers 12 --checkpoint-out "$ck" --graphs-dir "$shm/graphs" \
  --ep cuda --precision bf16,int4 --switches \
  --prompt-lens 128,2048,8192 --batches 1,32 --decode-tokens 128 --repeats 3 \
  --accuracy-reference "$shm/l12-cpu-fp32-all-logits" --accuracy-tokens 256 \
  --out "$out/switches-l12.json" 2>&1 | tee "$out/switches-l12.log"
"$bin/pio" bench --graphs "$shm/l12-cpu-fp32-all-logits" --ep cpu --prompt-lens 128 --batches 1,8 \
  --decode-tokens 16 --repeats 1 --out "$out/cpu-l12.json" 2>&1 | tee "$out/cpu-l12.log"
log "done"
