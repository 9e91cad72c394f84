#!/usr/bin/env bash
# The serving engine on a GPU (CUDA, bf16), checked through `pio run --batch` (many prompts
# submitted together, batched by the engine):
#
#   1. isolation: 32 prompts of 16 to 512 tokens, 32 to 128 new tokens each, run together
#      (--max-seqs 32) and one at a time (--max-seqs 1), CUDA graphs off and on: greedy tokens
#      from the graph's argmax (the production path), and seeded sampling with each token's
#      logprob (the logits path). Reported per run: how many requests gave the same tokens, where
#      the others first diverged, and the largest |logprob difference| before any divergence.
#   2. prefix reuse: A = S + a, an unrelated B, then C1..C3 = S + c_i, with S a shared
#      2,048-token prefix, one at a time with the prefix cache and without it: each C's tokens
#      against the cold run, the cached tokens, and the time from admission to the first token
#      (hit against cold; the issue's target: at most 25%).
#   3. the KV pool sized from free memory (no pool flags): the startup log line.
#
#   scripts/engine_gpu_check.sh        (results in $OUT, default engine-check-out/)
#
# Needs the release binaries (cargo build --release: target/release/pio, pio-export; or
# PIO_BIN_DIR), ONNX Runtime's CUDA build (ORT_DYLIB_PATH, see README "GPU") and python3.
# LAYERS=12 exports Qwen3-4B at real width with 12 of its 36 layers (faster; default: all).
# EP=cpu runs the same steps on the CPU on a tiny fp32 Qwen3 (1 layer, hidden 64; CUDA graphs
# skipped): a dry run of this script, not a measurement.
# The export goes to $PIO_SHM (default /dev/shm/pio) and is reused by later runs and by
# scripts/serve_gpu_bench.sh (scripts/synthetic_qwen3.sh).
# Writes $OUT/engine-check.json (the summary) and the runs' JSON lines and logs next to it.
set -euo pipefail
bin=${PIO_BIN_DIR:-target/release}
out=${OUT:-engine-check-out}
shm=${PIO_SHM:-/dev/shm/pio}
mkdir -p "$out" "$shm"
export RUST_LOG=${RUST_LOG:-info,ort=warn} NO_COLOR=1
log() { echo "[$(date +%T)] $*" | tee -a "$out/steps.log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1 || true
ep=${EP:-cuda}
graph_modes=(off on)
[[ $ep == cpu ]] && graph_modes=(off)
# shellcheck source=scripts/synthetic_qwen3.sh
source "$(dirname "${BASH_SOURCE[0]}")/synthetic_qwen3.sh"
log "the synthetic Qwen3-4B for $ep (exported once into $shm)"
export_synthetic_qwen3 "$ep" qwen3-4b-graphs "$out/export.log"
g=$graphs

log "writing the prompts"
python3 - "$out" <<'PY'
import json, random, sys
out = sys.argv[1]
rng = random.Random(20261206)
vocab = 151643  # ordinary tokens of Qwen3's vocabulary (no special tokens)
def ids(n):
    return [rng.randrange(vocab) for _ in range(n)]
with open(f"{out}/isolation.jsonl", "w") as f:
    for i in range(32):
        f.write(json.dumps({"prompt_ids": ids(16 + (i * 97) % 497), "max_tokens": 32 + (i * 37) % 97, "seed": 100 + i}) + "\n")
shared = ids(2048)
with open(f"{out}/prefix.jsonl", "w") as f:
    f.write(json.dumps({"prompt_ids": shared + ids(32), "max_tokens": 16}) + "\n")   # A
    f.write(json.dumps({"prompt_ids": ids(512), "max_tokens": 16}) + "\n")           # B
    for _ in range(3):                                                               # C1..C3
        f.write(json.dumps({"prompt_ids": shared + ids(32), "max_tokens": 16}) + "\n")
PY

common=(--graphs "$g" --ep "$ep" --max-model-len 1024)
for graphs in "${graph_modes[@]}"; do
  opts=()
  [[ $graphs == on ]] && opts=(--ep-option cuda_graph=1)
  for seqs in 32 1; do
    log "isolation, CUDA graphs $graphs, --max-seqs $seqs: greedy"
    "$bin/pio" run "${common[@]}" "${opts[@]}" --max-seqs $seqs --batch "$out/isolation.jsonl" --greedy --ignore-eos \
      > "$out/greedy-graphs-$graphs-seqs-$seqs.jsonl" 2> "$out/greedy-graphs-$graphs-seqs-$seqs.log"
    log "isolation, CUDA graphs $graphs, --max-seqs $seqs: seeded sampling with logprobs"
    "$bin/pio" run "${common[@]}" "${opts[@]}" --max-seqs $seqs --batch "$out/isolation.jsonl" --temperature 1 \
      --top-k 50 --ignore-eos --logprobs 0 \
      > "$out/sampled-graphs-$graphs-seqs-$seqs.jsonl" 2> "$out/sampled-graphs-$graphs-seqs-$seqs.log"
  done
done

# One pass per prompt (a prefill budget of the whole prompt), one request at a time.
prefix=(--graphs "$g" --ep "$ep" --max-seqs 1 --max-model-len 4096 --prefill-budget 4096 --batch "$out/prefix.jsonl" --greedy --ignore-eos)
log "prefix reuse: with the prefix cache"
"$bin/pio" run "${prefix[@]}" > "$out/prefix-hit.jsonl" 2> "$out/prefix-hit.log"
log "prefix reuse: without it"
"$bin/pio" run "${prefix[@]}" --no-prefix-cache > "$out/prefix-cold.jsonl" 2> "$out/prefix-cold.log"

log "the KV pool sized from free memory"
"$bin/pio" run --graphs "$g" --ep "$ep" --prompt-ids 1,2,3 --max-tokens 4 --greedy --json \
  > "$out/default-pool.json" 2> "$out/default-pool.log"

python3 - "$out" "${graph_modes[@]}" <<'PY'
import json, re, statistics, sys
out, graph_modes = sys.argv[1], sys.argv[2:]
def lines(name):
    with open(f"{out}/{name}") as f:
        return [json.loads(l) for l in f if l.strip()]
def compare(kind, graphs):
    together, alone = lines(f"{kind}-graphs-{graphs}-seqs-32.jsonl"), lines(f"{kind}-graphs-{graphs}-seqs-1.jsonl")
    same, divergence, max_lp = 0, [], 0.0
    for t, a in zip(together, alone):
        assert t["prompt_ids"] == a["prompt_ids"]
        gt, ga = t["generated_ids"], a["generated_ids"]
        first = next((i for i, (x, y) in enumerate(zip(gt, ga)) if x != y), None)
        if first is None and len(gt) == len(ga):
            same += 1
        else:
            divergence.append({"prompt_tokens": len(t["prompt_ids"]), "first_divergent_token": first, "tokens": len(gt)})
        upto = first if first is not None else len(gt)
        if "logprobs" in t and "logprobs" in a:
            diffs = [abs(x - y) for x, y in zip(t["logprobs"][:upto], a["logprobs"][:upto])]
            max_lp = max([max_lp] + diffs)
    return {"requests": len(together), "same_tokens": same, "diverged": divergence,
            "max_abs_logprob_diff_before_divergence": max_lp if kind == "sampled" else None}
report = {"isolation": {f"{k}_cuda_graphs_{g}": compare(k, g) for g in graph_modes for k in ("greedy", "sampled")}}
hit, cold = lines("prefix-hit.jsonl"), lines("prefix-cold.jsonl")
prefill_ms = lambda o: o["timings"]["time_to_first_token_ms"] - o["timings"]["queue_ms"]
cs = range(2, len(hit))
report["prefix"] = {
    "shared_prefix_tokens": 2048,
    "cached_tokens": [o["timings"]["cached_prompt_tokens"] for o in hit],
    "same_tokens_as_cold": [h["generated_ids"] == c["generated_ids"] for h, c in zip(hit, cold)],
    "hit_admission_to_first_token_ms": [prefill_ms(hit[i]) for i in cs],
    "cold_admission_to_first_token_ms": [prefill_ms(cold[i]) for i in cs],
}
p = report["prefix"]
p["hit_over_cold_median"] = statistics.median(p["hit_admission_to_first_token_ms"]) / statistics.median(p["cold_admission_to_first_token_ms"])
with open(f"{out}/default-pool.log") as f:
    plain = (re.sub(r"\x1b\[[0-9;]*m", "", l).strip() for l in f)
    report["default_pool_log"] = [l for l in plain if "KV pool" in l or "engine ready" in l or "free of" in l]
with open(f"{out}/engine-check.json", "w") as f:
    json.dump(report, f, indent=2)
print(json.dumps(report, indent=2))
PY
log "done: $out/engine-check.json"
