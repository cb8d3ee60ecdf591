"""Rendering and writing results: records as table/csv/json/jsonl rows (RowWriter, streamed per batch), the
terminal-aware table, atomic text files, progress bars and display-safe paths. Knows nothing of models; every file
it writes appears complete or not at all (a stream such as /dev/stdout is written in place)."""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from clipcli import scoring
from clipcli.errors import OptionError, UsageError, os_reason
from clipcli.fsutil import atomic_file, finish_file, folder_of, open_temp_file, remove_file, temp_prefix

if TYPE_CHECKING:
    from clipcli.index import Summary
    from clipcli.organize import Step

FORMATS = ("table", "csv", "json", "jsonl")
# -o NAME.<ext> picks the format when --format is not given; any other name gets the table. html is the report.
EXTENSION_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".html": "html"}


def choose_format(output: str | None, fmt: str | None) -> str:
    """The format to write: --format when given, else the one -o's extension names, else the table.

    An explicit --format that contradicts the extension (-o out.json -f csv) is a UsageError."""
    named = None if output is None or output == "-" else EXTENSION_FORMATS.get(os.path.splitext(output)[1].lower())
    if fmt is None:
        return named or "table"
    if named is not None and named != fmt:
        raise OptionError("fmt", fmt, f"contradicts the output name '{display_path(output or '')}', which is a "
                          f"{named} file", "drop {option} (the extension chooses) or change the -o name")
    return fmt


# ---------------------------------------------------------------------------------------------- rows of records


@dataclass(frozen=True)
class Layout:
    """How one command's records look in each format. json/jsonl write each record dict as it is.

    csv_columns: the CSV header (fixed; a failure row fills `path` and `error`, so both should be among them).
    csv_cells:   a record -> its CSV cells by column name (missing columns are empty); default: the record.
    csv_lines:   a record -> the cells of each of its CSV lines, for a record that is several lines (a group of
                 images, one line each); default: one line, csv_cells.
    table:       (records, width, color) -> the table's text; width None means one line per row however long
                 (files and pipes), a number the terminal's width to fit. Without it the format is refused.
    (The HTML report, -o NAME.html, is report.py's: it needs every row at once, with the images.)"""

    csv_columns: tuple[str, ...]
    csv_cells: Callable[[dict], dict[str, object]] = dict
    csv_lines: Callable[[dict], list[dict[str, object]]] | None = None
    table: Callable[[list[dict], int | None, bool], str] | None = None


class RowWriter:
    """Writes a command's records (dicts) in one format to stdout or to a file, a batch at a time.

    Any command with results per input uses it the same way (classify; search and duplicates with their own
    Layout)::

        with RowWriter(output, "jsonl", layout) as rows:   # output None or "-": stdout
            for batch in work:
                rows.write([{"path": ..., ...}, {"path": ..., "error": "reason"}])

    A record with an "error" key is a failure row: {"path": ..., "error": reason}; json/jsonl write it as it is,
    csv fills the path and error columns. jsonl, csv and json rows go out as each batch is written: to stdout (or
    a pipe, /dev/stdout) flushed per batch, so `| head -1` prints within seconds; to a file through a temp file
    beside it, renamed into place when the `with` block ends without error (complete or absent, never half
    written). The table needs every row to size its columns, so it is written at the end. Nothing is written
    before the first batch, so a usage error found before it leaves stdout empty."""

    def __init__(self, target: Path | str | None, fmt: str, layout: Layout) -> None:
        if fmt not in FORMATS:
            raise UsageError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}")
        if fmt == "table" and layout.table is None:
            raise OptionError("fmt", fmt, "is not available for this command", "choose another {option}")
        self.fmt, self.layout = fmt, layout
        self.target = None if target is None or str(target) == "-" else Path(target)
        self._to_stdout = self.target is None
        self._stream = self._to_stdout or is_stream(self.target)  # type: ignore[arg-type]
        self._handle: IO | None = None
        self._temp: str | None = None
        self._held: list[dict] = []  # table: every record, written at the end
        self._count = 0
        self._started = False
        if not self._stream:
            assert self.target is not None
            final = resolved_path(self.target)
            try:
                self._handle, self._temp = open_temp_file(final)
            except OSError as err:
                raise write_error(self.target, err) from None

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def write(self, records: Sequence[dict | JsonLine]) -> None:
        """Write one batch of records (in order); flushed when going to a stream."""
        if self.fmt == "table":
            self._held.extend(records)  # type: ignore[arg-type]  # dicts: JsonLine is for jsonl only
        elif records:
            self._emit("".join(self._encode(record) for record in records))

    def close(self) -> None:
        """Finish: the table, the json list's end or an empty CSV's header; rename a file into place."""
        if self.fmt == "table":
            assert self.layout.table is not None
            terminal = self._to_stdout and sys.stdout.isatty()
            width = shutil.get_terminal_size().columns if terminal else None
            self._emit(self.layout.table(self._held, width, terminal and "NO_COLOR" not in os.environ))
        elif self.fmt == "json":
            self._emit("[]\n" if self._count == 0 else "\n]\n")
        elif self.fmt == "csv" and not self._started:
            self._emit("")  # the header alone
        if self._handle is not None and self._temp is not None:
            assert self.target is not None
            try:
                finish_file(self._handle)
                os.replace(self._temp, resolved_path(self.target))
            except OSError as err:
                self.abort()
                raise write_error(self.target, err) from None
            self._temp = None
        elif self._handle is not None:
            self._handle.close()
        self._handle = None

    def abort(self) -> None:
        """Stop: a file target keeps what it held before (the temp file is removed); a stream keeps what it got."""
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError:
                pass  # a pipe whose reader left: nothing more to say to it
            self._handle = None
        if self._temp is not None:
            remove_file(self._temp)
            self._temp = None

    # ------------------------------------------------------------------------------------------ encoding

    def _encode(self, record: dict | JsonLine) -> str:
        if isinstance(record, JsonLine):
            if self.fmt != "jsonl":
                raise ValueError(f"an encoded JSON line cannot be written as {self.fmt}")
            return record + "\n"
        if self.fmt == "jsonl":
            return _json(record) + "\n"
        if self.fmt == "json":
            item = "  " + _json(record, indent=2).replace("\n", "\n  ")  # as json.dumps(list, indent=2) writes
            first, self._count = self._count == 0, self._count + 1
            return ("[\n" if first else ",\n") + item
        if "error" in record:
            lines: list[dict[str, object]] = [record]
        else:
            lines = self.layout.csv_lines(record) if self.layout.csv_lines else [self.layout.csv_cells(record)]
        return "".join(_csv_line([cells.get(column, "") for column in self.layout.csv_columns]) for cells in lines)

    def _emit(self, text: str) -> None:
        if not self._started:
            self._started = True
            if self.fmt == "csv":
                text = _csv_line(list(self.layout.csv_columns)) + text
        if not text:
            return
        try:
            if self._to_stdout:
                from clipcli.process import write_stdout

                write_stdout(text)
                return
            if self._handle is None:  # a stream (pipe, /dev/stdout): opened at the first output, appended to
                assert self.target is not None
                self._handle = open(  # noqa: SIM115 (kept open across batches; closed by close() or abort())
                    self.target, "a", encoding="utf-8", errors="surrogateescape", newline="")
            self._handle.write(text)
            if self._stream:
                self._handle.flush()
                from clipcli.process import note_streamed

                note_streamed()
        except BrokenPipeError:
            raise  # whoever read the stream has stopped (`| head`): not a disk problem; the CLI exits quietly
        except OSError as err:
            raise write_error(self.target or Path("-"), err) from None


def _csv_number(value: float) -> str:
    """A score in csv: 9 significant digits, which give a float32 score back exactly (csv is for programs)."""
    return f"{value:.9g}"


def _csv_line(cells: Sequence[object]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(["" if cell is None else cell for cell in cells])
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- classify's rows


CSV_COLUMNS = ("path", "label", "score")  # then one column per label, then "error"


def classify_records(paths: Sequence[str], probs: np.ndarray, labels: Sequence[str], top_k: int,
                     min_score: float | None = None) -> list[dict]:
    """One dict per image: path, top-1 label and score, top_k [{label, score}], and scores for every label. With
    `min_score`, an image whose top score is below it gets label None (its score and scores are still given)."""
    best = scoring.top_labels(probs, min_score).tolist()
    # Sorted and turned into Python floats for the whole batch at once: per row, numpy calls cost more than the row.
    orders = np.argsort(-probs, axis=1, kind="stable")[:, :top_k].tolist()
    rows = probs.tolist()
    return [{
        "path": display_path(path),
        "label": labels[top] if top >= 0 else None,
        "score": row[order[0]],
        "top": [{"label": labels[i], "score": row[i]} for i in order],
        "scores": dict(zip(labels, row, strict=True)),
    } for path, row, order, top in zip(paths, rows, orders, best, strict=True)]


class JsonLine(str):
    """A record already encoded as one line of JSON, as _json writes it (without the line's end): RowWriter writes it
    as it is, in jsonl only."""

    __slots__ = ()


def classify_jsonl(paths: Sequence[str], probs: np.ndarray, labels: Sequence[str], top_k: int,
                   min_score: float | None = None) -> list[JsonLine]:
    """classify_records, encoded: each record's JSON line exactly as RowWriter would write the dict, several times
    faster (a warm run of 10,000 images spent a third of its time in json). The labels' parts are encoded once,
    and each score is written once for both the top and the scores of its row."""
    encoded = [_json_string(label) for label in labels]
    top_parts = ['{"label": ' + label + ', "score": ' for label in encoded]
    scores_form = "{" + ", ".join(label.replace("%", "%%") + ": %s" for label in encoded) + "}"
    best = scoring.top_labels(probs, min_score).tolist()
    orders = np.argsort(-probs, axis=1, kind="stable")[:, :top_k].tolist()
    finite = np.isfinite(probs).all(axis=1).tolist()
    number = float.__repr__  # json's own float text (finite numbers; NaN and infinities take the dict's way)
    lines = []
    for at, (path, row, order, top, plain) in enumerate(zip(paths, probs.tolist(), orders, best, finite, strict=True)):
        if not plain:
            lines.append(JsonLine(_json(classify_records([path], probs[at:at + 1], labels, top_k, min_score)[0])))
            continue
        text = [*map(number, row)]
        label = encoded[top] if top >= 0 else "null"
        tops = ", ".join([top_parts[i] + text[i] + "}" for i in order])
        lines.append(JsonLine(f'{{"path": {_json_string(display_path(path))}, "label": {label}, '
                              f'"score": {text[order[0]]}, "top": [{tops}], "scores": {scores_form % tuple(text)}}}'))
    return lines


def failure_record(path: str, reason: str) -> dict:
    """The row of an input that failed: {"path": ..., "error": reason}."""
    return {"path": display_path(path), "error": reason}


def check_labels_for(fmt: str, labels: Sequence[str]) -> None:
    """UsageError when a label would share its CSV column name with a fixed column, so that a reader by header
    name could not tell them apart."""
    fixed = (*CSV_COLUMNS, "error")
    clash = next((label for label in labels if label in fixed), None) if fmt == "csv" else None
    if clash is not None:
        raise OptionError("labels", clash, f"is also the name of a fixed CSV column ({', '.join(fixed)})",
                          f"rename it (e.g. 'a {clash}') or use --format json or jsonl")


def classify_layout(labels: Sequence[str], score: str = "prob") -> Layout:
    """classify's rows: csv path,label,score,<one column per label>,error (a label None, below --min-score, is
    empty); the table shows the top-k labels, probabilities as percentages and cosines as they are (`score`)."""

    def cells(record: dict) -> dict[str, object]:
        scores = {label: _csv_number(p) for label, p in record["scores"].items()}
        return {"path": record["path"], "label": record["label"] or "", "score": _csv_number(record["score"]),
                **scores}

    return Layout(csv_columns=(*CSV_COLUMNS, *labels, "error"), csv_cells=cells,
                  table=functools.partial(classify_table, score=score))


def classify_table(records: list[dict], width: int | None, color: bool, score: str = "prob") -> str:
    """The table people read: path, then the top-k labels with their scores, `-` first for an image below
    --min-score (failures are on stderr)."""
    rows = [r for r in records if "error" not in r]
    ranks = max((len(r["top"]) for r in rows), default=1)
    header = ["path", "top label", *(f"#{rank + 1}" for rank in range(1, ranks))]
    cells = []
    for r in rows:
        shown = [f"{t['label']} {_score_text(t['score'], score)}" for t in r["top"]]
        if r["label"] is None:  # below --min-score: no label
            shown[0] = "-"
        cells.append([r["path"], *shown])
    return table_text(header, cells, width, shorten=0, droppable_from=2, emphasis=1 if color else None, color=color)


def _score_text(value: float, score: str) -> str:
    return f"{100 * value:.1f}%" if score == "prob" else f"{value:.3f}"


# ---------------------------------------------------------------------------------------------- search, duplicates


SEARCH_CSV_COLUMNS = ("path", "score", "error")
DUPLICATES_CSV_COLUMNS = ("group", "size", "min_score", "path")  # one line per image


def search_records(hits: Sequence[tuple[str, float]]) -> list[dict]:
    """One dict per (path, cosine), in the order given (best first): {"path", "score"}."""
    return [{"path": display_path(path), "score": float(score)} for path, score in hits]


def search_layout() -> Layout:
    """search's rows: csv path,score,error; the table shows rank, score and path."""
    return Layout(csv_columns=SEARCH_CSV_COLUMNS,
                  csv_cells=lambda r: {"path": r["path"], "score": _csv_number(r["score"])}, table=search_table)


def search_table(records: list[dict], width: int | None, color: bool) -> str:
    """rank, score (the cosine, 4 decimals) and path, one line per image (failures are on stderr)."""
    hits = [r for r in records if "error" not in r]
    rows = [[str(rank), f"{r['score']:.4f}", r["path"]] for rank, r in enumerate(hits, 1)]
    return table_text(["rank", "score", "path"], rows, width, shorten=2, emphasis=1 if color else None, color=color)


def duplicate_records(groups: Sequence[tuple[Sequence[str], float]]) -> list[dict]:
    """One dict per group of near-duplicates, in the order given: {"paths": [...], "min_score": x}."""
    return [{"paths": [display_path(path) for path in paths], "min_score": float(score)} for paths, score in groups]


def duplicates_layout() -> Layout:
    """duplicates' rows: json/jsonl one group per row; csv group,size,min_score,path and the table one line per
    image (groups numbered from 1 in the order written)."""
    numbers = iter(range(1, 1 << 62))

    def lines(record: dict) -> list[dict[str, object]]:
        number, size, score = next(numbers), len(record["paths"]), _csv_number(record["min_score"])
        return [{"group": number, "size": size, "min_score": score, "path": path} for path in record["paths"]]

    return Layout(csv_columns=DUPLICATES_CSV_COLUMNS, csv_lines=lines, table=duplicates_table)


def duplicates_table(records: list[dict], width: int | None, color: bool) -> str:
    """One line per image: its group's number on every line, the group's size and min score on its first."""
    rows = []
    for number, r in enumerate(records, 1):
        for i, path in enumerate(r["paths"]):
            first = i == 0
            rows.append([str(number), str(len(r["paths"])) if first else "",
                         f"{r['min_score']:.4f}" if first else "", path])
    return table_text(["group", "size", "min score", "path"], rows, width, shorten=3, color=color)


# ---------------------------------------------------------------------------------------------- tables


def table_text(header: Sequence[str], rows: Sequence[Sequence[str]], width: int | None = None, *, shorten: int = 0,
               droppable_from: int | None = None, emphasis: int | None = None, color: bool = False) -> str:
    """Rows as aligned columns two spaces apart under a header, exactly one line per row (no cell can hold a line
    break: control characters are escaped).

    width None: every column as wide as its widest cell (files and pipes: grep, sort and wc -l see one row per
    line). With a width (a terminal's): columns from `droppable_from` on are dropped from the right while the rest
    would not fit with column `shorten` at half the width, then that column's cells are cut in the middle with '…'
    (the end of a path, its file name, is kept longest), and any line still too wide is cut at the width.
    `emphasis` (a column) and the header are bold when `color`."""
    from rich.cells import cell_len

    grid = [[display_line(c) for c in header], *([display_line(c) for c in row] for row in rows)]
    count = len(grid[0])
    widths = [max((cell_len(row[i]) for row in grid if i < len(row)), default=0) for i in range(count)]
    if width is not None:
        readable = min(widths[shorten], max(24, width // 2))
        keep = count
        while droppable_from is not None and keep > droppable_from and (
                sum(widths[:keep]) - widths[shorten] + readable + 2 * (keep - 1) > width):
            keep -= 1
        widths = widths[:keep]
        room = width - (sum(widths) - widths[shorten]) - 2 * (keep - 1)
        widths[shorten] = max(min(widths[shorten], room), min(widths[shorten], 8))
        grid = [row[:keep] for row in grid]
        for row in grid:
            if shorten < len(row):
                row[shorten] = shorten_middle(row[shorten], widths[shorten])
    lines = []
    for number, row in enumerate(grid):
        parts = []
        for i, cell in enumerate(row):
            padded = cell + " " * (widths[i] - cell_len(cell)) if i < len(row) - 1 else cell
            if color and (number == 0 or i == emphasis):
                padded = f"\x1b[1m{cell}\x1b[0m" + padded[len(cell):]
            parts.append(padded)
        line = "  ".join(parts).rstrip(" ")
        if width is not None and cell_len(_plain(line)) > width:
            line = _cut_end(_plain(line), width)
        lines.append(line)
    return "\n".join(lines) + "\n"


def shorten_middle(text: str, width: int) -> str:
    """`text` in at most `width` terminal cells: the middle replaced by '…', keeping three times more of the end (a
    path's file name) than of the start."""
    from rich.cells import cell_len

    if cell_len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    budget = width - 1
    head_budget = budget // 4
    head, used = "", 0
    for char in text:
        if used + cell_len(char) > head_budget:
            break
        head, used = head + char, used + cell_len(char)
    tail, used = "", 0
    for char in reversed(text):
        if used + cell_len(char) > budget - cell_len(head):
            break
        tail, used = char + tail, used + cell_len(char)
    return f"{head}…{tail}"


def _cut_end(text: str, width: int) -> str:
    from rich.cells import cell_len

    out, used = "", 0
    for char in text:
        if used + cell_len(char) > width - 1:
            break
        out, used = out + char, used + cell_len(char)
    return out + "…"


def _plain(line: str) -> str:
    return line.replace("\x1b[1m", "").replace("\x1b[0m", "")


# Line breaks that JSON leaves unescaped but str.splitlines() and many line readers split on (NEL, LS, PS):
# escaped, so that a label or path holding one can never split a JSONL record.
_JSON_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


_ONE_LINE_JSON = json.JSONEncoder(ensure_ascii=False)  # made once: json.dumps with options makes one per call


def _json(value: object, indent: int | None = None) -> str:
    text = json.dumps(value, ensure_ascii=False, indent=indent) if indent else _ONE_LINE_JSON.encode(value)
    return _escape_line_breaks(text)


def _json_string(text: str) -> str:
    """A string as _json writes it, quotes included (json's own C string encoder, non-ASCII kept)."""
    return _escape_line_breaks(json.encoder.encode_basestring(text))


def _escape_line_breaks(text: str) -> str:
    return text.translate(_JSON_LINE_BREAKS) if not text.isascii() else text


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
    folder = folder_of(resolved_path(path))
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
        with atomic_file(resolved_path(Path(path))) as handle:
            handle.write(text)
    except BrokenPipeError:
        raise  # whoever read the stream has stopped (`| head`): not a disk problem; the CLI exits quietly
    except OSError as err:
        raise write_error(path, err) from None


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


def resolved_path(path: Path) -> Path:
    """Through a symbolic link to the file it names: renaming onto the link would replace the link, not the file."""
    return Path(os.path.realpath(path)) if os.path.islink(path) else path


def write_error(path: Path, err: OSError) -> UsageError:
    """A failed write as a UsageError naming the file: nothing was written, and the command says why."""
    return UsageError(f"cannot write '{path}': {os_reason(err)}; check the disk and the folder")


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
    below --min-score), its top score and the action; columns aligned (table_text), a row never wrapped."""
    return table_text(["source", "", "destination", "label", "score", "action"],
                      [[step.source, "->", step.destination, "-" if step.label is None else step.label,
                        _score_text(step.score, score), step.action] for step in steps])


# ---------------------------------------------------------------------------------------------- clip eval

EVAL_FORMATS = ("table", "csv", "json", "jsonl")


def render_eval(summary: dict, fmt: str, width: int | None = None) -> str:
    """`clip eval`'s result (evaluate.Metrics.to_json() plus "errors") as text in `fmt` (table, csv, json, or jsonl:
    the json object on one line).

    csv: one row per true class (label, images, recall, precision) and its confusion-matrix row as one
    `predicted:<label>` column per label; an undefined figure is an empty cell (json: null; table: -). `width`: the
    terminal's, which the table then fits (None: files and pipes)."""
    labels: list[str] = summary["labels"]
    if fmt == "jsonl":
        return _json(summary) + "\n"
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
        return _eval_table(summary, width)
    raise UsageError(f"unknown format '{fmt}'; use one of {', '.join(EVAL_FORMATS)}")


def _figure(value: float | None, missing: str = "-") -> str:
    return missing if value is None else f"{value:.4f}"


def _eval_table(summary: dict, width: int | None = None) -> str:
    """Metrics, then one line per class, then the confusion matrix (classes numbered) when it fits in 30 columns.
    Every row is one line: labels have line breaks and control characters escaped and are cut at 40 characters. With
    a terminal `width`, labels are cut further to fit it, the matrix is left out when it cannot fit, and any line
    still too long is cut."""
    labels: list[str] = summary["labels"]
    limit = 40 if width is None else max(5, min(40, width - 27))  # 27: the class table's other columns
    shown = [_cut(display_line(label), limit) for label in labels]
    with_images = sum(1 for label in labels if summary["support"][label])
    lines = [
        f"{'images':<23}{summary['n']} in {len(labels)} classes",
        f"{'acc1':<23}{_figure(summary['acc1'])}",
        f"{'acc5':<23}{_figure(summary['acc5'])}" + ("  (needs at least 5 classes)" if len(labels) < 5 else ""),
        f"{'mean_per_class_recall':<23}{_figure(summary['mean_per_class_recall'])}"
        f"  (over the {with_images} classes with images)",
        "",
    ]
    column = max([5, *(len(label) for label in shown)])
    lines.append(f"{'class':<{column}}  {'images':>6}  {'recall':>6}  {'precision':>9}")
    for label, name in zip(labels, shown, strict=True):
        lines.append(f"{name:<{column}}  {summary['support'][label]:>6}  "
                     f"{_figure(summary['per_class_recall'][label]):>6}  "
                     f"{_figure(summary['per_class_precision'][label]):>9}")
    lines.append("")
    matrix = summary["confusion_matrix"]
    cell = max([len(str(len(labels))), *(len(str(value)) for row in matrix for value in row)]) + 1
    digits = len(str(len(labels)))
    if width is not None:  # the matrix's labels get what room is left beside its cells
        room = width - digits - 1 - cell * len(labels)
        shown = [_cut(name, room) for name in shown] if room >= 5 else []
        column = max([0, *(len(name) for name in shown)])
    if len(labels) > 30 or (width is not None and not shown):
        lines.append(f"confusion matrix: {len(labels)} x {len(labels)}, too wide for a "
                     f"{'table' if width is None else 'terminal this wide'}; see --format json or --output "
                     "report.html")
    else:
        lead = digits + 1 + column
        lines.append("confusion matrix (rows: true class, columns: predicted class)")
        lines.append(" " * lead + "".join(f"{number:>{cell}}" for number in range(1, len(labels) + 1)))
        for number, (name, row) in enumerate(zip(shown, matrix, strict=True), 1):
            lines.append(f"{number:>{digits}} {name:<{column}}" + "".join(f"{v:>{cell}}" for v in row))
    if width is not None:
        lines = [line if len(line) <= width else _cut(line, width) for line in lines]
    return "\n".join(lines) + "\n"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"
