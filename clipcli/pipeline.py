"""classify() and embed() over a loaded Clip: find images, decode them in parallel ahead of the model, run batches,
return data (numpy float32, paths, failures). Never formats text or writes files; that is output.py's job."""

from __future__ import annotations

import ctypes
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipcli.errors import InputError, UsageError
from clipcli.loader import Clip
from clipcli.preprocess import load_image, preprocess, to_rgb

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_TEMPLATE = "a photo of a {}."

Progress = Callable[[int], None]  # called with the number of inputs just finished


@dataclass(frozen=True)
class Failure:
    """An input that could not be processed, and why (one short line)."""

    path: str
    reason: str


@dataclass(frozen=True)
class Batch:
    """Results for consecutive inputs: `rows` holds one float32 row per path (features or probabilities)."""

    paths: list[str]
    rows: np.ndarray


def find_images(inputs: Sequence[str]) -> tuple[list[str], list[Failure]]:
    """Files as given plus image files found under folders (recursively, hidden entries skipped), sorted.

    Each real directory is visited once, so symlink loops end. A missing input is a UsageError."""
    for name in inputs:
        if not os.path.lexists(name):
            raise UsageError(f"path '{name}' does not exist; pass image files or folders")
    found: set[str] = set()
    failures: list[Failure] = []
    seen_dirs: set[tuple[int, int]] = set()
    for name in inputs:
        if os.path.isdir(name):
            _walk(name, found, failures, seen_dirs)
        else:
            found.add(name)  # named explicitly: tried whatever its extension, so a bad file gets a reason
    return sorted(found), sorted(failures, key=lambda f: f.path)


def _walk(directory: str, found: set[str], failures: list[Failure], seen: set[tuple[int, int]]) -> None:
    # Depth-first with an explicit stack, not recursion: a tree nested deeper than Python's recursion limit
    # (a few thousand short folder names fit in a path) is walked like any other.
    stack = [directory]
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
        except OSError as err:
            failures.append(Failure(folder, _os_reason(err)))
            continue
        key = (info.st_dev, info.st_ino)
        if key in seen:
            continue
        seen.add(key)
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as err:
            failures.append(Failure(folder, _os_reason(err)))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks: a linked folder is walked, a loop ends at `seen`
            except OSError as err:
                failures.append(Failure(entry.path, _os_reason(err)))
                continue
            if is_dir:
                subfolders.append(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                if entry.is_symlink() and not os.path.exists(entry.path):
                    failures.append(Failure(entry.path, "broken symbolic link"))
                else:
                    found.add(entry.path)
        stack.extend(reversed(subfolders))  # visit in name order, as a recursive walk would


def _os_reason(err: OSError) -> str:
    return err.strerror.lower() if err.strerror else type(err).__name__


# glibc's mallopt parameters, from malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS; False if not glibc.

    Every batch allocates and frees the same large buffers (decoded photos, (B, T, 4D) activations). By default
    glibc maps many of them fresh and unmaps them on free, so each batch page-faults them in again: about 15% of
    decode time and up to a fifth of model time on CPU (benchmarks/README.md). Process-wide, so it is for a
    program to call once at start (the CLI), never at import. Peak memory is unchanged; freed memory stays with
    the process for reuse until it exits."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # No mmap'd blocks, so large buffers come from the heap and are reused; trim the heap only past 1 GiB free.
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1


def default_workers() -> int:
    """Decode threads when --workers is not given: one per CPU core this process may run on."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


def decode_ahead(device: torch.device) -> int:
    """Batches decoded in the background while the model runs: 0 on CPU, 2 on an accelerator.

    On CPU the model already uses every core, so decoding alongside it only makes the two fight for cores:
    decoding each batch on all cores between model calls measured as fast or faster, holding half the decoded
    images (benchmarks/README.md). A GPU computes while the CPU decodes, so there the next batches are prepared
    during each model call."""
    return 0 if device.type == "cpu" else 2


def decode_chunks(
    clip: Clip, paths: Sequence[str], chunk_size: int, workers: int | None = None, draft: bool = False,
    ahead: int = 0,
) -> Iterator[list[tuple[str, torch.Tensor | Failure]]]:
    """Consecutive `chunk_size` slices of paths as lists of (path, (3, H, W) float32 pixels or Failure).

    Each slice is decoded by `workers` threads at once; `ahead` further slices are decoded in the background
    while the caller works on the current one, so at most (ahead + 1) * chunk_size decoded images are held."""
    if chunk_size < 1 or ahead < 0:
        raise UsageError(f"chunk size must be at least 1 and ahead at least 0, got {chunk_size} and {ahead}")
    config = clip.preprocess
    draft_size = config.draft_size if draft else None

    def work(path: str) -> torch.Tensor | Failure:
        try:
            return preprocess(load_image(Path(path), draft_size=draft_size), config)
        except InputError as err:
            return Failure(path, str(err))

    def submit_all(pool: ThreadPoolExecutor, chunk: Sequence[str]) -> list[tuple[str, Future]]:
        # Largest files first: the slice is done when its slowest image is, so a big photo should not start last
        # while the other threads idle (measured about 1.5% faster on mixed photo sizes).
        futures = {index: pool.submit(work, chunk[index]) for index in sorted(
            range(len(chunk)), key=lambda i: _file_size(chunk[i]), reverse=True)}
        return [(path, futures[index]) for index, path in enumerate(chunk)]

    with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="clip-decode") as pool:
        pending: deque[list[tuple[str, Future]]] = deque()
        try:
            for start in range(0, len(paths), chunk_size):
                pending.append(submit_all(pool, paths[start:start + chunk_size]))
                if len(pending) > ahead:
                    yield [(path, future.result()) for path, future in pending.popleft()]
            while pending:
                yield [(path, future.result()) for path, future in pending.popleft()]
        finally:  # the caller stopped early: drop what has not started
            for chunk in pending:
                for _, future in chunk:
                    future.cancel()


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # reported by load_image
        return 0


def image_features(
    clip: Clip, paths: Sequence[str], batch_size: int = 32, workers: int | None = None, draft: bool = False,
    on_failure: Callable[[Failure], None] | None = None, progress: Progress | None = None, *,
    ahead: int | None = None,
) -> Iterator[Batch]:
    """Batches of raw projected image features, (B, D) float32, for the paths that decode; failures reported.

    Every batch but the last holds exactly `batch_size` images. `ahead` batches are decoded during each model call
    (default: decode_ahead(device)), so memory stays flat however many paths there are."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    names: list[str] = []
    pixels: list[torch.Tensor] = []
    ahead = decode_ahead(clip.device) if ahead is None else ahead
    chunks = decode_chunks(clip, paths, batch_size, workers, draft, ahead=ahead)
    for chunk in chunks:
        for path, item in chunk:
            if isinstance(item, Failure):
                if on_failure:
                    on_failure(item)
                if progress:
                    progress(1)
                continue
            names.append(path)
            pixels.append(item)
            if len(pixels) == batch_size:
                yield Batch(names, _encode_pixels(clip, pixels))
                if progress:
                    progress(len(names))
                names, pixels = [], []
    if pixels:
        yield Batch(names, _encode_pixels(clip, pixels))
        if progress:
            progress(len(names))


def _encode_pixels(clip: Clip, pixels: list[torch.Tensor]) -> np.ndarray:
    """Preprocessed (3, H, W) float32 images -> (B, D) float32 features, computed in clip.dtype."""
    pinned = clip.device.type == "cuda"
    # Stacked straight into page-locked memory on CUDA, so the copy to the GPU can run asynchronously.
    batch = torch.empty((len(pixels), *pixels[0].shape), dtype=torch.float32, pin_memory=pinned)  # (B, 3, H, W)
    torch.stack(pixels, out=batch)
    return pixel_features(clip, batch.to(device=clip.device, non_blocking=pinned))


def pixel_features(clip: Clip, batch: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float32 pixels on clip.device -> (B, D) float32 features; the image tower runs in clip.dtype."""
    with torch.inference_mode(), clip.image_precision():
        return clip.model.encode_image(batch).float().cpu().numpy()


def text_features(clip: Clip, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """(N, D) float32 raw projected text features, computed in float32 whatever clip.dtype (see
    loader.place_model); each batch is padded to its longest text, not to 77."""
    rows = []
    for start in range(0, len(texts), batch_size):
        ids = clip.tokenizer.encode(texts[start:start + batch_size]).to(clip.device)  # (B, T) int64
        with torch.inference_mode():
            rows.append(clip.model.encode_text(ids).float().cpu().numpy())
    width = clip.config.projection_dim
    return np.concatenate(rows) if rows else np.zeros((0, width), dtype=np.float32)


def normalize(rows: np.ndarray) -> np.ndarray:
    """L2-normalise each row (float32); an all-zero row stays zero."""
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return (rows / np.where(norms == 0, 1, norms)).astype(np.float32)


def check_templates(templates: Sequence[str]) -> None:
    """UsageError unless there is at least one template and each has a {} where the label goes."""
    if not templates:
        raise UsageError("no templates; pass --template 'a photo of a {}.' or omit it for the default")
    for template in templates:
        if "{}" not in template:
            raise UsageError(f"template '{template}' has no {{}} where the label goes; e.g. 'a photo of a {{}}.'")


def label_embeddings(clip: Clip, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """(L, D) float32 unit vectors: per label, the mean of its normalised template embeddings, re-normalised."""
    if not labels:
        raise UsageError("no labels; pass --labels cat,dog or --labels-file FILE")
    check_templates(templates)
    prompts = [template.replace("{}", label) for label in labels for template in templates]
    features = normalize(text_features(clip, prompts)).reshape(len(labels), len(templates), -1)
    return normalize(features.mean(axis=1))


def scores(clip: Clip, image_rows: np.ndarray, label_rows: np.ndarray) -> np.ndarray:
    """(N, L) float32 probabilities: softmax over labels of logit_scale.exp() * cosine, as logits_per_image."""
    scale = float(clip.model.logit_scale.float().exp())
    logits = torch.from_numpy(normalize(image_rows) @ label_rows.T) * scale
    return logits.softmax(dim=-1).numpy()


def classify(
    clip: Clip, paths: Sequence[str], labels: Sequence[str], templates: Sequence[str] = (DEFAULT_TEMPLATE,),
    batch_size: int = 32, workers: int | None = None, draft: bool = False,
    on_failure: Callable[[Failure], None] | None = None, progress: Progress | None = None,
) -> Iterator[Batch]:
    """Batches of (B, L) label probabilities for the images that decode, in input order."""
    label_rows = label_embeddings(clip, labels, templates)  # encoded once per run
    for batch in image_features(clip, paths, batch_size, workers, draft, on_failure, progress):
        yield Batch(batch.paths, scores(clip, batch.rows, label_rows))


def embed_images(
    clip: Clip, paths: Sequence[str], normalized: bool = True, batch_size: int = 32, workers: int | None = None,
    draft: bool = False, on_failure: Callable[[Failure], None] | None = None, progress: Progress | None = None,
) -> Iterator[Batch]:
    """Batches of (B, D) float32 image embeddings, L2-normalised unless `normalized` is False."""
    for batch in image_features(clip, paths, batch_size, workers, draft, on_failure, progress):
        yield Batch(batch.paths, normalize(batch.rows) if normalized else batch.rows)


def embed_texts(clip: Clip, texts: Sequence[str], normalized: bool = True, batch_size: int = 256) -> Iterable[Batch]:
    """One batch of (N, D) float32 text embeddings (no template), L2-normalised unless `normalized` is False."""
    rows = text_features(clip, texts, batch_size)
    return [Batch(list(texts), normalize(rows) if normalized else rows)]


def encode_images(clip: Clip, images: Sequence[str | Path | Image.Image], normalized: bool = True,
                  batch_size: int = 32) -> np.ndarray:
    """Scripting API: image paths or PIL images -> (N, D) float32 embeddings; an unreadable file raises InputError."""
    def pixels(item: str | Path | Image.Image) -> torch.Tensor:
        image = item if isinstance(item, Image.Image) else load_image(Path(item))
        return preprocess(to_rgb(image), clip.preprocess)

    rows = [_encode_pixels(clip, [pixels(i) for i in images[start:start + batch_size]])
            for start in range(0, len(images), batch_size)]
    features = np.concatenate(rows) if rows else np.zeros((0, clip.config.projection_dim), dtype=np.float32)
    return normalize(features) if normalized else features


def encode_texts(clip: Clip, texts: Sequence[str], normalized: bool = True) -> np.ndarray:
    """Scripting API: texts -> (N, D) float32 embeddings (no template)."""
    features = text_features(clip, texts)
    return normalize(features) if normalized else features


def zero_shot(clip: Clip, images: Sequence[str | Path | Image.Image], labels: Sequence[str],
              templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> np.ndarray:
    """Scripting API: (N, L) float32 label probabilities for images (paths or PIL images)."""
    return scores(clip, encode_images(clip, images, normalized=False), label_embeddings(clip, labels, templates))
