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

from clipcli import scoring
from clipcli.errors import OptionError, UsageError, os_reason
from clipcli.fsutil import atomic_file, finish_file, folder_of, remove_file, temp_file, temp_prefix

if TYPE_CHECKING:
    from clipcli.index import Summary
    from clipcli.organize import Step

FORMATS = ("table", "csv", "json", "jsonl")


def records(paths: Sequence[str], probs: np.ndarray, labels: Sequence[str], top_k: int,
            min_score: float | None = None) -> list[dict]:
    """One dict per image: path, top-1 label and score, top_k [{label, score}], and scores for every label. With
    `min_score`, an image whose top score is below it gets label None (its score and scores are still given)."""
    out = []
    best = scoring.top_labels(probs, min_score)
    for path, row, top in zip(paths, probs, best, strict=True):
        order = np.argsort(-row, kind="stable")
        out.append({
            "path": display_path(path),
            "label": labels[top] if top >= 0 else None,
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


def render(rows: list[dict], labels: Sequence[str], fmt: str, color: bool = False, score: str = "prob") -> str:
    """Classification records as text in `fmt` (table, csv, json or jsonl); a record's label None (below
    --min-score) is null in json, empty in csv and `-` in the table. `score` is the kind of the scores: the table
    shows probabilities as percentages and cosines as they are."""
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
            writer.writerow([r["path"], r["label"] or "", f"{r['score']:.6g}", *scores])
        return buffer.getvalue()
    if fmt == "table":
        return _table(rows, color, score)
    raise UsageError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}")


# Line breaks that JSON leaves unescaped but str.splitlines() and many line readers split on (NEL, LS, PS):
# escaped, so that a label or path holding one can never split a JSONL record.
_JSON_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _json(value: object, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent).translate(_JSON_LINE_BREAKS)


def _table(rows: list[dict], color: bool, score: str = "prob") -> str:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, header_style="bold" if color else "")
    table.add_column("path", overflow="fold")
    width = max((len(r["top"]) for r in rows), default=1)
    for rank in range(width):
        table.add_column("top label" if rank == 0 else f"#{rank + 1}")
    for r in rows:
        cells = [Text(f"{t['label']} {_score_text(t['score'], score)}", style="bold" if i == 0 and color else "")
                 for i, t in enumerate(r["top"])]
        if r["label"] is None:  # below --min-score: no label
            cells[0] = Text("-")
        table.add_row(Text(r["path"]), *cells)
    buffer = io.StringIO()
    Console(file=buffer, width=max(80, min(200, 30 + 24 * width)), color_system="auto" if color else None,
            force_terminal=color, highlight=False).print(table)
    return buffer.getvalue()


def _score_text(value: float, score: str) -> str:
    return f"{100 * value:.1f}%" if score == "prob" else f"{value:.3f}"


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


def render_plan(steps: Sequence[Step], score: str = "prob") -> str:
    """`clip organize --dry-run`'s plan: a header, then one line per image, `source -> destination`, its label (`-`
    below --min-score), its top score and the action; columns aligned, a row never wrapped."""
    rows = [("source", "", "destination", "label", "score", "action")]
    rows += [(display_line(step.source), "->", display_line(step.destination),
              "-" if step.label is None else display_line(step.label), _score_text(step.score, score), step.action)
             for step in steps]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "".join("  ".join([*(row[i].ljust(width) for i, width in enumerate(widths)), row[-1]]) + "\n"
                   for row in rows)


# ---------------------------------------------------------------------------------------------- clip eval

EVAL_FORMATS = ("table", "csv", "json")


def render_eval(summary: dict, fmt: str) -> str:
    """`clip eval`'s result (evaluate.Metrics.to_json() plus "errors") as text in `fmt` (table, csv or json).

    csv: one row per true class (label, images, recall, precision) and its confusion-matrix row as one
    `predicted:<label>` column per label; an undefined figure is an empty cell (json: null; table: -)."""
    labels: list[str] = summary["labels"]
    if fmt == "json":
        # Indented, with each confusion-matrix row on one line so that the matrix reads as one.
        marker = "\0confusion\0"
        rows = ",\n".join("    " + _json(row) for row in summary["confusion_matrix"])
        text = _json({**summary, "confusion_matrix": marker}, indent=2)
        matrix = f"[\n{rows}\n  ]" if rows else "[]"
        return text.replace(f'"confusion_matrix": {_json(marker)}', f'"confusion_matrix": {matrix}', 1) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["label", "images", "recall", "precision", *(f"predicted:{label}" for label in labels)])
        for label, row in zip(labels, summary["confusion_matrix"], strict=True):
            writer.writerow([label, summary["support"][label], _figure(summary["per_class_recall"][label], ""),
                             _figure(summary["per_class_precision"][label], ""), *row])
        return buffer.getvalue()
    if fmt == "table":
        return _eval_table(summary)
    raise UsageError(f"unknown format '{fmt}'; use one of {', '.join(EVAL_FORMATS)}")


def _figure(value: float | None, missing: str = "-") -> str:
    return missing if value is None else f"{value:.4f}"


def _eval_table(summary: dict) -> str:
    """Metrics, then one line per class, then the confusion matrix (classes numbered) when it fits in 30 columns.
    Every row is one line: labels have line breaks and control characters escaped and are cut at 40 characters."""
    labels: list[str] = summary["labels"]
    shown = [_cut(display_line(label), 40) for label in labels]
    with_images = sum(1 for label in labels if summary["support"][label])
    lines = [
        f"{'images':<23}{summary['n']} in {len(labels)} classes",
        f"{'acc1':<23}{_figure(summary['acc1'])}",
        f"{'acc5':<23}{_figure(summary['acc5'])}" + ("  (needs at least 5 classes)" if len(labels) < 5 else ""),
        f"{'mean_per_class_recall':<23}{_figure(summary['mean_per_class_recall'])}"
        f"  (over the {with_images} classes with images)",
        "",
    ]
    width = max([5, *(len(label) for label in shown)])
    lines.append(f"{'class':<{width}}  {'images':>6}  {'recall':>6}  {'precision':>9}")
    for label, name in zip(labels, shown, strict=True):
        lines.append(f"{name:<{width}}  {summary['support'][label]:>6}  "
                     f"{_figure(summary['per_class_recall'][label]):>6}  "
                     f"{_figure(summary['per_class_precision'][label]):>9}")
    lines.append("")
    matrix = summary["confusion_matrix"]
    if len(labels) > 30:
        lines.append(f"confusion matrix: {len(labels)} x {len(labels)}, too wide for a table; see --format json "
                     "or --output report.html")
        return "\n".join(lines) + "\n"
    cell = max([len(str(len(labels))), *(len(str(value)) for row in matrix for value in row)]) + 1
    lead = len(str(len(labels))) + 1 + width
    lines.append("confusion matrix (rows: true class, columns: predicted class)")
    lines.append(" " * lead + "".join(f"{number:>{cell}}" for number in range(1, len(labels) + 1)))
    for number, (name, row) in enumerate(zip(shown, matrix, strict=True), 1):
        lines.append(f"{number:>{len(str(len(labels)))}} {name:<{width}}" + "".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines) + "\n"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"
