#!/usr/bin/env python3
"""Totals ONNX Runtime profiles (PIO_ORT_PROFILE=DIR; see the README's "Profiling") per operator and provider.

    python3 scripts/ort_profile_summary.py DIR/vision_*.json [--top 25] [--json OUT]

Each row: operator, execution provider, nodes run, total and share of the node time. On the CPU the times are the
kernels' own; on CUDA a node's time is what its host side took (launching asynchronous kernels), so the shares show
host overhead and which nodes ran on the CPU (a CPUExecutionProvider row in a CUDA graph is a fallback, with copies
around it), not where the GPU spends its time.
"""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def summarize(path):
    events = json.loads(Path(path).read_text())
    totals = defaultdict(lambda: [0, 0.0])
    runs = []
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs.append(e.get("dur", 0) / 1e3)
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        key = (args.get("op_name", "?"), args.get("provider", "?"))
        totals[key][0] += 1
        totals[key][1] += e.get("dur", 0) / 1e3
    node_ms = sum(ms for _, ms in totals.values())
    rows = [
        {"op": op, "provider": provider, "nodes": n, "ms": ms, "share": ms / node_ms if node_ms else 0.0}
        for (op, provider), (n, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1])
    ]
    return {"file": str(path), "runs": len(runs), "run_ms_total": sum(runs), "node_ms_total": node_ms, "ops": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profiles", nargs="+", help="profile JSON files written by ONNX Runtime")
    ap.add_argument("--top", type=int, default=25, help="rows printed per file")
    ap.add_argument("--json", help="write every file's summary here")
    args = ap.parse_args()
    summaries = []
    for path in args.profiles:
        try:
            s = summarize(path)
        except (OSError, ValueError) as e:
            print(f"{path}: cannot read the profile: {e}", file=sys.stderr)
            return 1
        summaries.append(s)
        print(f"{s['file']}: {s['runs']} runs, {s['run_ms_total']:.1f} ms in runs, {s['node_ms_total']:.1f} ms in nodes")
        for r in s["ops"][: args.top]:
            print(f"  {r['op']:<28} {r['provider']:<26} {r['nodes']:>7} {r['ms']:>10.2f} ms {100 * r['share']:5.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
