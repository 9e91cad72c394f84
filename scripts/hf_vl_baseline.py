#!/usr/bin/env python3
"""The transformers baseline of the Qwen3-VL GPU benchmark: greedy `generate` with one image, asked what
`vl_bench` asked the engine.

    python3 scripts/hf_vl_baseline.py --checkpoint DIR --engine-report vl-bench.json \
        [--new-tokens 128] [--dtype bf16] [--attn eager] [--device cuda] [--repeats 3] --out result.json

The prompt is the same chat: one user message holding the image file (`ttft.image` of the engine's report) and the
question (`ttft.question`), through the checkpoint's chat template and its image processor (transformers' own
Qwen3VLProcessor over the checkpoint's tokenizer, preprocessor_config.json and chat_template.json). After a warm-up
it times a generate of one new token (time to first token: image processing, the vision encoder and the prefill,
`ttft_ms`; the image is read and processed in every timed run, as the engine does) and one of --new-tokens
(`min_new_tokens`, so end-of-sequence does not stop it), each the median of --repeats, the GPU synchronized around
each; decode throughput is (new_tokens - 1) / (t_total - t_first). The prompt's token count is reported: it must be
the engine's.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer, Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

from hf_baseline import DTYPES, device_name, time_generation, write_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a Qwen3VLForConditionalGeneration checkpoint folder")
    p.add_argument("--engine-report", required=True, help="vl_bench's JSON report (its ttft.image and ttft.question)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--attn", default="eager")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.new_tokens < 2 or a.repeats < 1:
        p.error("--new-tokens must be at least 2 and --repeats at least 1")
    return a


def make_processor(checkpoint: Path) -> Qwen3VLProcessor:
    template = json.loads((checkpoint / "chat_template.json").read_text())["chat_template"]
    image = AutoImageProcessor.from_pretrained(checkpoint)
    merge = image.merge_size
    video = Qwen3VLVideoProcessor(patch_size=image.patch_size, temporal_patch_size=image.temporal_patch_size,
                                  merge_size=merge)
    return Qwen3VLProcessor(image_processor=image, tokenizer=AutoTokenizer.from_pretrained(checkpoint),
                            video_processor=video, chat_template=template)


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"hf_vl_baseline: --device {a.device} but torch {torch.__version__} sees no CUDA GPU")
    transformers.logging.set_verbosity_error()
    report = json.loads(Path(a.engine_report).read_text())["ttft"]
    checkpoint = Path(a.checkpoint)
    processor = make_processor(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=DTYPES[a.dtype], attn_implementation=a.attn)
    model = model.to(device).eval()
    messages = [{"role": "user", "content": [{"type": "image", "path": report["image"]},
                                             {"type": "text", "text": report["question"]}]}]

    def inputs():
        out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
        return {k: (v.to(device, DTYPES[a.dtype]) if k == "pixel_values" else v.to(device)) for k, v in out.items()}

    prompt_tokens = int(inputs()["input_ids"].shape[1])
    t_first, t_total = time_generation(model, device, inputs, a.new_tokens, a.repeats)
    decode_s = t_total - t_first
    result = {
        "ttft_ms": t_first * 1e3,
        "tokens_per_s": (a.new_tokens - 1) / decode_s,
        "ms_per_step": decode_s * 1e3 / (a.new_tokens - 1),
        "prompt_tokens": prompt_tokens,
        "engine_prompt_tokens": report["prompt_tokens"],
        "image": report["image"],
        "new_tokens": a.new_tokens,
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device_name": device_name(device),
        "dtype": a.dtype,
        "attn": a.attn,
        "repeats": a.repeats,
        "checkpoint": str(checkpoint),
    }
    write_json(result, a.out)
    print(f"hf_vl_baseline: ttft {result['ttft_ms']:.1f} ms, {result['tokens_per_s']:.1f} tokens/s decode, "
          f"{prompt_tokens} prompt tokens (engine: {report['prompt_tokens']}) ({result['device_name']})")


if __name__ == "__main__":
    main()
