#!/usr/bin/env python3
"""Kernel builds side by side: `pio-kernels-check probe` outputs named BUILD-ROUND.json in one folder
(scripts/gpu_session.sh probe-variants), each case's kernels as the median microseconds over the rounds, one
column per build, and each build's sum over the cases of its default kernel (the one the operators launch)
against the first build in name order (the baseline, `A` by convention)."""
import json
import pathlib
import statistics
import sys
from collections import defaultdict


def main(folder):
    runs = defaultdict(list)  # build -> [probe json]
    for path in sorted(pathlib.Path(folder).glob("*.json")):
        build, _, round_ = path.stem.rpartition("-")
        if not build or not round_.isdigit():
            continue
        try:
            runs[build].append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            print(f"{path}: {err}", file=sys.stderr)
    if not runs:
        sys.exit(f"no BUILD-ROUND.json in {folder}")
    builds = sorted(runs)
    times = defaultdict(lambda: defaultdict(list))  # (case, kernel) -> build -> [us]
    default_of = {}  # (case, build) -> kernel
    cases = []
    for build in builds:
        for run in runs[build]:
            for case in run.get("tile_kernels") or []:
                if case["case"] not in cases:
                    cases.append(case["case"])
                for t in case.get("timings", []):
                    times[(case["case"], t["kernel"])][build].append(t["us"])
                    if t.get("default"):
                        default_of[(case["case"], build)] = t["kernel"]
    bw = {b: [r["bandwidth"]["best_tb_per_s"] for r in runs[b] if isinstance(r.get("bandwidth"), dict)] for b in builds}
    print("read bandwidth (TB/s, best of each run): " + "; ".join(f"{b} {', '.join(f'{x:.2f}' for x in bw[b])}" for b in builds))
    print(f"{'case':<34} {'kernel':<14} " + " ".join(f"{b:>9}" for b in builds) + "  (median us; * default)")
    totals = defaultdict(float)
    for case in cases:
        kernels = sorted({k for (c, k) in times if c == case})
        for kernel in kernels:
            cells = []
            for b in builds:
                v = times[(case, kernel)].get(b)
                mark = "*" if default_of.get((case, b)) == kernel else " "
                cells.append(f"{statistics.median(v):8.2f}{mark}" if v else f"{'-':>9}")
            print(f"{case:<34} {kernel:<14} " + " ".join(cells))
        for b in builds:
            k = default_of.get((case, b))
            if k and times[(case, k)].get(b):
                totals[b] += statistics.median(times[(case, k)][b])
    base = builds[0]
    print("sum of default kernels (us): " + "; ".join(
        f"{b} {totals[b]:.1f} ({totals[b] / totals[base]:.3f}x {base})" if totals[base] else f"{b} {totals[b]:.1f}"
        for b in builds))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
