"""Inputs: the image files a command works on, found from PATH arguments and file lists (folders walked recursively,
--exclude patterns applied during the walk), the Failure record for an input that could not be used, and the merge
that puts each batch's results and failures back into one sorted path order. Reads directory listings and file
lists only, never image bytes."""

from __future__ import annotations

import os
import stat
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Generic, TypeVar

from clipcli.errors import OptionError, UsageError, os_reason

# HEIC/HEIF decode through the optional pillow-heif, AVIF through Pillow's own plugin (preprocess.py): they are
# found like any other image, and a run without the decoder reports them as failures saying what to install.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif",
                              ".avif"})

T = TypeVar("T")


@dataclass(frozen=True)
class Failure:
    """An input that could not be processed, and why (one short line)."""

    path: str
    reason: str


@dataclass(frozen=True)
class Exclude:
    """--exclude patterns (fnmatch globs, case-sensitive; `*` also matches '/').

    A file or folder is dropped when a pattern matches its name (`*.tmp`, `thumbnails`), its path relative to the
    PATH argument it was found under (`raw/*.png`, `2023/*/drafts`), or its path as shown in the output
    (`photos/raw/*`). A pattern ending in '/' matches folders only (`cache/`). A dropped folder is not entered.
    Files named directly (PATH arguments, file lists) are matched by name and as given; a folder named directly is
    always walked: it is where relative paths start, unless `base` says where that folder lies under the folder the
    patterns are relative to (clip eval's class folders: 'cat/raw/*' under DATASET)."""

    patterns: tuple[str, ...] = ()
    base: str = ""  # '/'-separated, prefixed to the relative paths of a walk

    def __post_init__(self) -> None:
        for pattern in self.patterns:
            if not pattern.strip("/"):
                raise OptionError("exclude", pattern, "matches nothing useful",
                                  "give a glob such as {option} '*.tmp' or {option} 'raw/'")

    def matches(self, name: str, relative: str, shown: str, is_dir: bool) -> bool:
        """True when `name` (the entry's own name), `relative` (its path under the walked PATH, '/'-separated) or
        `shown` (its path as found) matches a pattern."""
        if self.base:
            relative = f"{self.base}/{relative}"
        for pattern in self.patterns:
            folder_only = pattern.endswith("/")
            if folder_only and not is_dir:
                continue
            glob = pattern.rstrip("/").removeprefix("./")
            if fnmatchcase(name, glob) or fnmatchcase(relative, glob) or fnmatchcase(shown, glob) or (
                    fnmatchcase(shown.removeprefix("./"), glob)):
                return True
        return False


def parse_path_list(data: bytes) -> list[str]:
    """A --files-from list's paths: one per line (LF or CRLF), or NUL-separated as `find -print0` writes; blank
    entries skipped, a leading byte-order mark dropped. Names that are not UTF-8 keep their bytes (os.fsdecode)."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    entries = data.split(b"\0") if b"\0" in data else [line.removesuffix(b"\r") for line in data.split(b"\n")]
    return [os.fsdecode(entry) for entry in entries if entry]


def find_images(inputs: Sequence[str], exclude: Exclude | None = None, listed: Sequence[str] = (),
                skip: Sequence[str] = ()) -> tuple[list[str], list[Failure]]:
    """Files as given plus image files found under folders (recursively, hidden entries skipped), sorted, and the
    inputs that could not be used.

    `inputs` are PATH arguments: one that does not exist is a UsageError. `listed` are paths from a file list: one
    that does not exist is a Failure, so a stale list does not stop the run. Each real directory is visited once,
    so symlink loops end, and under the name it was given when it was given (not as a link to it inside another
    input); the folders in `skip` (an output folder inside an input) are never entered."""
    exclude = exclude or Exclude()
    for name in inputs:
        if not os.path.lexists(name):
            raise UsageError(f"path '{name}' does not exist; pass image files or folders")
    found: set[str] = set()
    failures: list[Failure] = []
    seen_dirs: set[tuple[int, int]] = set()
    for folder in skip:
        try:
            info = os.stat(folder)
        except OSError:
            continue  # not there (yet): nothing in it to skip
        seen_dirs.add((info.st_dev, info.st_ino))
    folders = {name: _directory_key(name) for name in [*inputs, *listed]}  # one stat each, links followed
    named = {key for key in folders.values() if key is not None}
    for name in [*inputs, *listed]:
        if folders[name] is not None:
            _walk(name, found, failures, seen_dirs, exclude, named)
        elif not os.path.lexists(name):
            failures.append(Failure(name, "no such file (named in the file list)"))
        elif not exclude.matches(os.path.basename(name), name, name, False):
            found.add(name)  # named explicitly: tried whatever its extension, so a bad file gets a reason
    unique = {failure.path: failure for failure in failures}  # a path listed twice fails once
    return sorted(found), sorted(unique.values(), key=lambda f: f.path)


def _directory_key(path: str) -> tuple[int, int] | None:
    """(device, inode) of the directory at `path` (through links), None when it is not one."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


def _walk(directory: str, found: set[str], failures: list[Failure], seen: set[tuple[int, int]],
          exclude: Exclude, named: set[tuple[int, int]]) -> None:
    # Depth-first with an explicit stack, not recursion: a tree nested deeper than Python's recursion limit
    # (a few thousand short folder names fit in a path) is walked like any other. A folder inside it that is also
    # `named` (an input of its own) is walked as that input.
    stack = [(directory, "")]  # (folder, its path relative to `directory`)
    while stack:
        folder, relative = stack.pop()
        try:
            info = os.stat(folder)
        except OSError as err:
            failures.append(Failure(folder, os_reason(err)))
            continue
        key = (info.st_dev, info.st_ino)
        if key in seen or (relative and key in named):
            continue
        seen.add(key)
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as err:
            failures.append(Failure(folder, os_reason(err)))
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks: a linked folder is walked, a loop ends at `seen`
            except OSError as err:
                failures.append(Failure(entry.path, os_reason(err)))
                continue
            entry_relative = f"{relative}/{entry.name}" if relative else entry.name
            if exclude.patterns and exclude.matches(entry.name, entry_relative, entry.path, is_dir):
                continue
            if is_dir:
                subfolders.append((entry.path, entry_relative))
            elif (dot := entry.name.rfind(".")) > 0 and entry.name[dot:].lower() in IMAGE_EXTENSIONS:
                # os.path.splitext's extension, for a name that does not start with a dot (those are skipped above)
                if entry.is_symlink() and not os.path.exists(entry.path):
                    failures.append(Failure(entry.path, "broken symbolic link"))
                else:
                    found.add(entry.path)
        stack.extend(reversed(subfolders))  # visit in name order, as a recursive walk would


class PathOrder(Generic[T]):
    """Puts results back into one sorted path order as they come: each batch's rows and failures (consecutive
    stretches of the sorted input list) and the walk's failures (unreadable folders, broken links), which belong
    between them by path.

    Feed each batch to batch() and write what it returns; finally write rest()."""

    def __init__(self, walk_failures: Iterable[Failure]) -> None:
        self._pending = deque(sorted(walk_failures, key=lambda f: f.path))

    def batch(self, rows: Iterable[tuple[str, T]], failures: Iterable[Failure]) -> list[T | Failure]:
        """The batch's rows (path, row) and failures, with the walk failures that sort before them, in path order."""
        items: list[tuple[str, T | Failure]] = [*rows, *((f.path, f) for f in failures)]
        items.sort(key=lambda item: item[0])
        ordered: list[T | Failure] = []
        for path, item in items:
            while self._pending and self._pending[0].path < path:
                ordered.append(self._pending.popleft())
            ordered.append(item)
        return ordered

    def rest(self) -> list[Failure]:
        """The walk failures after the last input."""
        rest = list(self._pending)
        self._pending.clear()
        return rest
