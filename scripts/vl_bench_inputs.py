#!/usr/bin/env python3
"""Inputs of the Qwen3-VL GPU benchmark (scripts/vl_gpu_bench.sh):

    python3 scripts/vl_bench_inputs.py images --sizes 448x448,1024x1024,1920x1080 --out DIR
        one synthetic photo-like JPEG per size (width x height) as DIR/<W>x<H>.jpg (quality 90, 4:2:0): what
        `vl_bench` hands the engine and `hf_vl_baseline.py` hands transformers' processor.

    python3 scripts/vl_bench_inputs.py text-checkpoint --checkpoint VL_DIR --out DIR
        the text decoder of a Qwen3VLForConditionalGeneration checkpoint as a Qwen3ForCausalLM checkpoint
        (model.language_model.* -> model.*, the text_config as config.json, rope_theta kept, no mrope):
        on text positions the two decoders compute the same thing, so their exports can be compared
        for speed and for agreement.
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file, save_file


def synthetic_photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients, a few shapes and mild noise: content the resampling has to work on."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :]
    y = np.linspace(0, 1, height)[:, None]
    rgb = np.stack([255 * x * np.ones_like(y), 255 * y * np.ones_like(x), 128 + 100 * np.sin(8 * x + 5 * y)], axis=-1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.2) * min(width, height)
        mask = (np.arange(width)[None, :] - cx) ** 2 + (np.arange(height)[:, None] - cy) ** 2 < r * r
        rgb[mask] = rng.uniform(0, 255, 3)
    rgb += rng.normal(0, 6, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def images(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(args.sizes.split(",")):
        width, height = (int(v) for v in size.lower().split("x"))
        path = out / f"{size}.jpg"
        synthetic_photo(width, height, i).save(path, format="JPEG", quality=90)
        print(f"{path}: {width}x{height}, {path.stat().st_size} bytes")


def text_checkpoint(args) -> None:
    src, dst = Path(args.checkpoint), Path(args.out)
    config = json.loads((src / "config.json").read_text())
    text = dict(config["text_config"])
    rope = text.pop("rope_scaling", None) or text.pop("rope_parameters", None) or {}
    text.setdefault("rope_theta", rope.get("rope_theta", 500000.0))
    text.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", rope_scaling=None,
                tie_word_embeddings=config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(text, indent=2) + "\n")
    for f in ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]:
        if (src / f).is_file():
            shutil.copy(src / f, dst / f)
    weights = load_file(src / "model.safetensors")
    prefix = "model.language_model."
    renamed = {("model." + k[len(prefix):]): v for k, v in weights.items() if k.startswith(prefix)}
    if "lm_head.weight" in weights:
        renamed["lm_head.weight"] = weights["lm_head.weight"]
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    print(f"{dst}: {len(renamed)} tensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("images")
    p.add_argument("--sizes", default="448x448,1024x1024,1920x1080")
    p.add_argument("--out", required=True, help="a folder for the JPEG files")
    t = sub.add_parser("text-checkpoint")
    t.add_argument("--checkpoint", required=True)
    t.add_argument("--out", required=True)
    args = ap.parse_args()
    {"images": images, "text-checkpoint": text_checkpoint}[args.command](args)


if __name__ == "__main__":
    main()
