#!/usr/bin/env bash
# Two kernel builds on Qwen3-4B in one call: the current build (.gpu/pio) against a baseline carried as
# .gpu-b/pio-base.xz (`gpu_session.sh setup` unpacks it to .gpu/pio-base; BASE: its commit), on the --pio-kernels
# graphs of `PREP_KERNELS=1 scripts/gpu_session.sh prep` (bf16 and int4). pio bench (prompt 128, 128 new tokens,
# CUDA graphs, batches AB_BATCHES) ROUNDS times, the builds' order swapped every round (one lease's runs drift by a
# few percent, and whichever runs second has been seen to gain), the stock graphs once a round as the control;
# then each --pio-kernels graph's greedy 64 tokens and teacher-forced logits against its stock graph with the
# current build. Results in $OUT/ab-q4b.tar.gz; the tokens/s table printed.
#
#   bash scripts/gpu_session.sh setup >/dev/null; BASE=a060e88 bash scripts/kernels_ab_gpu.sh
set -u
source .gpu-b/ort-env.sh
W=/dev/shm/pio-kernels-check
A=$OUT/ab-q4b
mkdir -p "$A"
echo "base build: ${BASE:-?}"
bench() { # bench BIN NAME GRAPH...: pio bench of the graphs into $A/NAME.json
  local bin=$1 name=$2
  shift 2
  local args=()
  for g in "$@"; do args+=(--graphs "$W/$g"); done
  timeout 150 "$bin" bench "${args[@]}" --ep cuda --cuda-graph on --batches "${AB_BATCHES:-1,8,32}" --prompt-lens 128 \
    --decode-prompt-len 128 --decode-tokens 128 --repeats ${TTFT_REPEATS:-5} --out "$A/$name.json" > "$A/$name.log" 2>&1
  echo "$name rc=$?"
}
for r in $(seq 1 "${ROUNDS:-3}"); do
  order="base new"
  (( r % 2 == 0 )) && order="new base"
  for v in $order; do
    s=; [[ $v == base ]] && s=-base
    bench .gpu/pio$s "$v-$r" q4b-bf16-pio q4b-int4-pio
  done
  bench .gpu/pio "stock-$r" q4b-bf16-stock q4b-int4-stock
done
for p in bf16 int4; do
  timeout 150 .gpu/pio-kernels-check greedy --stock $W/q4b-$p-stock --pio $W/q4b-$p-pio --tokens 64 \
    --out "$A/greedy-$p.json" > "$A/greedy-$p.log" 2>&1
  echo "greedy $p rc=$?"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1]))['greedy']; print({k: v for k, v in d.items() if not isinstance(v, list)})" \
    "$A/greedy-$p.json" 2>&1 | cut -c1-400
done
python3 - "$A" <<'PY'
import json, pathlib, sys
rows = {}
for f in sorted(pathlib.Path(sys.argv[1]).glob("*-[0-9].json")):
    build, _ = f.stem.rsplit("-", 1)
    try:
        runs = json.loads(f.read_text())["runs"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        print(f, e)
        continue
    for run in runs:
        graph = run["label"].replace("-stock", "").replace("-pio", "")
        for d in run.get("decode") or []:
            rows.setdefault((graph, d["batch"]), {}).setdefault(build, []).append(d["tokens_per_s"])
for (graph, batch), by in sorted(rows.items()):
    print(f"{graph} batch {batch}: " + "; ".join(
        f"{b} {', '.join(f'{x:.1f}' for x in v)} (mean {sum(v) / len(v):.1f})" for b, v in sorted(by.items())))
PY
cd "$OUT" && tar czf ab-q4b.tar.gz ab-q4b && rm -rf ab-q4b
