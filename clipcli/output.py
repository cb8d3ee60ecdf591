"""Rendering and writing results: table/csv/json/jsonl text, streamed .npy + .paths.txt sidecar, atomic files.
Knows nothing of models; every file it writes appears complete or not at all."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np

from clipcli.errors import UsageError

FORMATS = ("table", "csv", "json", "jsonl")


def records(paths: Sequence[str], probs: np.ndarray, labels: Sequence[str], top_k: int) -> list[dict]:
    """One dict per image: path, top-1 label and score, top_k [{label, score}], and scores for every label."""
    out = []
    for path, row in zip(paths, probs):
        order = np.argsort(-row, kind="stable")
        out.append({
            "path": display_path(path),
            "label": labels[order[0]],
            "score": float(row[order[0]]),
            "top": [{"label": labels[i], "score": float(row[i])} for i in order[:top_k]],
            "scores": {label: float(p) for label, p in zip(labels, row)},
        })
    return out


def render(rows: list[dict], labels: Sequence[str], fmt: str, color: bool = False) -> str:
    """Classification records as text in `fmt` (table, csv, json or jsonl)."""
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if fmt == "json":
        return json.dumps(rows, ensure_ascii=False, indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "label", "score", *labels])
        for r in rows:
            writer.writerow([r["path"], r["label"], f"{r['score']:.6g}", *(f"{r['scores'][l]:.6g}" for l in labels)])
        return buffer.getvalue()
    if fmt == "table":
        return _table(rows, color)
    raise UsageError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}")


def _table(rows: list[dict], color: bool) -> str:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, header_style="bold" if color else "")
    table.add_column("path", overflow="fold")
    width = max((len(r["top"]) for r in rows), default=1)
    for rank in range(width):
        table.add_column("top label" if rank == 0 else f"#{rank + 1}")
    for r in rows:
        cells = [Text(f"{t['label']} {100 * t['score']:.1f}%", style="bold" if i == 0 and color else "")
                 for i, t in enumerate(r["top"])]
        table.add_row(Text(r["path"]), *cells)
    buffer = io.StringIO()
    Console(file=buffer, width=max(80, min(200, 30 + 24 * width)), color_system="auto" if color else None,
            force_terminal=color, highlight=False).print(table)
    return buffer.getvalue()


def check_writable(path: Path) -> None:
    """Raise UsageError before any work when `path` cannot be created (missing or read-only folder, a directory)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"output '{path}' is a directory; give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"output folder '{folder}' does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"output folder '{folder}' is not writable; choose another --output")


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """Write to a temp file beside `path`, then rename it into place; on any error the temp file is removed."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        _remove(temp)
        raise


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    try:
        with atomic_file(path) as handle:
            handle.write(text)
    except OSError as err:
        raise UsageError(f"cannot write '{path}': {err.strerror or err}; check the disk and the folder") from None


def sidecar_path(npy: Path) -> Path:
    """emb.npy -> emb.paths.txt beside it."""
    npy = Path(npy)
    return npy.with_name((npy.name[:-4] if npy.name.endswith(".npy") else npy.name) + ".paths.txt")


class EmbeddingWriter:
    """Streams float32 rows to disk, then writes `<name>.npy` (N, D) and `<name>.paths.txt` atomically.

    Rows go to a temp file as they come, so memory stays flat; the .npy appears only when close() finishes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        folder = self.path.parent if str(self.path.parent) else Path(".")
        fd, self._rows_file = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".rows", dir=folder)
        self._rows = os.fdopen(fd, "wb")
        self._names: list[str] = []
        self._width: int | None = None

    def add(self, names: Sequence[str], rows: np.ndarray) -> None:
        """Append (B, D) rows, one per name."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if self._width is None:
            self._width = rows.shape[1]
        self._rows.write(rows.tobytes())
        self._names.extend(names)

    def close(self, width: int) -> None:
        """Finish: write the .npy (header + rows) and the sidecar to temp files and rename them into place."""
        self._rows.close()
        count, width = len(self._names), self._width or width
        try:
            with atomic_file(sidecar_path(self.path)) as handle:
                handle.write("".join(_one_line(name) + "\n" for name in self._names))
            with atomic_file(self.path, "wb") as handle:
                np.lib.format.write_array_header_1_0(
                    handle, {"descr": "<f4", "fortran_order": False, "shape": (count, width)})
                with open(self._rows_file, "rb") as rows:
                    while chunk := rows.read(1 << 20):
                        handle.write(chunk)
        finally:
            _remove(self._rows_file)

    def abort(self) -> None:
        """Drop everything written so far; nothing appears at the target paths."""
        self._rows.close()
        _remove(self._rows_file)


def _one_line(name: str) -> str:
    # A path or text holding a line break would shift every later line of the sidecar: write it as "\n".
    return name.replace("\r", "\\r").replace("\n", "\\n")


def display_path(path: str) -> str:
    """A path as printable text: bytes that are not UTF-8 (kept by os as surrogates) shown as \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
