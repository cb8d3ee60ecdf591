"""Shared benchmark fixtures: a random-weight CLIP checkpoint in Hugging Face layout and folders of synthetic
photos, both cached under .bench/ (git-ignored) and rebuilt only when missing. Needs transformers (test extra)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / ".bench"

# Mixed realistic photo sizes (width, height): webcam and web images up to a 12 MP phone photo; every third one
# is portrait. The cycle's mean is about 4 megapixels.
PHOTO_SIZES = [(640, 480), (1024, 768), (1600, 1200), (2048, 1536), (3264, 2448), (4000, 3000)]
LABELS = ["cat", "dog", "rocket", "coffee", "astronaut", "horse", "bicycle", "mountain", "beach", "city street"]


def checkpoint(directory: Path, tiny: bool = False) -> Path:
    """A random-weight transformers.CLIPModel saved with our bundled tokenizer and a preprocessor_config.json.

    Default dimensions are ViT-B/32 (CLIPConfig()); `tiny` gives a 2-layer width-64 model for memory runs."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    import transformers

    from clipcli.preprocess import PreprocessConfig
    from clipcli.tokenizer import ClipTokenizer

    torch.manual_seed(0)
    if tiny:
        small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        config = transformers.CLIPConfig(text_config=small, vision_config=dict(small, image_size=224, patch_size=32),
                                         projection_dim=32)
    else:
        config = transformers.CLIPConfig()
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    transformers.CLIPModel(config).eval().save_pretrained(partial)
    ClipTokenizer.bundled().save(partial)
    image_size = config.vision_config.image_size
    (partial / "preprocessor_config.json").write_text(
        json.dumps(PreprocessConfig.for_image_size(image_size).to_json(), indent=2))
    os.replace(partial, directory)
    return directory


def synthetic_photo(width: int, height: int, seed: int) -> Image.Image:
    """Photo-like RGB content: coloured gradients, a few soft blobs and sensor noise, so JPEG sizes are realistic."""
    rng = np.random.default_rng(seed)
    # Compose at low resolution and upscale (fast at 12 MP), then add full-resolution noise.
    small_w, small_h = max(width // 8, 8), max(height // 8, 8)
    y, x = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    fx, fy = x / small_w, y / small_h
    freq = rng.uniform(1, 8, size=(3, 2))
    phase = rng.uniform(0, 6.28, size=3)
    base = np.stack([np.sin(freq[c, 0] * fx * 3 + freq[c, 1] * fy * 3 + phase[c]) for c in range(3)], axis=-1)
    base = 128 + 90 * base
    for _ in range(int(rng.integers(2, 6))):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        blob = np.exp(-((fx - cx) ** 2 + (fy - cy) ** 2) / (2 * r * r))[..., None]
        base = base * (1 - blob) + rng.uniform(0, 255, size=3) * blob
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR)
    noise = rng.normal(0, 6, size=(256, 256, 3)).astype(np.int16)  # tiled: cheap, still defeats JPEG smoothing
    reps = (height // 256 + 1, width // 256 + 1, 1)
    pixels = np.asarray(image).astype(np.int16) + np.tile(noise, reps)[:height, :width]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def photo_folder(directory: Path, count: int, sizes: list[tuple[int, int]] | None = None) -> Path:
    """`count` JPEG (quality 90) photos cycling through `sizes` (PHOTO_SIZES by default); built once, then reused."""
    sizes = sizes or PHOTO_SIZES
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        path = directory / f"photo-{index:05d}.jpg"
        if path.exists():
            continue
        width, height = sizes[index % len(sizes)]
        if index % 3 == 2:
            width, height = height, width
        tmp = path.with_suffix(".tmp")
        synthetic_photo(width, height, seed=index).save(tmp, format="JPEG", quality=90)
        os.replace(tmp, path)
    return directory


def image_paths(directory: Path, count: int) -> list[str]:
    """The first `count` photos of a folder built by photo_folder, sorted."""
    return [str(directory / f"photo-{index:05d}.jpg") for index in range(count)]


def first_photos(directory: Path, count: int) -> Path:
    """A folder of symbolic links to the first `count` photos of `directory`, for commands that take a folder."""
    subset = directory.with_name(f"{directory.name}-first-{count}")
    subset.mkdir(exist_ok=True)
    wanted = {Path(p).name for p in image_paths(directory, count)}
    for stale in subset.iterdir():
        if stale.name not in wanted:
            stale.unlink()
    for name in wanted:
        if not (subset / name).is_symlink():
            (subset / name).symlink_to(directory / name)
    return subset


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Runs argv[1:] with stdout discarded, then prints its peak RSS in KiB. getrusage(RUSAGE_CHILDREN) in this small
# launcher, rather than in the benchmark, because a child's ru_maxrss starts at its parent's RSS at fork time.
_LAUNCHER = ("import resource, subprocess, sys; "
             "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
             "sys.stderr.buffer.write(code.stderr); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code.returncode)")


def run_measured(command: Sequence[str]) -> tuple[float, float]:
    """Run a command, stdout discarded: (wall seconds, its peak RSS in MiB). Raises RuntimeError when it fails."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds, int(done.stdout.split()[-1]) / 1024


class OtherLoad:
    """Cores used by other processes during each `with` block: system busy time (/proc/stat) minus ours."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    @staticmethod
    def _system_busy() -> float:
        try:
            values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        except (OSError, ValueError):
            return 0.0
        return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> OtherLoad:
        self._start = (time.perf_counter(), self._system_busy(), self._own())
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, own = self._start
        others = (self._system_busy() - busy) - (self._own() - own)
        self.samples.append(max(others, 0.0) / (time.perf_counter() - wall))


def wait_until_quiet(max_cores: float = 0.25, timeout: float = 120.0) -> float:
    """Wait (up to `timeout` s) until other processes use under `max_cores` over a 1 s sample; returns the last one.

    On a shared machine this keeps a timed run from starting on top of someone else's test suite."""
    meter = OtherLoad()
    deadline = time.perf_counter() + timeout
    while True:
        with meter:
            time.sleep(1.0)
        if meter.samples[-1] < max_cores or time.perf_counter() > deadline:
            return meter.samples[-1]
