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
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipcli.errors import os_reason
from clipcli.fsutil import file_sha256, make_private_dirs
from clipcli.resolve import ModelFiles, model_file_roles

SCHEMA_VERSION = 2  # 1: a row per vector on 64 KiB pages, the memo keyed by whole paths (migrated on open)
APPLICATION_ID = 0x434C4950  # "CLIP": tells our files from other programs' SQLite files
# Bumped whenever a change to the model code or preprocessing changes the features computed for the same inputs,
# so entries computed by older code are never reused.
FEATURES_VERSION = 1
DIGEST_BYTES = 16  # of SHA-256: content addresses; 2**-64 collision odds even at billions of files
# A file whose mtime/ctime lies this close to the moment it was looked at may change again within the same
# timestamp tick, unseen by stat; its memo entry is not trusted (git's "racy" entries).
RACY_NS = 2_000_000_000
# Before the first write of a run (and before `clip index` shows what it holds), an index up to this size is checked
# whole (PRAGMA integrity_check: about 0.1 s per 200 MB), so that damage anywhere in it is found before anything is
# written; larger ones rely on the checks made as each page is read and on the entries' checksums.
CHECK_BEFORE_WRITE_BYTES = 1 << 30
BUSY_TIMEOUT_MS = 10_000  # a concurrent run's transaction takes milliseconds; a lock held longer is a problem
_CHUNK = 500  # host parameters per IN (...) query
BLOCK_BYTES = 512 * 1024  # about this much feature data per row of `blocks`


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
class StoredImages:
    """Image features found in the index, as one matrix: the image with digest d is row rows[d] of `matrix`
    ((N, D) float32), and pixels[rows[d]] is its pixel count. Also read as a mapping digest -> StoredImage."""

    matrix: np.ndarray
    rows: dict[bytes, int]
    pixels: list[int]

    def __contains__(self, digest: object) -> bool:
        return digest in self.rows

    def __getitem__(self, digest: bytes) -> StoredImage:
        row = self.rows[digest]
        return self.matrix[row], self.pixels[row]

    def __len__(self) -> int:
        return len(self.rows)


NOTHING_STORED = StoredImages(np.zeros((0, 0), dtype=np.float32), {}, [])


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
-- Model and variant ids are never reused: a run that read an id before a concurrent clear never finds another
-- model's entries under it.
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY AUTOINCREMENT, fingerprint TEXT NOT NULL UNIQUE, name TEXT NOT NULL, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS variants (
    id INTEGER PRIMARY KEY AUTOINCREMENT, model INTEGER NOT NULL, dtype TEXT NOT NULL, fast_decode INTEGER NOT NULL,
    UNIQUE (model, dtype, fast_decode));
-- Rows of float32 features of one width (bytes), end to end in blocks of about BLOCK_BYTES: a row alone would leave
-- much of its page empty. Rows are only appended, and a block's rows move only when prune compacts it, into a new block
-- (ids are never reused, so a key read before that finds its block gone, never another row).
CREATE TABLE IF NOT EXISTS blocks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, width INTEGER NOT NULL, rows INTEGER NOT NULL, data BLOB NOT NULL);
-- pixels: the image's width x height as stored, so a run answered from here applies the same size limit as decoding.
-- crc: crc32 of the row's bytes, after the key's (_image_key, _text_key).
CREATE TABLE IF NOT EXISTS image_keys (
    variant INTEGER NOT NULL, digest BLOB NOT NULL, block INTEGER NOT NULL, slot INTEGER NOT NULL,
    pixels INTEGER NOT NULL, crc INTEGER NOT NULL, PRIMARY KEY (variant, digest)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS prompt_keys (
    model INTEGER NOT NULL, text TEXT NOT NULL, block INTEGER NOT NULL, slot INTEGER NOT NULL,
    truncated INTEGER NOT NULL, crc INTEGER NOT NULL, PRIMARY KEY (model, text)) WITHOUT ROWID;
-- The stat memo: a file (its folder's absolute path, ending in a separator, and its name: bytes, as the OS has them)
-- -> the digest of its content when it had this stat. Folder ids are never reused.
CREATE TABLE IF NOT EXISTS folders (id INTEGER PRIMARY KEY AUTOINCREMENT, path BLOB NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS files (
    folder INTEGER NOT NULL, name BLOB NOT NULL, dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, racy INTEGER NOT NULL, digest BLOB NOT NULL,
    crc INTEGER NOT NULL, PRIMARY KEY (folder, name)) WITHOUT ROWID;
"""


# The model is recorded (add_model) before any of its features are computed: only a concurrent clear removes it.
_CLEARED = "was cleared by another run while this one used it"


class IndexProblem(Exception):
    """Why the index cannot be used (one line); Index turns it into its one warning."""


class Index:
    """An open embedding index. Every method is safe to call after a problem: it then finds nothing and stores
    nothing. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path, warn: Callable[[str], None], warn_on_problem: bool = True) -> None:
        """`warn`: where the run's warnings go. `warn_on_problem` False: a problem that disables the index is not
        warned of (the caller, for which the index is the work, reports `problem` as its error)."""
        self.path = Path(path)  # as the user gave it, for messages
        self._file = Path(os.path.realpath(path))  # SQLite keeps its -wal and -shm files beside this one
        self._warn = warn
        self.problem: str | None = None  # why the index stopped being used, once it has
        self._lock = threading.RLock()
        self._con: sqlite3.Connection | None = None
        self._variants: dict[Variant, int] = {}
        self._models: dict[str, int] = {}
        self._checked = False  # whether the file was checked whole in this run (_check_whole_file)
        self._wrote = False  # whether this run committed a write
        self.images_stored = 0  # image entries this run has committed
        self.read_only = False  # opened for reading only (the user may not write it): nothing is stored
        self._warned = False  # the run's one warning about the index was given
        self._warn_on_problem = warn_on_problem
        with self._guard():
            self._con = self._connect()

    @property
    def usable(self) -> bool:
        return self._con is not None

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                _roll_back(self._con)  # a transaction an interrupt left open (see _transaction) stores nothing
                if self._wrote:  # a run that appended rows has rewritten blocks: their old pages go, if no one waits
                    try:
                        self._con.execute("PRAGMA busy_timeout=0")
                        _give_back_space(self._con)
                    except sqlite3.Error:
                        pass
                self._con.close()
                self._con = None

    # ------------------------------------------------------------------------------------------ opening, faults

    def _connect(self) -> sqlite3.Connection:
        if self.path.is_dir():
            raise IndexProblem("is a folder")
        file = self._file  # a symbolic link's target, which may not exist yet
        if not file.exists():
            make_private_dirs(file.parent)  # file paths and embeddings say what is in someone's photos
            try:
                os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:  # created by a concurrent run this instant
                pass
        if _writable(file):
            con = sqlite3.connect(file, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
        else:  # a shared index this user may only read: read as it is, with no -wal/-shm files made beside it
            con = sqlite3.connect(f"{file.as_uri()}?immutable=1", uri=True, isolation_level=None,
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
            elif version < SCHEMA_VERSION:
                if self.read_only:
                    raise IndexProblem(f"was written by an older clipcli (schema {version}) and cannot be upgraded "
                                       f"here (read-only)")
                self._check_whole_file(con)
                dropped = _upgrade(con)
                if dropped:  # the rest is kept: what was dropped is computed again when it is needed
                    self._warned = True
                    what = ("1 damaged entry (failing its checksum)" if dropped == 1
                            else f"{dropped} damaged entries (failing their checksums)")
                    self._warn(f"the index {self.path} had {what}, left out when it was upgraded to this clipcli's "
                               "format")
            con.execute("PRAGMA synchronous=NORMAL")  # WAL: committed batches survive a crash of the process
        except BaseException:
            con.close()
            raise
        return con

    @staticmethod
    def _create(con: sqlite3.Connection) -> None:
        # Before the first table: incremental vacuum lets prune and clear give space back.
        con.execute("PRAGMA auto_vacuum=INCREMENTAL")
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("BEGIN IMMEDIATE")
        try:
            if con.execute("PRAGMA application_id").fetchone()[0] not in (0, APPLICATION_ID):
                raise IndexProblem("is not a clipcli index (another program's SQLite file)")
            _make_tables(con)
            con.execute(f"PRAGMA application_id={APPLICATION_ID}")
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            con.execute("COMMIT")
        except BaseException:
            _roll_back(con)
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
            _roll_back(self._con)
            self._con.close()
            self._con = None
        if self.problem is None:
            self.problem = problem
            if not self._warned and self._warn_on_problem:  # one warning per run
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

    def _check_whole_file(self, con: sqlite3.Connection) -> None:
        """Check the whole file once per run (up to CHECK_BEFORE_WRITE_BYTES): before its first write, so that damage
        is found before anything is written to it, and before its contents are shown."""
        if not self._checked:
            self._checked = True
            if self.size_bytes() <= CHECK_BEFORE_WRITE_BYTES:
                # integrity_check, not quick_check: it also finds an index (the UNIQUE ones) that no longer matches
                # its table, which would let a run store a model twice; it costs about as much (0.09 s for 100,000
                # entries here): the blocks' pages dominate both
                verdict = con.execute("PRAGMA integrity_check(1)").fetchone()[0]
                if verdict != "ok":
                    found = [line for line in str(verdict).splitlines() if line and not line.startswith("***")]
                    raise IndexProblem(f"is damaged ({(found or ['integrity_check failed'])[0][:120]})")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        con = self._con
        assert con is not None
        if self.read_only:
            raise IndexProblem("cannot be written (read-only)")
        self._check_whole_file(con)
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:  # GeneratorExit too: an interrupt between the yield and the with body left it open
            _roll_back(con)
            raise
        con.execute("COMMIT")
        self._wrote = True

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
            folders: dict[bytes, dict[bytes, tuple[str, os.stat_result]]] = {}
            twins: list[tuple[str, os.stat_result]] = []  # a file given again under another spelling (./a, a)
            for path, state in files:
                folder, name = keys(path)
                named = folders.get(folder)
                if named is None:
                    named = folders[folder] = {}
                if name in named:
                    twins.append((path, state))
                else:
                    named[name] = (path, state)
            # The checksum and the comparison written out (not _memo_crc and _stat_key): this loop runs once per
            # file of every run.
            pack, crc32 = _MEMO_FIELDS.pack, zlib.crc32
            for folder, named in folders.items():
                known = named.get
                for rows in self._memo_rows(folder, list(named)):
                    for row in rows:
                        item = known(row[0])
                        if item is None:
                            continue
                        name, dev, ino, size, mtime, ctime, racy, digest, crc = row
                        if crc != crc32(folder + name + pack(dev, ino, size, mtime, ctime, racy) + digest):
                            raise IndexProblem("is damaged (a file entry fails its checksum)")
                        path, state = item
                        found[path] = (digest, not racy and mtime == state.st_mtime_ns
                                       and ctime == state.st_ctime_ns and size == state.st_size
                                       and ((ino - state.st_ino) & _UINT64) == 0
                                       and ((dev - state.st_dev) & _UINT64) == 0)
            if twins:
                found.update(self.file_entries(twins))
        return found

    def _memo_rows(self, folder: bytes, names: list[bytes]) -> Iterator[Iterable[tuple]]:
        """Memo rows of `names` in `folder` (and maybe others of the folder, which the caller skips): many names are
        read in one scan of the folder's entries; a few, by lookups."""
        assert self._con is not None
        row = self._con.execute("SELECT id FROM folders WHERE path = ?", (folder,)).fetchone()
        if row is None:
            return
        columns = "name, dev, ino, size, mtime_ns, ctime_ns, racy, digest, crc"
        if len(names) > 2 * _CHUNK:
            yield self._con.execute(f"SELECT {columns} FROM files WHERE folder = ?", row)
            return
        for chunk in _chunks(names, _CHUNK):
            yield self._con.execute(f"SELECT {columns} FROM files WHERE folder = ? AND name IN "
                                    f"({','.join('?' * len(chunk))})", [row[0], *chunk]).fetchall()

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
        ids: dict[bytes, int] = {}
        for record in records:
            folder, name = keys(record.path)
            folder_id = ids.get(folder)
            if folder_id is None:
                folder_id = ids[folder] = _folder_id(con, folder)
            dev, ino, size, mtime, ctime = _stat_key(record.state)
            racy = int(record.seen_ns - max(mtime, ctime) < RACY_NS)
            rows.append((folder_id, name, dev, ino, size, mtime, ctime, racy, record.digest,
                         _memo_crc(folder + name, dev, ino, size, mtime, ctime, racy, record.digest)))
        con.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

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

    def _look_ids_up_again(self) -> None:
        """In a write transaction: the model and variant ids this run has read may be gone (a concurrent clear);
        rows stored under them would be found by no one, and the run's model has no entry any more."""
        self._models.clear()
        self._variants.clear()

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

    def image_features(self, variant: Variant, digests: Iterable[bytes]) -> StoredImages:
        """The features stored for `variant` of those of `digests` that have an entry."""
        with self._guard():
            if self._con is None:
                return NOTHING_STORED
            variant_id = self._variant_id(variant, create=False)
            if variant_id is None:
                return NOTHING_STORED
            con = self._con
            wanted = list(dict.fromkeys(digests))
            columns = "block, slot, digest, pixels, crc"
            refs: list[tuple[int, int, bytes, int, int]] = []
            stored = con.execute("SELECT coalesce(sum(rows), 0) FROM blocks").fetchone()[0]
            if len(wanted) * 4 >= stored:  # most of what is stored: one scan beats a lookup per digest
                wanted_set = set(wanted)
                refs.extend(row for row in con.execute(f"SELECT {columns} FROM image_keys WHERE variant = ?",
                                                       (variant_id,)) if row[2] in wanted_set)
            else:
                for chunk in _chunks(wanted, _CHUNK):
                    refs.extend(con.execute(f"SELECT {columns} FROM image_keys WHERE variant = ? AND digest IN "
                                            f"({','.join('?' * len(chunk))})", [variant_id, *chunk]))
            refs.sort()  # block by block, each block read once
            return _gather(con, refs)
        return NOTHING_STORED

    def add_image_features(self, variant: Variant, rows: Sequence[tuple[bytes, np.ndarray, int]],
                           files: Iterable[FileRecord] = ()) -> None:
        """Store (digest, (D,) float32 features, pixel count) rows and stat memo entries in one transaction (one
        per batch)."""
        with self._guard():
            if self._con is None or self._not_stored("image embeddings"):
                return
            with self._transaction() as con:
                self._look_ids_up_again()
                variant_id = self._variant_id(variant, create=True)
                if variant_id is None:
                    raise IndexProblem(_CLEARED)
                rows = list({digest: (digest, features, pixels) for digest, features, pixels in rows}.values())
                data = [_row_bytes(features) for _, features, _ in rows]  # identical files in a batch: stored once
                places = _append_rows(con, data)
                con.executemany("INSERT OR REPLACE INTO image_keys VALUES (?, ?, ?, ?, ?, ?)", [
                    (variant_id, digest, block, slot, pixels, _row_crc(_image_key(digest, pixels), row))
                    for (digest, _, pixels), row, (block, slot) in zip(rows, data, places, strict=True)])
                self._store_memo(con, files)
            self.images_stored += len(rows)

    def text_features(self, model: str, texts: Iterable[str]) -> dict[str, tuple[np.ndarray, bool]]:
        """text -> ((D,) float32 features, whether the text was truncated to the context) stored for `model`."""
        found: dict[str, tuple[np.ndarray, bool]] = {}
        with self._guard():
            if self._con is None:
                return found
            model_id = self._model_id(model)
            if model_id is None:
                return found
            refs: list[tuple[int, int, str, int, int]] = []
            for chunk in _chunks(list(dict.fromkeys(texts)), _CHUNK):
                refs.extend(self._con.execute(
                    f"SELECT block, slot, text, truncated, crc FROM prompt_keys WHERE model = ? AND text IN "
                    f"({','.join('?' * len(chunk))})", [model_id, *chunk]))
            refs.sort()
            for position, data in _stored_rows(self._con, refs):
                _, _, text, truncated, crc = refs[position]
                found[text] = (_vector(_text_key(text), data, crc), bool(truncated))
        return found

    def add_text_features(self, model: str, rows: Sequence[tuple[str, np.ndarray, bool]]) -> None:
        """Store (text, (D,) float32 features, truncated) rows for `model`."""
        with self._guard():
            if self._con is None or self._not_stored("prompt embeddings"):
                return
            with self._transaction() as con:
                self._look_ids_up_again()
                model_id = self._model_id(model)
                if model_id is None:
                    raise IndexProblem(_CLEARED)
                data = [_row_bytes(features) for _, features, _ in rows]
                places = _append_rows(con, data)
                con.executemany("INSERT OR REPLACE INTO prompt_keys VALUES (?, ?, ?, ?, ?, ?)", [
                    (model_id, text, block, slot, int(truncated), _row_crc(_text_key(text), row))
                    for (text, _, truncated), row, (block, slot) in zip(rows, data, places, strict=True)])

    # ------------------------------------------------------------------------------------------ upkeep

    def summary(self) -> Summary | None:
        """Entries per model variant, files remembered and size on disk; None when the index is unusable."""
        with self._guard():
            if self._con is None:
                return None
            con = self._con
            self._check_whole_file(con)
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
        return sum(os.path.getsize(p) for p in (self._file, Path(f"{self._file}-wal")) if p.exists())

    def prune(self) -> tuple[int, int] | None:
        """Forget files that are gone and the image entries no remaining file has; (files, images) removed."""
        with self._guard():
            if self._con is None:
                return None
            folders = dict(self._con.execute("SELECT id, path FROM folders"))
            gone = [(folder, name) for folder, name in self._con.execute("SELECT folder, name FROM files")
                    if folder not in folders or not os.path.isfile(os.fsdecode(folders[folder] + name))]
            with self._transaction() as con:
                con.executemany("DELETE FROM files WHERE folder = ? AND name = ?", gone)
                con.execute("DELETE FROM folders WHERE id NOT IN (SELECT folder FROM files)")
                images = con.execute(
                    "DELETE FROM image_keys WHERE digest NOT IN (SELECT digest FROM files)").rowcount
                _compact(con)
            _give_back_space(self._con)
            return len(gone), images
        return None

    def clear(self) -> bool:
        """Remove every entry (the file stays, as an empty index); False when the index is unusable."""
        with self._guard():
            if self._con is None:
                return False
            with self._transaction() as con:
                for table in ("image_keys", "prompt_keys", "blocks", "variants", "models", "files", "folders"):
                    con.execute(f"DELETE FROM {table}")
            _give_back_space(self._con)
            self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._variants.clear()
            self._models.clear()
            return True
        return False


def open_index(path: Path | None, warn: Callable[[str], None], warn_on_problem: bool = True) -> Index | None:
    """The index at `path` (created when missing), or None for no index (path None)."""
    return None if path is None else Index(path, warn, warn_on_problem)


def _row_bytes(features: np.ndarray) -> bytes:
    return np.ascontiguousarray(features, dtype="<f4").tobytes()


def _row_crc(key: bytes, data: bytes | memoryview) -> int:
    """A feature row's checksum: it covers the key the row is stored under (_image_key, _text_key) too."""
    return zlib.crc32(data, zlib.crc32(key))


def _vector(key: bytes, data: bytes | memoryview, crc: int) -> np.ndarray:
    if _row_crc(key, data) != crc or len(data) % 4:
        raise IndexProblem("is damaged (an entry fails its checksum)")
    return np.frombuffer(bytes(data), dtype="<f4")


def _block_rows(page_size: int, width: int) -> int:
    """How many rows of `width` bytes a block holds: about BLOCK_BYTES, ending just short of filling its last page.
    (SQLite keeps a large row's first min_local bytes on its table's page and the rest on overflow pages of
    page_size - 4 bytes each.)"""
    min_local = (page_size - 12) * 32 // 255 - 23
    overflow = max(1, BLOCK_BYTES // (page_size - 4))
    return max(1, (min_local + overflow * (page_size - 4) - 32) // width)


def _append_rows(con: sqlite3.Connection, rows: Sequence[bytes],
                 keep_out: Collection[int] = ()) -> list[tuple[int, int]]:
    """Append feature rows to the blocks of their width (in the caller's transaction; never to a block in
    `keep_out`); each one's (block, slot)."""
    page_size = con.execute("PRAGMA page_size").fetchone()[0]
    places = [(0, 0)] * len(rows)
    widths: dict[int, list[int]] = {}
    for at, row in enumerate(rows):
        widths.setdefault(len(row), []).append(at)
    for width, pending in widths.items():
        capacity = _block_rows(page_size, width)
        block: int | None = None
        used, data = 0, b""
        last = con.execute("SELECT id, rows FROM blocks WHERE width = ? ORDER BY id DESC LIMIT 1", (width,)).fetchone()
        if last is not None and last[1] < capacity and last[0] not in keep_out:
            # The newest block has room: it is rewritten with the rows added.
            block, used = last
            data = con.execute("SELECT data FROM blocks WHERE id = ?", (block,)).fetchone()[0]
        while pending:
            take, pending = pending[:capacity - used], pending[capacity - used:]
            data += b"".join(rows[at] for at in take)
            if block is None:
                cursor = con.execute("INSERT INTO blocks (width, rows, data) VALUES (?, ?, ?)",
                                     (width, used + len(take), data))
                assert cursor.lastrowid is not None
                block = cursor.lastrowid
            else:
                con.execute("UPDATE blocks SET rows = ?, data = ? WHERE id = ?", (used + len(take), data, block))
            for slot, at in enumerate(take, start=used):
                places[at] = (block, slot)
            block, used, data = None, 0, b""
    return places


def _compact(con: sqlite3.Connection) -> None:
    """Rewrite the blocks holding rows that no key points to any more (pruned or replaced entries): their other rows
    move to new blocks, a few blocks at a time (in the caller's transaction)."""
    tables = {"image_keys": ("variant", "digest"), "prompt_keys": ("model", "text")}
    live: dict[int, int] = {}
    for table in tables:
        for (block,) in con.execute(f"SELECT block FROM {table}"):
            live[block] = live.get(block, 0) + 1
    stale = sorted(block for block, rows in con.execute("SELECT id, rows FROM blocks") if live.get(block, 0) < rows)
    if not stale:
        return
    staying: dict[int, list[tuple]] = {}  # block -> (block, slot, table, key...) of its rows that stay
    stale_set = set(stale)
    for table, (first, second) in tables.items():
        for row in con.execute(f"SELECT block, slot, '{table}', {first}, {second} FROM {table}"):
            if row[0] in stale_set:
                staying.setdefault(row[0], []).append(row)
    for group in _chunks(stale, 64):  # about 32 MB of rows held at once
        moving = sorted(row for block in group for row in staying.get(block, ()))
        data = [bytes(row) for _, row in _stored_rows(con, moving)]
        if len(data) != len(moving):
            raise IndexProblem("is damaged (an entry points to a block that is not there)")
        con.execute(f"DELETE FROM blocks WHERE id IN ({','.join('?' * len(group))})", group)
        places = _append_rows(con, data, keep_out=stale_set)
        for table, (first, second) in tables.items():
            con.executemany(f"UPDATE {table} SET block = ?, slot = ? WHERE {first} = ? AND {second} = ?",
                            [(*place, row[3], row[4]) for row, place in zip(moving, places, strict=True)
                             if row[2] == table])


def _make_tables(con: sqlite3.Connection) -> None:
    """The tables of _SCHEMA that are missing (in the caller's transaction: executescript would commit it)."""
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            con.execute(statement)


def _roll_back(con: sqlite3.Connection) -> None:
    """Undo the open transaction, if any, while another error is on its way: a failing ROLLBACK must not hide that
    error, and a connection already closed (a transaction's generator finalised after close) has nothing to undo."""
    try:
        if con.in_transaction:
            con.execute("ROLLBACK")
    except sqlite3.Error:
        pass


def _give_back_space(con: sqlite3.Connection) -> None:
    """Truncate the file's free pages (outside a transaction). executescript steps the pragma to its end: a plain
    execute frees one page."""
    con.executescript("PRAGMA incremental_vacuum;")


def _upgrade(con: sqlite3.Connection) -> int:
    """Rewrite a schema 1 index as schema 2, keeping every entry that passes its checksum (one transaction: a
    concurrent run waits for it); how many failed theirs and were left out."""
    con.execute("BEGIN IMMEDIATE")
    dropped = 0
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version == 1:
            dropped = _upgrade_from_1(con)
        elif version != SCHEMA_VERSION:  # else a concurrent run has just upgraded it
            raise IndexProblem(f"is damaged (schema version {version})")
        con.execute("COMMIT")
    except BaseException:
        _roll_back(con)
        raise
    _give_back_space(con)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the upgrade's log, as large as the index, is not kept
    return dropped


def _upgrade_from_1(con: sqlite3.Connection) -> int:
    for table in ("files", "image_keys", "prompt_keys", "models", "variants"):
        con.execute(f"ALTER TABLE {table} RENAME TO old_{table}")
    _make_tables(con)
    for table, columns in (("models", "id, fingerprint, name, info"), ("variants", "id, model, dtype, fast_decode")):
        con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM old_{table}")  # ids kept: keys use them
    separator = os.fsencode(os.sep)
    folders: dict[bytes, int] = {}
    dropped = 0
    rows = con.execute("SELECT path, dev, ino, size, mtime_ns, ctime_ns, racy, digest, crc FROM old_files")
    while chunk := rows.fetchmany(1000):
        memo = []
        for path, dev, ino, size, mtime, ctime, racy, digest, crc in chunk:
            if crc != _memo_crc(path, dev, ino, size, mtime, ctime, racy, digest):  # over the whole path
                dropped += 1
                continue
            cut = path.rfind(separator) + 1
            folder = path[:cut]
            if folder not in folders:
                folders[folder] = _folder_id(con, folder)
            memo.append((folders[folder], path[cut:], dev, ino, size, mtime, ctime, racy, digest, crc))
        con.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", memo)
    kinds = [("image_keys", "variant, digest, pixels", lambda key: _image_key(key[1], key[2])),
             ("prompt_keys", "model, text, truncated", lambda key: _text_key(key[1]))]
    for table, columns, checked in kinds:
        rows = con.execute(f"SELECT {columns}, v.data, v.crc FROM old_{table} JOIN vectors v ON v.id = vector "
                           f"ORDER BY vector")
        while read := rows.fetchmany(1000):
            chunk = [row for row in read if _row_crc(checked(row), row[3]) == row[4]]
            dropped += len(read) - len(chunk)
            places = _append_rows(con, [data for *_, data, _ in chunk])
            con.executemany(f"INSERT OR REPLACE INTO {table} VALUES (?, ?, ?, ?, ?, ?)",
                            [(first, second, block, slot, third, crc) for (first, second, third, _, crc), (block, slot)
                             in zip(chunk, places, strict=True)])
    for table in ("old_files", "old_image_keys", "old_prompt_keys", "old_models", "old_variants", "vectors"):
        con.execute(f"DROP TABLE {table}")
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    return dropped


def _gather(con: sqlite3.Connection, refs: list[tuple[int, int, bytes, int, int]]) -> StoredImages:
    """The rows of image keys (block, slot, digest, pixels, crc), sorted, checked against their checksums and copied
    into one matrix a block at a time (a warm run's peak memory is the matrix)."""
    matrix: np.ndarray | None = None
    digests: list[bytes] = []
    pixels: list[int] = []
    crc32 = zlib.crc32
    for data, width, start, end in _blocks_of(con, refs):
        view = memoryview(data)
        slots = []
        for _, slot, digest, size, crc in refs[start:end]:
            if crc32(view[slot * width:(slot + 1) * width], crc32(digest + size.to_bytes(8, "little"))) != crc:
                raise IndexProblem("is damaged (an entry fails its checksum)")  # _row_crc(_image_key), written out
            slots.append(slot)
            digests.append(digest)
            pixels.append(size)
        rows = np.frombuffer(data, dtype="<f4").reshape(-1, width // 4)
        if matrix is None:
            matrix = np.empty((len(refs), rows.shape[1]), dtype="<f4")
        if rows.shape[1] != matrix.shape[1]:
            raise IndexProblem("is damaged (features of different lengths for one model)")
        matrix[len(digests) - len(slots):len(digests)] = rows[slots]
    if matrix is None:
        return NOTHING_STORED
    return StoredImages(matrix[:len(digests)], {digest: row for row, digest in enumerate(digests)}, pixels)


def _stored_rows(con: sqlite3.Connection, refs: Sequence[tuple]) -> Iterator[tuple[int, memoryview]]:
    """(position in refs, the row's bytes) for refs starting (block, slot), sorted (see _blocks_of)."""
    for data, width, start, end in _blocks_of(con, refs):
        view = memoryview(data)
        for at in range(start, end):
            slot = refs[at][1]
            yield at, view[slot * width:(slot + 1) * width]


def _blocks_of(con: sqlite3.Connection, refs: Sequence[tuple]) -> Iterator[tuple[bytes, int, int, int]]:
    """For refs starting (block, slot), sorted: each block they point to, read once, as (its data, its row width,
    start, end), refs[start:end] being the ones in it, their slots checked. A block that is gone (moved by a
    concurrent prune since the refs were read) leaves its refs out."""
    ids = sorted({ref[0] for ref in refs})
    at = 0
    for chunk in _chunks(ids, _CHUNK):
        for block, width, count, data in con.execute(
                f"SELECT id, width, rows, data FROM blocks WHERE id IN ({','.join('?' * len(chunk))}) ORDER BY id",
                chunk):
            if width <= 0 or width % 4 or len(data) != width * count:
                raise IndexProblem("is damaged (a block of features has the wrong length)")
            while at < len(refs) and refs[at][0] < block:
                at += 1
            end = at
            while end < len(refs) and refs[end][0] == block:
                if not 0 <= refs[end][1] < count:
                    raise IndexProblem("is damaged (an entry points past the end of its block)")
                end += 1
            if end > at:
                yield data, width, at, end
            at = end


def _info_check(info: dict) -> int:
    """crc32 of a model record (without its check): a warm run takes the logit scale from it."""
    return zlib.crc32(json.dumps(info, sort_keys=True).encode("utf-8"))


def _image_key(digest: bytes, pixels: int) -> bytes:
    """What an image vector's checksum covers besides its data: its key and its pixel count."""
    return digest + pixels.to_bytes(8, "little")


def _text_key(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class _PathKeys:
    """The memo's key of a path, os.fsencode(os.path.abspath(path)), as (its folder, ending in a separator; its
    name), normalising each folder once: a walk gives thousands of files per folder."""

    def __init__(self) -> None:
        self._cwd = os.getcwd()
        self._folders: dict[str, bytes] = {}
        self._encoding = sys.getfilesystemencoding()  # os.fsencode's, without its per-call checks

    def __call__(self, path: str) -> tuple[bytes, bytes]:
        folder, _, name = path.rpartition(os.sep)
        if name in ("", ".", "..") or path.startswith(2 * os.sep) or (os.altsep and os.altsep in path):
            whole = os.fsencode(os.path.normpath(os.path.join(self._cwd, path)))
            cut = whole.rfind(os.fsencode(os.sep)) + 1
            return whole[:cut], whole[cut:]
        if not folder:
            folder = os.sep if path.startswith(os.sep) else "."
        key = self._folders.get(folder)
        if key is None:
            base = os.path.normpath(os.path.join(self._cwd, folder))
            key = self._folders[folder] = os.fsencode(base if base.endswith(os.sep) else base + os.sep)
        return key, name.encode(self._encoding, "surrogateescape")


def _folder_id(con: sqlite3.Connection, folder: bytes) -> int:
    """The id of a memo folder, made when new (in the caller's transaction)."""
    row = con.execute("SELECT id FROM folders WHERE path = ?", (folder,)).fetchone()
    if row is not None:
        return row[0]
    cursor = con.execute("INSERT INTO folders (path) VALUES (?)", (folder,))
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def _stat_key(state: os.stat_result) -> tuple[int, int, int, int, int]:
    return (_int64(state.st_dev), _int64(state.st_ino), state.st_size, state.st_mtime_ns, state.st_ctime_ns)


def _int64(value: int) -> int:
    # As SQLite's signed 64-bit integers: device and inode numbers may use all 64 bits.
    return value - (1 << 64) if value >= 1 << 63 else value


_MEMO_FIELDS = struct.Struct("<5qB")  # dev, ino, size, mtime_ns, ctime_ns, racy: what a memo entry's checksum covers
_UINT64 = (1 << 64) - 1  # a stored (signed) device or inode number equals stat's, signed or not, modulo 2**64


def _memo_crc(key: bytes, dev: int, ino: int, size: int, mtime: int, ctime: int, racy: int, digest: bytes) -> int:
    return zlib.crc32(key + _MEMO_FIELDS.pack(dev, ino, size, mtime, ctime, racy) + digest)


def _writable(file: Path) -> bool:
    """Whether this process may write the index file (no symbolic link) and create its -wal and -shm files beside
    it."""
    return os.access(file, os.W_OK) and os.access(file.parent, os.W_OK | os.X_OK)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def unusable(path: Path | None, problem: str | None, indexed: int | None = None) -> str:
    """A command's error for an index it cannot do its work without: the problem and its fix, then for a command
    that was filling it, what became of its work (`indexed`: the images it had stored)."""
    problem = problem or "cannot be used"
    if indexed is None or problem == _CLEARED:
        outcome = ""
    else:
        outcome = "; the images indexed before that are kept" if indexed else "; nothing was indexed"
    return f"the index {path} {problem}{remedy(problem)}{outcome}"


def remedy(problem: str) -> str:
    """What to do about a problem this module worded (Index.problem), as "; ...", for a command that stops on it
    ("" when the problem says it)."""
    if "read-only" in problem or "cannot be written" in problem:
        return "; give --index a file you may write"
    if "disk is full" in problem:
        return "; make room on its disk and run it again"
    if "locked by another process" in problem:
        return "; run it again once the other clip run is done"
    if "newer clipcli" in problem or "give --index" in problem:  # the problem says what to do
        return ""
    if problem == _CLEARED:
        return "; run it again"
    if "is damaged (" in problem:  # not "damaged or not an index": that file may be another program's
        return "; delete the file (it holds only what clipcli can compute again)"
    return "; give --index the path of a clipcli index"


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
