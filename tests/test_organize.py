"""`clip organize` against cli-contract.md: placement by top label (checked against transformers' CLIPModel) for
every mode, collisions, re-runs, dry runs, hostile labels, DEST inside the input, symbolic links in DEST, moves across
file systems, SIGKILL during --move, undo, and reading through the embedding index."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from clipcli import organize
from clipcli.organize import LOG_NAME, TEMP_PREFIX, TEMP_SUFFIX, UNSURE, folder_name, label_folders
from tests.conftest import assert_usage_error, photo
from tests.test_cli import Reference, clip_command, clip_env, invoke

LABELS = ["cat", "dog", "red car"]
MODES = ["copy", "move", "link", "symlink"]


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photos in nested folders; a/x.png and b/x.png share a name but not their bytes."""
    root = tmp_path_factory.mktemp("master")
    layout = ["a/x.png", "a/y.png", "a/z.jpg", "b/x.png", "b/w.png", "b/deep/v.png", "c.bmp", "b/deep/u.png"]
    for seed, name in enumerate(layout):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        photo(24 + seed, 20 + 2 * seed, seed=100 + seed).save(root / name)
    return root


@pytest.fixture()
def photos(master: Path, tmp_path: Path) -> Path:
    """A fresh copy of the photos for one test (same bytes and times, so the index knows them)."""
    target = tmp_path / "photos"
    shutil.copytree(master, target)
    return target


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def found(folder: Path) -> list[str]:
    """The images under `folder` as clip names them: found paths, sorted."""
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: folders with their mode, links with their target, files with hash, mode, mtime."""
    entries: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            key = os.path.relpath(path, root)
            if stat.S_ISLNK(info.st_mode):
                entries[key] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                entries[key] = ("dir", stat.S_IMODE(info.st_mode))
            else:
                entries[key] = ("file", sha(path), stat.S_IMODE(info.st_mode), info.st_mtime_ns)
    return entries


def contents(*roots: Path) -> Counter:
    """How many regular files under `roots` hold each content (the log left out)."""
    counts: Counter = Counter()
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                if name != LOG_NAME and stat.S_ISREG(os.lstat(path).st_mode):
                    counts[sha(path)] += 1
    return counts


def log_records(dest: Path) -> list[dict]:
    return [json.loads(line) for line in (dest / LOG_NAME).read_text(encoding="utf-8").splitlines()]


def organize_cli(model: Path, *args: object):
    return invoke("organize", *args, "-m", model)


def reference_labels(reference: Reference, images: list[str], labels: list[str] = LABELS) -> dict[str, tuple]:
    """image -> (top label, its probability) by transformers."""
    probs = reference.probs(images, labels)
    return {path: (labels[int(row.argmax())], float(row.max())) for path, row in zip(images, probs, strict=True)}


# ---------------------------------------------------------------------------------------------------------------
# placement


@pytest.mark.parametrize("mode", MODES)
def test_placement_matches_the_reference(tiny_model_dir, reference, photos, tmp_path, mode):
    images = found(photos)
    want = reference_labels(reference, images)
    hashes = {path: sha(path) for path in images}
    dest = tmp_path / "sorted"
    result = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest, f"--{mode}")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout == ""
    assert result.stderr.startswith(f"organized {len(images)} image(s) into {dest}")
    records = {r["source"]: r for r in log_records(dest)}
    assert len(records) == len(images) == len(log_records(dest))
    placed = set()
    for path in images:
        record = records[os.path.abspath(path)]
        label, score = want[path]
        assert (record["label"], record["action"]) == (label, mode)
        assert record["score"] == pytest.approx(score, abs=1e-4)
        target = Path(record["destination"])
        assert target.parent == dest / label
        assert target.name in (Path(path).name, f"{Path(path).stem} (1){Path(path).suffix}")
        placed.add(target)
        if mode == "symlink":
            assert target.is_symlink() and os.readlink(target) == os.path.abspath(path)
        else:
            assert not target.is_symlink()
        assert sha(target) == hashes[path]
        if mode == "move":
            assert not os.path.lexists(path)
        else:
            assert sha(path) == hashes[path]
        if mode == "link":
            assert os.path.samefile(target, path)
        if mode == "copy":
            assert not os.path.samefile(target, path)
            assert target.stat().st_mtime_ns == os.stat(path).st_mtime_ns  # times kept, like cp -p
    in_dest = {p for p in dest.rglob("*") if p.name != LOG_NAME and not p.is_dir()}
    assert in_dest == placed
    # The same name from two folders: both kept, whichever labels they got.
    assert Counter(p.name.replace(" (1)", "") for p in placed)["x.png"] == 2
    assert not list(dest.rglob(f"{TEMP_PREFIX}*"))


def test_collisions_keep_both_and_identical_files_are_left(tiny_model_dir, photos, tmp_path):
    dest = tmp_path / "sorted"
    (dest / "cat").mkdir(parents=True)
    (dest / "cat" / "y.png").write_bytes(b"someone else's y.png")  # a different file of that name
    shutil.copy2(photos / "b" / "w.png", dest / "cat" / "w.png")  # an identical one
    result = organize_cli(tiny_model_dir, photos, "-l", "cat", "--score", "cosine", "--into", dest)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert (dest / "cat" / "y.png").read_bytes() == b"someone else's y.png"
    assert sha(dest / "cat" / "y (1).png") == sha(photos / "a" / "y.png")
    names = {sha(photos / "a" / "x.png"), sha(photos / "b" / "x.png")}
    assert {sha(dest / "cat" / "x.png"), sha(dest / "cat" / "x (1).png")} == names
    assert not (dest / "cat" / "w (1).png").exists()
    records = log_records(dest)
    assert os.path.abspath(photos / "b" / "w.png") not in {r["source"] for r in records}  # nothing done, not logged
    assert len(records) == len(found(photos)) - 1
    assert "1 already there" in result.stderr


@pytest.mark.parametrize("mode", MODES)
def test_rerun_is_a_no_op(tiny_model_dir, photos, tmp_path, mode):
    dest = tmp_path / "sorted"
    args = (photos, "-l", ",".join(LABELS), "--into", dest, f"--{mode}")
    first = organize_cli(tiny_model_dir, *args)
    assert first.exit_code == 0, (first.stderr, first.exception)
    before = snapshot(tmp_path)
    again = organize_cli(tiny_model_dir, *args)
    assert again.exit_code == 0, (again.stderr, again.exception)
    assert snapshot(tmp_path) == before  # nothing moved, copied, renamed, numbered or logged
    if mode == "move":
        assert "no images found" in again.stderr
    else:
        assert f"{len(found(photos))} already there" in again.stderr


@pytest.mark.parametrize("mode", MODES)
def test_dry_run_touches_nothing_and_shows_the_plan(tiny_model_dir, reference, photos, tmp_path, mode, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = found(Path("photos"))
    want = reference_labels(reference, images)
    before = snapshot(tmp_path)
    result = organize_cli(tiny_model_dir, "photos", "-l", ",".join(LABELS), "--into", "sorted", f"--{mode}",
                          "--dry-run")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert snapshot(tmp_path) == before
    assert not os.path.lexists("sorted")
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["source", "destination", "label", "score", "action"]
    plan = {}
    for line in lines[1:]:
        parsed = re.fullmatch(r"(\S+)\s+->\s+(\S.*?)\s{2,}(\S.*?)\s{2,}(\d+\.\d)%\s{2,}(\S+)", line)
        assert parsed, line
        source, target, label, percent, action = parsed.groups()
        assert (label, action) == (want[source][0], mode)
        assert abs(float(percent) - 100 * want[source][1]) <= 0.051
        plan[source] = target
    assert sorted(plan) == images
    assert "would organize" in result.stderr
    # The plan is what the run then does.
    done = organize_cli(tiny_model_dir, "photos", "-l", ",".join(LABELS), "--into", "sorted", f"--{mode}")
    assert done.exit_code == 0
    records = log_records(Path("sorted"))
    assert {os.path.relpath(r["source"]): os.path.relpath(r["destination"]) for r in records} == plan
    if mode == "copy":  # with everything in place, the plan says so and still touches nothing
        before = snapshot(tmp_path)
        again = organize_cli(tiny_model_dir, "photos", "-l", ",".join(LABELS), "--into", "sorted", "--dry-run")
        assert snapshot(tmp_path) == before
        assert [line.split()[-1] for line in again.stdout.splitlines()[1:]] == ["skip"] * len(images)


def test_min_score_sends_low_images_to_unsure(tiny_model_dir, reference, photos, tmp_path):
    images = found(photos)
    want = reference_labels(reference, images)
    tops = sorted(score for _, score in want.values())
    cut = (tops[len(tops) // 2 - 1] + tops[len(tops) // 2]) / 2
    dest = tmp_path / "sorted"
    result = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest, "--min-score", cut)
    assert result.exit_code == 0, (result.stderr, result.exception)
    records = {r["source"]: r for r in log_records(dest)}
    unsure = 0
    for path in images:
        record = records[os.path.abspath(path)]
        label, score = want[path]
        if score < cut:
            unsure += 1
            assert record["label"] is None and Path(record["destination"]).parent == dest / UNSURE
        else:
            assert record["label"] == label and Path(record["destination"]).parent == dest / label
        assert sha(record["destination"]) == sha(path)
    assert 0 < unsure < len(images)
    assert f"{unsure} in {UNSURE}/" in result.stderr


def test_cosine_scores_and_templates(tiny_model_dir, reference, photos, tmp_path):
    images = found(photos)
    dest = tmp_path / "sorted"
    result = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest, "--score", "cosine",
                          "-t", "a photo of a {}.", "-t", "a drawing of a {}.")
    assert result.exit_code == 0, (result.stderr, result.exception)
    import torch

    from tests.test_cli import unit

    prompts = [t.replace("{}", label) for label in LABELS for t in ("a photo of a {}.", "a drawing of a {}.")]
    text = unit(unit(torch.from_numpy(reference.text_features(prompts))).reshape(len(LABELS), 2, -1).mean(1))
    cosines = (unit(torch.from_numpy(reference.image_features(images))) @ text.T).numpy()
    records = {r["source"]: r for r in log_records(dest)}
    for path, row in zip(images, cosines, strict=True):
        record = records[os.path.abspath(path)]
        assert record["label"] == LABELS[int(row.argmax())]
        assert record["score"] == pytest.approx(float(row.max()), abs=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# labels and DEST


def test_folder_names():
    assert folder_name("cat") == "cat"
    assert folder_name("red car") == "red car"
    assert folder_name("猫") == "猫"
    assert folder_name("a/b") == "a_b"
    assert folder_name("a\\b") == "a_b"
    assert folder_name("..") == "_"
    assert folder_name(".") == "_"
    assert folder_name(".hidden") == "_hidden"
    assert folder_name("CON") == "CON_"
    assert folder_name("nul.txt") == "nul_.txt"
    assert folder_name("com1") == "com1_"
    assert folder_name("console") == "console"
    assert folder_name("dots...") == "dots"
    assert folder_name("line\nbreak\x00") == "line_break_"
    assert folder_name("e\u0301") == "\u00e9"  # one normal form
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    assert folder_name(long_a) != folder_name(long_b)
    assert len(folder_name(long_a).encode()) <= organize.MAX_FOLDER_BYTES
    assert len(folder_name("é" * 300).encode()) <= organize.MAX_FOLDER_BYTES
    folder_name("é" * 300).encode().decode()  # cut at a character boundary


HOSTILE = ["../escape", "/etc", "a\\b", "..", "CON", "nul.txt", "x" * 300, "tab\there", "new\nline",
           ".hidden", "dots. .", "日本語/猫", "~", "$HOME", "<>:\"|?*", "\u202eevil"]


def test_hostile_labels_stay_inside_dest(tiny_model_dir, photos, tmp_path):
    dest = tmp_path / "deep" / "sorted"
    outside = snapshot(tmp_path)
    labels = [arg for label in HOSTILE for arg in ("-l", label)]  # one by one: no comma splitting
    result = organize_cli(tiny_model_dir, photos, *labels, "--score", "cosine", "--into", dest)
    assert result.exit_code == 0, (result.stderr, result.exception)
    after = snapshot(tmp_path)
    new = {key for key in after if key not in outside}
    assert new and all(key == "deep" or key.startswith(os.path.join("deep", "sorted")) for key in new)
    assert {k: v for k, v in after.items() if k in outside} == outside  # nothing else changed
    for entry in dest.iterdir():
        if entry.name == LOG_NAME:
            continue
        assert entry.is_dir() and not entry.is_symlink()
        name = entry.name
        assert not name.startswith(".") and not name.endswith((".", " ")) and len(name.encode()) <= 255
        assert not any(ord(ch) < 32 or ch in '/\\<>:"|?*\u202e' for ch in name)
        assert name.split(".")[0].upper() not in ("CON", "NUL")
    records = log_records(dest)
    assert len(records) == len(found(photos))
    for record in records:
        assert Path(record["destination"]).parent.name == folder_name(record["label"])
        assert Path(record["destination"]).resolve().is_relative_to(dest.resolve())


@pytest.mark.parametrize("labels, fragments", [
    (["a/b", "a_b"], ["'a_b'", "'a/b'", "share the folder"]),
    (["Cat", "cat"], ["--labels 'cat'", "with 'Cat'", "share the folder"]),
    (["e\u0301", "\u00e9"], ["share the folder"]),
    (["_unsure", "cat"], ["'_unsure'", "low-confidence"]),
    (["clip-organize.jsonl", "cat"], ["'clip-organize.jsonl'", "log"]),
])
def test_labels_sharing_a_folder_are_refused(tiny_model_dir, photos, tmp_path, labels, fragments):
    dest = tmp_path / "sorted"
    result = organize_cli(tiny_model_dir, photos, *(a for label in labels for a in ("-l", label)), "--into", dest)
    assert_usage_error(result, "--labels", *fragments)
    assert not dest.exists()
    with pytest.raises(organize.UsageError):
        label_folders(labels)


def test_dest_inside_the_input_is_never_walked(tiny_model_dir, photos):
    images = found(photos)
    originals = contents(photos)
    dest = photos / "sorted"
    first = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest)
    assert first.exit_code == 0, (first.stderr, first.exception)
    records = log_records(dest)
    assert sorted(os.path.relpath(r["source"]) for r in records) == sorted(os.path.relpath(p) for p in images)
    before = snapshot(photos)
    again = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest)
    assert again.exit_code == 0 and snapshot(photos) == before
    assert f"organized {len(images)} image(s)" in again.stderr  # the originals only, not their copies in DEST
    # Moving: the images leave (their copies are in DEST already); DEST's own files are never taken for new ones.
    moved = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest, "--move")
    assert moved.exit_code == 0, (moved.stderr, moved.exception)
    assert [p for p in found(photos) if not p.startswith(str(dest))] == []
    assert contents(dest) == originals
    # A PATH that is DEST, or inside it, is refused.
    assert_usage_error(organize_cli(tiny_model_dir, dest, "-l", "cat,dog", "--into", dest), "inside the destination")
    assert_usage_error(organize_cli(tiny_model_dir, dest / "cat", "-l", "cat,dog", "--into", dest),
                       "inside the destination")


def test_files_from_and_exclude_choose_the_inputs(tiny_model_dir, photos, tmp_path, monkeypatch):
    # cli-contract.md, "Inputs (every command that takes image PATHs)": --files-from (- is stdin) adds paths and
    # PATH may then be omitted; --exclude drops files and folders during the walk. A listed file inside DEST is
    # still never input.
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # --max-megapixels sets it process-wide
    dest = tmp_path / "sorted"
    listed = [photos / "a" / "x.png", photos / "c.bmp"]
    first = invoke("organize", "--files-from", "-", "-l", "cat,dog", "--into", dest, "-m", tiny_model_dir,
                   input="".join(f"{p}\n" for p in listed))
    assert first.exit_code == 0, (first.stderr, first.exception)
    assert sorted(r["source"] for r in log_records(dest)) == sorted(str(p) for p in listed)
    inside = next(dest.rglob("x.png"))
    (tmp_path / "list.txt").write_text(f"{inside}\n{photos / 'a' / 'y.png'}\n")
    again = organize_cli(tiny_model_dir, "--files-from", tmp_path / "list.txt", "-l", "cat,dog", "--into", dest)
    assert again.exit_code == 0, (again.stderr, again.exception)
    assert sorted(r["source"] for r in log_records(dest)) == sorted(str(p) for p in [*listed, photos / "a" / "y.png"])
    other = tmp_path / "other"
    walked = organize_cli(tiny_model_dir, photos, "--exclude", "deep/", "--exclude", "*.jpg", "-l", "cat,dog",
                          "--into", other, "--max-megapixels", "100")
    assert walked.exit_code == 0, (walked.stderr, walked.exception)
    want = [p for p in found(photos) if "/deep/" not in p and not p.endswith(".jpg")]
    assert sorted(r["source"] for r in log_records(other)) == want


def test_dest_reached_through_a_link_is_not_input(tiny_model_dir, photos, tmp_path):
    images = found(photos)
    dest = tmp_path / "sorted"
    first = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest)
    assert first.exit_code == 0
    (photos / "shortcut").symlink_to(dest, target_is_directory=True)  # DEST's files now lie under PATH too
    before = snapshot(tmp_path)
    again = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest)
    assert again.exit_code == 0, (again.stderr, again.exception)
    assert again.stderr.startswith(f"organized {len(images)} image(s) into {dest}: {len(images)} already there")
    assert snapshot(tmp_path) == before


def test_symbolic_links_in_dest_are_never_written_through(tiny_model_dir, photos, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "sorted"
    dest.mkdir()
    (dest / "cat").symlink_to(elsewhere, target_is_directory=True)
    result = organize_cli(tiny_model_dir, photos, "-l", "cat,dog", "--into", dest)
    assert_usage_error(result, str(dest / "cat"), "symbolic link")
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in dest.iterdir()) == ["cat"]
    (dest / "cat").unlink()
    (dest / LOG_NAME).symlink_to(elsewhere / "log")
    assert_usage_error(organize_cli(tiny_model_dir, photos, "-l", "cat,dog", "--into", dest), LOG_NAME,
                       "not a regular file")
    assert list(elsewhere.iterdir()) == []
    (dest / LOG_NAME).unlink()
    # A link at a file's name inside a label folder is a taken name, never a way out.
    target = elsewhere / "precious"
    target.write_bytes(b"keep me")
    (dest / "cat").mkdir()
    (dest / "cat" / "x.png").symlink_to(target)
    result = organize_cli(tiny_model_dir, photos, "-l", "cat", "--score", "cosine", "--into", dest)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert target.read_bytes() == b"keep me" and os.readlink(dest / "cat" / "x.png") == str(target)
    assert {sha(dest / "cat" / "x (1).png"), sha(dest / "cat" / "x (2).png")} == {
        sha(photos / "a" / "x.png"), sha(photos / "b" / "x.png")}


def test_a_folder_swapped_for_a_link_during_the_run_stops_it(tiny_model_dir, photos, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "sorted"
    real_mkdir = os.mkdir

    def swapped(path, *args, **kwargs):  # someone puts a link where the label folder is about to be made
        if Path(path).parent == dest:
            os.symlink(elsewhere, path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", swapped)
    result = organize_cli(tiny_model_dir, photos, "-l", "cat", "--score", "cosine", "--into", dest)
    assert_usage_error(result, "not a folder")
    assert list(elsewhere.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# moving safely


def test_rename_no_replace_never_replaces(tmp_path, monkeypatch):
    if os.uname().sysname == "Linux":
        assert organize._renameat2() is not None  # the atomic no-clobber rename is what runs here
    for atomic in (True, False):
        if not atomic:
            monkeypatch.setattr(organize, "_renameat2", lambda: None)  # link + unlink
        assert_rename_never_replaces(tmp_path / f"a{atomic}", tmp_path / f"b{atomic}")


def assert_rename_never_replaces(a: Path, b: Path) -> None:
    """rename_no_replace(a, b) refuses while b exists (both files kept as they were), and moves a once b is gone."""
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    with pytest.raises(FileExistsError):
        organize.rename_no_replace(str(a), str(b))
    assert (a.read_bytes(), b.read_bytes()) == (b"a", b"b")
    b.unlink()
    organize.rename_no_replace(str(a), str(b))
    assert not a.exists() and b.read_bytes() == b"a"


def test_rename_without_hard_links_still_never_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(organize, "_renameat2", lambda: None)

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert_rename_never_replaces(tmp_path / "a", tmp_path / "b")


def crossing_file_systems(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every rename of an image into DEST fail with EXDEV, as between two file systems (temp files, which
    live beside their target, still rename)."""
    real = organize.rename_no_replace

    def rename(source: str, target: str) -> None:
        if not os.path.basename(source).startswith(TEMP_PREFIX):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), source)
        real(source, target)

    monkeypatch.setattr(organize, "rename_no_replace", rename)


def test_move_across_file_systems_simulated(tiny_model_dir, photos, tmp_path, monkeypatch):
    crossing_file_systems(monkeypatch)
    images = found(photos)
    originals = {path: (sha(path), os.stat(path)) for path in images}
    dest = tmp_path / "sorted"
    result = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest, "--move")
    assert result.exit_code == 0, (result.stderr, result.exception)
    for record in log_records(dest):
        source = record["source"]
        digest, info = originals[source]
        assert not os.path.lexists(source)
        placed = os.stat(record["destination"])
        assert sha(record["destination"]) == digest
        assert (placed.st_mtime_ns, stat.S_IMODE(placed.st_mode)) == (info.st_mtime_ns, stat.S_IMODE(info.st_mode))
    assert not list(dest.rglob(f"{TEMP_PREFIX}*")) and found(photos) == []


def test_move_across_file_systems_interrupted_then_finished(tiny_model_dir, photos, tmp_path, monkeypatch):
    crossing_file_systems(monkeypatch)
    images = found(photos)
    counts = contents(photos)
    dest = tmp_path / "sorted"
    real_unlink = os.unlink

    def interrupted(path, *args, **kwargs):  # Ctrl-C once the first copy is in place, before its source goes
        if os.path.abspath(path).startswith(str(photos)):
            raise KeyboardInterrupt
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", interrupted)
    result = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest, "--move")
    assert result.exit_code == 130
    assert "run the same command again to finish" in result.stderr
    assert found(photos) == images  # every source still there; the first one also in DEST
    both = contents(photos, dest)
    assert sorted(both.values()) == [1] * (len(images) - 1) + [2]
    # What SIGKILL during a copy leaves: a temp file; the next run removes it.
    stale = Path(log_records(dest)[0]["destination"]).parent / f"{TEMP_PREFIX}abc123{TEMP_SUFFIX}"
    stale.write_bytes(b"half a photo")
    monkeypatch.setattr(os, "unlink", real_unlink)
    done = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest, "--move")
    assert done.exit_code == 0, (done.stderr, done.exception)
    assert found(photos) == [] and contents(dest) == counts
    assert not stale.exists() and not list(dest.rglob(f"{TEMP_PREFIX}*"))
    assert "1 already there (source removed)" in done.stderr


def test_an_interrupted_dry_run_says_nothing_was_changed(tiny_model_dir, photos, tmp_path, monkeypatch):
    from clipcli import organize

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(organize.Organizer, "place", interrupted)
    dest = tmp_path / "sorted"
    result = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest, "--dry-run")
    assert result.exit_code == 130 and result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last == "interrupted; nothing was changed (--dry-run) and no plan was printed"
    assert not dest.exists()


def test_move_across_file_systems_of_a_source_that_cannot_go(tiny_model_dir, photos, tmp_path, monkeypatch):
    crossing_file_systems(monkeypatch)
    real_unlink = os.unlink

    def read_only(path, *args, **kwargs):  # the sources' folder does not let files be removed
        if os.path.abspath(path).startswith(str(photos)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", read_only)
    before = snapshot(photos)
    dest = tmp_path / "sorted"
    result = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest, "--move")
    assert result.exit_code == 1
    assert result.stderr.count("not organized: permission denied") == len(found(photos))
    assert snapshot(photos) == before and contents(dest) == Counter()  # the copies were taken back


def other_file_system(near: Path) -> Path | None:
    """A writable folder on another file system than `near` (a tmpfs such as /dev/shm), or None."""
    device = os.stat(near).st_dev
    for candidate in ("/dev/shm", "/run/shm", f"/run/user/{os.getuid()}", "/var/tmp", "/tmp"):
        try:
            if os.stat(candidate).st_dev != device and os.access(candidate, os.W_OK | os.X_OK):
                return Path(candidate)
        except OSError:
            continue
    return None


def test_move_and_undo_across_real_file_systems(tiny_model_dir, photos, tmp_path):
    other = other_file_system(tmp_path)
    if other is None:
        pytest.skip("no writable folder on another file system than the test's temp folder (such as a tmpfs at "
                    "/dev/shm), and mounting one needs privileges; test_move_across_file_systems_simulated covers "
                    "the same code path")
    before = snapshot(photos)
    with tempfile.TemporaryDirectory(dir=other, prefix="clipcli-test-") as scratch:
        dest = Path(scratch) / "sorted"
        result = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest, "--move")
        assert result.exit_code == 0, (result.stderr, result.exception)
        assert found(photos) == [] and contents(dest) == Counter(v[1] for v in before.values() if v[0] == "file")
        assert not list(dest.rglob(f"{TEMP_PREFIX}*"))
        back = organize_cli(tiny_model_dir, "--undo", dest)
        assert back.exit_code == 0, (back.stderr, back.exception)
        assert snapshot(photos) == before
        assert sorted(p.name for p in dest.iterdir()) == [LOG_NAME]


def test_hard_link_across_file_systems_is_a_failure_per_image(tiny_model_dir, photos, tmp_path, monkeypatch):
    def crossing(*args, **kwargs):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", crossing)
    result = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", tmp_path / "sorted", "--link")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert sum("cannot hard-link across file systems" in line and "--copy" in line for line in lines) == len(
        found(photos))
    assert found(photos) and contents(tmp_path / "sorted") == Counter()
    failed = [r for r in log_records(tmp_path / "sorted") if r["action"] == "failed"]
    assert len(failed) == len(found(photos))
    back = organize_cli(tiny_model_dir, "--undo", tmp_path / "sorted")  # failed actions have nothing to undo
    assert back.exit_code == 0 and back.stderr.startswith("undid 0 action(s)")


def test_linked_sources(tiny_model_dir, photos, tmp_path):
    elsewhere = tmp_path / "elsewhere.png"
    shutil.copy(photos / "c.bmp", elsewhere)
    (photos / "a" / "linked.png").symlink_to(elsewhere)
    dest = tmp_path / "sorted"
    moved = organize_cli(tiny_model_dir, photos, "-l", "cat", "--score", "cosine", "--into", dest, "--move")
    assert moved.exit_code == 1
    assert "linked.png: is a symbolic link: not moved" in moved.stderr
    assert os.readlink(photos / "a" / "linked.png") == str(elsewhere)  # left as it was
    copied = organize_cli(tiny_model_dir, photos, "-l", "cat", "--score", "cosine", "--into", dest)
    assert copied.exit_code == 0
    linked_copy = dest / "cat" / "linked.png"
    assert not linked_copy.is_symlink() and sha(linked_copy) == sha(elsewhere)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX processes")
def test_sigkill_during_move_never_loses_a_file(tiny_model_dir, tmp_path):
    """SIGKILL at random moments of `clip organize --move` over a few hundred files, again and again: each image's
    bytes stay present once or twice, never zero times, and a last run finishes the job."""
    source = tmp_path / "photos"
    for i in range(300):
        folder = source / f"f{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        photo(12, 12, seed=5000 + i).save(folder / f"{i // 3:03d}.png")
    originals = contents(source)
    assert set(originals.values()) == {1}
    labels = ",".join(LABELS)
    # In this process (torch is loaded already): fills the index that the `clip` processes below read.
    classified = invoke("classify", source, "-l", labels, "-f", "jsonl", "-m", tiny_model_dir)
    assert classified.exit_code == 0, classified.stderr
    expected = {sha(r["path"]): r["label"] for r in map(json.loads, classified.stdout.splitlines())}
    dest = tmp_path / "sorted"
    log = dest / LOG_NAME
    command = [*clip_command(), "organize", str(source), "-l", labels, "--into", str(dest), "--move", "-q",
               "-m", str(tiny_model_dir)]
    rng = random.Random(12)
    killed_mid_way = 0
    for round_ in range(5):
        lines = len(log.read_bytes().splitlines()) if log.exists() else 0
        goal = lines + rng.randint(1, 40)
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clip_env())
        deadline = time.monotonic() + 30
        if round_ == 0:
            time.sleep(rng.uniform(0, 0.3))  # anywhere from start-up on
        else:
            while proc.poll() is None and time.monotonic() < deadline and (
                    not log.exists() or len(log.read_bytes().splitlines()) < goal):
                time.sleep(0.0005)
        progress = len(log.read_bytes().splitlines()) if log.exists() else 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)
        if proc.returncode == -signal.SIGKILL:
            killed_mid_way += lines < progress and bool(found(source))
        else:
            assert proc.returncode == 0, stderr.decode()
        now = contents(source, dest)
        assert set(now) == set(originals), "an image's bytes are gone"
        assert set(now.values()) <= {1, 2}, now.most_common(3)
    assert killed_mid_way >= 3
    finished = subprocess.run(command, capture_output=True, env=clip_env(), timeout=60)
    assert finished.returncode == 0, finished.stderr.decode()
    assert found(source) == [] and contents(dest) == originals
    leftovers = [p for p in dest.rglob("*") if p.name.startswith(".")]
    assert leftovers == []
    for path in dest.rglob("*.png"):
        assert path.parent.name == expected[sha(path)]


# ---------------------------------------------------------------------------------------------------------------
# undo


@pytest.mark.parametrize("mode", MODES)
def test_undo_restores_the_original_tree(tiny_model_dir, photos, tmp_path, mode, monkeypatch):
    before = snapshot(photos)
    dest = tmp_path / "sorted"
    done = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest, f"--{mode}",
                        "--min-score", "0.4")
    assert done.exit_code == 0, (done.stderr, done.exception)
    monkeypatch.chdir(tmp_path / "photos" / "a")  # another working folder: the log holds absolute paths
    back = organize_cli(tiny_model_dir, "--undo", dest)
    assert back.exit_code == 0, (back.stderr, back.exception)
    assert back.stderr.startswith(f"undid {len(found(photos))} action(s)")
    assert snapshot(photos) == before
    assert sorted(p.name for p in dest.iterdir()) == [LOG_NAME]  # emptied label folders removed too
    records = log_records(dest)
    undone = [r for r in records if r["action"] == "undo"]
    assert sorted(r["of"] for r in undone) == [i for i, r in enumerate(records) if r["action"] == mode]
    again = organize_cli(tiny_model_dir, "--undo", dest)
    assert again.exit_code == 0 and again.stderr.startswith("undid 0 action(s)")
    assert log_records(dest) == records and snapshot(photos) == before


def test_undo_after_copy_then_move(tiny_model_dir, photos, tmp_path):
    before = snapshot(photos)
    dest = tmp_path / "sorted"
    for mode in ("--copy", "--move"):
        result = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest, mode)
        assert result.exit_code == 0, (result.stderr, result.exception)
    assert found(photos) == []
    assert {r["action"] for r in log_records(dest)} == {"copy", "remove-source"}
    back = organize_cli(tiny_model_dir, "--undo", dest)
    assert back.exit_code == 0, (back.stderr, back.exception)
    assert {k: v[:2] for k, v in snapshot(photos).items()} == {k: v[:2] for k, v in before.items()}


def test_undo_never_restores_a_source_from_a_copy_changed_since(tiny_model_dir, photos, tmp_path):
    # --move beside an identical copy removed only the source; undo copies that copy back, but not once it changed.
    dest = tmp_path / "sorted"
    for mode in ("--copy", "--move"):
        assert organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest, mode).exit_code == 0
    removed = [r for r in log_records(dest) if r["action"] == "remove-source"]
    assert removed and all(r["sha256"] == sha(r["destination"]) for r in removed)
    changed = removed[0]
    with open(changed["destination"], "ab") as handle:
        handle.write(b"edited since")
    back = organize_cli(tiny_model_dir, "--undo", dest)
    assert back.exit_code == 1
    assert f"{changed['source']}: cannot be restored" in back.stderr and "has changed since" in back.stderr
    assert not os.path.lexists(changed["source"])  # not restored from the changed file
    assert all(os.path.exists(r["source"]) for r in removed[1:])  # the others are back
    assert Path(changed["destination"]).read_bytes().endswith(b"edited since")  # and the edited copy kept


def test_undo_that_cannot_remove_a_copy_reports_it_and_goes_on(tiny_model_dir, photos, tmp_path, monkeypatch):
    # A label folder the user may no longer write (root may write anything, so the refusal is made here).
    dest = tmp_path / "sorted"
    assert organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest).exit_code == 0
    copies = [r["destination"] for r in log_records(dest) if r["action"] == "copy"]
    locked = copies[0]
    unlink = os.unlink

    def refuse(path, *args, **kwargs):
        if os.fspath(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refuse)
    back = organize_cli(tiny_model_dir, "--undo", dest)
    assert back.exit_code == 1 and "Traceback" not in back.stderr, back.stderr
    assert f"{locked}: not undone: permission denied" in back.stderr.lower()
    assert [c for c in copies if Path(c).exists()] == [locked]  # the others were undone
    assert found(photos) == sorted(found(photos))  # the originals were never touched


def test_a_log_that_cannot_be_read_or_written_is_one_line(tiny_model_dir, photos, tmp_path, monkeypatch):
    dest = tmp_path / "sorted"
    assert organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest).exit_code == 0

    def unreadable(path):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(organize, "read_log_bytes", unreadable)
    assert_usage_error(organize_cli(tiny_model_dir, "--undo", dest), "cannot read the log", "permission denied")
    again = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", tmp_path / "other")
    assert_usage_error(again, "cannot write the log", "clip-organize.jsonl", "permission denied")


def test_undo_never_overwrites_and_keeps_what_changed(tiny_model_dir, photos, tmp_path):
    images = found(photos)
    dest = tmp_path / "sorted"
    moved = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest, "--move")
    assert moved.exit_code == 0
    (photos / "a" / "x.png").write_bytes(b"a new file where x.png was")
    back = organize_cli(tiny_model_dir, "--undo", dest)
    assert back.exit_code == 1
    assert "its original place" in back.stderr and "taken by another file" in back.stderr
    assert (photos / "a" / "x.png").read_bytes() == b"a new file where x.png was"
    (kept,) = [r["destination"] for r in log_records(dest) if r["source"] == str(photos / "a" / "x.png")]
    assert Path(kept).exists()
    assert found(photos) == images  # the others are back; x.png's place holds the new file
    (photos / "a" / "x.png").unlink()  # out of the way: the next undo finishes
    finished = organize_cli(tiny_model_dir, "--undo", dest)
    assert finished.exit_code == 0 and finished.stderr.startswith("undid 1 action(s)")
    # Copies: one changed since is kept; one whose original is gone is kept.
    other = tmp_path / "copies"
    copied = organize_cli(tiny_model_dir, photos, "-l", "cat", "--score", "cosine", "--into", other)
    assert copied.exit_code == 0
    (other / "cat" / "y.png").write_bytes(b"edited")
    (photos / "c.bmp").unlink()
    back = organize_cli(tiny_model_dir, "--undo", other)
    assert back.exit_code == 1
    assert "changed since it was organized: kept" in back.stderr and "is gone: this copy is kept" in back.stderr
    assert sorted(p.name for p in (other / "cat").iterdir()) == ["c.bmp", "y.png"]


# ---------------------------------------------------------------------------------------------------------------
# the index, the command line


def test_organizing_a_classified_folder_needs_no_model(tiny_model_dir, photos, tmp_path, monkeypatch):
    index = tmp_path / "index.db"
    classified = invoke("classify", photos, "-l", ",".join(LABELS), "-f", "jsonl", "--index", index,
                        "-m", tiny_model_dir)
    assert classified.exit_code == 0
    labels = {json.loads(line)["path"]: json.loads(line)["label"] for line in classified.stdout.splitlines()}
    import clipcli.loader

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(clipcli.loader, "load_files", no_model)
    dest = tmp_path / "sorted"
    result = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest, "--index", index)
    assert result.exit_code == 0, (result.stderr, result.exception)
    records = log_records(dest)
    assert len(records) == len(labels)
    for record in records:
        assert Path(record["destination"]).parent.name == labels[record["source"]]
    # Without the index the model is needed: the patched loader is called.
    without = organize_cli(tiny_model_dir, photos, "-l", ",".join(LABELS), "--into", dest, "--no-index")
    assert isinstance(without.exception, AssertionError)


def test_session_counts_no_computed_images_on_a_second_run(tiny_model_dir, photos, tmp_path):
    from clipcli import pipeline
    from clipcli.index import open_index
    from clipcli.pipeline import Session, Settings

    images = found(photos)
    counts = []
    for _ in range(2):
        store = open_index(tmp_path / "index.db", lambda message: None)
        session = Session(Settings(model=str(tiny_model_dir), device="cpu"), store)
        labels = pipeline.label_embeddings(session, LABELS, ["a photo of a {}."])
        with organize.Organizer(tmp_path / "sorted", LABELS) as organizer:
            for batch in pipeline.classify(session, images, labels):
                assert organizer.place(batch.paths, batch.scores) == []
        counts.append(session.computed_images)
        store.close()
    assert counts == [len(images), 0]


@pytest.mark.parametrize("args, fragments", [
    (["{photos}", "-l", "cat,dog"], ["--into"]),
    (["-l", "cat,dog", "--into", "{tmp}/sorted"], ["nothing to organize"]),
    (["{photos}", "-l", "cat,dog", "--into", "{tmp}/sorted", "--move", "--link"], ["--move and --link"]),
    (["{photos}", "--into", "{tmp}/sorted"], ["no labels"]),
    (["{photos}", "-l", "cat,dog", "--into", "{tmp}/sorted", "--min-score", "2"], ["--min-score", "between 0 and 1"]),
    (["{photos}", "-l", "cat,dog", "--into", "{photos}/c.bmp"], ["--into", "c.bmp", "not a folder"]),
    (["{photos}", "-l", "cat,dog", "--undo", "{tmp}/sorted"], ["--undo", "alone"]),
    (["--undo", "{tmp}"], ["--undo", "clip-organize.jsonl", "nothing to undo"]),
    (["--undo", "{tmp}/missing"], ["--undo", "not a folder"]),
])
def test_organize_usage_errors(tiny_model_dir, photos, tmp_path, args, fragments):
    before = snapshot(tmp_path)
    argv = [a.format(photos=photos, tmp=tmp_path) for a in args]
    assert_usage_error(organize_cli(tiny_model_dir, *argv), *fragments)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="flock is POSIX")
def test_two_runs_on_one_dest_do_not_mix(tiny_model_dir, photos, tmp_path):
    import fcntl

    dest = tmp_path / "sorted"
    dest.mkdir()
    fd = os.open(dest, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert_usage_error(organize_cli(tiny_model_dir, photos, "-l", "cat,dog", "--into", dest),
                           "another clip organize")
        assert list(dest.iterdir()) == []
    finally:
        os.close(fd)


def test_help_shows_examples_and_modes():
    result = invoke("organize", "--help")
    assert result.exit_code == 0
    for text in ("clip organize photos/", "--into", "--copy", "--move", "--link", "--symlink", "--min-score",
                 "--dry-run", "--undo", "--score", "--templates", "--index", "--no-index", "--batch-size",
                 "--workers", "--fast-decode", "--quiet"):
        assert text in result.stdout, text


def test_log_survives_a_record_cut_short(tmp_path):
    log = organize.Log(str(tmp_path / LOG_NAME))
    assert log.write({"action": "copy"}) == 0
    log.close()
    with open(tmp_path / LOG_NAME, "ab") as handle:
        handle.write(b'{"action": "mo')  # power lost mid-record
    again = organize.Log(str(tmp_path / LOG_NAME))
    assert again.write({"action": "link"}) == 2
    again.close()
    assert organize.read_lines(str(tmp_path / LOG_NAME)) == [{"action": "copy"}, None, {"action": "link"}]


def test_place_sends_scores_below_min_score_to_unsure():
    scores = np.array([[0.2, 0.8], [0.55, 0.45]], dtype=np.float32)
    with tempfile.TemporaryDirectory() as folder:
        organizer = organize.Organizer(folder, ["cat", "dog"], min_score=0.6, dry_run=True)
        for name in ("a.png", "b.png"):
            Path(folder, name).write_bytes(name.encode())
        assert organizer.place([os.path.join(folder, "a.png"), os.path.join(folder, "b.png")], scores) == []
        assert [(s.label, os.path.basename(os.path.dirname(s.destination))) for s in organizer.steps] == [
            ("dog", "dog"), (None, UNSURE)]


def test_the_dry_run_plan_aligns_wide_characters():
    """Columns line up in terminal cells: a CJK label or file name takes two cells a character."""
    from rich.cells import cell_len

    from clipcli.output import render_plan

    steps = [organize.Step("photos/猫.jpg", "sorted/猫/猫.jpg", "猫", 0.9, "copy"),
             organize.Step("photos/dog.jpg", "sorted/dog/dog.jpg", "dog", 0.25, "move")]
    lines = render_plan(steps).splitlines()
    starts = {cell_len(line[:line.rindex("  ") + 2]) for line in lines}  # where the last column begins
    assert len(lines) == 3 and len(starts) == 1, lines


def test_undo_follows_links_before_going_up(tmp_path):
    # A logged destination DEST/link/../x, where link leads out of DEST, is outside DEST: the OS goes up from where
    # the link leads, so a textual clean-up (link/.. -> nothing) must not decide it.
    dest, outside = tmp_path / "dest", tmp_path / "elsewhere" / "deep"
    dest.mkdir()
    outside.mkdir(parents=True)
    os.symlink(outside, dest / "link")
    real = os.path.realpath(dest)
    assert not organize._is_under(organize._real_location(f"{dest}/link/../x"), real)
    assert organize._is_under(organize._real_location(f"{dest}/sub/../x"), real)
    assert organize._is_under(organize._real_location(f"{dest}/label/x.png"), real)
