#!/usr/bin/env python3
"""Make the image fixtures for pio-image under tests/fixtures/images/: small source images in every format the
crate decodes, two image-processor configs, and transformers' reference output for them.

Usage:
    python3 scripts/make_image_fixtures.py

Needs torch, torchvision, transformers, Pillow and numpy (no network: the configs are written here). Deterministic:
a second run gives byte-identical files. See scripts/README.md for what each file holds.

The references, and which transformers route they follow:
  * decoding: transformers.image_utils.load_image(path) = Pillow ImageOps.exif_transpose + convert("RGB");
  * processing: the checkpoint's image processor as AutoImageProcessor builds it (Qwen2VLImageProcessor, the
    torchvision backend, which transformers 5 picks by default), called on the decoded RGB array.
The decoded array is passed as numpy rather than as a PIL image because transformers >= 5.2x composites PIL
images that carry transparency onto white before processing, which load_image's convert("RGB") (and the
path/URL route, torchvision's decode_image) do not; summary.json records where the routes agree.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
import transformers
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torchvision.io import ImageReadMode, decode_image
from transformers import AutoImageProcessor
from transformers.image_utils import load_image

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT = REPO_ROOT / "tests" / "fixtures" / "images"

# Qwen/Qwen3-VL-2B-Instruct's preprocessor_config.json, as on the Hub.
HUB_CONFIG = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
# A small pixel range, so that big images are scaled down and small ones up, with Qwen2-VL's patch size and
# CLIP statistics (both left to transformers' class defaults), in transformers 5's processor_config.json layout
# with the legacy min_pixels/max_pixels keys overriding size.
CLAMP_CONFIG = {
    "image_processor": {
        "size": {"longest_edge": 1003520, "shortest_edge": 3136},
        "min_pixels": 3136,
        "max_pixels": 6272,
        "image_processor_type": "Qwen2VLImageProcessorFast",
    },
    "processor_class": "Qwen2VLProcessor",
}

# Which source images get a processor reference under which config (every image gets a decoding reference).
# Hub config: photo-landscape is resampled only vertically (320x240 -> 320x256), gradient only horizontally
# (300x256 -> 288x256), checker not at all (256x256), text up in both directions (320x96 -> 480x160).
HUB_IMAGES = ["photo-landscape.jpg", "gradient.png", "checker.png", "text.png"]
CLAMP_IMAGES = [
    "photo-landscape.jpg",
    "photo-portrait.jpg",
    "photo-pano.jpg",
    "photo-small.jpg",
    "gradient.png",
    "checker.png",
    "text.png",
    "tiny.png",
    "strip.png",
    "exif-rot6.jpg",
    "lossy.webp",
    "cmyk.jpg",
]
# A batch: transformers' output for several images at once must be the concatenation of single-image outputs.
CLAMP_BATCH = ["photo-pano.jpg", "tiny.png", "photo-landscape.jpg"]


# ---------------------------------------------------------------------------------------------- source images
def value_noise(rng: np.random.Generator, height: int, width: int, octaves: list[tuple[int, float]]) -> np.ndarray:
    """Smooth multi-octave noise in [0, 1], shape (height, width, 3)."""
    out = np.zeros((height, width, 3))
    for cell, amplitude in octaves:
        small = rng.random((height // cell + 2, width // cell + 2, 3))
        layer = Image.fromarray((small * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        out += amplitude * np.asarray(layer, dtype=np.float64) / 255
    out -= out.min()
    return out / out.max()


def photo(seed: int, width: int, height: int) -> Image.Image:
    """A natural-looking scene: sky gradient, textured ground, soft blobs and a hard-edged building."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    sky = np.concatenate([0.45 + 0.3 * y, 0.6 + 0.25 * y, 0.95 - 0.2 * y], axis=2) * np.ones((1, width, 1))
    ground = value_noise(rng, height, width, [(32, 1.0), (8, 0.5), (2, 0.25)]) * np.array([0.45, 0.55, 0.25])
    horizon = int(height * 0.55)
    scene = sky.copy()
    scene[horizon:] = ground[horizon:] + 0.15
    image = Image.fromarray((np.clip(scene, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        cx, cy = rng.integers(0, width), rng.integers(0, horizon)
        r = int(rng.integers(max(2, width // 16), max(3, width // 6)))
        draw.ellipse((cx - r, cy - r // 2, cx + r, cy + r // 2), fill=tuple(int(v) for v in rng.integers(180, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(radius=max(1, width // 80)))
    draw = ImageDraw.Draw(image)
    bx = int(width * 0.6)
    draw.rectangle((bx, int(height * 0.3), bx + width // 5, horizon + height // 10), fill=(90, 80, 85))
    for wy in range(int(height * 0.34), horizon, max(4, height // 16)):
        for wx in range(bx + 3, bx + width // 5 - 3, max(4, width // 40)):
            draw.rectangle((wx, wy, wx + 1, wy + 2), fill=(250, 230, 120))
    grain = rng.normal(0, 2, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def gradient(width: int, height: int) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    radial = np.hypot(xx - width / 2, yy - height / 2) / np.hypot(width / 2, height / 2)
    rgb = np.stack([xx / (width - 1), yy / (height - 1), 1 - radial], axis=2)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def checker(size: int, cell: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size]
    board = ((xx // cell + yy // cell) % 2).astype(bool)
    rgb = np.where(board[..., None], np.array([250, 245, 240]), np.array([20, 30, 160])).astype(np.uint8)
    rgb[::16, :] = (255, 0, 0)  # one-pixel lines: the worst case for aliasing
    rgb[:, ::23] = (0, 200, 0)
    return Image.fromarray(rgb)


def text(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((6, 4), "Qwen3-VL reads text:", fill=(0, 0, 0), font=ImageFont.load_default(size=26))
    draw.text((6, 40), "0123456789 ABCDEFGHIJ abcdefghij", fill=(200, 20, 20), font=ImageFont.load_default(size=15))
    draw.text((6, 64), "small print, 1.5% of 2,048 px", fill=(20, 20, 120), font=ImageFont.load_default(size=11))
    return image


def with_exif(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def png16(array: np.ndarray, transparent_grey: int | None = None) -> bytes:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA; grey optionally with a tRNS colour) written by hand: Pillow
    cannot write 16-bit colour."""
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + array[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    trns = chunk(b"tRNS", struct.pack(">H", transparent_grey)) if transparent_grey is not None else b""
    idat = chunk(b"IDAT", zlib.compress(raw, 9))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + trns + idat + chunk(b"IEND", b"")


def gif_with_offset_frame() -> bytes:
    """A 40x30 GIF whose only frame is 20x10 at (5, 7) with a transparent index: Pillow fills the rest of the
    canvas with that index. Written by hand (uncompressed LZW) because Pillow always writes full frames."""
    palette = b"".join(bytes(((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)) for i in range(256))
    pixels = bytes((i % 7) + 1 for i in range(20 * 10))
    codes, run = [], 0
    for value in pixels:
        if run == 0:
            codes.append(256)  # clear: keeps the code width at 9 bits
        codes.append(value)
        run = (run + 1) % 254
    codes.append(257)
    data, acc, bits = bytearray(), 0, 0
    for code in codes:
        acc |= code << bits
        bits += 9
        while bits >= 8:
            data.append(acc & 0xFF)
            acc >>= 8
            bits -= 8
    if bits:
        data.append(acc & 0xFF)
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", 40, 30, 0xF7, 2, 0) + palette)
    out += b"\x21\xf9\x04\x01\x00\x00\x02\x00"  # graphic control: transparent index 2
    out += b"\x2c" + struct.pack("<HHHHB", 5, 7, 20, 10, 0) + b"\x08"
    for start in range(0, len(data), 255):
        block = bytes(data[start : start + 255])
        out += bytes([len(block)]) + block
    out += b"\x00\x3b"
    return bytes(out)


def save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def source_images() -> dict[str, bytes]:
    base = photo(7, 64, 48)
    base_rgba = base.copy()
    yy, xx = np.mgrid[0:48, 0:64]
    base_rgba.putalpha(Image.fromarray(((xx * 4 + yy * 2) % 256).astype(np.uint8)))
    grey16 = (np.asarray(base.convert("L"), dtype=np.uint32) * 257).astype(np.uint16)
    grey16[:4] = np.arange(64, dtype=np.uint16)[None, :] * 5  # some values below 256, which survive the clamp
    first, second = photo(3, 64, 48), photo(4, 64, 48)
    animated = io.BytesIO()
    first.quantize(64).save(animated, "GIF", save_all=True, append_images=[second.quantize(64)], duration=100)
    animated_webp = io.BytesIO()
    first.save(animated_webp, "WEBP", save_all=True, append_images=[second], duration=100, lossless=True)
    return {
        "photo-landscape.jpg": save(photo(1, 320, 240), "JPEG", quality=85),
        "photo-portrait.jpg": save(photo(2, 180, 240), "JPEG", quality=92, subsampling=0),
        "photo-pano.jpg": save(photo(3, 480, 120), "JPEG", quality=80, subsampling=1, progressive=True),
        "photo-small.jpg": save(photo(5, 97, 61), "JPEG", quality=90),
        "grey.jpg": save(photo(6, 80, 60).convert("L"), "JPEG", quality=90),
        "cmyk.jpg": save(photo(8, 96, 64).convert("CMYK"), "JPEG", quality=90),
        "exif-rot6.jpg": save(photo(9, 160, 120), "JPEG", quality=88, exif=with_exif(base, 6)),
        "exif-rot5.jpg": save(photo(10, 72, 40), "JPEG", quality=88, exif=with_exif(base, 5)),
        "gradient.png": save(gradient(300, 256), "PNG", optimize=True),
        "checker.png": save(checker(256, 8), "PNG", optimize=True),
        "text.png": save(text(320, 96), "PNG", optimize=True),
        "tiny.png": save(Image.fromarray(np.random.default_rng(11).integers(0, 256, (5, 7, 3), dtype=np.uint8)), "PNG"),
        "strip.png": save(gradient(600, 5), "PNG"),
        "rgba.png": save(base_rgba, "PNG"),
        "grey-alpha.png": save(base_rgba.convert("LA"), "PNG"),
        "grey.png": save(base.convert("L"), "PNG"),
        "palette-trns.png": save(base.quantize(32), "PNG", transparency=5),
        "bilevel.png": save(base.convert("1"), "PNG"),
        "grey16.png": png16(grey16),
        "grey16-trns.png": png16(grey16, transparent_grey=int(grey16[10, 10])),
        "rgb16.png": png16(np.stack([grey16, 65535 - grey16, grey16 // 3], axis=2)),
        "exif-rot8.png": save(base, "PNG", exif=with_exif(base, 8)),
        "animated.gif": animated.getvalue(),
        "offset-trns.gif": gif_with_offset_frame(),
        "lossy.webp": save(photo(12, 128, 96), "WEBP", quality=80, method=4),
        "lossless-rgba.webp": save(base_rgba, "WEBP", lossless=True),
        "animated.webp": animated_webp.getvalue(),
        "rgb24.bmp": save(base, "BMP"),
        "palette8.bmp": save(base.quantize(100), "BMP"),
    }


# ----------------------------------------------------------------------------------------------- references
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def torchvision_route(path: Path, reference: np.ndarray) -> str:
    """What transformers 5.25's path/URL route (torchvision decode_image, EXIF applied) gives, against load_image."""
    try:
        decoded = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as error:
        return f"unsupported ({str(error).splitlines()[0][:60]})"
    if decoded.ndim == 4:
        return f"differs: decodes all {decoded.shape[0]} frames (transformers takes them as separate images)"
    if decoded.dtype != torch.uint8:
        return f"differs: {decoded.dtype} samples, not scaled to 8 bits"
    array = decoded.permute(1, 2, 0).numpy()
    if array.shape != reference.shape:
        return f"differs: shape {array.shape}"
    diff = np.abs(array.astype(np.int32) - reference.astype(np.int32)).max()
    return "equal" if diff == 0 else f"differs: max {diff} levels"


def level_table(processor) -> np.ndarray:
    """The processor's own rescale_and_normalize applied to every 8-bit level: [3, 256] float32."""
    levels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 1, 256).expand(1, 3, 1, 256).contiguous()
    out = processor.rescale_and_normalize(
        levels,
        processor.do_rescale,
        processor.rescale_factor,
        processor.do_normalize,
        processor.image_mean,
        processor.image_std,
    )
    return out[0, :, 0, :].numpy().astype(np.float32)


def to_levels(pixel_values: np.ndarray, table: np.ndarray, patch: int, frames: int) -> np.ndarray:
    """Inverts the level table on pixel_values [N, 3*T*P*P] -> uint8 [N, 3*P*P] (frame 0), asserting that the
    frames are equal and that table[level] reproduces every value bit for bit."""
    rows = pixel_values.shape[0]
    blocks = pixel_values.reshape(rows, 3, frames, patch * patch)
    for frame in range(1, frames):
        assert np.array_equal(blocks[:, :, frame], blocks[:, :, 0]), "frames differ"
    first = blocks[:, :, 0]
    levels = np.empty(first.shape, dtype=np.uint8)
    for channel in range(3):
        order = np.argsort(table[channel], kind="stable")
        found = np.searchsorted(table[channel][order], first[:, channel])
        found = np.clip(found, 0, 255)
        levels[:, channel] = order[found]
        assert np.array_equal(table[channel][levels[:, channel]], first[:, channel]), "value not in the level table"
    return levels.reshape(rows, 3 * patch * patch)


def processor_for(config_dir: Path):
    processor = AutoImageProcessor.from_pretrained(str(config_dir))
    assert type(processor).__name__ == "Qwen2VLImageProcessor", type(processor)
    assert processor.backend == "torchvision", processor.backend
    return processor


def run(processor, arrays: list[np.ndarray]):
    out = processor(images=arrays, return_tensors="pt", input_data_format="channels_last")
    return out["pixel_values"].numpy(), out["image_grid_thw"].numpy()


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "source").mkdir(parents=True)
    sources = source_images()
    decoded: dict[str, np.ndarray] = {}
    summary: dict = {
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
        },
        "images": {},
        "configs": {},
    }
    for name, data in sources.items():
        path = OUT / "source" / name
        path.write_bytes(data)
        array = np.asarray(load_image(str(path)))
        decoded[name] = array
        with Image.open(path) as opened:
            mode = opened.mode
        summary["images"][name] = {
            "pil_mode": mode,
            "height": int(array.shape[0]),
            "width": int(array.shape[1]),
            "rgb_sha256": sha256(array.tobytes()),
            "torchvision_route": torchvision_route(path, array),
        }

    for config_name, file_name, config, images in [
        ("qwen3vl-hub", "preprocessor_config.json", HUB_CONFIG, HUB_IMAGES),
        ("qwen2vl-clamp", "processor_config.json", CLAMP_CONFIG, CLAMP_IMAGES),
    ]:
        config_dir = OUT / "configs" / config_name
        config_dir.mkdir(parents=True)
        (config_dir / file_name).write_text(json.dumps(config, indent=2) + "\n")
        processor = processor_for(config_dir)
        table = level_table(processor)
        patch, frames = processor.patch_size, processor.temporal_patch_size
        refs_dir = OUT / "refs" / config_name
        refs_dir.mkdir(parents=True)
        (refs_dir / "level_table.f32").write_bytes(table.astype("<f4").tobytes())
        entries = {}
        for name in images:
            pixel_values, grid = run(processor, [decoded[name]])
            levels = to_levels(pixel_values, table, patch, frames)
            Image.fromarray(levels).save(refs_dir / (name + ".png"), optimize=True)
            with Image.open(OUT / "source" / name) as opened:
                pil_object_route, _ = run(processor, [opened])
            entries[name] = {
                "grid_thw": grid[0].tolist(),
                "rows": int(pixel_values.shape[0]),
                "cols": int(pixel_values.shape[1]),
                "pixel_values_sha256": sha256(pixel_values.astype("<f4").tobytes()),
                "pil_object_route_equal": bool(np.array_equal(pil_object_route, pixel_values)),
            }
        batch = {}
        if config_name == "qwen2vl-clamp":
            # transformers' other route: handing the processor the opened PIL image (no EXIF transpose; in 5.25,
            # transparency composited onto white), against the reference route, for every source image.
            for name, array in decoded.items():
                reference_values, _ = run(processor, [array])
                with Image.open(OUT / "source" / name) as opened:
                    try:
                        values, _ = run(processor, [opened])
                    except Exception as error:  # noqa: BLE001 - recorded, not fatal
                        summary["images"][name]["pil_object_route"] = f"fails ({type(error).__name__})"
                        continue
                if values.shape != reference_values.shape:
                    verdict = f"differs: shape {list(values.shape)}"
                else:
                    diff = float(np.abs(values - reference_values).max())
                    verdict = "equal" if diff == 0 else f"differs: max |diff| {diff:.3g}"
                summary["images"][name]["pil_object_route"] = verdict
            pixel_values, grids = run(processor, [decoded[name] for name in CLAMP_BATCH])
            singles = [run(processor, [decoded[name]])[0] for name in CLAMP_BATCH]
            assert np.array_equal(pixel_values, np.concatenate(singles)), "batch is not the concatenation"
            batch = {"images": CLAMP_BATCH, "grid_thw": grids.tolist()}
        summary["configs"][config_name] = {
            "file": file_name,
            "patch_size": patch,
            "temporal_patch_size": frames,
            "merge_size": processor.merge_size,
            "images": entries,
            "batch": batch,
        }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
