#!/usr/bin/env python3
"""Summary of scripts/kernels_gpu_check.sh's results (stdlib only).

Usage: kernels_gpu_summary.py OUT_DIR [WORK_DIR]

Reads OUT_DIR/{torch_bandwidth,probe,ops,bench,greedy-*,moe-bench}.json (whatever exists),
prints the tables and writes OUT_DIR/summary.json: the measured read bandwidth, each kernel's
error and speed (µs, TB/s, fraction of the bandwidth, against ONNX Runtime's op), each graph's
decode tokens/s against its bandwidth floor (weight bytes read per step / bandwidth), and the
greedy comparison.
"""
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except Exception as e:  # a missing or cut-short report is part of the summary
        return {"missing": f"{path}: {e}"}


def main():
    out = sys.argv[1]
    work = sys.argv[2] if len(sys.argv) > 2 else None
    s = {}
    tb = load(os.path.join(out, "torch_bandwidth.json"))
    probe = load(os.path.join(out, "probe.json"))
    own_bw = (probe.get("bandwidth") or {}).get("best_tb_per_s")
    # The floor uses the faster of the two reads (the stricter bar).
    reads = [v for v in (own_bw, tb.get("best_tb_per_s")) if v]
    bw = max(reads) if reads else None
    s["device"] = probe.get("device")
    s["bandwidth_tb_per_s"] = {"kernel": own_bw, "torch": tb.get("best_tb_per_s"), "used": bw}
    print(f"device: {json.dumps(probe.get('device'))}")
    print(f"read bandwidth: own kernel {own_bw} TB/s, torch {tb.get('best_tb_per_s')} TB/s")

    exact = probe.get("dequant_exact")
    if isinstance(exact, list):
        s["dequant_bit_exact"] = all(r.get("bit_exact") for r in exact)
        print(f"int4 dequantization bit-exact: {s['dequant_bit_exact']} ({len(exact)} cases)")

    deq = probe.get("dequant_timing")
    if isinstance(deq, list):
        print("\nint4 dequantization (the prefill path's first step): case | us | TB/s (read + written) | of bw")
        for r in deq:
            if "error" in r:
                print(f"  {r.get('case')}: ERROR {r['error']}")
                continue
            frac = r["tb_per_s"] / bw if bw else None
            print(f"  {r['case']:<44} {r['us']:8.2f} {r['tb_per_s']:5.2f} {frac if frac is None else round(frac, 3)!s:>6}")
        s["dequant_timing"] = deq
    elif isinstance(deq, dict) and "error" in deq:
        print(f"\nint4 dequantization timing: ERROR {deq['error']}")

    tiles = probe.get("tile_kernels")
    if isinstance(tiles, list):
        print("\ntile kernels (direct, CUDA-graph replay): case | max rel err vs CPU | best us | TB/s | of bw | warps")
        rows = []
        for r in tiles:
            if "error" in r:
                print(f"  {r.get('case')}: ERROR {r['error']}")
                rows.append(r)
                continue
            best = min(r["timings"], key=lambda t: t["us"])
            dflt = next((t for t in r["timings"] if t["default"]), best)
            frac = best["tb_per_s"] / bw if bw else None
            rows.append({"case": r["case"], "max_rel_error": r["max_rel_error_vs_cpu_reference"], "best_us": best["us"],
                         "best_warps": best["warps"], "default_us": dflt["us"], "tb_per_s": best["tb_per_s"],
                         "fraction_of_bandwidth": frac})
            print(f"  {r['case']:<44} {r['max_rel_error_vs_cpu_reference']:.2e} {best['us']:8.2f} "
                  f"{best['tb_per_s']:5.2f} {frac if frac is None else round(frac, 3)!s:>6} {best['warps']} "
                  f"(default {dflt['warps']}: {dflt['us']:.2f} us)")
        s["tile_kernels"] = rows

    ops = load(os.path.join(out, "ops.json"))
    if "missing" not in ops:
        print("\nops in ONNX Runtime (CUDA graphs): case | ours op | max rel err vs stock | ours us | stock us | speed-up | ours TB/s")
        rows = []
        for preset, cases in ops.items():
            for r in cases if isinstance(cases, list) else []:
                if "error" in r:
                    print(f"  {r.get('case')}: ERROR {r['error']}")
                    rows.append(r)
                    continue
                o, st = r["ours"], r["stock"]
                rows.append({"case": r["case"], "max_rel_error_vs_stock": r["max_rel_error_vs_stock"],
                             "max_rel_error_vs_cpu_reference": r.get("max_rel_error_vs_cpu_reference"),
                             "ours_us": o["us_per_op"], "stock_us": st["us_per_op"], "speedup": r["speedup"],
                             "ours_tb_per_s": o["tb_per_s"], "stock_tb_per_s": st["tb_per_s"],
                             "cuda_graph": o["cuda_graph"] and st["cuda_graph"],
                             "graph_replay_identical": o["graph_replay_identical"]})
                print(f"  {r['case']:<44} {o['op']:<11} {r['max_rel_error_vs_stock']:.2e} {o['us_per_op']:8.2f} "
                      f"{st['us_per_op']:8.2f} {r['speedup']:6.2f}x {o['tb_per_s']:5.2f}"
                      f"{'' if o['cuda_graph'] else ' (no CUDA graph)'}")
        s["ops"] = rows

    def bench_table(name, label):
        b = load(os.path.join(out, name))
        if "missing" in b:
            return None
        print(f"\n{label}: graph | weights GB | floor tok/s (b1) | tok/s b1 | of floor | b8 | b32 | TTFT 128 | CUDA-graph check")
        rows = []
        for r in b.get("runs", []):
            if r.get("error"):
                print(f"  {r['label']}: ERROR {r['error']}")
                rows.append({"graph": r["label"], "error": r["error"]})
                continue
            data = os.path.join(r["graphs"], "model.onnx.data")
            wbytes = os.path.getsize(data) if os.path.exists(data) else r.get("weight_bytes")
            floor = bw * 1e12 / wbytes if bw and wbytes else None
            dec = {d["batch"]: d["tokens_per_s"] for d in r.get("decode", [])}
            ttft = {t["prompt_len"]: t["ms"] for t in r.get("ttft", [])}
            frac = dec.get(1) / floor if floor and dec.get(1) else None
            check = (r.get("cuda_graph_check") or {}).get("same_tokens")
            rows.append({"graph": r["label"], "weight_bytes": wbytes, "floor_tokens_per_s_b1": floor,
                         "tokens_per_s": dec, "fraction_of_floor_b1": frac, "ttft_ms": ttft,
                         "cuda_graph_same_tokens": check})
            fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"
            print(f"  {r['label']:<22} {fmt(wbytes / 1e9 if wbytes else None, 2)} {fmt(floor)} {fmt(dec.get(1))} "
                  f"{fmt(frac, 3)} {fmt(dec.get(8))} {fmt(dec.get(32))} {fmt(ttft.get(128), 2)} {check}")
        return rows

    s["qwen3_4b"] = bench_table("bench.json", "Qwen3-4B decode")
    s["qwen3_coder_4_layers"] = bench_table("moe-bench.json", "Qwen3-Coder-30B-A3B (4 layers) decode")

    for p in ["bf16", "int4"]:
        g = load(os.path.join(out, f"greedy-{p}.json"))
        if "missing" in g:
            continue
        s[f"greedy_{p}"] = {"greedy": g.get("greedy", {}).get("tokens_equal"),
                            "first_mismatch": g.get("greedy", {}).get("first_mismatch"),
                            "teacher_forced": g.get("teacher_forced")}
        print(f"\ngreedy {p}, stock vs pio over {g.get('greedy', {}).get('steps')} tokens: "
              f"equal={s[f'greedy_{p}']['greedy']} first mismatch={json.dumps(s[f'greedy_{p}']['first_mismatch'])}")
        print(f"  teacher-forced: {json.dumps(g.get('teacher_forced'))}")

    steps = []
    try:
        with open(os.path.join(out, "steps.jsonl")) as f:
            steps = [json.loads(l) for l in f if l.strip()]
    except OSError:
        pass
    s["steps"] = steps
    failed = [x for x in steps if x.get("rc") not in (0, None) or x.get("skipped")]
    print(f"\nsteps: {len(steps)}, failed or skipped: {json.dumps(failed)}")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(s, f, indent=2)


if __name__ == "__main__":
    main()
