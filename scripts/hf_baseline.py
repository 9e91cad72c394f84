#!/usr/bin/env python3
"""The Hugging Face transformers baseline for `pio bench`: greedy `generate` timings of a checkpoint.

    python3 scripts/hf_baseline.py --checkpoint DIR --prompt-len N --new-tokens M \
        [--batch B] [--dtype bf16|fp16|fp32] [--device cuda|cuda:K|cpu] [--attn eager|sdpa] --out result.json

The prompt is N random token ids (seeded). After one short warm-up generate, it times a generate of one new token
(time to first token, `ttft_ms`) and one of M new tokens (`min_new_tokens=M`, so end-of-sequence does not stop it),
each the median of --repeats runs, with the GPU synchronized around each. Decode throughput over all sequences is
tokens_per_s = B * (M - 1) / (t_total - t_first). Peak memory is torch.cuda.max_memory_allocated on a GPU (weights
included) and the process's peak RSS on the CPU.
"""

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a Hugging Face checkpoint folder")
    p.add_argument("--prompt-len", type=int, required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda", help="cuda, cuda:K or cpu")
    p.add_argument("--attn", default="eager", help="attn_implementation (eager, sdpa, ...)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each generate (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="where to write the JSON result")
    a = p.parse_args(argv)
    if a.prompt_len < 1 or a.batch < 1 or a.repeats < 1:
        p.error("--prompt-len, --batch and --repeats must be at least 1")
    if a.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed is measured after the first token)")
    return a


def load_model(checkpoint, dtype, attn, device):
    kwargs = {"attn_implementation": attn}
    try:  # transformers >= 4.56 takes `dtype`; older ones `torch_dtype`
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, **kwargs)
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=dtype, **kwargs)
    return model.to(device).eval()


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_generation(model, device, inputs, new_tokens, repeats):
    """(t_first, t_total) in seconds: the medians of `repeats` greedy generates of one and of `new_tokens` new
    tokens (`min_new_tokens`, so end-of-sequence does not stop them) from `inputs`, after a short warm-up, the GPU
    synchronized around each; the peak-memory counter is reset after the warm-up. Exits when the long generate is
    not slower than the short one (decode speed would be meaningless). `inputs` is the generate's keyword
    arguments, or a function making them, called inside each timed run (an image read and processed each time)."""
    make_inputs = inputs if callable(inputs) else (lambda: inputs)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    # A fresh greedy config: the checkpoint's sampling settings would only draw warnings.
    base = model.generation_config
    eos = base.eos_token_id if base.eos_token_id is not None else getattr(cfg, "eos_token_id", None)
    first_eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    pad = base.pad_token_id if base.pad_token_id is not None else (first_eos if first_eos is not None else 0)
    prompt_len = make_inputs()["input_ids"].shape[1]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def generate(n):
        sync()
        t = time.perf_counter()
        gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=eos, pad_token_id=pad)
        out = model.generate(**make_inputs(), generation_config=gc)
        sync()
        dt = time.perf_counter() - t
        if out.shape[1] != prompt_len + n:
            raise RuntimeError(f"generate returned {out.shape[1] - prompt_len} new tokens, not {n}")
        return dt

    with torch.inference_mode():
        generate(min(4, new_tokens))  # warm-up: kernels, allocator, caches
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_first = statistics.median(generate(1) for _ in range(repeats))
        t_total = statistics.median(generate(new_tokens) for _ in range(repeats))
    if t_total <= t_first:
        sys.exit(f"the {new_tokens}-token generate ({t_total:.4f}s) was not slower than the 1-token one "
                 f"({t_first:.4f}s); use more --new-tokens or --repeats")
    return t_first, t_total


def write_json(result, path):
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"hf_baseline: --device {a.device} but torch {torch.__version__} sees no CUDA GPU")
    dtype = DTYPES[a.dtype]
    transformers.logging.set_verbosity_error()  # the checkpoint's sampling settings warn under greedy decoding
    torch.manual_seed(a.seed)
    model = load_model(a.checkpoint, dtype, a.attn, device)

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    gen = torch.Generator().manual_seed(a.seed)
    input_ids = torch.randint(0, cfg.vocab_size, (a.batch, a.prompt_len), generator=gen).to(device)
    attention_mask = torch.ones_like(input_ids)

    t_first, t_total = time_generation(model, device, dict(input_ids=input_ids, attention_mask=attention_mask),
                                       a.new_tokens, a.repeats)
    decode_s = t_total - t_first
    if device.type == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak RSS"
    result = {
        "tokens_per_s": a.batch * (a.new_tokens - 1) / decode_s,
        "ttft_ms": t_first * 1e3,
        "ms_per_step": decode_s * 1e3 / (a.new_tokens - 1),
        "total_s": t_total,
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": peak_kind,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "device_name": device_name(device),
        "checkpoint": a.checkpoint,
        "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
        "batch": a.batch,
        "dtype": a.dtype,
        "attn": a.attn,
        "repeats": a.repeats,
        "seed": a.seed,
    }
    write_json(result, a.out)
    print(f"hf_baseline: {result['tokens_per_s']:.1f} tokens/s decode, ttft {result['ttft_ms']:.1f} ms, "
          f"peak {peak / 2**20:.0f} MiB ({result['device_name']})")


if __name__ == "__main__":
    main()
