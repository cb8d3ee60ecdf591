"""File-system helpers every writer shares: atomic files and directories (temp beside the target, fsync, rename into
place), the umask, private folders, and JSON reading with one-line errors. Knows nothing of models or formats."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from clipcli.errors import UsageError


def umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_file_mode(path: Path) -> int:
    """The permissions a file written at `path` should get: the old file's when replacing one, else open()'s."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~umask()


TEMP_MARK = "clipcli-"  # in the name of every temp file made beside a target: what remove_stale_temp_files may remove
STALE_AFTER_S = 60  # a temp file changed more recently than this may be one a writer has just made, not yet locked


def temp_prefix(path: Path) -> str:
    """Hidden, named after the target, and short enough that a temp name fits wherever the target's name fits: the
    name is cut to 200 bytes (whole characters), well under the usual 255-byte limit with the rest added."""
    name = Path(path).name[:200]
    while len(os.fsencode(name)) > 200:
        name = name[:-1]
    return f".{name}.{TEMP_MARK}"


def folder_of(path: Path) -> Path:
    """The folder a file at `path` lives in ('.' for a bare name)."""
    return Path(path).parent if str(Path(path).parent) else Path(".")


def open_temp_file(path: Path, mode: str = "w", suffix: str = ".part") -> tuple[IO, str]:
    """A new temp file beside `path`, hidden and named after it, with the permissions a file written at `path` gets
    (mkstemp makes it private), open in `mode` (text: UTF-8, undecodable names' bytes kept); and its name. The
    caller renames it into place or removes it (remove_file).

    The open file holds a lock (flock) until it is closed, which tells it from the temp files of a run that was
    killed (SIGKILL, a crash) before it could remove them: those, beside the same target, are removed now."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=suffix, dir=folder_of(path))
    try:
        os.chmod(temp, new_file_mode(path))
        locked = _try_lock(fd)
        handle: IO = (os.fdopen(fd, mode) if "b" in mode else
                      os.fdopen(fd, mode, encoding="utf-8", errors="surrogateescape", newline=""))
    except BaseException:
        os.close(fd)
        remove_file(temp)
        raise
    if locked:  # where locks do not work (some network file systems), a live writer could not be told apart
        remove_stale_temp_files(path, suffix)
    return handle, temp


def remove_stale_temp_files(path: Path, suffix: str) -> list[str]:
    """Remove the temp files (open_temp_file's, with `suffix`) that a killed run left beside `path`: named as this
    package names them, a regular file, changed more than STALE_AFTER_S ago, and locked by no live writer. Returns
    the names removed. Best effort: what cannot be looked at is left alone."""
    folder = folder_of(path)
    name = re.compile(re.escape(temp_prefix(path)) + r"[a-z0-9_]{8}" + re.escape(suffix))
    removed: list[str] = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        if not name.fullmatch(entry):
            continue
        candidate = os.path.join(folder, entry)
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode) and time.time() - info.st_mtime > STALE_AFTER_S and _try_lock(fd):
                os.unlink(candidate)
                removed.append(candidate)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on the open file without waiting; False when another process holds one, or when this
    file system or platform has no locks."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


@contextmanager
def temp_file(path: Path, mode: str = "w") -> Iterator[tuple[IO, str]]:
    """An open temp file beside `path` (open_temp_file) and its name; removed at the end unless renamed into place
    by then."""
    handle, temp = open_temp_file(path, mode)
    try:
        with handle:
            yield handle, temp
    finally:
        remove_file(temp)


def finish_file(handle: IO) -> None:
    """Flush, fsync and close: a file renamed into place afterwards is complete on disk."""
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """Write to a temp file beside `path`, then fsync and rename it into place; on any error nothing appears."""
    path = Path(path)
    with temp_file(path, mode) as (handle, temp):
        yield handle
        finish_file(handle)
        os.replace(temp, path)


@contextmanager
def atomic_directory(destination: Path) -> Iterator[Path]:
    """A private staging folder beside `destination` to fill; on success its files are fsynced and it is renamed
    into place, replacing an existing `destination` (moved aside first, deleted last). On any error the staging
    folder is removed and `destination` is left as it was."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(destination), suffix=".tmp", dir=destination.parent))
    try:
        os.chmod(staging, 0o777 & ~umask())  # mkdtemp makes it private (0700); give it what mkdir would
        yield staging
        for item in staging.iterdir():
            if item.is_file():
                with open(item, "rb") as handle:
                    os.fsync(handle.fileno())
        if destination.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside, then delete it.
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(destination), suffix=".old", dir=destination.parent))
            os.replace(destination, old)
            try:
                os.replace(staging, destination)
            except BaseException:
                os.replace(old, destination)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def file_sha256(path: Path | str) -> hashlib._Hash:
    """The SHA-256 of a file's bytes, read in 1 MiB pieces (a model's weights can be gigabytes)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(1 << 20):
            sha.update(piece)
    return sha


def make_private_dirs(folder: Path) -> None:
    """Create `folder` and any missing parents with mode 0700 (each one the user's alone); existing ones are kept."""
    folder = Path(folder)
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for item in reversed(missing):
        try:
            item.mkdir(mode=0o700)
        except FileExistsError:  # made at the same moment by another process
            pass


def read_json(path: Path, fix: str) -> object:
    """A UTF-8 JSON file's value; UsageError naming the file and ending in `fix` when it cannot be read."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read ({type(err).__name__}); {fix}") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}; {fix}") from None


def remove_file(path: str | Path) -> None:
    """Delete a file if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
