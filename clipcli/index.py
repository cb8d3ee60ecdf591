"""The embedding index: one SQLite file that maps an image's content (a digest of its bytes) and a model variant to its
features, and a prompt text to its text features, so that nothing is computed twice. Owns the schema, the keys, the
stat memo (path + stat -> digest, so unchanged files are not read again) and the model fingerprint.

A damaged, foreign, newer, locked or unwritable index never fails a run and never gives a wrong result: the first
problem becomes one warning, and from then on the index answers nothing and stores nothing. Imports no torch."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipcli.errors import os_reason
from clipcli.fsutil import file_sha256, make_private_dirs
from clipcli.resolve import ModelFiles, model_file_roles

SCHEMA_VERSION = 1
APPLICATION_ID = 0x434C4950  # "CLIP": tells our files from other programs' SQLite files
# Bumped whenever a change to the model code or preprocessing changes the features computed for the same inputs,
# so entries computed by older code are never reused.
FEATURES_VERSION = 1
DIGEST_BYTES = 16  # of SHA-256: content addresses; 2**-64 collision odds even at billions of files
# A file whose mtime/ctime lies this close to the moment it was looked at may change again within the same
# timestamp tick, unseen by stat; its memo entry is not trusted (git's "racy" entries).
RACY_NS = 2_000_000_000
# Before the first write of a run, an index up to this size is checked whole (PRAGMA quick_check: about 0.1 s per 200
# MB), so that damage anywhere in it is found before anything is written; larger ones rely on the checks made as each
# page is read and on the entries' checksums.
CHECK_BEFORE_WRITE_BYTES = 1 << 30
BUSY_TIMEOUT_MS = 10_000  # a concurrent run's transaction takes milliseconds; a lock held longer is a problem
_CHUNK = 500  # host parameters per IN (...) query


def default_location() -> Path:
    """$XDG_CACHE_HOME/clipcli/index.db, else ~/.cache/clipcli/index.db."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "clipcli" / "index.db"


def content_digest(data: bytes) -> bytes:
    """The key of a file's content: the first DIGEST_BYTES of its SHA-256."""
    return hashlib.sha256(data).digest()[:DIGEST_BYTES]


def model_fingerprint(files: ModelFiles, digest: Callable[[Path], bytes] | None = None,
                      hidden_act: str | None = None) -> str:
    """A hex key for everything that decides a model's features: the content of each of its files (weights,
    config, tokenizer, preprocessing; `digest`, file_digest by default), the activation override and
    FEATURES_VERSION."""
    digest = digest or file_digest
    sha = hashlib.sha256(f"clipcli-features-{FEATURES_VERSION}\0{hidden_act or ''}\0".encode())
    for role, path in model_file_roles(files):
        sha.update(f"{role}\0".encode() + digest(path))
    return sha.hexdigest()


def file_digest(path: Path) -> bytes:
    """content_digest of a file, read in pieces (fsutil.file_sha256)."""
    return file_sha256(path).digest()[:DIGEST_BYTES]


@dataclass(frozen=True)
class Variant:
    """What image features depend on besides the image: the model (fingerprint of its files), precision, decoding."""

    model: str
    dtype: str  # fp32, fp16 or bf16, as resolved for the run
    fast_decode: bool


StoredImage = tuple[np.ndarray, int]  # (D,) float32 features, and the image's pixel count (width x height)


@dataclass(frozen=True)
class FileRecord:
    """A stat memo entry to store: this file, in this state, seen at `seen_ns`, holds content `digest`."""

    path: str
    state: os.stat_result
    digest: bytes
    seen_ns: int


@dataclass(frozen=True)
class ModelSummary:
    name: str
    fingerprint: str
    dtype: str | None  # None for the prompt row of a model
    fast_decode: bool
    images: int
    prompts: int


@dataclass(frozen=True)
class Summary:
    """What `clip index --info` shows."""

    path: Path
    size_bytes: int
    files: int
    models: list[ModelSummary]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE, name TEXT NOT NULL, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS variants (
    id INTEGER PRIMARY KEY, model INTEGER NOT NULL, dtype TEXT NOT NULL, fast_decode INTEGER NOT NULL,
    UNIQUE (model, dtype, fast_decode));
-- Rows of float32 features, appended in rowid order so pages stay full. crc32 covers the key they belong to.
CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY, data BLOB NOT NULL, crc INTEGER NOT NULL);
-- pixels: the image's width x height as stored, so a run answered from here applies the same size limit as decoding.
CREATE TABLE IF NOT EXISTS image_keys (
    variant INTEGER NOT NULL, digest BLOB NOT NULL, vector INTEGER NOT NULL, pixels INTEGER NOT NULL,
    PRIMARY KEY (variant, digest)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS prompt_keys (
    model INTEGER NOT NULL, text TEXT NOT NULL, vector INTEGER NOT NULL, truncated INTEGER NOT NULL,
    PRIMARY KEY (model, text)) WITHOUT ROWID;
-- The stat memo: path (bytes, as the OS has it) -> the digest of its content when it had this stat.
CREATE TABLE IF NOT EXISTS files (
    path BLOB PRIMARY KEY, dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, racy INTEGER NOT NULL, digest BLOB NOT NULL,
    crc INTEGER NOT NULL) WITHOUT ROWID;
"""


class IndexProblem(Exception):
    """Why the index cannot be used (one line); Index turns it into its one warning."""


class Index:
    """An open embedding index. Every method is safe to call after a problem: it then finds nothing and stores
    nothing. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path, warn: Callable[[str], None]) -> None:
        self.path = Path(path)
        self._warn = warn
        self.problem: str | None = None  # why the index stopped being used, once it has
        self._lock = threading.RLock()
        self._con: sqlite3.Connection | None = None
        self._variants: dict[Variant, int] = {}
        self._models: dict[str, int] = {}
        self._checked = False  # whether the file was checked whole before this run's first write
        self.read_only = False  # opened for reading only (the user may not write it): nothing is stored
        self._warned = False  # the run's one warning about the index was given
        with self._guard():
            self._con = self._connect()

    @property
    def usable(self) -> bool:
        return self._con is not None

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    # ------------------------------------------------------------------------------------------ opening, faults

    def _connect(self) -> sqlite3.Connection:
        if self.path.is_dir():
            raise IndexProblem("is a folder")
        if not self.path.exists():
            make_private_dirs(self.path.parent)  # file paths and embeddings say what is in someone's photos
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:  # created by a concurrent run this instant
                pass
        if _writable(self.path):
            con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                  check_same_thread=False)
        else:  # a shared index this user may only read: read as it is, with no -wal/-shm files made beside it
            con = sqlite3.connect(f"{self.path.absolute().as_uri()}?immutable=1", uri=True, isolation_level=None,
                                  check_same_thread=False)
            self.read_only = True
        try:
            con.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            # Damage in a page is found when the page is read, before anything is written to it.
            con.execute("PRAGMA cell_size_check=ON")
            app_id = con.execute("PRAGMA application_id").fetchone()[0]
            version = con.execute("PRAGMA user_version").fetchone()[0]
            tables = con.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id != APPLICATION_ID:
                if tables or app_id or version:
                    raise IndexProblem("is not a clipcli index (another program's SQLite file); give --index a "
                                       "new file name")
                self._create(con)
            elif version > SCHEMA_VERSION:
                raise IndexProblem(f"was written by a newer clipcli (schema {version}, this one reads "
                                   f"{SCHEMA_VERSION}); upgrade clipcli or use another --index")
            con.execute("PRAGMA synchronous=NORMAL")  # WAL: committed batches survive a crash of the process
        except BaseException:
            con.close()
            raise
        return con

    @staticmethod
    def _create(con: sqlite3.Connection) -> None:
        # Before the first table: 64 KiB pages hold 31 rows of 512 float32 each (4 KiB pages would hold one, half
        # empty), and incremental vacuum lets prune and clear give space back.
        con.execute("PRAGMA page_size=65536")
        con.execute("PRAGMA auto_vacuum=INCREMENTAL")
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("BEGIN IMMEDIATE")
        try:
            if con.execute("PRAGMA application_id").fetchone()[0] not in (0, APPLICATION_ID):
                raise IndexProblem("is not a clipcli index (another program's SQLite file)")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    con.execute(statement)
            con.execute(f"PRAGMA application_id={APPLICATION_ID}")
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Run index work; the first problem disables the index with one warning and is not raised."""
        with self._lock:
            try:
                yield
            except IndexProblem as problem:
                self._disable(str(problem))
            except (sqlite3.Error, OSError, ValueError, json.JSONDecodeError) as err:
                self._disable(_describe(err))

    def _disable(self, problem: str) -> None:
        if self._con is not None:
            try:
                if self._con.in_transaction:
                    self._con.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._con.close()
            self._con = None
        if self.problem is None:
            self.problem = problem
            if not self._warned:  # one warning per run
                self._warned = True
                self._warn(f"the index {self.path} {problem}; this run goes on without it")

    def _not_stored(self, what: str | None) -> bool:
        """True when the index is read-only, so that nothing is written: a shortcut (`what` None: stat memo entries,
        model records) is silently not kept; new entries (`what`) cost the run's one warning."""
        if not self.read_only:
            return False
        if what is not None and not self._warned:
            self._warned = True
            self._warn(f"the index {self.path} cannot be written (read-only): what it holds is used, but this run's "
                       f"new {what} are not stored")
        return True

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        con = self._con
        assert con is not None
        if self.read_only:
            raise IndexProblem("cannot be written (read-only)")
        if not self._checked:
            self._checked = True
            if self.size_bytes() <= CHECK_BEFORE_WRITE_BYTES:
                verdict = con.execute("PRAGMA quick_check").fetchone()[0]
                if verdict != "ok":
                    found = [line for line in str(verdict).splitlines() if line and not line.startswith("***")]
                    raise IndexProblem(f"is damaged ({(found or ['quick_check failed'])[0][:120]})")
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    # ------------------------------------------------------------------------------------------ the stat memo

    def known_digests(self, files: Sequence[tuple[str, os.stat_result]]) -> dict[str, bytes]:
        """path -> content digest, for the files whose memo entry matches their stat now and is not racy."""
        return {path: digest for path, (digest, unchanged) in self.file_entries(files).items() if unchanged}

    def file_entries(self, files: Sequence[tuple[str, os.stat_result]]) -> dict[str, tuple[bytes, bool]]:
        """path -> (digest remembered, whether the file is unchanged since), for the files the memo has."""
        found: dict[str, tuple[bytes, bool]] = {}
        with self._guard():
            if self._con is None:
                return found
            keys = _PathKeys()
            states = {keys(path): (path, state) for path, state in files}
            known = states.get
            # The checksum and the comparison written out (not _memo_crc and _stat_key): this loop runs once per
            # file of every run.
            pack, crc32 = _MEMO_FIELDS.pack, zlib.crc32
            for rows in self._memo_rows(list(states)):
                for row in rows:
                    item = known(row[0])
                    if item is None:
                        continue
                    key, dev, ino, size, mtime, ctime, racy, digest, crc = row
                    if crc != crc32(key + pack(dev, ino, size, mtime, ctime, racy) + digest):
                        raise IndexProblem("is damaged (a file entry fails its checksum)")
                    path, state = item
                    found[path] = (digest, not racy and mtime == state.st_mtime_ns and ctime == state.st_ctime_ns
                                   and size == state.st_size and ((ino - state.st_ino) & _UINT64) == 0
                                   and ((dev - state.st_dev) & _UINT64) == 0)
        return found

    def _memo_rows(self, keys: list[bytes]) -> Iterator[Iterable[tuple]]:
        """Memo rows for `keys` (and maybe others, which the caller skips). Many keys under one folder are read in
        one range scan of the primary key; a few, by lookups."""
        assert self._con is not None
        columns = "path, dev, ino, size, mtime_ns, ctime_ns, racy, digest, crc"
        if len(keys) > 2 * _CHUNK:
            low, high = min(keys), max(keys)
            yield self._con.execute(f"SELECT {columns} FROM files WHERE path >= ? AND path <= ?", (low, high))
            return
        for chunk in _chunks(keys, _CHUNK):
            yield self._con.execute(f"SELECT {columns} FROM files WHERE path IN ({','.join('?' * len(chunk))})",
                                    chunk).fetchall()

    def remember_files(self, records: Iterable[FileRecord]) -> None:
        """Store stat memo entries (in their own transaction)."""
        with self._guard():
            if self._con is not None and not self._not_stored(None):
                with self._transaction() as con:
                    self._store_memo(con, records)

    @staticmethod
    def _store_memo(con: sqlite3.Connection, records: Iterable[FileRecord]) -> None:
        rows = []
        keys = _PathKeys()
        for record in records:
            key = keys(record.path)
            dev, ino, size, mtime, ctime = _stat_key(record.state)
            racy = int(record.seen_ns - max(mtime, ctime) < RACY_NS)
            rows.append((key, dev, ino, size, mtime, ctime, racy, record.digest,
                         _memo_crc(key, dev, ino, size, mtime, ctime, racy, record.digest)))
        con.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def digest_of(self, path: Path) -> bytes:
        """A (model) file's content digest: from the memo when unchanged, else read, hashed and remembered."""
        seen = time.time_ns()
        state = os.stat(path)
        known = self.known_digests([(str(path), state)]).get(str(path))
        if known is not None:
            return known
        digest = file_digest(path)
        self.remember_files([FileRecord(str(path), state, digest, seen)])
        return digest

    # ------------------------------------------------------------------------------------------ models

    def model_fingerprint(self, files: ModelFiles, hidden_act: str | None = None) -> str:
        """model_fingerprint() with each file hashed once and then remembered by path and stat, so a 600 MB
        checkpoint is not read again on every run."""
        return model_fingerprint(files, self.digest_of, hidden_act)

    def model_info(self, fingerprint: str) -> dict | None:
        """What was recorded about a model when it was first loaded (projection_dim, logit_scale, ...), or None."""
        with self._guard():
            if self._con is None:
                return None
            row = self._con.execute("SELECT id, info FROM models WHERE fingerprint = ?", (fingerprint,)).fetchone()
            if row is not None:
                info = json.loads(row[1])
                if not isinstance(info, dict):
                    raise IndexProblem("is damaged (a model entry is not a JSON object)")
                check = info.pop("check", None)  # absent in entries written before it was added
                if check is not None and check != _info_check(info):
                    raise IndexProblem("is damaged (a model entry fails its checksum)")
                self._models[fingerprint] = row[0]
                return info
        return None

    def add_model(self, fingerprint: str, name: str, info: dict) -> None:
        """Record a loaded model (name for people, info for runs that need no model)."""
        with self._guard():
            if self._con is not None and not self._not_stored(None):
                with self._transaction() as con:
                    con.execute("INSERT OR IGNORE INTO models (fingerprint, name, info) VALUES (?, ?, ?)",
                                (fingerprint, name, json.dumps({**info, "check": _info_check(info)}, sort_keys=True)))
                    self._models[fingerprint] = con.execute(
                        "SELECT id FROM models WHERE fingerprint = ?", (fingerprint,)).fetchone()[0]

    def _model_id(self, fingerprint: str) -> int | None:
        if fingerprint not in self._models:
            assert self._con is not None
            row = self._con.execute("SELECT id FROM models WHERE fingerprint = ?", (fingerprint,)).fetchone()
            if row is None:
                return None
            self._models[fingerprint] = row[0]
        return self._models[fingerprint]

    def _variant_id(self, variant: Variant, create: bool) -> int | None:
        if variant not in self._variants:
            assert self._con is not None
            model = self._model_id(variant.model)
            if model is None:
                return None
            key = (model, variant.dtype, int(variant.fast_decode))
            if create:
                self._con.execute("INSERT OR IGNORE INTO variants (model, dtype, fast_decode) VALUES (?, ?, ?)", key)
            row = self._con.execute("SELECT id FROM variants WHERE model = ? AND dtype = ? AND fast_decode = ?",
                                    key).fetchone()
            if row is None:
                return None
            self._variants[variant] = row[0]
        return self._variants[variant]

    # ------------------------------------------------------------------------------------------ features

    def image_features(self, variant: Variant, digests: Iterable[bytes]) -> dict[bytes, StoredImage]:
        """digest -> ((D,) float32 features, pixel count) stored for `variant`; digests without an entry are left
        out."""
        found: dict[bytes, StoredImage] = {}
        with self._guard():
            if self._con is None:
                return found
            variant_id = self._variant_id(variant, create=False)
            if variant_id is None:
                return found
            # Two steps, so that each 64 KiB page of vectors is read once: the keys' row ids, then the rows in row id
            # order (looked up in digest order, the rows' pages would be read again for nearly every row).
            wanted = list(dict.fromkeys(digests))
            vectors: dict[int, tuple[bytes, int]] = {}
            rows_at_most = self._con.execute("SELECT max(id) FROM vectors").fetchone()[0] or 0
            if len(wanted) * 4 >= rows_at_most:  # most of the variant: one scan beats a lookup per digest
                wanted_set = set(wanted)
                vectors.update((vector, (digest, pixels)) for vector, digest, pixels in self._con.execute(
                    "SELECT vector, digest, pixels FROM image_keys WHERE variant = ?", (variant_id,))
                    if digest in wanted_set)
            else:
                for chunk in _chunks(wanted, _CHUNK):
                    vectors.update((vector, (digest, pixels)) for vector, digest, pixels in self._con.execute(
                        f"SELECT vector, digest, pixels FROM image_keys WHERE variant = ? AND digest IN "
                        f"({','.join('?' * len(chunk))})", [variant_id, *chunk]))
            ids = sorted(vectors)
            if len(ids) > 2 * _CHUNK and ids[-1] - ids[0] < 2 * len(ids):  # dense: one range scan
                batches: Iterable[Iterable[tuple]] = [self._con.execute(
                    "SELECT id, data, crc FROM vectors WHERE id BETWEEN ? AND ?", (ids[0], ids[-1]))]
            else:
                batches = (self._con.execute(f"SELECT id, data, crc FROM vectors WHERE id IN "
                                             f"({','.join('?' * len(chunk))})", chunk)
                           for chunk in _chunks(ids, _CHUNK))
            # Each row is copied into one matrix as it is read (rows are views of it): one allocation, and the
            # blobs are never all held at once beside it (a warm run's peak memory is the matrix).
            matrix = np.empty((0, 0), dtype="<f4")
            flat = memoryview(b"")
            keys: list[bytes] = []
            sizes: list[int] = []
            at = step = 0  # where the next row goes in `flat`, and a row's bytes
            entry, crc32 = vectors.get, zlib.crc32
            for rows in batches:
                for vector, data, crc in rows:
                    key = entry(vector)
                    if key is None:
                        continue
                    digest, pixels = key
                    if crc32(data, crc32(digest + pixels.to_bytes(8, "little"))) != crc:  # _image_key, written out
                        raise IndexProblem("is damaged (an entry fails its checksum)")
                    if not keys:
                        matrix = np.empty((len(vectors), len(data) // 4), dtype="<f4")
                        flat, step = matrix.data.cast("B"), 4 * matrix.shape[1]
                    if len(data) != step:
                        raise IndexProblem("is damaged (features of different lengths for one model)")
                    flat[at:at + step] = data
                    at += step
                    keys.append(digest)
                    sizes.append(pixels)
            flat.release()
            found.update(zip(keys, zip(matrix[:len(keys)], sizes, strict=True), strict=True))
        return found

    def add_image_features(self, variant: Variant, rows: Sequence[tuple[bytes, np.ndarray, int]],
                           files: Iterable[FileRecord] = ()) -> None:
        """Store (digest, (D,) float32 features, pixel count) rows and stat memo entries in one transaction (one
        per batch)."""
        with self._guard():
            if self._con is None or self._not_stored("image embeddings"):
                return
            with self._transaction() as con:
                variant_id = self._variant_id(variant, create=True)
                if variant_id is None:  # the model was never recorded: nothing to key the rows by
                    raise IndexProblem("has no entry for the model of these features")
                for digest, features, pixels in rows:
                    vector = _insert_vector(con, _image_key(digest, pixels), features)
                    con.execute("INSERT OR REPLACE INTO image_keys VALUES (?, ?, ?, ?)",
                                (variant_id, digest, vector, pixels))
                self._store_memo(con, files)

    def text_features(self, model: str, texts: Iterable[str]) -> dict[str, tuple[np.ndarray, bool]]:
        """text -> ((D,) float32 features, whether the text was truncated to the context) stored for `model`."""
        found: dict[str, tuple[np.ndarray, bool]] = {}
        with self._guard():
            if self._con is None:
                return found
            model_id = self._model_id(model)
            if model_id is None:
                return found
            for chunk in _chunks(list(dict.fromkeys(texts)), _CHUNK):
                rows = self._con.execute(
                    f"SELECT k.text, k.truncated, v.data, v.crc FROM prompt_keys k JOIN vectors v ON v.id = k.vector "
                    f"WHERE k.model = ? AND k.text IN ({','.join('?' * len(chunk))})", [model_id, *chunk]).fetchall()
                for text, truncated, data, crc in rows:
                    found[text] = (_vector(_text_key(text), data, crc), bool(truncated))
        return found

    def add_text_features(self, model: str, rows: Sequence[tuple[str, np.ndarray, bool]]) -> None:
        """Store (text, (D,) float32 features, truncated) rows for `model`."""
        with self._guard():
            if self._con is None or self._not_stored("prompt embeddings"):
                return
            with self._transaction() as con:
                model_id = self._model_id(model)
                if model_id is None:
                    raise IndexProblem("has no entry for the model of these features")
                for text, features, truncated in rows:
                    vector = _insert_vector(con, _text_key(text), features)
                    con.execute("INSERT OR REPLACE INTO prompt_keys VALUES (?, ?, ?, ?)",
                                (model_id, text, vector, int(truncated)))

    # ------------------------------------------------------------------------------------------ upkeep

    def summary(self) -> Summary | None:
        """Entries per model variant, files remembered and size on disk; None when the index is unusable."""
        with self._guard():
            if self._con is None:
                return None
            con = self._con
            models = []
            for model_id, fingerprint, name in con.execute("SELECT id, fingerprint, name FROM models ORDER BY id"):
                prompts = con.execute("SELECT count(*) FROM prompt_keys WHERE model = ?", (model_id,)).fetchone()[0]
                variants = con.execute(
                    "SELECT v.dtype, v.fast_decode, (SELECT count(*) FROM image_keys k WHERE k.variant = v.id) "
                    "FROM variants v WHERE v.model = ? ORDER BY v.id", (model_id,)).fetchall()
                for index, (dtype, fast, images) in enumerate(variants or [(None, 0, 0)]):
                    models.append(ModelSummary(name, fingerprint, dtype, bool(fast), images,
                                               prompts if index == 0 else 0))
            files = con.execute("SELECT count(*) FROM files").fetchone()[0]
            return Summary(self.path, self.size_bytes(), files, models)
        return None

    def size_bytes(self) -> int:
        """The index file and its write-ahead log, in bytes."""
        return sum(os.path.getsize(p) for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    def prune(self) -> tuple[int, int] | None:
        """Forget files that are gone and the image entries no remaining file has; (files, images) removed."""
        with self._guard():
            if self._con is None:
                return None
            gone = [key for (key,) in self._con.execute("SELECT path FROM files")
                    if not os.path.lexists(os.fsdecode(key))]
            with self._transaction() as con:
                for chunk in _chunks(gone, _CHUNK):
                    con.execute(f"DELETE FROM files WHERE path IN ({','.join('?' * len(chunk))})", chunk)
                images = con.execute(
                    "DELETE FROM image_keys WHERE digest NOT IN (SELECT digest FROM files)").rowcount
                _delete_orphan_vectors(con)
            self._con.execute("PRAGMA incremental_vacuum")
            return len(gone), images
        return None

    def clear(self) -> bool:
        """Remove every entry (the file stays, as an empty index); False when the index is unusable."""
        with self._guard():
            if self._con is None:
                return False
            with self._transaction() as con:
                for table in ("image_keys", "prompt_keys", "vectors", "variants", "models", "files"):
                    con.execute(f"DELETE FROM {table}")
            self._con.execute("PRAGMA incremental_vacuum")
            self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._variants.clear()
            self._models.clear()
            return True
        return False


def open_index(path: Path | None, warn: Callable[[str], None]) -> Index | None:
    """The index at `path` (created when missing), or None for no index (path None)."""
    return None if path is None else Index(path, warn)


def _insert_vector(con: sqlite3.Connection, key: bytes, features: np.ndarray) -> int:
    data = np.ascontiguousarray(features, dtype="<f4").tobytes()
    cursor = con.execute("INSERT INTO vectors (data, crc) VALUES (?, ?)", (data, zlib.crc32(key + data)))
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def _vector(key: bytes, data: bytes, crc: int) -> np.ndarray:
    if zlib.crc32(data, zlib.crc32(key)) != crc or len(data) % 4:
        raise IndexProblem("is damaged (an entry fails its checksum)")
    return np.frombuffer(data, dtype="<f4")


def _delete_orphan_vectors(con: sqlite3.Connection) -> None:
    con.execute("DELETE FROM vectors WHERE id NOT IN (SELECT vector FROM image_keys) "
                "AND id NOT IN (SELECT vector FROM prompt_keys)")


def _info_check(info: dict) -> int:
    """crc32 of a model record (without its check): a warm run takes the logit scale from it."""
    return zlib.crc32(json.dumps(info, sort_keys=True).encode("utf-8"))


def _image_key(digest: bytes, pixels: int) -> bytes:
    """What an image vector's checksum covers besides its data: its key and its pixel count."""
    return digest + pixels.to_bytes(8, "little")


def _text_key(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class _PathKeys:
    """The memo's key of a path, os.fsencode(os.path.abspath(path)), normalising each folder once: a walk gives
    thousands of files per folder."""

    def __init__(self) -> None:
        self._cwd = os.getcwd()
        self._folders: dict[str, bytes] = {}
        self._encoding = sys.getfilesystemencoding()  # os.fsencode's, without its per-call checks

    def __call__(self, path: str) -> bytes:
        folder, _, name = path.rpartition(os.sep)
        if name in ("", ".", "..") or path.startswith(2 * os.sep) or (os.altsep and os.altsep in path):
            return os.fsencode(os.path.normpath(os.path.join(self._cwd, path)))
        if not folder:
            folder = os.sep if path.startswith(os.sep) else "."
        key = self._folders.get(folder)
        if key is None:
            base = os.path.normpath(os.path.join(self._cwd, folder))
            key = self._folders[folder] = os.fsencode(base if base.endswith(os.sep) else base + os.sep)
        return key + name.encode(self._encoding, "surrogateescape")


def _stat_key(state: os.stat_result) -> tuple[int, int, int, int, int]:
    return (_int64(state.st_dev), _int64(state.st_ino), state.st_size, state.st_mtime_ns, state.st_ctime_ns)


def _int64(value: int) -> int:
    # As SQLite's signed 64-bit integers: device and inode numbers may use all 64 bits.
    return value - (1 << 64) if value >= 1 << 63 else value


_MEMO_FIELDS = struct.Struct("<5qB")  # dev, ino, size, mtime_ns, ctime_ns, racy: what a memo entry's checksum covers
_UINT64 = (1 << 64) - 1  # a stored (signed) device or inode number equals stat's, signed or not, modulo 2**64


def _memo_crc(key: bytes, dev: int, ino: int, size: int, mtime: int, ctime: int, racy: int, digest: bytes) -> int:
    return zlib.crc32(key + _MEMO_FIELDS.pack(dev, ino, size, mtime, ctime, racy) + digest)


def _writable(path: Path) -> bool:
    """Whether this process may write the index file and create its -wal and -shm files beside it."""
    real = os.path.realpath(path)  # SQLite puts them beside the file a symbolic link leads to
    return os.access(real, os.W_OK) and os.access(os.path.dirname(real), os.W_OK | os.X_OK)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _describe(err: BaseException) -> str:
    """An error from SQLite or the file system as the problem of the index, one line."""
    if isinstance(err, OSError):
        return f"cannot be written ({os_reason(err)})"
    text = " ".join(str(err).split()) or type(err).__name__
    lowered = text.lower()
    if "locked" in lowered or "busy" in lowered:
        return f"is locked by another process for more than {BUSY_TIMEOUT_MS // 1000} s"
    if "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
        return f"is damaged or not an index ({text})"
    if "readonly" in lowered or "read-only" in lowered or "permission" in lowered or "unable to open" in lowered:
        return f"cannot be written ({text})"
    if "full" in lowered or "no space" in lowered:
        return f"cannot grow: the disk is full ({text})"
    return f"cannot be used ({text})"
