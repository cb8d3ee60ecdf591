"""Rendering and writing results: table/csv/json/jsonl text, streamed .npy + .paths.txt sidecar, atomic files.
Knows nothing of models; every file it writes appears complete or not at all (a stream such as /dev/stdout is
written in place)."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipcli.errors import OptionError, UsageError, os_reason
from clipcli.fsutil import atomic_file, finish_file, folder_of, remove_file, temp_file, temp_prefix

if TYPE_CHECKING:
    from clipcli.index import Summary

FORMATS = ("table", "csv", "json", "jsonl")


def records(paths: Sequence[str], probs: np.ndarray, labels: Sequence[str], top_k: int) -> list[dict]:
    """One dict per image: path, top-1 label and score, top_k [{label, score}], and scores for every label."""
    out = []
    for path, row in zip(paths, probs, strict=True):
        order = np.argsort(-row, kind="stable")
        out.append({
            "path": display_path(path),
            "label": labels[order[0]],
            "score": float(row[order[0]]),
            "top": [{"label": labels[i], "score": float(row[i])} for i in order[:top_k]],
            "scores": {label: float(p) for label, p in zip(labels, row, strict=True)},
        })
    return out


CSV_COLUMNS = ("path", "label", "score")  # before one column per label


def check_labels_for(fmt: str, labels: Sequence[str]) -> None:
    """UsageError when a label would share its CSV column name with a fixed column, so that a reader by header
    name could not tell them apart."""
    clash = next((label for label in labels if label in CSV_COLUMNS), None) if fmt == "csv" else None
    if clash is not None:
        raise OptionError("labels", clash, f"is also the name of a fixed CSV column ({', '.join(CSV_COLUMNS)})",
                          f"rename it (e.g. 'a {clash}') or use --format json or jsonl")


def render(rows: list[dict], labels: Sequence[str], fmt: str, color: bool = False) -> str:
    """Classification records as text in `fmt` (table, csv, json or jsonl)."""
    if fmt == "jsonl":
        return "".join(_json(r) + "\n" for r in rows)
    if fmt == "json":
        return _json(rows, indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*CSV_COLUMNS, *labels])
        for r in rows:
            scores = (f"{r['scores'][label]:.6g}" for label in labels)
            writer.writerow([r["path"], r["label"], f"{r['score']:.6g}", *scores])
        return buffer.getvalue()
    if fmt == "table":
        return _table(rows, color)
    raise UsageError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}")


# Line breaks that JSON leaves unescaped but str.splitlines() and many line readers split on (NEL, LS, PS):
# escaped, so that a label or path holding one can never split a JSONL record.
_JSON_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _json(value: object, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent).translate(_JSON_LINE_BREAKS)


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


# ---------------------------------------------------------------------------------------------- search, duplicates

SEARCH_CSV_COLUMNS = ("path", "score")
DUPLICATES_CSV_COLUMNS = ("group", "size", "min_score", "path")  # one line per image


def search_records(hits: Sequence[tuple[str, float]]) -> list[dict]:
    """One dict per (path, cosine), in the order given (best first): {"path", "score"}."""
    return [{"path": display_path(path), "score": float(score)} for path, score in hits]


def search_table(records: list[dict], width: int | None = None, color: bool = False) -> str:
    """rank, score (the cosine, 4 decimals) and path, one line per image."""
    rows = [[str(rank), f"{r['score']:.4f}", r["path"]] for rank, r in enumerate(records, 1)]
    return _aligned(["rank", "score", "path"], rows, right={0, 1})


def render_search(records: list[dict], fmt: str) -> str:
    """Search records as text in `fmt` (table, csv, json or jsonl)."""
    return _render(records, fmt, search_table, SEARCH_CSV_COLUMNS,
                   lambda r: [[r["path"], f"{r['score']:.6g}"]])


def duplicate_records(groups: Sequence[tuple[Sequence[str], float]]) -> list[dict]:
    """One dict per group of near-duplicates, in the order given: {"paths": [...], "min_score": x}."""
    return [{"paths": [display_path(path) for path in paths], "min_score": float(score)} for paths, score in groups]


def duplicates_table(records: list[dict], width: int | None = None, color: bool = False) -> str:
    """One line per image: its group's number on every line, the group's size and min score on its first."""
    rows = []
    for number, r in enumerate(records, 1):
        for i, path in enumerate(r["paths"]):
            first = i == 0
            rows.append([str(number), str(len(r["paths"])) if first else "",
                         f"{r['min_score']:.4f}" if first else "", path])
    return _aligned(["group", "size", "min score", "path"], rows, right={0, 1, 2})


def render_duplicates(records: list[dict], fmt: str) -> str:
    """Duplicate groups as text in `fmt`: json/jsonl one group per row, csv and table one line per image."""
    return _render(records, fmt, duplicates_table, DUPLICATES_CSV_COLUMNS, lambda r: [
        [str(r["group"]), str(len(r["paths"])), f"{r['min_score']:.6g}", path] for path in r["paths"]])


def _render(records: list[dict], fmt: str, table: Callable[[list[dict]], str], columns: Sequence[str],
            csv_rows: Callable[[dict], list[list[str]]]) -> str:
    if fmt == "jsonl":
        return "".join(_json(r) + "\n" for r in records)
    if fmt == "json":
        return _json(records, indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for number, r in enumerate(records, 1):
            writer.writerows(csv_rows({**r, "group": number}))
        return buffer.getvalue()
    if fmt == "table":
        return table(records)
    raise UsageError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}")


def _aligned(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """Columns two spaces apart under a header, one line per row (control characters in cells escaped)."""
    from rich.cells import cell_len

    grid = [[display_line(cell) for cell in row] for row in [header, *rows]]
    widths = [max(cell_len(row[i]) for row in grid) for i in range(len(header))]
    lines = []
    for row in grid:
        cells = [" " * (widths[i] - cell_len(cell)) + cell if i in right else
                 cell + " " * (widths[i] - cell_len(cell)) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def check_writable(path: Path, stream_ok: bool = True) -> None:
    """Raise UsageError before any work when `path` cannot be created (missing or read-only folder, a directory).

    An existing non-regular file (/dev/stdout, /dev/null, a pipe) is written in place when `stream_ok`."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"output '{path}' is a directory; give a file name")
    if is_stream(path):
        if not stream_ok:
            raise UsageError(f"output '{path}' is not a regular file; give a file name")
        return
    folder = folder_of(_resolved(path))
    if not folder.exists():
        raise UsageError(f"output folder '{folder}' does not exist; create it first")
    if not folder.is_dir():
        raise UsageError(f"output folder '{folder}' is not a folder; give a path inside an existing folder")
    # Try it: permission bits say nothing for root, read-only mounts or /proc, where os.access() still says yes.
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".probe", dir=folder)
    except OSError as err:
        raise OptionError("output", path, f"its folder '{folder}' is not writable ({os_reason(err)})",
                          "choose another {option}") from None
    os.close(fd)
    remove_file(probe)


def check_not_an_input(outputs: Sequence[Path], inputs: Sequence[str]) -> None:
    """UsageError when an output file already exists as one of the input images: writing it would destroy it."""
    existing = {}
    for path in outputs:
        try:
            info = os.stat(path)
        except OSError:
            continue  # not there yet, so not an input
        existing[(info.st_dev, info.st_ino)] = path
    if not existing:
        return
    for item in inputs:
        try:
            info = os.stat(item)
        except OSError:
            continue
        same = existing.get((info.st_dev, info.st_ino))
        if same is not None and stat.S_ISREG(info.st_mode):
            raise OptionError("output", display_path(str(same)), f"is one of the input images ('{display_path(item)}')",
                              "choose another {option}")


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically; a stream such as /dev/stdout is written in place, never replaced."""
    try:
        if is_stream(path):  # appended: a file behind /dev/stdout keeps what was written to it before
            with open(path, "a", encoding="utf-8", errors="surrogateescape", newline="") as handle:
                handle.write(text)
            return
        with atomic_file(_resolved(Path(path))) as handle:
            handle.write(text)
    except BrokenPipeError:
        raise  # whoever read the stream has stopped (`| head`): not a disk problem; the CLI exits quietly
    except OSError as err:
        raise _write_error(path, err) from None


def sidecar_path(npy: Path) -> Path:
    """emb.npy -> emb.paths.txt beside it."""
    npy = Path(npy)
    return npy.with_name((npy.name[:-4] if npy.name.lower().endswith(".npy") else npy.name) + ".paths.txt")


class EmbeddingWriter:
    """Streams float32 rows to disk, then writes `<name>.npy` (N, D) and `<name>.paths.txt` atomically.

    Rows go to a temp file as they come, so memory stays flat; the .npy appears only when close() finishes.
    Disk errors (full, read-only) are UsageErrors: nothing is written, and the command says why."""

    def __init__(self, path: Path) -> None:
        self.path = _resolved(Path(path))
        self.sidecar = _resolved(sidecar_path(Path(path)))  # beside the name given, wherever a link points
        try:
            fd, self._rows_file = tempfile.mkstemp(prefix=temp_prefix(self.path), suffix=".rows",
                                                   dir=folder_of(self.path))
        except OSError as err:
            raise _write_error(self.path, err) from None
        self._rows = os.fdopen(fd, "wb")
        self._names: list[str] = []
        self._width: int | None = None

    def add(self, names: Sequence[str], rows: np.ndarray) -> None:
        """Append (B, D) rows, one per name."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if self._width is None:
            self._width = rows.shape[1]
        try:
            self._rows.write(rows.tobytes())
        except OSError as err:
            raise _write_error(self.path, err) from None
        self._names.extend(names)

    def close(self, width: int) -> None:
        """Finish: write the .npy (header + rows) and the sidecar to temp files, then rename both into place."""
        count, width = len(self._names), self._width or width
        sidecar = self.sidecar
        try:
            self._rows.close()
            # Both files are complete on disk before either is renamed, and the .npy is renamed last: a new .npy
            # never stands beside an old sidecar, and an interruption before the renames leaves the old pair.
            with temp_file(sidecar, "w") as (names, names_temp), temp_file(self.path, "wb") as (array, array_temp):
                names.write("".join(_sidecar_line(name) + "\n" for name in self._names))
                finish_file(names)
                np.lib.format.write_array_header_1_0(
                    array, {"descr": "<f4", "fortran_order": False, "shape": (count, width)})
                with open(self._rows_file, "rb") as rows:
                    while chunk := rows.read(1 << 20):
                        array.write(chunk)
                finish_file(array)
                os.replace(names_temp, sidecar)
                os.replace(array_temp, self.path)
        except OSError as err:
            raise _write_error(self.path, err) from None
        finally:
            remove_file(self._rows_file)

    def abort(self) -> None:
        """Drop everything written so far; nothing appears at the target paths."""
        self._rows.close()
        remove_file(self._rows_file)


def is_stream(path: Path) -> bool:
    """True for an output to write in place, never replace: an existing non-regular file (a terminal, pipe or
    device such as /dev/null), or a link to an open file descriptor (/dev/stdout, /dev/fd/1), whatever it is."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    if stat.S_ISDIR(mode):
        return False
    if not stat.S_ISREG(mode):
        return True
    # /dev/stdout -> /proc/self/fd/1 -> the file the shell redirected stdout to: renaming onto that would swap
    # the shell's file for a new one, so follow the links one by one and look for a file descriptor.
    link = os.fspath(path)
    for _ in range(40):
        if link.startswith(("/dev/fd/", "/dev/stdout", "/dev/stderr")) or (
                link.startswith("/proc/") and "/fd/" in link):
            return True
        if not os.path.islink(link):
            return False
        link = os.path.join(os.path.dirname(link), os.readlink(link))
    return False


def _resolved(path: Path) -> Path:
    # Through a symbolic link to the file it names: renaming onto the link would replace the link, not the file.
    return Path(os.path.realpath(path)) if os.path.islink(path) else path


def _write_error(path: Path, err: OSError) -> UsageError:
    return UsageError(f"cannot write '{path}': {os_reason(err)}; check the disk and the folder")


# Every character str.splitlines() breaks at, so that any line reader gets one sidecar line per row.
_SIDECAR_BREAKS = {ord("\n"): "\\n", ord("\r"): "\\r", 0x0B: "\\x0b", 0x0C: "\\x0c", 0x1C: "\\x1c",
                   0x1D: "\\x1d", 0x1E: "\\x1e", 0x85: "\\x85", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _sidecar_line(name: str) -> str:
    # A path or text holding a line break would shift every later line of the sidecar: write it as "\n".
    return name.translate(_SIDECAR_BREAKS)


def display_path(path: str) -> str:
    """A path as printable text: bytes that are not UTF-8 (kept by os as surrogates) shown as \\xNN escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# C0/C1 control characters, DEL and the Unicode line/paragraph separators: a file name holding a line break or an
# escape sequence must not split a stderr line or drive the terminal.
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def display_line(text: str) -> str:
    """`text` as one printable stderr line: non-UTF-8 bytes as \\xNN, line breaks and control characters escaped."""
    return display_path(text).translate(_CONTROL)


@contextmanager
def progress_bar(total: int, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr (images/s, ETA), hidden when stderr is no terminal or with `quiet`; yields the
    function to call with the number of inputs just finished."""
    if quiet or total <= 0 or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        Task,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} img/s" if speed else "")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn(),
                  console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task("images", total=total)
        yield lambda n: bar.advance(task, n)


def render_index_summary(summary: Summary) -> str:
    """What `clip index` shows: where the index is, its size, and its entries per model variant."""
    lines = [f"index: {display_path(str(summary.path))} ({summary.size_bytes / 1e6:.1f} MB, "
             f"{summary.files:,} files remembered)"]
    if not summary.models:
        lines.append("no embeddings yet")
    for model in summary.models:
        precision = f"{model.dtype}, {'fast' if model.fast_decode else 'exact'} decode" if model.dtype else "-"
        lines.append(f"{model.name} [{model.fingerprint[:12]}]  {precision}: {model.images:,} images, "
                     f"{model.prompts:,} prompts")
    return "\n".join(lines) + "\n"
