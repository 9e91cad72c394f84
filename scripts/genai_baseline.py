#!/usr/bin/env python3
"""onnxruntime-genai as a peer: build its graphs from a checkpoint with its own builder, then time generation.

    python3 scripts/genai_baseline.py --checkpoint DIR --work DIR --precisions bf16,int4 --batches 1,32 \
        --prompt-len 128 --new-tokens 128 --ep cuda --out result.json

Needs `onnxruntime_genai` importable (on the GPU host: scripts/genai_setup.sh puts the onnxruntime-genai-cuda wheel
and an onnxruntime package whose capi/ holds ONNX Runtime 1.31.1's CUDA build on PYTHONPATH). For each precision it
runs `python3 -m onnxruntime_genai.models.builder -i CHECKPOINT -o WORK/<precision> -p <precision> -e <ep>` (once;
an existing folder is reused), turns CUDA graphs on in genai_config.json (`enable_cuda_graph`, under
model.decoder.session_options.provider_options), and for each batch size generates from random prompt ids (seeded)
with greedy search and min_length = max_length, so every sequence decodes exactly --new-tokens tokens whatever the
random weights predict. Timings per run (median of --repeats, after one warm-up):

- ttft_ms: append_tokens (the prefill) + the first generate_next_token, until its token is read back;
- tokens_per_s: batch * (new_tokens - 1) / the time of the remaining generate_next_token calls.

A batch size that fails with CUDA graphs on is retried with them off, and the row says which ran.
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def build(checkpoint, out_dir, precision, ep):
    if (out_dir / "genai_config.json").is_file():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out_dir),
           "-p", precision, "-e", ep, "-c", str(out_dir / "hf-cache")]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


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


def measure(og, model_dir, ep, batch, prompt_len, new_tokens, repeats, vocab, cuda_graph):
    set_cuda_graph(model_dir, cuda_graph)
    config = og.Config(str(model_dir))
    config.clear_providers()
    if ep != "cpu":
        config.append_provider(ep)
    model = og.Model(config)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(batch, prompt_len), dtype=np.int32)
    run_once(og, model, ids, min(new_tokens, 8))  # warm-up (and CUDA-graph capture)
    runs = [run_once(og, model, ids, new_tokens) for _ in range(repeats)]
    del model
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "cuda_graph": cuda_graph,
        "ttft_ms": statistics.median(r[0] for r in runs),
        "tokens_per_s": statistics.median(r[1] for r in runs),
        "decoded_steps": runs[0][2],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--work", required=True, help="where the builder's graphs go (one folder per precision)")
    p.add_argument("--precisions", default="bf16,int4")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ep", default="cuda")
    p.add_argument("--cuda-graph", choices=["on", "off"], default="on")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import onnxruntime_genai as og

    checkpoint = Path(a.checkpoint)
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    rows = []

    def save():  # after every row, so a run cut short keeps what it measured
        result = {
            "what": "onnxruntime-genai generate, its own builder's graphs, greedy, min_length = max_length",
            "onnxruntime_genai": getattr(og, "__version__", "unknown"),
            "python": platform.python_version(),
            "checkpoint": str(checkpoint),
            "rows": rows,
        }
        Path(a.out).write_text(json.dumps(result, indent=2))

    for precision in a.precisions.split(","):
        model_dir = Path(a.work) / precision
        try:
            build(checkpoint, model_dir, precision, a.ep)
        except Exception as e:  # a failed build is a row, not the end of the run
            rows.append({"precision": precision, "error": f"build failed: {e}"})
            save()
            continue
        for batch in [int(b) for b in a.batches.split(",")]:
            graph_modes = [a.cuda_graph == "on", False] if a.cuda_graph == "on" and a.ep == "cuda" else [False]
            for graph in graph_modes:
                try:
                    row = measure(og, model_dir, a.ep, batch, a.prompt_len, a.new_tokens, a.repeats, vocab, graph)
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


if __name__ == "__main__":
    sys.exit(main())
