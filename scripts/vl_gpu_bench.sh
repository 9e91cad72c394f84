#!/usr/bin/env bash
# Qwen3-VL-2B on the GPU through the runtime's own path (README "Qwen3-VL", issue 11): a synthetic checkpoint at the
# real shape, its graphs, and the same weights' text decoder as a Qwen3 checkpoint.
#
#   scripts/vl_gpu_bench.sh [full|cpu-smoke] [STAGES]   (results in $OUT, default bench-out/vl; checkpoints, graphs
#                                                        and logs in $PIO_SHM, default /dev/shm/pio-vl)
#
# Measured (bf16; PRECISIONS="bf16 int4" adds int4; VL_EXPORT_FLAGS adds export flags to both graphs, e.g.
# "--pio-kernels"):
#   1. vl_bench (examples/vl_bench.rs) on the engine, image FILES in chat messages as `pio run --image` and a server
#      take them: per image (448x448, 1024x1024, 1920x1080 JPEGs) reading and decoding, the image processor and the
#      vision encoder; the time to first token with the 1024x1024 image and a 64-token question, and decode
#      tokens/s after it (CUDA graphs on);
#   2. `pio bench` on the multimodal decoder and on the text-only Qwen3 export of the same weights: decode tokens/s
#      at batch 1 and 8, CUDA graphs on (the target: multimodal within 5% of text);
#   3. transformers bf16 eager (scripts/hf_vl_baseline.py) with the same image file and question through its own
#      processor and chat template: time to first token and decode tokens/s (the targets: ours >= 3x and >= 5x).
# Results: $OUT/vl-bench-<precision>.json (1), $OUT/decode-<precision>.json (2), $OUT/summary.json (everything, the
# transformers run included, and the ratios); $OUT/steps.log (what ran; a failed step's log tail).
#
# STAGES (comma-separated, default export,engine,decode,baseline,summary,clean): later stages reuse what earlier
# ones left in $PIO_SHM, so a run can be split over calls on the same machine.
#
# Needs: the release binaries `pio`, `pio-export` and the example `vl_bench` ($PIO_BIN_DIR, default target/release:
# `cargo build --release --bin pio --bin pio-export --example vl_bench`), the Qwen3 tokenizer in .cache/pio/tokenizers
# (scripts/setup.sh; pio-export copies it into the synthetic checkpoint), ONNX Runtime 1.31.1's CUDA build
# (ORT_DYLIB_PATH) and python3 with torch, transformers and pillow. cpu-smoke runs every step on the CPU at a cut
# shape (fp32, 1 repeat): a check of the plumbing, not a measurement.
set -uo pipefail
mode=${1:-full}
case $mode in
  full) ep=cuda; precisions=(${PRECISIONS:-bf16}); hf_dtype=bf16; shape=(); repeats=5; ep_opts=(--ep-option cuda_graph=1) ;;
  cpu-smoke)
    ep=cpu; precisions=(fp32); hf_dtype=fp32; repeats=1; ep_opts=()
    shape=(--layers 2 --hidden-size 128 --intermediate-size 256 --heads 4 --kv-heads 2 --head-dim 32 --vision-layers 2
      --vision-hidden-size 64 --vision-intermediate-size 128 --vision-heads 4) ;;
  *) echo "usage: scripts/vl_gpu_bench.sh [full|cpu-smoke] [STAGES]" >&2; exit 2 ;;
esac
stages=",${2:-export,engine,decode,baseline,summary,clean},"
stage() { [[ $stages == *",$1,"* ]]; }
bin=${PIO_BIN_DIR:-target/release}
vl_bench=${VL_BENCH:-$bin/examples/vl_bench}
out=${OUT:-bench-out/vl}
shm=${PIO_SHM:-/dev/shm/pio-vl}
mkdir -p "$out" "$shm/logs"
export RUST_LOG=${RUST_LOG:-info,ort=warn} NO_COLOR=1
log() { echo "[$(date +%T)] $*" | tee -a "$out/steps.log"; }
run() { # run NAME CMD...: output in $shm/logs/NAME.log; a failure is logged with the log's tail, and the run goes on
  local name=$1
  shift
  if ! "$@" > "$shm/logs/$name.log" 2>&1; then
    log "FAILED: $name: $*"
    tail -n 25 "$shm/logs/$name.log" | sed 's/^/    /' | tee -a "$out/steps.log"
    return 1
  fi
}

if [[ $ep == cuda ]]; then
  log "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)"
fi
log "$(python3 -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")' 2>&1)"

ck=$shm/qwen3-vl-2b-synthetic
text_ck=$shm/qwen3-vl-2b-text
g=$shm/graphs
images=$shm/images
if stage export; then
  log "export: qwen3-vl-2b synthetic ${shape[*]:-(real shape)} and its text decoder as Qwen3: ${precisions[*]} for $ep"
  run synthetic-checkpoint "$bin/pio-export" --model qwen3-vl-2b --synthetic "${shape[@]}" --checkpoint-out "$ck" \
    --checkpoint-only
  [[ -f $ck/tokenizer.json ]] || log "FAILED: $ck has no tokenizer.json (carry .cache/pio/tokenizers; scripts/setup.sh)"
  run text-checkpoint python3 scripts/vl_bench_inputs.py text-checkpoint --checkpoint "$ck" --out "$text_ck"
  for p in "${precisions[@]}"; do
    run export-vl-$p "$bin/pio-export" --checkpoint "$ck" --ep $ep --precision $p --out "$g/vl-$p" --force ${VL_EXPORT_FLAGS:-}
    run export-text-$p "$bin/pio-export" --checkpoint "$text_ck" --ep $ep --precision $p --out "$g/text-$p" --force \
      ${VL_EXPORT_FLAGS:-}
  done
  run images python3 scripts/vl_bench_inputs.py images --sizes 448x448,1024x1024,1920x1080 --out "$images"
fi

if stage engine; then
  log "engine: vision encode per image, time to first token (1024x1024 + 64-token question), decode"
  for p in "${precisions[@]}"; do
    run vl-bench-$p "$vl_bench" --graphs "$g/vl-$p" --ep $ep "${ep_opts[@]}" \
      --images "$images/448x448.jpg,$images/1024x1024.jpg,$images/1920x1080.jpg" --ttft-image "$images/1024x1024.jpg" \
      --question-tokens 64 --decode-tokens 128 --repeats $repeats --out "$out/vl-bench-$p.json"
  done
fi

if stage decode; then
  log "decode: the multimodal decoder against the same-shape text decoder (pio bench)"
  graph_mode=on
  [[ $ep == cpu ]] && graph_mode=off
  for p in "${precisions[@]}"; do
    run decode-$p "$bin/pio" bench --graphs "$g/vl-$p" --graphs "$g/text-$p" --ep $ep --cuda-graph $graph_mode \
      --prompt-lens 128 --batches 1,8 --decode-prompt-len 128 --decode-tokens 128 --repeats 3 \
      --out "$out/decode-$p.json"
  done
fi

if stage baseline; then
  log "transformers $hf_dtype eager: the same image file and question"
  run hf-$hf_dtype python3 scripts/hf_vl_baseline.py --checkpoint "$ck" --engine-report "$out/vl-bench-${precisions[0]}.json" \
    --new-tokens 128 --dtype $hf_dtype --attn eager --device $([[ $ep == cuda ]] && echo cuda || echo cpu) \
    --repeats 3 --out "$shm/hf.json"
fi

if stage summary; then
  log "summary"
  python3 - "$out" "$shm/hf.json" <<'EOF' | tee -a "$out/steps.log"
import json, sys
from pathlib import Path
out, hf_path = Path(sys.argv[1]), Path(sys.argv[2])
load = lambda p: json.loads(p.read_text()) if p.is_file() else None
hf = load(hf_path)
summary = {"transformers_eager": hf}
for engine in sorted(out.glob("vl-bench-*.json")):
    p = engine.stem.removeprefix("vl-bench-")
    e = load(engine)
    s = {"vision_ms": {Path(r["image"]).stem: {k: r[k] for k in ["encode_ms", "preprocess_ms", "decode_ms", "image_tokens"]}
                       for r in e["images"]},
         "ttft": {k: e["ttft"][k] for k in ["ttft_ms", "encode_ms", "preprocess_ms", "image_decode_ms", "prompt_tokens",
                                             "question_tokens", "decode_tokens_per_s"]}}
    if hf:
        s["ttft_speedup_vs_transformers"] = hf["ttft_ms"] / e["ttft"]["ttft_ms"]
        s["decode_speedup_vs_transformers"] = e["ttft"]["decode_tokens_per_s"] / hf["tokens_per_s"]
        s["targets_met"] = {"ttft_3x": s["ttft_speedup_vs_transformers"] >= 3,
                            "decode_5x": s["decode_speedup_vs_transformers"] >= 5,
                            "same_prompt_tokens": hf["prompt_tokens"] == e["ttft"]["prompt_tokens"]}
    d = load(out / f"decode-{p}.json")
    if d:
        tok = {}
        for r in d["runs"]:
            kind = "multimodal" if Path(r["graphs"]).name.startswith("vl-") else "text"
            for row in r.get("decode") or []:
                tok[(kind, row["batch"])] = row["tokens_per_s"]
            if r.get("error"):
                s.setdefault("decode_errors", []).append({kind: r["error"]})
        s["decode_vs_text"] = {
            f"batch{b}": {"multimodal_tokens_per_s": v, "text_tokens_per_s": tok[("text", b)],
                          "multimodal_over_text": v / tok[("text", b)], "within_5_percent": v >= 0.95 * tok[("text", b)]}
            for (kind, b), v in sorted(tok.items()) if kind == "multimodal" and ("text", b) in tok}
    summary[p] = s
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2)[:5000])
EOF
fi

if stage clean; then
  rm -rf "$ck" "$text_ck" "$g" "$images"
fi
log "done: $stages"
