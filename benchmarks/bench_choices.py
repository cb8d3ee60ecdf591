"""The measurements behind three preprocessing and precision choices, on the benchmark's photos and checkpoint:

  precision  bf16 as a whole-model cast vs autocast (fp32 weights) vs autocast with bf16 matmul weights (ours),
             image tower only and with the labels encoded in bf16 too: agreement with fp32 and seconds per batch;
  draft      --fast-decode's draft target (1.0x, 1.25x, 1.5x, 2x the resize target): decode time per photo and
             agreement with exact preprocessing;
  resize     the bit-exact shortcuts that were tried for exact preprocessing: resizing only the centre crop through
             Pillow's `box` argument, and resizing the three bands separately.

Reported, never asserted. Needs transformers (pip install -e ".[test]").

    .venv/bin/python benchmarks/bench_choices.py --images 200          # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, LABELS, checkpoint, image_paths, photo_folder

from clipcli import api, scoring
from clipcli.loader import Clip, load, place_model
from clipcli.preprocess import PreprocessConfig, load_image, preprocess, resize_output_size

TEMPLATE = "a photo of a {}."


def agreement(clip: Clip, rows: np.ndarray, labels: np.ndarray, base_rows: np.ndarray,
              base_labels: np.ndarray) -> str:
    """top-1 agreement, max |dprob| and min cosine of (rows, labels) against the fp32 exact (base) scores."""
    base = scoring.probabilities(base_rows, base_labels, clip.logit_scale)
    probs = scoring.probabilities(rows, labels, clip.logit_scale)
    cosine = (scoring.normalize(rows) * scoring.normalize(base_rows)).sum(-1).min()
    top1 = np.mean(base.argmax(-1) == probs.argmax(-1))
    return f"top-1 {top1:7.1%}  max |dprob| {np.abs(probs - base).max():.1e}  min cosine {cosine:.7f}"


def per_batch_seconds(encode, batch: torch.Tensor) -> float:
    with torch.inference_mode():
        encode(batch)
        start = time.perf_counter()
        for _ in range(2):
            encode(batch)
    return (time.perf_counter() - start) / 2


def precision(model_dir: Path, paths: list[str], batch_size: int) -> None:
    print("\nprecision: bf16 variants against fp32 (image features on exact pixels)")
    clip = load(str(model_dir), device="cpu", dtype="fp32")
    pixels = torch.stack([torch.from_numpy(preprocess(load_image(Path(p)), clip.preprocess)) for p in paths])
    ids = clip.tokenizer.encode([TEMPLATE.replace("{}", label) for label in LABELS])
    bf16 = torch.bfloat16

    def image_rows(encode) -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([encode(chunk).float().numpy() for chunk in pixels.split(batch_size)])

    def label_rows(encode) -> np.ndarray:
        with torch.inference_mode():
            return scoring.normalize(encode(ids).float().numpy())

    def autocast(fn):
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=bf16):
                return fn(x)
        return run

    fp32 = clip.model
    whole = load(str(model_dir), device="cpu", dtype="fp32").model.to(bf16)
    mixed = place_model(load(str(model_dir), device="cpu", dtype="fp32").model, torch.device("cpu"), bf16)
    variants = {
        "whole-model cast": (lambda x: whole.encode_image(x.to(bf16)), whole.encode_text),
        "autocast, fp32 weights": (autocast(fp32.encode_image), autocast(fp32.encode_text)),
        "autocast, bf16 matmul weights (ours)": (autocast(mixed.encode_image), autocast(mixed.encode_text)),
    }
    base_rows, base_labels = image_rows(fp32.encode_image), label_rows(fp32.encode_text)
    print(f"  {'fp32':<38} {per_batch_seconds(fp32.encode_image, pixels[:batch_size]):.2f} s per batch of "
          f"{batch_size}")
    for name, (encode_image, encode_text) in variants.items():
        rows = image_rows(encode_image)
        seconds = per_batch_seconds(encode_image, pixels[:batch_size])
        fp32_labels = agreement(clip, rows, base_labels, base_rows, base_labels)
        print(f"  {name:<38} {seconds:.2f} s  fp32 labels: {fp32_labels}")
        print(f"  {'':<38} {'':>6}  bf16 labels: "
              f"{agreement(clip, rows, label_rows(encode_text), base_rows, base_labels)}")


def draft(model_dir: Path, paths: list[str]) -> None:
    print("\ndraft: --fast-decode's draft target against exact preprocessing (one thread, per photo)")
    clip = load(str(model_dir), device="cpu", dtype="fp32")
    labels = api.label_embeddings(clip, LABELS, [TEMPLATE])
    target = clip.preprocess.shortest_edge or clip.preprocess.size_height

    def decoded(draft_size: int | None) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        pixels = torch.stack([torch.from_numpy(preprocess(load_image(Path(p), draft_size=draft_size),
                                                          clip.preprocess)) for p in paths])
        return pixels, (time.perf_counter() - start) / len(paths) * 1000

    exact, exact_ms = decoded(None)
    base = clip.batch_features(exact)
    print(f"  {'exact':<16} {exact_ms:6.1f} ms")
    for factor in (1.0, 1.25, 1.5, 2.0):
        size = round(target * factor)
        pixels, ms = decoded(size)
        error = (pixels - exact).abs()
        rows = clip.batch_features(pixels)
        print(f"  {f'{size} ({factor}x)':<16} {ms:6.1f} ms  pixel error mean {error.mean():.4f} max {error.max():.3f}  "
              f"{agreement(clip, rows, labels, base, labels)}")


def resize(paths: list[str], trials: int) -> None:
    print("\nresize: bit-exact shortcuts for the exact resize + centre crop (224, bicubic)")
    config = PreprocessConfig()
    crop = config.crop_width
    rng, sizes = np.random.default_rng(0), random.Random(1)
    differ = 0
    for _ in range(trials):
        width, height = sizes.randint(crop + 1, 1500), sizes.randint(crop + 1, 1500)
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        new_h, new_w = resize_output_size(height, width, config)
        left, top = (new_w - crop) // 2, (new_h - crop) // 2
        full = image.resize((new_w, new_h), Image.Resampling.BICUBIC).crop((left, top, left + crop, top + crop))
        sx, sy = width / new_w, height / new_h
        boxed = image.resize((crop, crop), Image.Resampling.BICUBIC,
                             box=(left * sx, top * sy, (left + crop) * sx, (top + crop) * sy))
        differ += not np.array_equal(np.asarray(full), np.asarray(boxed))
    print(f"  crop-only resize through Pillow's box: differs from resize-then-crop in {differ} of {trials} random "
          "sizes")
    images = [load_image(Path(p)) for p in paths]

    def timed(fn) -> float:
        start = time.perf_counter()
        for image in images:
            fn(image)
        return (time.perf_counter() - start) / len(images) * 1000

    def size_of(image: Image.Image) -> tuple[int, int]:
        height, width = resize_output_size(image.height, image.width, config)
        return width, height

    whole = timed(lambda im: im.resize(size_of(im), Image.Resampling.BICUBIC))
    bands = timed(lambda im: Image.merge("RGB", [b.resize(size_of(im), Image.Resampling.BICUBIC) for b in im.split()]))
    print(f"  resize per photo: RGB at once {whole:.1f} ms, band by band {bands:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="photos (default 200)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resize-trials", type=int, default=3000, help="random sizes for the crop-box check")
    parser.add_argument("--only", choices=["precision", "draft", "resize"], help="run one section")
    args = parser.parse_args()
    model_dir = checkpoint(BENCH_DIR / "vit-b-32")
    paths = image_paths(photo_folder(BENCH_DIR / "photos", args.images), args.images)
    print(f"random-weight ViT-B/32, {len(paths)} JPEG photos, {len(LABELS)} labels, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads)")
    if args.only in (None, "precision"):
        precision(model_dir, paths, args.batch_size)
    if args.only in (None, "draft"):
        draft(model_dir, paths)
    if args.only in (None, "resize"):
        resize(paths[:60], args.resize_trials)


if __name__ == "__main__":
    main()
