#!/usr/bin/env bash
# The GPU check of Inference-PIO's kernels (issue 12), everything in one go, about 7-8 minutes on
# one H100/H200. Run it on the GPU host from the repository root:
#
#   source .gpu/ort-env.sh            # ONNX Runtime's GPU build (ORT_DYLIB_PATH, LD_LIBRARY_PATH)
#   OUT=/path/to/results bash scripts/kernels_gpu_check.sh
#
# Binaries: pio, pio-export, pio-kernels-check from .gpu/ (else target/release/). Exported graphs go
# to PIO_CHECK_WORK (default /dev/shm/pio-kernels-check, about 25 GB at most; removed at the end
# unless PIO_CHECK_KEEP=1). Needs python3
# (stdlib; torch only for the cross-check of the bandwidth) and libnvrtc (/usr/local/cuda/lib64,
# or PIO_NVRTC_PATH). Every step writes under $OUT (JSON + a log each); a step that fails or runs
# out of time is logged in $OUT/steps.jsonl and the next one runs. $OUT/summary.json and the
# printed summary put it together.
#
# Steps, in this order (budget: PIO_CHECK_BUDGET seconds in all, default 480; PIO_CHECK_SKIP=ops,moe_model,...
# skips steps by name; PIO_CHECK_KEEP_CHECKPOINT=1 keeps the synthetic Qwen3-4B checkpoint in the work folder):
#   1. device + read bandwidth: torch (a large read), and the kernels' own read kernel (probe);
#   2. probe: int4 dequantization bit for bit; every preset projection through the tile kernels
#      directly (M = 1, 8, 32; warps per CTA swept), checked against the CPU reference;
#   3. a synthetic Qwen3-4B exported four ways (bf16 / int4, stock / --pio-kernels), pio bench at
#      batch 1/8/32 with CUDA graphs (its CUDA-graph check replays the pio kernels too);
#   4. greedy equality over 64 tokens, stock against --pio-kernels, bf16 and int4 (plus the
#      teacher-forced logits);
#   5. ops: every operator against ONNX Runtime's counterpart inside ONNX Runtime with CUDA graphs
#      (MatMulNBits, MatMul/cuBLAS, the 5-node SwiGLU, QMoE): max relative error, us/op, TB/s;
#   6. if time is left: Qwen3-Coder-30B-A3B cut to 4 layers, int4, QMoE against MoEInt4 at batch 1.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/kernels-check-out}"
mkdir -p "$OUT"
BUDGET="${PIO_CHECK_BUDGET:-480}"
START=$(date +%s)
WORK="${PIO_CHECK_WORK:-/dev/shm/pio-kernels-check}"
if ! mkdir -p "$WORK" 2>/dev/null; then WORK="$OUT/work"; mkdir -p "$WORK"; fi
export PIO_KERNEL_CACHE="${PIO_KERNEL_CACHE:-$OUT/kernel-cache}"
export RUST_LOG="${RUST_LOG:-info}"
PY="${PIO_PYTHON:-python3}"

bin() {
  for d in "$ROOT/.gpu" "$ROOT/target/release"; do
    if [ -x "$d/$1" ]; then echo "$d/$1"; return 0; fi
  done
  echo "missing-$1"
}
PIO="$(bin pio)"; EXPORT="$(bin pio-export)"; CHECK="$(bin pio-kernels-check)"
echo "[kernels-check] out=$OUT work=$WORK budget=${BUDGET}s"
echo "[kernels-check] pio=$PIO pio-export=$EXPORT pio-kernels-check=$CHECK"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME MAX_SECONDS CMD...: runs CMD with a timeout of min(MAX_SECONDS, time left), logs it.
step() {
  local name=$1 max=$2; shift 2
  if [[ ",${PIO_CHECK_SKIP:-}," == *",$name,"* ]]; then
    echo "{\"step\":\"$name\",\"skipped\":\"PIO_CHECK_SKIP\"}" >>"$OUT/steps.jsonl"
    echo "[kernels-check] $name: skipped (PIO_CHECK_SKIP)"
    return 0
  fi
  local remaining; remaining=$(left)
  local t=$(( max < remaining ? max : remaining ))
  if [ "$t" -lt 5 ]; then
    echo "{\"step\":\"$name\",\"skipped\":\"out of time\"}" >>"$OUT/steps.jsonl"
    echo "[kernels-check] $name: skipped (out of time)"
    return 0
  fi
  echo "[kernels-check] $name (up to ${t}s) ..."
  local s; s=$(date +%s)
  # bash -c so that shell functions (exported below) run under the timeout too.
  timeout --kill-after=10 "$t" bash -c '"$@"' _ "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"step\":\"$name\",\"rc\":$rc,\"seconds\":$(( $(date +%s) - s )),\"timeout\":$t}" >>"$OUT/steps.jsonl"
  echo "[kernels-check] $name: rc=$rc in $(( $(date +%s) - s ))s"
  [ $rc -eq 0 ] || tail -5 "$OUT/$name.log" | sed 's/^/    /'
  return 0
}

: >"$OUT/steps.jsonl"
command -v nvidia-smi >/dev/null && nvidia-smi -q >"$OUT/nvidia-smi.txt" 2>&1

# 1. The device's read bandwidth with torch (cross-check of the probe's own kernel).
torch_bandwidth() {
  "$PY" - "$OUT/torch_bandwidth.json" <<'EOF'
import json, sys, torch
x = torch.empty(2 << 30, dtype=torch.float32, device="cuda").fill_(1.0)  # 8 GiB
torch.cuda.synchronize()
times = []
for _ in range(6):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); s = x.sum(); b.record(); torch.cuda.synchronize()
    times.append(a.elapsed_time(b))
times = sorted(times[1:])
nbytes = x.numel() * 4
json.dump({"device": torch.cuda.get_device_name(0), "bytes": nbytes, "best_ms": times[0],
           "best_tb_per_s": nbytes / (times[0] * 1e-3) / 1e12, "median_tb_per_s": nbytes / (times[len(times) // 2] * 1e-3) / 1e12,
           "torch": torch.__version__}, open(sys.argv[1], "w"), indent=2)
print(open(sys.argv[1]).read())
EOF
}
export -f torch_bandwidth
export OUT WORK PY EXPORT
step torch_bandwidth 40 torch_bandwidth

# 2. Probe: bandwidth, exact dequantization, the tile kernels on every projection shape.
step probe 110 "$CHECK" probe --out "$OUT/probe.json" --tokens 1,8,32

# 3. Qwen3-4B, four graphs, pio bench.
CK="$WORK/qwen3-4b-ck"
step checkpoint 60 "$EXPORT" --model qwen3-4b-instruct-2507 --synthetic --checkpoint-only --checkpoint-out "$CK"
export_pair() {  # precision: the stock and the --pio-kernels graph, side by side
  local p=$1
  "$EXPORT" --checkpoint "$CK" --ep cuda --precision "$p" --context-length 8192 --force --out "$WORK/q4b-$p-stock" &
  local a=$!
  "$EXPORT" --checkpoint "$CK" --ep cuda --precision "$p" --context-length 8192 --force --pio-kernels \
    --out "$WORK/q4b-$p-pio"
  local rb=$?
  wait $a; local ra=$?
  return $(( ra | rb ))
}
export CK
export -f export_pair
step export_bf16 80 export_pair bf16
step export_int4 80 export_pair int4
# The graphs are all that is needed from here on (keeps /dev/shm small), unless the caller keeps the
# checkpoint for another tool (PIO_CHECK_KEEP_CHECKPOINT=1: e.g. scripts/genai_baseline.py next).
[ "${PIO_CHECK_KEEP_CHECKPOINT:-0}" = 1 ] || rm -rf "$CK"
GRAPHS=()
for g in q4b-bf16-stock q4b-bf16-pio q4b-int4-stock q4b-int4-pio; do
  [ -f "$WORK/$g/pio.json" ] && GRAPHS+=(--graphs "$WORK/$g")
done
if [ ${#GRAPHS[@]} -gt 0 ]; then
  step bench 110 "$PIO" bench "${GRAPHS[@]}" --ep cuda --cuda-graph on --batches 1,8,32 --prompt-lens 128 \
    --decode-prompt-len 128 --decode-tokens 128 --repeats 1 --out "$OUT/bench.json"
fi

# 4. Greedy equality, stock against --pio-kernels.
for p in bf16 int4; do
  if [ -f "$WORK/q4b-$p-stock/pio.json" ] && [ -f "$WORK/q4b-$p-pio/pio.json" ]; then
    step "greedy_$p" 60 "$CHECK" greedy --stock "$WORK/q4b-$p-stock" --pio "$WORK/q4b-$p-pio" --tokens 64 \
      --out "$OUT/greedy-$p.json"
  fi
done

# 5. Each operator against ONNX Runtime's counterpart (last of the main steps: it saves after every
#    case, so a cut-short run keeps Qwen3-4B's cases, which come first).
step ops 200 "$CHECK" ops --out "$OUT/ops.json" --tokens 1,8,32 --other-tokens 1

# 6. MoE at the model level, if time is left: Qwen3-Coder-30B-A3B, 4 of 48 layers, int4.
if [ "$(left)" -gt 90 ] && [[ ",${PIO_CHECK_SKIP:-}," != *",moe_model,"* ]]; then
  MCK="$WORK/coder-ck"
  step moe_checkpoint 40 "$EXPORT" --model qwen3-coder-30b --synthetic --layers 4 --checkpoint-only --checkpoint-out "$MCK"
  moe_exports() {
    "$EXPORT" --checkpoint "$MCK" --ep cuda --precision int4 --context-length 4096 --force --out "$WORK/coder-int4-stock" &
    local a=$!
    "$EXPORT" --checkpoint "$MCK" --ep cuda --precision int4 --context-length 4096 --force --pio-kernels \
      --out "$WORK/coder-int4-pio"
    local rb=$?
    wait $a; return $(( $? | rb ))
  }
  export MCK
  export -f moe_exports
  step moe_export 40 moe_exports
  rm -rf "$MCK"
  step moe_bench 60 "$PIO" bench --graphs "$WORK/coder-int4-stock" --graphs "$WORK/coder-int4-pio" --ep cuda \
    --cuda-graph on --batches 1,8 --prompt-lens 128 --decode-prompt-len 128 --decode-tokens 64 --repeats 1 \
    --out "$OUT/moe-bench.json"
else
  echo "{\"step\":\"moe_model\",\"skipped\":\"out of time\"}" >>"$OUT/steps.jsonl"
fi

# The summary (stdlib python).
"$PY" "$ROOT/scripts/kernels_gpu_summary.py" "$OUT" "$WORK" | tee "$OUT/summary.txt"
if [ "${PIO_CHECK_KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi  # PIO_CHECK_KEEP=1 keeps the exported graphs
echo "[kernels-check] done in $(( $(date +%s) - START ))s; results in $OUT"
