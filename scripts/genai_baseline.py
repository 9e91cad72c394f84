#!/usr/bin/env python3
"""onnxruntime-genai as a peer: build its graphs from a checkpoint with its own builder, then time generation.

    python3 scripts/genai_baseline.py --checkpoint DIR --work DIR --precisions bf16,int4 --batches 1,32 \
        --prompt-len 128 --new-tokens 128 --ep cuda --out result.json

Needs `onnxruntime_genai` importable (written against 0.18.0; on the GPU host scripts/genai_setup.sh puts the
onnxruntime-genai-cuda wheel and an onnxruntime package whose capi/ holds ONNX Runtime 1.31.1's CUDA build on
PYTHONPATH); its builder also needs torch, transformers, onnx, onnx_ir and the onnxruntime Python package. For each
precision it runs `python3 -m onnxruntime_genai.models.builder -i CHECKPOINT -o WORK/<precision> -p <precision>
-e <ep> -c WORK/<precision>/hf-cache [--extra_options ...]` (once: a folder built with the same arguments is
reused; the builder runs with HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1, so it never reaches the network). With
--ep cuda it turns CUDA graphs on in genai_config.json (`enable_cuda_graph`, under
model.decoder.session_options.provider_options[].cuda). Each batch size is measured in a child process of its own
(a crash or hang there costs that row alone, --measure-timeout seconds at most), which loads the model, and
generates from random prompt ids (seeded) with greedy search and min_length = max_length, so every sequence decodes
exactly --new-tokens tokens whatever the random weights predict. Timings per run (median of --repeats, after one
warm-up of 8 new tokens):

- ttft_ms: append_tokens (the prefill) + the first generate_next_token, until its token is read back;
- tokens_per_s: batch * (new_tokens - 1) / the time of the remaining generate_next_token calls (each a decode
  step; with CUDA graphs, the first two of a generator run uncaptured and capture its graph).

A batch size that fails with CUDA graphs on is retried with them off, and the row says which ran.

The builder's defaults are kept unless --extra-options says otherwise: on CUDA its bf16 graph has bf16 activations
and float32 logits; its int4 graph has float16 activations (use_cuda_bf16=true for bf16), int4 MatMulNBits
(block 32) for the projections and the lm_head, and an int4 embedding table; both compute logits for every prompt
position in the prefill (prune_lm_head=true for the last one only).
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def build(checkpoint, out_dir, precision, ep, extra_options):
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out_dir),
           "-p", precision, "-e", ep, "-c", str(out_dir / "hf-cache")]
    if extra_options:
        cmd += ["--extra_options", *extra_options]
    stamp = out_dir / "pio-build.json"
    if (out_dir / "genai_config.json").is_file() and stamp.is_file() and json.loads(stamp.read_text())["cmd"] == cmd[1:]:
        return json.loads(stamp.read_text())["seconds"]
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    seconds = time.perf_counter() - t0
    stamp.write_text(json.dumps({"cmd": cmd[1:], "seconds": seconds}))
    return seconds


def set_cuda_graph(model_dir, on):
    path = model_dir / "genai_config.json"
    cfg = json.loads(path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    providers = so.setdefault("provider_options", [])
    cuda = next((p["cuda"] for p in providers if "cuda" in p), None)
    if cuda is None:
        cuda = {}
        providers.append({"cuda": cuda})
    cuda["enable_cuda_graph"] = "1" if on else "0"
    path.write_text(json.dumps(cfg, indent=2))


def run_once(og, model, ids, new_tokens):
    batch, prompt_len = ids.shape
    params = og.GeneratorParams(model)
    total = prompt_len + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=batch)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    first = gen.get_next_tokens()  # reads the token back: the prefill and first choice are done
    t1 = time.perf_counter()
    steps = 1
    while not gen.is_done():
        gen.generate_next_token()
        steps += 1
    last = gen.get_next_tokens()
    t2 = time.perf_counter()
    assert len(first) == batch and len(last) == batch
    return (t1 - t0) * 1e3, batch * (steps - 1) / (t2 - t1), steps


def measure(model_dir, ep, batch, prompt_len, new_tokens, repeats, vocab):
    """In the child process: load the model as genai_config.json says, warm up, time --repeats runs."""
    import numpy as np
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.clear_providers()
    if ep != "cpu":
        config.append_provider(ep)
    model = og.Model(config)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(batch, prompt_len), dtype=np.int32)
    run_once(og, model, ids, min(new_tokens, 8))  # warm-up (and CUDA-graph capture)
    runs = [run_once(og, model, ids, new_tokens) for _ in range(repeats)]
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "ttft_ms": statistics.median(r[0] for r in runs),
        "tokens_per_s": statistics.median(r[1] for r in runs),
        "decoded_steps": runs[0][2],
    }


def measure_in_child(a, model_dir, batch, vocab):
    """Runs measure() in a child process; returns its row, or raises with the end of its output."""
    job = {"model_dir": str(model_dir), "ep": a.ep, "batch": batch, "prompt_len": a.prompt_len,
           "new_tokens": a.new_tokens, "repeats": a.repeats, "vocab": vocab}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.measure_timeout)
    except subprocess.TimeoutExpired as e:
        out = ((e.stderr or b"") + (e.stdout or b""))[-1000:].decode(errors="replace")  # bytes, whatever text=
        raise RuntimeError(f"timed out after {a.measure_timeout} s: {out}") from None
    lines = [line for line in p.stdout.splitlines() if line.startswith("PIO_ROW ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip() or p.stdout.strip()).splitlines()[-3:]  # the exception, for a Python error
        raise RuntimeError(f"exit {p.returncode}: " + " | ".join(tail))
    return json.loads(lines[-1][len("PIO_ROW "):])


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        job = json.loads(sys.argv[2])
        row = measure(Path(job["model_dir"]), job["ep"], job["batch"], job["prompt_len"], job["new_tokens"],
                      job["repeats"], job["vocab"])
        print("PIO_ROW " + json.dumps(row), flush=True)
        return 0

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--work", required=True, help="where the builder's graphs go (one folder per precision)")
    p.add_argument("--precisions", default="bf16,int4")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ep", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--cuda-graph", choices=["on", "off"], default="on")
    p.add_argument("--extra-options", nargs="*", default=[], metavar="KEY=VALUE",
                   help="passed to the builder's --extra_options (e.g. use_cuda_bf16=true prune_lm_head=true)")
    p.add_argument("--measure-timeout", type=float, default=240, help="seconds for one batch size's child process")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import onnxruntime_genai as og

    checkpoint = Path(a.checkpoint)
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    rows = []
    builds = {}

    def save():  # after every row, so a run cut short keeps what it measured
        result = {
            "what": "onnxruntime-genai generate, its own builder's graphs, greedy, min_length = max_length",
            "onnxruntime_genai": getattr(og, "__version__", "unknown"),
            "python": platform.python_version(),
            "checkpoint": str(checkpoint),
            "ep": a.ep,
            "builder_extra_options": a.extra_options,
            "build_seconds": builds,
            "rows": rows,
        }
        Path(a.out).write_text(json.dumps(result, indent=2))

    for precision in a.precisions.split(","):
        model_dir = Path(a.work) / precision
        try:
            builds[precision] = build(checkpoint, model_dir, precision, a.ep, a.extra_options)
        except Exception as e:  # a failed build is a row, not the end of the run
            print(f"precision {precision}: build failed: {e}", flush=True)
            rows.append({"precision": precision, "error": f"build failed: {e}"})
            save()
            continue
        for batch in [int(b) for b in a.batches.split(",")]:
            graph_modes = [True, False] if a.cuda_graph == "on" and a.ep == "cuda" else [False]
            for graph in graph_modes:
                try:
                    if a.ep == "cuda":
                        set_cuda_graph(model_dir, graph)
                    row = measure_in_child(a, model_dir, batch, vocab)
                    row["cuda_graph"] = graph
                    row["precision"] = precision
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    save()
                    break
                except Exception as e:
                    rows.append({"precision": precision, "batch": batch, "cuda_graph": graph, "error": str(e)})
                    save()
                    print(f"precision {precision} batch {batch} cuda_graph {graph}: {e}", flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
