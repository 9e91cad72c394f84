#!/usr/bin/env python3
"""Totals an Nsight Compute CSV of kernel durations (`ncu --metrics gpu__time_duration.sum --csv --print-units
base`, as `scripts/gpu_session.sh ncu-vl` writes it) per kernel name, in launch order or by total.

    python3 scripts/ncu_summary.py kernels.csv [--top 30] [--range FIRST:LAST] [--sequence]

--range keeps kernels FIRST..LAST (0-based launch indexes, LAST excluded) to look at one phase (for example one
vision encode), --sequence prints every kernel of the range with its running total instead of the table.
"""
import argparse
import csv
import re
import sys
from collections import defaultdict


def short(name):
    """A kernel's name without template arguments and parameter lists."""
    name = re.sub(r"\(.*", "", name)
    depth, out = 0, []
    for ch in name:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out).replace("void ", "").strip()[:90]


def read(path):
    kernels = []
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "ns")
        ns = value * {"ns": 1, "nsecond": 1, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6}.get(unit, 1)
        kernels.append((short(row["Kernel Name"]), ns, row.get("Grid Size", ""), row.get("Block Size", "")))
    return kernels


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--range", help="FIRST:LAST launch indexes")
    ap.add_argument("--sequence", action="store_true")
    args = ap.parse_args()
    kernels = read(args.csv)
    if not kernels:
        print(f"{args.csv}: no gpu__time_duration.sum rows", file=sys.stderr)
        return 1
    first, last = 0, len(kernels)
    if args.range:
        a, b = args.range.split(":")
        first, last = int(a or 0), int(b or len(kernels))
    chosen = kernels[first:last]
    total = sum(ns for _, ns, _, _ in chosen)
    print(f"{len(chosen)} kernels ({first}..{last} of {len(kernels)}), {total / 1e6:.3f} ms")
    if args.sequence:
        running = 0.0
        for i, (name, ns, grid, block) in enumerate(chosen, start=first):
            running += ns
            print(f"{i:>7} {ns / 1e3:>10.1f} us {running / 1e6:>9.3f} ms  {name}  grid {grid} block {block}")
        return 0
    totals = defaultdict(lambda: [0, 0.0])
    for name, ns, _, _ in chosen:
        totals[name][0] += 1
        totals[name][1] += ns
    for name, (n, ns) in sorted(totals.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"{ns / 1e6:>9.3f} ms {100 * ns / total:5.1f}% {n:>6}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
