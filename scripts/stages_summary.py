#!/usr/bin/env python3
"""The summaries of the pipeline-stage GPU scripts (stdlib only).

  stages_summary.py one-gpu OUT SINGLE STAGED SECONDS EP   scripts/stages_gpu_check.sh: greedy equality and
                                                           the boundary's cost -> OUT/summary.json
  stages_summary.py multi OUT PART EP                      scripts/multi_gpu_bench.sh: GLM-4.7 and Qwen3-Coder
                                                           -> OUT/glm-summary.json, OUT/coder-summary.json
"""
import csv
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def one_gpu(out, single, staged, seconds, ep):
    a, b = load(f"{out}/greedy-single.json"), load(f"{out}/greedy-stages.json")
    greedy = {"ran": bool(a and b)}
    if a and b:
        x, y = a.get("generated_ids", []), b.get("generated_ids", [])
        diverge = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        if diverge is None and len(x) != len(y):
            diverge = min(len(x), len(y))
        greedy.update(tokens=len(x), equal=(x == y and len(x) > 0), first_divergence=diverge)

    bench = load(f"{out}/bench.json") or {}
    runs = {}
    for run in bench.get("runs", []):
        key = "stages" if os.path.realpath(run.get("graphs", "")) == os.path.realpath(staged) else "single"
        runs[key] = run

    def decode(run, batch):
        return next((r["tokens_per_s"] for r in run.get("decode", []) if r["batch"] == batch), None)

    def ttft(run, n):
        return next((r["ms"] for r in run.get("ttft", []) if r["prompt_len"] == n), None)

    def overhead(s, t, higher_is_better):
        if s is None or t is None or s == 0:
            return None
        return round(100.0 * ((s - t) / s if higher_is_better else (t - s) / s), 2)

    rows = []
    one, two = runs.get("single", {}), runs.get("stages", {})
    batches = sorted({r["batch"] for r in one.get("decode", []) + two.get("decode", [])})
    lens = sorted({r["prompt_len"] for r in one.get("ttft", []) + two.get("ttft", [])})
    for batch in batches:
        s, t = decode(one, batch), decode(two, batch)
        rows.append({"what": f"decode tok/s, batch {batch}", "single": s, "stages2": t, "overhead_pct": overhead(s, t, True)})
    for n in lens:
        s, t = ttft(one, n), ttft(two, n)
        rows.append({"what": f"ttft ms, {n} tokens", "single": s, "stages2": t, "overhead_pct": overhead(s, t, False)})

    summary = {
        "ep": ep,
        "seconds": int(seconds),
        "graphs": {"single": single, "stages2": staged},
        "stage_layers": [s["layers"] for s in (load(f"{staged}/pio.json") or {}).get("stages", [])],
        "greedy": greedy,
        "boundary_cost": rows,
        "pipeline": two.get("pipeline"),
        "errors": {k: r.get("error") for k, r in runs.items() if r.get("error")},
        "steps": [json.loads(l) for l in open(f"{out}/steps.jsonl") if l.strip()],
    }
    json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
    if not greedy["ran"]:
        verdict = "not run"
    elif greedy["equal"]:
        verdict = "EQUAL"
    else:
        verdict = f"DIFFERENT (first at token {greedy['first_divergence']})"
    print(f"greedy over {greedy.get('tokens')} tokens, one graph vs 2 stages: {verdict}")
    print(f"{'':28} {'1 graph':>10} {'2 stages':>10} {'overhead':>9}")
    for r in rows:
        f = lambda v: "-" if v is None else f"{v:10.1f}"
        o = "-" if r["overhead_pct"] is None else f"{r['overhead_pct']:+.1f}%"
        print(f"{r['what']:28} {f(r['single'])} {f(r['stages2'])} {o:>9}")
    for row in (summary["pipeline"] or {}).get("rows", []):
        print(f"pipeline {row['what']} ({row['mode']}): stage busy ms {row['stage_busy_ms']}, bubble {row['bubble']:.3f}")


def multi(out, part, ep):
    def peak_memory(path):
        """Each GPU's largest used memory in the samples, MiB."""
        peaks = {}
        try:
            for row in csv.reader(open(path)):
                if len(row) == 2 and row[1].strip().isdigit():
                    gpu = row[0].strip()
                    peaks[gpu] = max(peaks.get(gpu, 0), int(row[1]))
        except OSError:
            return None
        return peaks or None

    def numbers(bench):
        if not bench or not bench.get("runs"):
            return None
        run = bench["runs"][0]
        return {
            "error": run.get("error"),
            "decode_tok_s": {str(r["batch"]): r["tokens_per_s"] for r in run.get("decode", [])},
            "ttft_ms": {str(r["prompt_len"]): r["ms"] for r in run.get("ttft", [])},
            "load_s": run.get("load_s"),
            "weight_bytes": run.get("weight_bytes"),
            "pipeline": run.get("pipeline"),
        }

    if part in ("glm", "all"):
        glm = {
            "ep": ep,
            "bench": numbers(load(f"{out}/glm-bench.json")),
            "peak_memory_mib_per_gpu": peak_memory(f"{out}/glm-memory.csv"),
            "extrapolated_batch1_tok_s_from_one_layer": 63,
        }
        json.dump(glm, open(f"{out}/glm-summary.json", "w"), indent=2)
        b = glm["bench"] or {}
        print(f"GLM-4.7 int4: decode tok/s {b.get('decode_tok_s')}, ttft ms {b.get('ttft_ms')}, "
              f"peak MiB per GPU {glm['peak_memory_mib_per_gpu']} (extrapolated batch 1: about 63 tok/s)")

    if part in ("coder", "all"):
        tokens = {k: (load(f"{out}/coder-greedy-{k}.json") or {}).get("generated_ids")
                  for k in ("single", "stages-1gpu", "stages-2gpu")}
        base = tokens["single"]
        coder = {"ep": ep, "greedy_equal_to_single": {k: (v == base and bool(v)) for k, v in tokens.items() if k != "single"}}
        runs = {k: numbers(load(f"{out}/coder-bench-{k}.json")) for k in ("single", "stages-1gpu", "stages-2gpu")}
        coder["bench"] = runs
        coder["peak_memory_mib_per_gpu"] = {k: peak_memory(f"{out}/coder-memory-{k}.csv")
                                            for k in ("single", "stages-1gpu", "stages-2gpu")}
        overhead = {}
        one = (runs.get("single") or {}).get("decode_tok_s", {})
        for k in ("stages-1gpu", "stages-2gpu"):
            other = (runs.get(k) or {}).get("decode_tok_s", {})
            overhead[k] = {b: round(100 * (one[b] - other[b]) / one[b], 2) for b in one if b in other and one[b]}
        coder["decode_overhead_pct_vs_single"] = overhead
        json.dump(coder, open(f"{out}/coder-summary.json", "w"), indent=2)
        print(f"Qwen3-Coder-30B-A3B: same greedy tokens {coder['greedy_equal_to_single']}, "
              f"decode overhead % vs one graph {overhead}")


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "one-gpu":
        one_gpu(*sys.argv[2:7])
    elif len(sys.argv) == 5 and sys.argv[1] == "multi":
        multi(*sys.argv[2:5])
    else:
        sys.exit(__doc__)
