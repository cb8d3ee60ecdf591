"""Embedding files, chosen by the output's extension: `.npy` with `.paths.txt` (row names) and `.meta.json` (which
model made them) beside it, or `.parquet` (columns path (+ text) and embedding, the same metadata in its schema; needs
the optional pyarrow). Rows are streamed as they come, so memory stays flat, and every file appears complete or not
at all. Engines (local, Ray) feed the same writers batch by batch; knows nothing of models or images."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from clipcli.errors import UsageError
from clipcli.fsutil import finish_file, open_temp_file, remove_file, temp_file
from clipcli.output import display_path, resolved_path, write_error

EXTENSIONS = (".npy", ".parquet")
PARQUET_INSTALL = "pip install 'clipcli[parquet]'"
METADATA_KEY = b"clipcli"  # the parquet schema's metadata entry holding EmbeddingMeta.to_json() as JSON


@dataclass(frozen=True)
class EmbeddingMeta:
    """What says how a set of embeddings was made: the model (as given, its id, its content fingerprint), the
    precision it ran in, whether rows are unit length, and whether rows are images (named by path) or texts."""

    model: str
    model_id: str
    fingerprint: str | None
    precision: str
    normalized: bool
    content: str = "images"  # or "texts"

    @property
    def name_columns(self) -> tuple[str, ...]:
        """The parquet columns that name each row: `path`, which texts fill too (as the sidecar's lines), so that
        every embeddings file is read the same way; and for texts, `text`, which says what they are."""
        return ("path",) if self.content == "images" else ("path", "text")

    def to_json(self, rows: int, dims: int) -> dict[str, Any]:
        from importlib.metadata import version

        return {"model": self.model, "model_id": self.model_id, "fingerprint": self.fingerprint, "rows": rows,
                "dims": dims, "dtype": "float32", "normalized": self.normalized, "precision": self.precision,
                "content": self.content, "clipcli_version": version("clipcli")}


@dataclass(frozen=True)
class Written:
    """What a writer put on disk: rows x dims, and the files (the embeddings file first)."""

    rows: int
    dims: int
    files: tuple[Path, ...]

    def summary(self) -> str:
        """One line for people, e.g. 'wrote 4 x 512 embeddings to emb.npy (names in emb.paths.txt, ...)'."""
        main, *rest = (display_path(str(p)) for p in self.files)
        extra = {".paths.txt": "names in", ".meta.json": "model details in"}
        notes = [f"{next(w for s, w in extra.items() if f.endswith(s))} {f}" for f in rest]
        return f"wrote {self.rows} x {self.dims} embeddings to {main}" + (f" ({', '.join(notes)})" if notes else "")


class EmbeddingSink(Protocol):
    """A writer of (N, D) float32 rows with one name each, streamed: add() per batch, then close() or abort()."""

    def add(self, names: Sequence[str], rows: np.ndarray) -> None: ...

    def close(self, width: int) -> Written: ...

    def abort(self) -> None: ...


def output_files(path: Path) -> list[Path]:
    """Every file writing embeddings to `path` makes; UsageError for an extension that is neither .npy nor .parquet,
    or .parquet without pyarrow. Called before any work, so that nothing is computed for nothing."""
    kind = Path(path).suffix.lower()
    if kind == ".npy":
        return [Path(path), sidecar_path(path), meta_path(path)]
    if kind == ".parquet":
        require_pyarrow()
        return [Path(path)]
    raise UsageError(f"output '{display_path(str(path))}' has no embeddings extension; name it NAME.npy (with "
                     "NAME.paths.txt and NAME.meta.json beside it) or NAME.parquet")


def open_embeddings(path: Path, meta: EmbeddingMeta) -> EmbeddingSink:
    """The writer for `path`'s extension (see output_files)."""
    output_files(path)
    return ParquetWriter(path, meta) if Path(path).suffix.lower() == ".parquet" else NpyWriter(path, meta)


def require_pyarrow() -> None:
    """UsageError naming the extra to install when pyarrow is missing."""
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UsageError(f"writing .parquet needs pyarrow, which is not installed; {PARQUET_INSTALL}, or write "
                         "NAME.npy") from None


def _stem(path: Path) -> str:
    name = Path(path).name
    return name[:-4] if name.lower().endswith(".npy") else name


def sidecar_path(npy: Path) -> Path:
    """emb.npy -> emb.paths.txt beside it."""
    return Path(npy).with_name(_stem(npy) + ".paths.txt")


def meta_path(npy: Path) -> Path:
    """emb.npy -> emb.meta.json beside it."""
    return Path(npy).with_name(_stem(npy) + ".meta.json")


class NpyWriter:
    """Streams float32 rows to a temp file, then writes `<name>.npy` (N, D), `<name>.paths.txt` (line i names row
    i) and `<name>.meta.json` atomically. The .npy appears only when close() finishes; disk errors (full, read-only)
    are UsageErrors: nothing is written, and the command says why."""

    def __init__(self, path: Path, meta: EmbeddingMeta) -> None:
        self.meta = meta
        self.given = Path(path)
        self.path = resolved_path(Path(path))
        self.sidecar = resolved_path(sidecar_path(Path(path)))  # beside the name given, wherever a link points
        self.meta_file = resolved_path(meta_path(Path(path)))
        try:
            self._rows, self._rows_file = open_temp_file(self.path, "wb", suffix=".rows")
        except OSError as err:
            raise write_error(self.path, err) from None
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
            raise write_error(self.path, err) from None
        self._names.extend(names)

    def close(self, width: int) -> Written:
        """Finish: the .npy (header + rows), sidecar and meta to temp files, then renamed into place, .npy last."""
        count, width = len(self._names), self._width or width
        try:
            self._rows.flush()  # kept open (and locked) until the rows are copied: fsutil.remove_stale_temp_files
            # Every file is complete on disk before any is renamed, and the .npy is renamed last: a new .npy never
            # stands beside an old sidecar, and an interruption before the renames leaves the old files.
            with temp_file(self.sidecar, "w") as (names, names_temp), \
                    temp_file(self.meta_file, "w") as (meta, meta_temp), \
                    temp_file(self.path, "wb") as (array, array_temp):
                names.write("".join(_sidecar_line(name) + "\n" for name in self._names))
                finish_file(names)
                meta.write(json.dumps(self.meta.to_json(count, width), indent=2, ensure_ascii=False) + "\n")
                finish_file(meta)
                np.lib.format.write_array_header_1_0(
                    array, {"descr": "<f4", "fortran_order": False, "shape": (count, width)})
                with open(self._rows_file, "rb") as rows:
                    while chunk := rows.read(1 << 20):
                        array.write(chunk)
                finish_file(array)
                os.replace(names_temp, self.sidecar)
                os.replace(meta_temp, self.meta_file)
                os.replace(array_temp, self.path)
        except OSError as err:
            raise write_error(self.path, err) from None
        finally:
            with contextlib.suppress(OSError):  # the error that matters (a full disk, say) is already on its way
                self._rows.close()
            remove_file(self._rows_file)
        return Written(count, width, (self.given, sidecar_path(self.given), meta_path(self.given)))

    def abort(self) -> None:
        """Drop everything written so far; nothing appears at the target paths."""
        with contextlib.suppress(OSError):  # rows that cannot be flushed are dropped anyway
            self._rows.close()
        remove_file(self._rows_file)


class ParquetWriter:
    """Streams rows into a Parquet file (pyarrow's ParquetWriter, one row group per ~32 MiB of rows, so memory stays
    flat): a `path` string column (and for texts a `text` column, the same strings) and an `embedding` column of
    fixed-size float32 lists, with EmbeddingMeta.to_json() as JSON under the schema metadata key b"clipcli". Written
    to a temp file beside the target and renamed into place by close()."""

    GROUP_BYTES = 32 << 20

    def __init__(self, path: Path, meta: EmbeddingMeta) -> None:
        require_pyarrow()
        self.meta = meta
        self.given = Path(path)
        self.path = resolved_path(Path(path))
        try:
            # pyarrow writes it by name; this handle only holds its lock until close() or abort()
            self._held, self._temp = open_temp_file(self.path, "wb")
        except OSError as err:
            raise write_error(self.path, err) from None
        self._writer: Any = None
        self._names: list[str] = []
        self._rows: list[np.ndarray] = []
        self._pending = 0
        self._count = 0
        self._width: int | None = None

    def add(self, names: Sequence[str], rows: np.ndarray) -> None:
        """Append (B, D) rows, one per name; a row group is written once enough rows are waiting."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if self._width is None and rows.shape[0]:
            self._width = rows.shape[1]
        self._names.extend(names)
        self._rows.append(rows)
        self._pending += rows.shape[0]
        self._count += rows.shape[0]
        if self._width and self._pending * self._width * 4 >= self.GROUP_BYTES:
            self._flush(self._width)

    def _flush(self, width: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if self._writer is None:
                embedding = pa.list_(pa.float32(), width)
                schema = pa.schema([*(pa.field(name, pa.string()) for name in self.meta.name_columns),
                                    pa.field("embedding", embedding)])
                # The row count is known only at the end: the schema carries everything else, and rows is left out.
                info = {k: v for k, v in self.meta.to_json(0, width).items() if k != "rows"}
                schema = schema.with_metadata({METADATA_KEY: json.dumps(info).encode("utf-8")})
                self._writer = pq.ParquetWriter(self._temp, schema)
            if not self._pending:
                return
            rows = np.concatenate(self._rows) if len(self._rows) > 1 else self._rows[0]
            names = pa.array([display_path(name) for name in self._names], type=pa.string())
            vectors = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), type=pa.float32()), width)
            columns = [names] * len(self.meta.name_columns)
            self._writer.write_table(pa.Table.from_arrays([*columns, vectors], schema=self._writer.schema))
        except OSError as err:
            raise write_error(self.path, err) from None
        self._names, self._rows, self._pending = [], [], 0

    def close(self, width: int) -> Written:
        """Write what is waiting, close the file and rename it into place."""
        width = self._width or width
        try:
            self._flush(width)
            self._writer.close()
            finish_file(self._held)  # fsync covers what pyarrow wrote through its own handle
            os.replace(self._temp, self.path)
        except OSError as err:
            self.abort()
            raise write_error(self.path, err) from None
        return Written(self._count, width, (self.given,))

    def abort(self) -> None:
        """Drop everything written so far; nothing appears at the target path."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # pyarrow's errors on a half-written file: the file is removed anyway
                pass
            self._writer = None
        self._held.close()
        remove_file(self._temp)


# Every character str.splitlines() breaks at, so that any line reader gets one sidecar line per row.
_SIDECAR_BREAKS = {ord("\n"): "\\n", ord("\r"): "\\r", 0x0B: "\\x0b", 0x0C: "\\x0c", 0x1C: "\\x1c",
                   0x1D: "\\x1d", 0x1E: "\\x1e", 0x85: "\\x85", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def _sidecar_line(name: str) -> str:
    # A path or text holding a line break would shift every later line of the sidecar: write it as "\n".
    return name.translate(_SIDECAR_BREAKS)
