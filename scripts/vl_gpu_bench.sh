#!/usr/bin/env bash
# Qwen3-VL-2B on the GPU: the measurements of README "Qwen3-VL" (issue 11), for a machine with an NVIDIA GPU,
# CUDA 13, ONNX Runtime 1.31.1's CUDA build (ORT_DYLIB_PATH) and python3 with torch + transformers.
#
#   scripts/vl_gpu_bench.sh [full|cpu-smoke] [STAGES]   (results in $OUT, default bench-out/; checkpoints and
#                                                        graphs in $PIO_SHM, default /dev/shm/pio)
#
# STAGES (comma-separated, default all of them in this order): export, checks, vision, decode, baseline, summary,
# clean. Later stages reuse what earlier ones left in $PIO_SHM and $OUT, so a long run can be split over several
# calls on the same machine (`export,checks` then `vision,decode` then `baseline,summary,clean`).
#
# cpu-smoke runs every step on the CPU at a cut shape (fp32 for bf16, 1 repeat), to check the plumbing anywhere.
#
# Needs the release binaries `pio`, `pio-export` (in $PIO_BIN_DIR, default target/release) and the example
# `vl_bench` ($VL_BENCH, default $PIO_BIN_DIR/examples/vl_bench): `cargo build --release --bins --example vl_bench`.
#
# 1. qwen3-vl-2b at its real shape with synthetic weights, exported for CUDA in bf16 and int4; the same
#    weights' text decoder as a Qwen3ForCausalLM checkpoint, exported the same ways (the same-shape text model);
# 2. checks on the GPU: the multimodal and the text decoder agree on a text prompt (logits, greedy tokens, with
#    and without a CUDA graph), and the two test fixtures exported for the GPU against transformers;
# 3. vision encoder latency at 448x448, 1024x1024 and 1920x1080 (transformers' processor makes the patch rows);
# 4. time to first token with one 1024x1024 image and a 64-token question;
# 5. decode tokens/s of the multimodal decoder against the text decoder (`pio bench`, CUDA graphs off and on);
# 6. transformers bf16 eager with the same image and question (TTFT, decode);
# then summary.json with the ratios the issue asks for.
set -uo pipefail
mode=${1:-full}
case $mode in
  full) ep=cuda; precisions=(bf16 int4); hf_dtype=bf16; shape=(); repeats=(10 5 3) ;;
  cpu-smoke)
    ep=cpu; precisions=(fp32 int4); hf_dtype=fp32; repeats=(1 1 1)
    shape=(--layers 2 --hidden-size 128 --intermediate-size 256 --heads 4 --kv-heads 2 --head-dim 32 --vision-layers 2
      --vision-hidden-size 64 --vision-intermediate-size 128 --vision-heads 4) ;;
  *) echo "usage: scripts/vl_gpu_bench.sh [full|cpu-smoke]" >&2; exit 2 ;;
esac
stages=",${2:-export,checks,vision,decode,baseline,summary,clean},"
stage() { [[ $stages == *",$1,"* ]]; }
bin=${PIO_BIN_DIR:-target/release}
vl_bench=${VL_BENCH:-$bin/examples/vl_bench}
out=${OUT:-bench-out}
shm=${PIO_SHM:-/dev/shm/pio}
mkdir -p "$out" "$shm"
export RUST_LOG=${RUST_LOG:-info,ort=warn}
log() { echo "[$(date +%T)] $*" | tee -a "$out/steps.log"; }
run() { # run NAME CMD...: the command's output in $out/NAME.log; a failure is logged and the run goes on
  local name=$1
  shift
  if ! "$@" > "$out/$name.log" 2>&1; then
    log "FAILED: $name (see $name.log)"
    return 1
  fi
}

if [[ $ep == cuda ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$out/gpu.csv" 2>&1
  log "GPU: $(tail -n 1 "$out/gpu.csv")"
fi
python3 -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}')" \
  | tee -a "$out/steps.log"

ck=$shm/qwen3-vl-2b-synthetic
text_ck=$shm/qwen3-vl-2b-text
g=$shm/vl-graphs
if stage export; then
log "export: qwen3-vl-2b synthetic ${shape[*]:-(real shape)} and its text decoder as Qwen3: ${precisions[*]} for $ep"
run synthetic-checkpoint "$bin/pio-export" --model qwen3-vl-2b --synthetic "${shape[@]}" --checkpoint-out "$ck" \
  --checkpoint-only
run text-checkpoint python3 scripts/vl_bench_inputs.py text-checkpoint --checkpoint "$ck" --out "$text_ck"
for p in "${precisions[@]}"; do
  run export-vl-$p "$bin/pio-export" --checkpoint "$ck" --ep $ep --precision $p --out "$g/vl-$p" --force
  run export-text-$p "$bin/pio-export" --checkpoint "$text_ck" --ep $ep --precision $p --out "$g/text-$p" --force
done
run patches python3 scripts/vl_bench_inputs.py patches --checkpoint "$ck" --sizes 448x448,1024x1024,1920x1080 \
  --out "$out/patches.safetensors"
fi


if stage checks; then
log "checks: multimodal vs text decoder on a text prompt; the fixtures against transformers"
for p in "${precisions[@]}"; do
  run compare-$p "$vl_bench" --ep $ep compare --vl "$g/vl-$p" --text "$g/text-$p" --prompt-len 128 --tokens 32 \
    --out "$out/compare-$p.json"
done
for f in qwen3vl-a qwen3vl-b; do
  fixture_precisions=(bf16 fp16)
  [[ $ep == cpu ]] && fixture_precisions=(fp32)
  for p in "${fixture_precisions[@]}"; do
    run export-$f-$p "$bin/pio-export" --checkpoint "tests/fixtures/$f" --ep $ep --precision $p \
      --context-length 512 --out "$g/$f-$p" --force
    run fixture-$f-$p "$vl_bench" --ep $ep fixture --graphs "$g/$f-$p" --fixture "tests/fixtures/$f" --out "$out/fixture-$f-$p.json"
  done
done

fi

if stage vision; then
log "vision encoder latency and time to first token (1024x1024 image + 64-token question)"
for p in "${precisions[@]}"; do
  run vision-$p "$vl_bench" --ep $ep vision --graphs "$g/vl-$p" --inputs "$out/patches.safetensors" \
    --repeats "${repeats[0]}" --out "$out/vision-$p.json"
  run ttft-$p "$vl_bench" --ep $ep ttft --graphs "$g/vl-$p" --inputs "$out/patches.safetensors" --image 1024x1024 \
    --question-tokens 64 --repeats "${repeats[1]}" --out "$out/ttft-$p.json"
done

fi

if stage decode; then
log "decode: multimodal decoder vs the same-shape text decoder (pio bench, CUDA graphs off and on)"
graph_modes=both
[[ $ep == cpu ]] && graph_modes=off
for p in "${precisions[@]}"; do
  run decode-$p "$bin/pio" bench --graphs "$g/vl-$p" --graphs "$g/text-$p" --ep $ep --cuda-graph $graph_modes \
    --prompt-lens 128,1088 --batches 1,8 --decode-tokens 128 --repeats "${repeats[2]}" --out "$out/decode-$p.json"
done

fi

if stage baseline; then
log "transformers $hf_dtype eager: same image and question"
run hf-$hf_dtype python3 scripts/hf_vl_baseline.py --checkpoint "$ck" --inputs "$out/patches.safetensors" \
  --image 1024x1024 --question-tokens 64 --new-tokens 128 --dtype $hf_dtype --attn eager \
  --device $([[ $ep == cuda ]] && echo cuda || echo cpu) --repeats "${repeats[2]}" --out "$out/hf.json"

fi

if stage summary; then
log "summary"
python3 - "$out" <<'EOF' | tee -a "$out/steps.log"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None
summary = {}
hf = load("hf.json")
for p in ["bf16", "fp32", "int4"]:
    s = {}
    if (v := load(f"vision-{p}.json")):
        s["vision_ms"] = {r["image"]: r["median_ms"] for r in v["report"]["vision"]}
    if (t := load(f"ttft-{p}.json")):
        s["ttft_ms"] = t["report"]["ttft_ms"]
        if hf:
            s["ttft_speedup_vs_transformers"] = hf["ttft_ms"] / t["report"]["ttft_ms"]
    if (d := load(f"decode-{p}.json")):
        # runs: one per graph folder and CUDA-graph mode; decode tokens/s per batch.
        tok = {}
        for run in d["runs"]:
            kind = "multimodal" if Path(run["graphs"]).name.startswith("vl-") else "text"
            for row in run.get("decode") or []:
                tok[(kind, run["cuda_graph"], row["batch"])] = row["tokens_per_s"]
        decode = {}
        for (kind, graph, batch), v in sorted(tok.items()):
            if kind != "multimodal" or ("text", graph, batch) not in tok:
                continue
            text = tok[("text", graph, batch)]
            decode[f"batch{batch}_cuda_graph_{graph}"] = {
                "multimodal_tokens_per_s": v, "text_tokens_per_s": text,
                "multimodal_over_text": v / text, "within_5_percent": v >= 0.95 * text,
            }
            if hf and batch == 1:
                decode[f"batch{batch}_cuda_graph_{graph}"]["speedup_vs_transformers"] = v / hf["tokens_per_s"]
        s["decode"] = decode
    if (c := load(f"compare-{p}.json")):
        s["multimodal_vs_text_agreement"] = {
            mode: {k: v for k, v in r.items() if not k.endswith("_tokens")} for mode, r in c["report"]["compare"].items()
        }
    if s:
        summary[p] = s
if hf:
    summary["transformers_eager"] = {k: hf[k] for k in ["ttft_ms", "tokens_per_s", "dtype", "transformers", "torch"]}
summary["fixtures"] = {f.stem: json.loads(f.read_text())["report"]["cases"] for f in sorted(out.glob("fixture-*.json"))}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2)[:4000])
EOF
fi

if stage clean; then
  rm -rf "$ck" "$text_ck" "$g"
fi
log "done: $stages"
