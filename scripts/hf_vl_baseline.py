#!/usr/bin/env python3
"""The transformers baseline of the Qwen3-VL GPU benchmark: greedy `generate` with one image.

    python3 scripts/hf_vl_baseline.py --checkpoint DIR --inputs PATCHES --image 1024x1024 \
        [--question-tokens 64] [--new-tokens 128] [--dtype bf16] [--attn eager] [--device cuda] --out result.json

The prompt is what `vl_bench ttft` feeds the exported graphs: <|vision_start|>, the image's pad tokens,
<|vision_end|>, then --question-tokens seeded ids; the image is the patch rows `scripts/vl_bench_inputs.py
patches` wrote (transformers' own processor output). After a warm-up it times a generate of one new token (time to
first token: the vision encoder and the prefill, `ttft_ms`) and one of --new-tokens (`min_new_tokens`, so
end-of-sequence does not stop it), each the median of --repeats, the GPU synchronized around each; decode
throughput is (new_tokens - 1) / (t_total - t_first).
"""

import argparse
import inspect
import sys

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from hf_baseline import DTYPES, device_name, time_generation, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a Qwen3VLForConditionalGeneration checkpoint folder")
    p.add_argument("--inputs", required=True, help="patch rows from scripts/vl_bench_inputs.py patches")
    p.add_argument("--image", required=True, help="which image of --inputs (its WxH name)")
    p.add_argument("--question-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--attn", default="eager")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.new_tokens < 2 or a.repeats < 1:
        p.error("--new-tokens must be at least 2 and --repeats at least 1")
    return a


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"hf_vl_baseline: --device {a.device} but torch {torch.__version__} sees no CUDA GPU")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(a.seed)
    model = AutoModelForImageTextToText.from_pretrained(a.checkpoint, dtype=DTYPES[a.dtype], attn_implementation=a.attn)
    model = model.to(device).eval()
    cfg = model.config

    inputs = load_file(a.inputs)
    pixel_values = inputs[f"{a.image}.pixel_values"].to(device, DTYPES[a.dtype])
    grid = inputs[f"{a.image}.image_grid_thw"].reshape(1, 3).to(device)
    merge = cfg.vision_config.spatial_merge_size
    pads = int(grid.prod()) // (merge * merge)
    gen = torch.Generator().manual_seed(a.seed)
    question = torch.randint(1000, 101000, (a.question_tokens,), generator=gen).tolist()
    ids = [cfg.vision_start_token_id] + [cfg.image_token_id] * pads + [cfg.vision_end_token_id] + question
    input_ids = torch.tensor([ids], device=device)
    kwargs = dict(attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values, image_grid_thw=grid)
    # transformers >= 5.2x computes the rope index from the token types; older versions from the ids.
    if "mm_token_type_ids" in inspect.signature(model.model.forward).parameters:
        kwargs["mm_token_type_ids"] = (input_ids == cfg.image_token_id).to(torch.int32)

    t_first, t_total = time_generation(model, device, dict(input_ids=input_ids, **kwargs), a.new_tokens, a.repeats)
    decode_s = t_total - t_first
    result = {
        "ttft_ms": t_first * 1e3,
        "tokens_per_s": (a.new_tokens - 1) / decode_s,
        "ms_per_step": decode_s * 1e3 / (a.new_tokens - 1),
        "prompt_tokens": len(ids),
        "image": a.image,
        "grid_thw": grid[0].tolist(),
        "question_tokens": a.question_tokens,
        "new_tokens": a.new_tokens,
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device_name": device_name(device),
        "dtype": a.dtype,
        "attn": a.attn,
        "repeats": a.repeats,
        "checkpoint": a.checkpoint,
    }
    write_json(result, a.out)
    print(f"hf_vl_baseline: ttft {result['ttft_ms']:.1f} ms, {result['tokens_per_s']:.1f} tokens/s decode "
          f"({result['device_name']})")


if __name__ == "__main__":
    main()
