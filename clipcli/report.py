"""HTML reports (`-o NAME.html` for classify and eval): one self-contained file that opens from disk with no network.
The page itself (clipcli/data/report.html, .css, .js) draws everything from two JSON blocks; this module builds them
(thumbnails, top-k scores, metrics) and writes the file atomically. No model code and no web framework here."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path
from typing import IO
from urllib.parse import quote

import numpy as np
from PIL import Image, features

from clipcli.errors import InputError, UsageError, os_reason
from clipcli.evaluate import Evaluation
from clipcli.fsutil import atomic_file
from clipcli.inputs import Failure
from clipcli.output import display_path
from clipcli.pipeline import Progress, default_workers
from clipcli.preprocess import load_image

# Thumbnails: at most THUMBNAIL_SIDE pixels on the longest side and THUMBNAIL_MAX_BYTES encoded (WebP, else JPEG).
# Each try is smaller than the last; an image that none of them brings under the limit (rare: pure noise) gets no
# preview. With the path and scores, an image costs at most about 9 KB of report, so 10,000 images stay under 90 MB.
THUMBNAIL_SIDE = 128
THUMBNAIL_MAX_BYTES = 6144
_TRIES = ((128, 70), (128, 45), (96, 40), (64, 30))  # (longest side, quality)
LOW_CONFIDENCE = 0.5  # classify: a top probability below this is shown as low confidence unless a threshold is given
_CHUNK = 256  # thumbnails made per round of the thread pool


def thumbnail_format() -> tuple[str, str]:
    """(Pillow format, MIME type) of the thumbnails: WebP where this Pillow can write it, else JPEG."""
    return ("WEBP", "image/webp") if features.check("webp") else ("JPEG", "image/jpeg")


def thumbnail(path: str) -> str:
    """A base64 thumbnail of the image at `path` (EXIF-rotated, at most THUMBNAIL_SIDE px and THUMBNAIL_MAX_BYTES
    encoded), or "" when the file cannot be read now or no try fits the limit."""
    try:
        image = load_image(Path(path), draft_size=THUMBNAIL_SIDE)  # JPEGs decode at a fraction of their size
    except (InputError, OSError):
        return ""
    kind = thumbnail_format()[0]
    for side, quality in _TRIES:
        small = image.copy()
        small.thumbnail((side, side), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        small.save(buffer, kind, quality=quality)
        if buffer.tell() <= THUMBNAIL_MAX_BYTES:
            return base64.b64encode(buffer.getvalue()).decode("ascii")
    return ""


def _thumbnails(paths: Sequence[str], workers: int | None, progress: Progress | None) -> Iterator[str]:
    """thumbnail() of each path, in order, made by a thread pool a chunk at a time (memory stays bounded)."""
    with ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="clip-thumb") as pool:
        for start in range(0, len(paths), _CHUNK):
            chunk = paths[start:start + _CHUNK]
            yield from pool.map(thumbnail, chunk)
            if progress is not None:
                progress(len(chunk))


def write_classify_report(output: Path, paths: Sequence[str], scores: np.ndarray, labels: Sequence[str], *,
                          top_k: int = 5, threshold: float | None = None, score: str = "prob", model: str = "",
                          templates: Sequence[str] = (), failures: Sequence[Failure] = (),
                          workers: int | None = None, progress: Progress | None = None) -> None:
    """The `clip classify -o NAME.html` report: (N, L) `scores` of `paths`, grouped by top label, best first.

    Images whose top score is below `threshold` (default LOW_CONFIDENCE for probabilities, none for cosines) are
    marked low confidence; the page lets the reader move the threshold."""
    if threshold is None and score == "prob":
        threshold = LOW_CONFIDENCE
    meta = {
        "kind": "classify", "score": score, "threshold": threshold,
        "title": f"clip classify: {len(paths):,} images, {len(labels):,} labels",
        "details": _details(model, templates, score),
    }
    _write(output, meta, labels, paths, scores, None, top_k, failures, workers, progress)


def write_eval_report(output: Path, evaluation: Evaluation, *, top_k: int = 5, model: str = "",
                      templates: Sequence[str] = (), workers: int | None = None,
                      progress: Progress | None = None) -> None:
    """The `clip eval -o NAME.html` report: metrics, per-class table, confusion matrix (a click shows a cell's images),
    the misclassified images per true class, and every image by top label, best first."""
    dataset = evaluation.dataset
    meta = {
        "kind": "eval", "score": "prob", "threshold": None,
        "title": f"clip eval: {display_path(dataset.root)} ({evaluation.metrics.n:,} images, "
                 f"{len(dataset.labels):,} classes)",
        "details": _details(model, templates, "prob"),
        "metrics": evaluation.metrics.to_json(),
    }
    _write(output, meta, dataset.labels, evaluation.paths, evaluation.scores, evaluation.targets, top_k,
           evaluation.failures, workers, progress)


def _details(model: str, templates: Sequence[str], score: str) -> list[str]:
    lines = [f"model: {model}"] if model else []
    if templates:
        more = f" (and {len(templates) - 1} more)" if len(templates) > 1 else ""
        lines.append(f"templates: {templates[0]}{more}")
    lines.append("scores: " + ("probabilities over the labels" if score == "prob" else "cosine similarities"))
    return lines


def _write(output: Path, meta: dict, labels: Sequence[str], paths: Sequence[str], scores: np.ndarray,
           targets: np.ndarray | None, top_k: int, failures: Sequence[Failure], workers: int | None,
           progress: Progress | None) -> None:
    """Order the images (by top label, then score, best first), then write the page with one JSON object per image
    streamed into it as its thumbnail is made."""
    scores = np.asarray(scores, dtype=np.float32).reshape(len(paths), len(labels))
    best = scores.argmax(axis=1) if len(paths) else np.zeros(0, dtype=np.int64)
    top_scores = scores[np.arange(len(paths)), best] if len(paths) else np.zeros(0, dtype=np.float32)
    order = sorted(range(len(paths)), key=lambda i: (int(best[i]), -float(top_scores[i]), paths[i]))
    ordered = [paths[i] for i in order]
    meta = {**meta, "labels": list(labels), "mime": thumbnail_format()[1],
            "failed": [{"p": display_path(f.path), "r": f.reason} for f in failures]}
    target = _resolved(Path(output))
    folder = os.path.dirname(os.path.abspath(target))

    def entries() -> Iterator[dict]:
        for i, thumb in zip(order, _thumbnails(ordered, workers, progress), strict=True):
            ranked = np.argsort(-scores[i], kind="stable")[:top_k]
            entry: dict[str, object] = {"p": display_path(paths[i]), "u": _link(paths[i], folder), "t": thumb,
                     "k": [[int(c), round(float(scores[i, c]), 5)] for c in ranked]}
            if targets is not None:
                entry["y"] = int(targets[i])
            yield entry

    try:
        with atomic_file(target) as handle:
            _render(handle, meta, entries())
    except OSError as err:
        raise UsageError(f"cannot write '{output}': {os_reason(err)}; check the disk and the folder") from None


def _render(handle: IO, meta: dict, entries: Iterable[dict]) -> None:
    """Fill the page template: the CSS and script inline, allowed by their hashes in the page's Content-Security-Policy
    (so nothing else can run or load, even if some text were not escaped), then the data blocks."""
    page, style, script = (_template(name) for name in ("report.html", "report.css", "report.js"))
    values = {
        "csp": f"default-src 'none'; img-src data:; style-src '{_digest(style)}'; script-src '{_digest(script)}'; "
               "base-uri 'none'; form-action 'none'",
        "title": _html_text(meta["title"]),
        "style": style,
        "script": script,
        "meta": _script_json(meta),
    }
    parts = re.split(r"\{\{(\w+)\}\}", page)  # literal text at even positions, placeholder names at odd ones
    for number, part in enumerate(parts):
        if number % 2 == 0:
            handle.write(part)
        elif part == "images":
            handle.write("[")
            for count, entry in enumerate(entries):
                handle.write(("," if count else "") + "\n" + _script_json(entry))
            handle.write("]")
        else:
            handle.write(values[part])


def _template(name: str) -> str:
    return (files("clipcli") / "data" / name).read_text(encoding="utf-8")


def _digest(text: str) -> str:
    """A CSP source for exactly this inline text: 'sha256-<base64 of its SHA-256>'."""
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


# In a <script> block only "</script" or "<!--" could end or bend it; JSON lets every "<", ">" and "&" be written as
# \u escapes, so none of them appears raw. U+2028/2029 are escaped for older JavaScript parsers.
_SCRIPT_SAFE = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _script_json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).translate(_SCRIPT_SAFE)


def _html_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _link(path: str, folder: str) -> str:
    """A relative, percent-encoded URL from the report's folder to the image ("" when there is none, e.g. another
    drive): it cannot name a scheme, and the report holds no absolute path."""
    try:
        relative = os.path.relpath(os.path.abspath(path), folder)
    except ValueError:
        return ""
    return quote(os.fsencode(relative).replace(os.sep.encode(), b"/"), safe="/")


def _resolved(path: Path) -> Path:
    # Through a symbolic link to the file it names: renaming onto the link would replace the link, not the file.
    return Path(os.path.realpath(path)) if os.path.islink(path) else path


__all__ = ["LOW_CONFIDENCE", "THUMBNAIL_MAX_BYTES", "THUMBNAIL_SIDE", "thumbnail", "write_classify_report",
           "write_eval_report"]
