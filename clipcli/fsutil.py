"""File-system helpers every writer shares: atomic files and directories (temp beside the target, fsync, rename into
place), the umask, private folders, and JSON reading with one-line errors. Knows nothing of models or formats."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
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


def temp_prefix(path: Path) -> str:
    """Hidden, named after the target, and short enough that a temp name fits where the target's name fits."""
    return f".{Path(path).name[:120]}."


def folder_of(path: Path) -> Path:
    """The folder a file at `path` lives in ('.' for a bare name)."""
    return Path(path).parent if str(Path(path).parent) else Path(".")


def open_temp_file(path: Path, mode: str = "w", suffix: str = ".part") -> tuple[IO, str]:
    """A new temp file beside `path`, hidden and named after it, with the permissions a file written at `path` gets
    (mkstemp makes it private), open in `mode` (text: UTF-8, undecodable names' bytes kept); and its name. The
    caller renames it into place or removes it (remove_file)."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=suffix, dir=folder_of(path))
    try:
        os.chmod(temp, new_file_mode(path))
        handle: IO = (os.fdopen(fd, mode) if "b" in mode else
                      os.fdopen(fd, mode, encoding="utf-8", errors="surrogateescape", newline=""))
    except BaseException:
        os.close(fd)
        remove_file(temp)
        raise
    return handle, temp


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
