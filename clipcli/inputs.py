"""Inputs: the image files a command works on, found from PATH arguments (folders walked recursively), and the
Failure record for an input that could not be used. Reads directory listings only, never image bytes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from clipcli.errors import UsageError, os_reason

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class Failure:
    """An input that could not be processed, and why (one short line)."""

    path: str
    reason: str


def find_images(inputs: Sequence[str], skip: Sequence[str] = ()) -> tuple[list[str], list[Failure]]:
    """Files as given plus image files found under folders (recursively, hidden entries skipped), sorted.

    Each real directory is visited once, so symlink loops end; the folders in `skip` (an output folder inside an
    input) are never entered. A missing input is a UsageError."""
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
    for name in inputs:
        if os.path.isdir(name):
            _walk(name, found, failures, seen_dirs)
        else:
            found.add(name)  # named explicitly: tried whatever its extension, so a bad file gets a reason
    return sorted(found), sorted(failures, key=lambda f: f.path)


def _walk(directory: str, found: set[str], failures: list[Failure], seen: set[tuple[int, int]]) -> None:
    # Depth-first with an explicit stack, not recursion: a tree nested deeper than Python's recursion limit
    # (a few thousand short folder names fit in a path) is walked like any other.
    stack = [directory]
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
        except OSError as err:
            failures.append(Failure(folder, os_reason(err)))
            continue
        key = (info.st_dev, info.st_ino)
        if key in seen:
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
            if is_dir:
                subfolders.append(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                if entry.is_symlink() and not os.path.exists(entry.path):
                    failures.append(Failure(entry.path, "broken symbolic link"))
                else:
                    found.add(entry.path)
        stack.extend(reversed(subfolders))  # visit in name order, as a recursive walk would
