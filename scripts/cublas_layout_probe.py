"""cuBLAS at the Qwen3-4B projection shapes: y = x @ W with W stored (in, out), as the exported
MatMul gets it, against W stored (out, in) and transposed in the call (torch's `linear`, i.e. a
Gemm with transB=1). Decides whether exporting transposed weights would speed up decode.

    python3 scripts/cublas_layout_probe.py OUT.json      (needs torch with CUDA)

Result on an H100: benches/results/2026-11-26-h100-run2/linear_probe.json.
"""
import json
import sys

import torch

# (in, out) of q|k|v, o_proj, gate|up, down and the lm_head of Qwen3-4B.
SHAPES = {"qkv": (2560, 6144), "o_proj": (4096, 2560), "gate_up": (2560, 19456), "down": (9728, 2560), "lm_head": (2560, 151936)}


def time_us(fn, iters=200):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def main():
    results = {}
    for m in (1, 32):
        for name, (k, n) in SHAPES.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w_in_out = torch.randn(k, n, device="cuda", dtype=torch.bfloat16) * 0.02
            w_out_in = w_in_out.t().contiguous()
            row = {}
            for label, fn in (("kn_matmul", lambda: x @ w_in_out), ("nk_linear", lambda: torch.nn.functional.linear(x, w_out_in))):
                us = time_us(fn)
                row[label] = {"us": round(us, 2), "TBps": round(k * n * 2 / us / 1e6, 2)}
            results[f"m{m}_{name}"] = row
            print(m, name, row, flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
