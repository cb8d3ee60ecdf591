"""Sorting images into one folder per label without ever losing a file: safe folder names from labels, the plan (where
each image goes, numbered variants, files already there), no-clobber file operations (copy, hard link, symbolic link,
move within and across file systems), the log DEST/clip-organize.jsonl, and undo. Knows nothing of models: it is given
paths and their label scores. Never overwrites a file and never writes outside DEST (undo writes only to the paths the
log says the images came from)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from clipcli import scoring
from clipcli.errors import OptionError, UsageError, os_reason
from clipcli.fsutil import file_sha256
from clipcli.inputs import Failure

MODES = ("copy", "move", "link", "symlink")
UNSURE = "_unsure"  # the folder of images whose top score is below min_score
LOG_NAME = "clip-organize.jsonl"
# Temp files are hidden (never walked as input) and named so that any later run recognises and removes them.
TEMP_PREFIX, TEMP_SUFFIX = ".clip-organize-", ".part"
MAX_FOLDER_BYTES = 200  # of the 255 most file systems allow, so a folder name always fits
MAX_NAME_BYTES = 255
_RETRIES = 100  # names taken under our feet (another program, a case-insensitive file system) before giving up

ACTIONS = {  # what the log's "action" says, in words for the summary
    "copy": "copied", "move": "moved", "link": "hard-linked", "symlink": "symlinked",
    "skip": "already there", "remove-source": "already there (source removed)",
}
PLANNED = {"copy": "to copy", "move": "to move", "link": "to hard-link", "symlink": "to symlink",
           "skip": "already there", "remove-source": "already there (source to remove)"}


# ---------------------------------------------------------------------------------------------- folder names

# Characters no folder name may hold on some system (Windows' <>:"|?*\ and every system's /), line breaks, and the
# bidirectional controls that make a name display as another; each becomes "_". Control characters and lone
# surrogates (undecodable bytes) go too, by their Unicode category.
_FORBIDDEN = frozenset('/\\<>:"|?*\u2028\u2029\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069')
_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",  # Windows device names, in any folder
                       *(f"{port}{n}" for port in ("COM", "LPT") for n in ("0123456789¹²³"))})


def folder_name(label: str) -> str:
    """The folder a label's images go to: the label itself when it is a safe folder name on every common system,
    else a safe name made from it (forbidden characters as "_", no leading dot, no trailing dot or space, Windows
    device names suffixed with "_", long names cut and given a digest of the label so they stay distinct)."""
    name = unicodedata.normalize("NFC", label)
    name = "".join("_" if ch in _FORBIDDEN or unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in name)
    name = name.strip().rstrip(". ")  # Windows drops trailing dots and spaces: "cat." would be "cat"
    name = name or "_"
    if name.startswith("."):  # ".", ".." and hidden names
        name = "_" + name[1:]
    stem, dot, rest = name.partition(".")
    if stem.rstrip(" ").upper() in _RESERVED:  # CON, nul.txt, Com1 ...
        name = stem + "_" + dot + rest
    if len(name.encode("utf-8")) > MAX_FOLDER_BYTES:
        digest = hashlib.sha256(label.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        cut = name.encode("utf-8")[:MAX_FOLDER_BYTES - len(digest) - 1].decode("utf-8", "ignore").rstrip(". ")
        name = f"{cut}~{digest}"
    return name


def _same_name_key(name: str) -> str:
    # Case-insensitive, normalisation-insensitive file systems (macOS, Windows) take names equal under this as one.
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def label_folders(labels: Sequence[str]) -> dict[str, str]:
    """Each label's folder name (folder_name); UsageError when two labels would share a folder on any common file
    system, or a label would take the name of the unsure folder or of the log."""
    owners: dict[str, str | None] = {_same_name_key(UNSURE): None, _same_name_key(LOG_NAME): None}
    folders = {}
    for label in labels:
        name = folder_name(label)
        key = _same_name_key(name)
        if key in owners:
            other = owners[key]
            if other is None:
                kept = "low-confidence images" if key == _same_name_key(UNSURE) else "its log"
                raise OptionError("labels", label, f"would be the folder '{name}', which clip organize keeps for "
                                  f"{kept}", "rename the label")
            raise OptionError("labels", label, f"would share the folder '{name}' with '{other}' (on some file "
                              "systems)", "rename one of them")
        owners[key] = label
        folders[label] = name
    return folders


# ---------------------------------------------------------------------------------------------- file operations


_AT_FDCWD = -100  # Linux's "relative to the working directory"
_RENAME_NOREPLACE = 1  # linux/fs.h


@cache
def _renameat2() -> Any:
    """glibc's renameat2 (Linux 3.15+, glibc 2.28+), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def rename_no_replace(source: str, target: str) -> None:
    """Rename `source` to `target` on one file system, never replacing anything: FileExistsError when `target` is
    taken, OSError EXDEV across file systems. Atomic with renameat2(RENAME_NOREPLACE); where the kernel, C library or
    file system lacks it, a hard link then an unlink (for a moment both names exist, never neither)."""
    function = _renameat2()
    if function is not None:
        if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise OSError(code, os.strerror(code), source, None, target)  # FileExistsError for EEXIST
    try:
        if os.link in os.supports_follow_symlinks:
            os.link(source, target, follow_symlinks=False)  # a link is renamed as itself
        else:
            os.link(source, target)
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        # A file system without hard links (FAT, some network shares): rename after looking. Only a program writing
        # into the same folder at this very moment could slip in between; clip organize holds DEST's lock.
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target) from None
        os.rename(source, target)
        return
    os.unlink(source)


def copy_into_place(source: str, target: str) -> None:
    """Copy `source` (its bytes, mode and times) to `target`, which must not exist: into a temp file beside it,
    fsynced, then renamed into place without replacing anything. An interruption leaves at most a temp file, never
    a partial file under `target`'s name."""
    fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=os.path.dirname(target) or ".")
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as data:
            shutil.copyfileobj(data, out, 1 << 20)
            out.flush()
            shutil.copystat(source, temp)
            os.fsync(out.fileno())
        rename_no_replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def move(source: str, target: str) -> None:
    """Move `source` to `target`, which must not exist: a no-clobber rename on one file system; across file systems
    copy -> fsync -> rename into place -> fsync the folder -> unlink the source (when the source cannot be removed,
    the copy is, and the error raised). At every moment the file is at `source`, at `target`, or at both."""
    try:
        rename_no_replace(source, target)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        copy_into_place(source, target)
        _fsync_folder(os.path.dirname(target) or ".")  # the new name is on disk before the old one goes
        try:
            os.unlink(source)
        except OSError:  # the source cannot go (a read-only folder): take the copy back, so nothing changed
            with contextlib.suppress(OSError):
                os.unlink(target)
            raise


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on this system (Windows): the file itself was fsynced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the file itself was fsynced
    finally:
        os.close(fd)


def same_bytes(a: str, b: str) -> bool:
    """True when the files at `a` and `b` (links followed) hold the same bytes."""
    try:
        first, second = os.stat(a), os.stat(b)
        if (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino):
            return True
        if not (stat.S_ISREG(first.st_mode) and stat.S_ISREG(second.st_mode)) or first.st_size != second.st_size:
            return False
        with open(a, "rb") as left, open(b, "rb") as right:
            while True:
                chunk = left.read(1 << 20)
                if chunk != right.read(1 << 20):
                    return False
                if not chunk:
                    return True
    except OSError:
        return False


def remove_temp_files(folder: str) -> int:
    """Delete the temp files an interrupted run left in `folder` (see TEMP_PREFIX); how many there were."""
    removed = 0
    try:
        with os.scandir(folder) as listing:
            stale = [entry.path for entry in listing if entry.name.startswith(TEMP_PREFIX)
                     and entry.name.endswith(TEMP_SUFFIX) and entry.is_file(follow_symlinks=False)]
    except OSError:
        return 0
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed += 1
    return removed


@contextlib.contextmanager
def _locked(folder: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (flock on the folder itself) for the block: two runs on one DEST would
    remove each other's temp files and race for names. Not locked where the system has no flock."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as err:
        raise UsageError(f"cannot open '{folder}': {os_reason(err)}; check the folder's permissions") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another clip organize is working in '{folder}'; wait until it has finished") from None
        except OSError:
            pass  # a file system without locks: go on unlocked
        yield
    finally:
        os.close(fd)  # releases the lock


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------------------------------------- the log


class Log:
    """DEST/clip-organize.jsonl: one JSON object per line, appended, flushed and fsynced one at a time. Records are
    numbered by their line (0-based); a record naming an action is written before the action is done, so after an
    interruption the last record may name one not done yet (the files show which)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self.lines = 0

    def write(self, record: dict) -> int:
        """Append `record`; its line number. UsageError when the log cannot be read or written (nothing is done
        that the log does not record first)."""
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape")
        try:
            if self._fd is None:
                self._open()
            assert self._fd is not None
            os.write(self._fd, data)
            os.fsync(self._fd)
        except OSError as err:
            raise UsageError(f"cannot write the log '{self.path}': {os_reason(err)}; check the disk and the "
                             "folder's permissions") from None
        self.lines += 1
        return self.lines - 1

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.path, flags, 0o666)
        existing = read_log_bytes(self.path)  # only counted here (records are numbered by line), not parsed
        cut_short = bool(existing) and not existing.endswith(b"\n")  # a record cut short (power loss)
        self.lines = existing.count(b"\n") + cut_short  # as len(read_lines(...))
        if cut_short:
            os.write(fd, b"\n")  # end its line
        self._fd = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_log_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def read_lines(path: str) -> list[dict | None]:
    """The log's records by line number; None for a line that is not a JSON object (cut short by a crash)."""
    raw = read_log_bytes(path)
    records: list[dict | None] = []
    lines = raw.split(b"\n")
    if lines[-1] == b"":  # the empty rest after the last line break (or an empty file)
        lines.pop()
    for line in lines:
        try:
            value = json.loads(line.decode("utf-8", "surrogateescape"))
        except ValueError:
            value = None
        records.append(value if isinstance(value, dict) else None)
    return records


# ---------------------------------------------------------------------------------------------- organizing


@dataclass(frozen=True)
class Step:
    """One image's place in the plan. `action`: the mode (copy, move, link, symlink); "skip" when an identical file
    is there already; "remove-source" when moving and an identical file is there already (only the source goes)."""

    source: str  # the image as found
    destination: str  # DEST as given / folder / file name
    label: str | None  # None: its top score is below min_score (the unsure folder)
    score: float  # its top score
    action: str


@dataclass
class _Folder:
    """What a destination folder holds: its names, and each name's numbered variants ("x.jpg" -> "x (2).jpg")."""

    names: set[str] = field(default_factory=set)
    variants: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

    def add(self, name: str) -> None:
        self.names.add(name)
        self.variants.setdefault(name, []).append((0, name))
        stem, ext = os.path.splitext(name)
        numbered = re.fullmatch(r"(.+) \((\d+)\)", stem, flags=re.DOTALL)
        if numbered:
            self.variants.setdefault(numbered.group(1) + ext, []).append((int(numbered.group(2)), name))

    def taken(self, name: str) -> list[str]:
        """`name` and its numbered variants that exist, plain name first, then by number."""
        return [item for _, item in sorted(self.variants.get(name, []))]

    def free(self, name: str) -> str | None:
        """`name`, or its first numbered variant not taken; None when numbering would make the name too long."""
        if name not in self.names:
            return name
        stem, ext = os.path.splitext(name)
        number = 1
        while True:
            candidate = f"{stem} ({number}){ext}"
            if len(os.fsencode(candidate)) > MAX_NAME_BYTES:
                return None
            if candidate not in self.names:
                return candidate
            number += 1


class Organizer:
    """One `clip organize` run into `dest`: `place()` takes scored images a batch at a time and puts each into
    `dest/<folder of its top label>/` (UNSURE below `min_score`), logging each action before doing it. With
    `dry_run` it only plans (nothing is created, written or removed). Use as a context manager: DEST is created,
    locked and cleaned of an interrupted run's temp files on entry."""

    def __init__(self, dest: str | os.PathLike[str], labels: Sequence[str], mode: str = "copy", *,
                 min_score: float | None = None, dry_run: bool = False) -> None:
        if mode not in MODES:
            raise OptionError("mode", mode, "unknown mode", f"use one of {', '.join(MODES)}")
        self.dest = os.fspath(dest)
        self.labels = list(labels)
        self.folders = label_folders(self.labels)
        self.mode = mode
        self.min_score = min_score
        self.dry_run = dry_run
        self.steps: list[Step] = []
        self.real = os.path.realpath(self.dest)
        self.log = Log(os.path.join(self.dest, LOG_NAME))
        self._contents: dict[str, _Folder] = {}
        self._ready: set[str] = set()
        self._seen: set[str] = set()
        self._check_dest()
        self._lock: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------------------------------ checks

    def _check_dest(self) -> None:
        """UsageError before any work when DEST, one of the folders this run uses or the log is not what it must be:
        a symbolic link there would lead writes outside DEST."""
        if os.path.lexists(self.dest) and not os.path.isdir(self.dest):
            raise OptionError("into", self.dest, "is not a folder", "give a folder (it is created if missing)")
        folders = [*self.folders.values(), *([UNSURE] if self.min_score is not None else [])]
        for folder in folders:
            path = os.path.join(self.dest, folder)
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            except OSError as err:
                raise UsageError(f"cannot use '{path}' ({os_reason(err)}); check DEST's permissions") from None
            if stat.S_ISLNK(info.st_mode):
                raise UsageError(f"'{path}' is a symbolic link; clip organize writes only inside DEST, so remove "
                                 "the link or choose another --into")
            if not stat.S_ISDIR(info.st_mode):
                raise UsageError(f"'{path}' is not a folder; move it away or choose another --into")
        log = os.path.join(self.dest, LOG_NAME)
        if os.path.lexists(log) and not stat.S_ISREG(os.lstat(log).st_mode):
            raise UsageError(f"'{log}' is not a regular file; move it away or choose another --into")

    def check_paths(self, paths: Sequence[str]) -> None:
        """UsageError for a PATH argument that is DEST or inside it: DEST is never taken as input."""
        for path in paths:
            if self._inside(path):
                raise UsageError(f"path '{path}' is inside the destination '{self.dest}'; DEST is never taken as "
                                 "input, so give the folders to sort")

    def outside(self, images: Sequence[str]) -> list[str]:
        """`images` without those inside DEST (reached through a symbolic link, say): they are never input."""
        return [path for path in images if not self._inside(path)]

    def _inside(self, path: str) -> bool:
        where = os.path.realpath(path) if os.path.isdir(path) else _real_location(path)
        return where == self.real or _is_under(where, self.real)

    # ------------------------------------------------------------------------------------------ the run

    def __enter__(self) -> Organizer:
        if self.dry_run:
            return self
        try:
            os.makedirs(self.dest, exist_ok=True)
        except OSError as err:
            raise OptionError("into", self.dest, f"cannot be created ({os_reason(err)})",
                              "choose another {option}") from None
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(_locked(self.dest))
        except OSError as err:
            raise OptionError("into", self.dest, f"cannot be opened ({os_reason(err)})",
                              "choose another {option}") from None
        self._lock = stack
        with os.scandir(self.dest) as listing:
            folders = [entry.path for entry in listing if entry.is_dir(follow_symlinks=False)]
        for folder in folders:
            remove_temp_files(folder)
        return self

    def __exit__(self, *exc: object) -> None:
        self.log.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def place(self, paths: Sequence[str], scores: np.ndarray) -> list[Failure]:
        """Put each of `paths` ((B, L) `scores` over the labels) in its folder; the inputs that could not be."""
        failures = []
        for path, row, top in zip(paths, scores, scoring.top_labels(scores, self.min_score), strict=True):
            label = self.labels[top] if top >= 0 else None
            failure = self.place_one(path, label, float(row.max()))
            if failure is not None:
                failures.append(failure)
        return failures

    def place_one(self, source: str, label: str | None, score: float) -> Failure | None:
        """Put `source` into the folder of `label` (None: the unsure folder); a Failure when it could not be."""
        folder = UNSURE if label is None else self.folders[label]
        try:
            info = os.lstat(source)
            real = os.path.realpath(source)
        except OSError as err:
            return Failure(source, os_reason(err))
        if real in self._seen:  # the same file reached twice (a linked folder): placed once
            return None
        self._seen.add(real)
        if self.mode == "move" and stat.S_ISLNK(info.st_mode):
            return Failure(source, "is a symbolic link: not moved (moving a link can break it); use --copy, --link "
                                   "or --symlink for it")
        for _ in range(_RETRIES):
            step = self._plan(source, folder, label, score)
            if isinstance(step, Failure):
                return step
            if self.dry_run or step.action == "skip":
                self.steps.append(step)
                return None
            try:
                self._ready_folder(folder)
            except OSError as err:
                raise UsageError(f"cannot write into '{self.dest}': {os_reason(err)}; check the disk and the "
                                 "folder's permissions") from None
            try:
                record = self._record(step)
            except OSError as err:  # the identical file, read a moment ago, cannot be read now
                return Failure(source, self._reason(err))
            line = self.log.write(record)
            try:
                self._do(step)
            except FileExistsError:  # taken since it was listed: plan again
                self.log.write({"action": "failed", "of": line, "reason": "the name was taken meanwhile",
                                "time": _now()})
                continue
            except OSError as err:
                self.log.write({"action": "failed", "of": line, "reason": os_reason(err), "time": _now()})
                return Failure(source, self._reason(err))
            self.steps.append(step)
            return None
        return Failure(source, f"no free name for it in '{os.path.join(self.dest, folder)}'")

    def _reason(self, err: OSError) -> str:
        if err.errno == errno.EXDEV and self.mode == "link":
            return "cannot hard-link across file systems (DEST is on another one); use --copy or --symlink"
        return f"not organized: {os_reason(err)}"

    def _plan(self, source: str, folder: str, label: str | None, score: float) -> Step | Failure:
        contents = self._folder(folder)
        name = os.path.basename(source)
        where = os.path.join(self.dest, folder)
        for candidate in contents.taken(name):
            if self._identical(source, os.path.join(where, candidate)):
                action = "remove-source" if self.mode == "move" else "skip"
                return Step(source, os.path.join(where, candidate), label, score, action)
        target = contents.free(name)
        if target is None:
            return Failure(source, f"its name is too long to number beside the file of that name in '{where}'")
        contents.add(target)
        return Step(source, os.path.join(where, target), label, score, self.mode)

    def _folder(self, folder: str) -> _Folder:
        if folder not in self._contents:
            contents = _Folder()
            try:
                names = os.listdir(os.path.join(self.dest, folder))
            except FileNotFoundError:
                names = []
            except OSError as err:
                raise UsageError(f"cannot list '{os.path.join(self.dest, folder)}' ({os_reason(err)}); check its "
                                 "permissions") from None
            for item in names:
                contents.add(item)
            self._contents[folder] = contents
        return self._contents[folder]

    def _identical(self, source: str, target: str) -> bool:
        """Whether `target` already is what this run would put there for `source`."""
        try:
            info = os.lstat(target)
        except OSError:
            return False
        if self.mode == "symlink":
            return stat.S_ISLNK(info.st_mode) and os.readlink(target) == os.path.abspath(source)
        return stat.S_ISREG(info.st_mode) and same_bytes(source, target)

    def _ready_folder(self, folder: str) -> None:
        """Create DEST/folder if needed and make sure it is a real folder, not a link that leads elsewhere."""
        if folder in self._ready:
            return
        path = os.path.join(self.dest, folder)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise UsageError(f"'{path}' is not a folder (it was replaced during the run); nothing more was done")
        self._ready.add(folder)

    def _record(self, step: Step) -> dict:
        record = {"action": step.action, "source": os.path.abspath(step.source),
                  "destination": os.path.abspath(step.destination), "label": step.label, "score": step.score,
                  "time": _now()}
        if step.action == "remove-source":  # what undo restores the source from must still hold these bytes
            record["sha256"] = file_sha256(step.destination).hexdigest()
        return record

    def _do(self, step: Step) -> None:
        source, target = step.source, step.destination
        if step.action == "copy":
            copy_into_place(source, target)
        elif step.action == "link":
            os.link(source, target)  # a linked image is linked itself, not the link to it
        elif step.action == "symlink":
            os.symlink(os.path.abspath(source), target)
        elif step.action == "move":
            move(source, target)
        elif step.action == "remove-source":
            if not same_bytes(source, target):  # changed since it was compared: leave both
                raise OSError(errno.EAGAIN, "changed while it was being organized")
            os.unlink(source)

    def summary(self) -> str:
        """One line: how many images went where and how."""
        counts = Counter(step.action for step in self.steps)
        unsure = sum(step.label is None for step in self.steps)
        words = PLANNED if self.dry_run else ACTIONS
        parts = [f"{counts[action]} {words[action]}" for action in ACTIONS if counts[action]]
        if unsure:
            parts.append(f"{unsure} in {UNSURE}/ (below the minimum score)")
        return (f"{'would organize' if self.dry_run else 'organized'} {len(self.steps)} image(s) into {self.dest}: "
                + (", ".join(parts) or "nothing to do")
                + ("" if self.dry_run or not any(s.action != "skip" for s in self.steps)
                   else f"; log: {self.log.path}"))


# ---------------------------------------------------------------------------------------------- undo


@dataclass(frozen=True)
class UndoResult:
    """What `undo` did: records undone, and the files it left alone with the reason."""

    undone: Counter
    failures: list[Failure]


def _real_location(path: str) -> str:
    """Where `path` really is: its folder's real path joined with its own name (a link itself is not followed).
    Not os.path.abspath: it would take `link/..` away as text, where the OS goes up from wherever `link` leads."""
    absolute = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def _is_under(where: str, folder: str) -> bool:
    """Whether the real path `where` lies inside the real folder `folder` (not the folder itself)."""
    return where.startswith(folder.rstrip(os.sep) + os.sep)


def undo(dest: str | os.PathLike[str]) -> UndoResult:
    """Undo the actions DEST's log records (newest first) that are not undone yet: moved files go back to where they
    were, copies and links this tool made are removed, a source removed beside an identical file is restored from
    it; each undo is logged. Nothing is overwritten: a file whose original place is taken by another file, or that
    changed since, stays where it is and is reported."""
    dest = os.fspath(dest)
    log_path = os.path.join(dest, LOG_NAME)
    if not os.path.isdir(dest):
        raise OptionError("undo", dest, "is not a folder", "give the folder that was given to --into")
    if not os.path.lexists(log_path):
        raise OptionError("undo", dest, f"has no {LOG_NAME}, so there is nothing to undo",
                          "give the folder that was given to --into")
    if not stat.S_ISREG(os.lstat(log_path).st_mode):
        raise UsageError(f"'{log_path}' is not a regular file; it is not clip organize's log")
    real = os.path.realpath(dest)
    undone: Counter = Counter()
    failures: list[Failure] = []
    log = Log(log_path)
    touched: set[str] = set()
    with _locked(dest):
        try:
            try:
                lines = read_lines(log_path)
            except OSError as err:
                raise UsageError(f"cannot read the log '{log_path}': {os_reason(err)}") from None
            closed = {record.get("of") for record in lines if record and record.get("action") in ("undo", "failed")}
            todo = [(n, record) for n, record in enumerate(lines) if record and n not in closed
                    and record.get("action") in (*MODES, "remove-source")
                    and isinstance(record.get("source"), str) and isinstance(record.get("destination"), str)]
            for folder in {os.path.dirname(record["source"]) for _, record in todo}:
                remove_temp_files(folder)  # an interrupted undo's copies back across file systems
            for n, record in reversed(todo):
                target = record["destination"]
                if not _is_under(_real_location(target), real):
                    failures.append(Failure(target, "is not inside DEST: left alone"))
                    continue
                try:
                    outcome = _undo_one(record)
                except OSError as err:  # e.g. a label folder that may not be written: this one stays, the rest go on
                    outcome = Failure(target, f"not undone: {os_reason(err)}")
                if isinstance(outcome, Failure):
                    failures.append(outcome)
                    continue
                log.write({"action": "undo", "of": n, "undone": record["action"], "source": target,
                           "destination": record["source"], "result": outcome, "time": _now()})
                undone[outcome] += 1
                touched.add(os.path.dirname(target))
        finally:
            log.close()
    for folder in touched:  # the label folders this tool made, once empty
        if os.path.realpath(folder) != real:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
    return UndoResult(undone, failures)


def _undo_one(record: dict) -> str | Failure:
    """Undo one logged action; what was done, or why the file was left alone."""
    source, target, action = record["source"], record["destination"], record["action"]
    if action == "remove-source":  # the source was removed beside an identical file: copy that back
        if os.path.lexists(source):
            return "nothing to undo" if same_bytes(source, target) else Failure(
                target, f"its original place '{source}' is taken by another file: not restored")
        if not os.path.lexists(target):
            return Failure(source, f"cannot be restored: the identical file '{target}' is gone")
        # Logs written before the sha256 was recorded have none.
        if "sha256" in record and file_sha256(target).hexdigest() != record["sha256"]:
            return Failure(source, f"cannot be restored: the identical file '{target}' has changed since")
        return _put_back(target, source, copy_into_place, "restored")
    if not os.path.lexists(target):
        return "nothing to undo"  # never done (an interrupted run), or removed since
    if action == "move":
        if os.path.lexists(source):
            if same_bytes(source, target):  # both names of one file (an interrupted move), or equal copies
                os.unlink(target)
                return "moved back"
            return Failure(target, f"its original place '{source}' is taken by another file: left here")
        return _put_back(target, source, move, "moved back")
    if action == "symlink":
        if os.path.islink(target) and os.readlink(target) == source:
            os.unlink(target)
            return "removed"
        return Failure(target, "is no longer the link clip organize made: left here")
    # copy or link: removed only while the original is there with the same bytes, so no image is ever lost
    if not os.path.lexists(source):
        return Failure(target, f"the original '{source}' is gone: this copy is kept")
    if not same_bytes(source, target):
        return Failure(target, "changed since it was organized: kept")
    os.unlink(target)
    return "removed"


def _put_back(target: str, source: str, operation: Callable[[str, str], None], done: str) -> str:
    """`operation(target, source)` (move or copy_into_place: never replaces), its folder made again if needed."""
    os.makedirs(os.path.dirname(source), exist_ok=True)
    operation(target, source)
    return done
