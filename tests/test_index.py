"""The embedding index against cli-contract.md ("The embedding index"): warm runs equal cold ones (bit for bit) and
--no-index runs (to float rounding), entries follow file content (not names, sizes or times), other models,
precisions and decode modes never share entries, interrupted runs resume, concurrent runs complete, and every fault
(damaged, foreign, newer, unwritable, full, locked) is one warning and a correct run. Model work is counted by
wrapping Clip.image_features / Clip.text_features in-process."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipcli import index as index_module
from clipcli import loader
from clipcli import pipeline as pipeline_module
from tests.conftest import make_hf_checkpoint, photo
from tests.test_cli import clip_command, clip_env, interrupt, invoke

LABELS = "cat,dog,red car"


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Images and texts that went through the model in this test (in-process runs)."""
    counts = {"images": 0, "texts": 0, "loads": 0, "text-only loads": 0}
    image_features, text_features, load_files = loader.Clip.image_features, loader.Clip.text_features, loader.load_files

    def count_images(self, pixels):
        counts["images"] += len(pixels)
        return image_features(self, pixels)

    def count_texts(self, texts, batch_size=256):
        counts["texts"] += len(texts)
        return text_features(self, texts, batch_size)

    def count_loads(*args, **kwargs):
        counts["text-only loads" if kwargs.get("text_only") else "loads"] += 1
        return load_files(*args, **kwargs)

    monkeypatch.setattr(loader.Clip, "image_features", count_images)
    monkeypatch.setattr(loader.Clip, "text_features", count_texts)
    monkeypatch.setattr(loader, "load_files", count_loads)
    return counts


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Six small photos in two folders, made for this test (so their stat memo entries are its own)."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        photo(40 + 3 * i, 30 + 2 * i, seed=i).save(root / ("sub" if i % 2 else ".") / f"p{i}.png")
    return root


def run(*args: object, index: Path | None, expect: int = 0):
    result = invoke(*args, *(["--index", index] if index is not None else ["--no-index"]))
    assert result.exit_code == expect, (result.exit_code, result.stderr, result.exception)
    return result


def scores(result) -> dict[str, dict[str, float]]:
    return {row["path"]: row["scores"] for row in map(json.loads, result.stdout.splitlines())}


def classify(model: Path, target: Path, index: Path | None, *extra: object) -> dict[str, dict[str, float]]:
    return scores(run("classify", target, "-l", LABELS, "-f", "jsonl", "-m", model, *extra, index=index))


def embed(model: Path, target: Path, out: Path, index: Path | None, *extra: object) -> np.ndarray:
    run("embed", target, "-o", out, "-m", model, *extra, index=index)
    return np.load(out)


def assert_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_allclose([a[path][k] for k in sorted(a[path])], [b[path][k] for k in sorted(b[path])],
                                   atol=atol, rtol=0)


def one_warning(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1, stderr
    assert "index" in lines[0] and "goes on without it" in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# parity and reuse


def test_warm_runs_equal_cold_bit_for_bit_and_no_index_to_rounding(tiny_model_dir, folder, tmp_path, calls):
    index = tmp_path / "index.db"
    cold = embed(tiny_model_dir, folder, tmp_path / "cold.npy", index, "--batch-size", "4")
    assert calls["images"] == 6
    warm = embed(tiny_model_dir, folder, tmp_path / "warm.npy", index, "--batch-size", "4")
    assert calls["images"] == 6  # nothing computed again
    np.testing.assert_array_equal(warm, cold)
    assert (tmp_path / "warm.paths.txt").read_text() == (tmp_path / "cold.paths.txt").read_text()
    # Without the index, batches group images differently: equal to float rounding.
    plain = embed(tiny_model_dir, folder, tmp_path / "plain.npy", None, "--batch-size", "3")
    np.testing.assert_allclose(plain, cold, atol=1e-6, rtol=0)
    assert calls["images"] == 12
    raw = embed(tiny_model_dir, folder, tmp_path / "raw.npy", index, "--no-normalize")
    assert calls["images"] == 12  # raw features are what is stored: --no-normalize reads the same entries
    np.testing.assert_array_equal((raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32), cold)
    assert_close(classify(tiny_model_dir, folder, index), classify(tiny_model_dir, folder, None))


def test_a_warm_run_needs_no_model_and_reads_no_image(tiny_model_dir, folder, tmp_path, calls, monkeypatch):
    index = tmp_path / "index.db"
    monkeypatch.setattr(index_module, "RACY_NS", 0)  # files made a moment ago are "racy" (re-read) otherwise
    first = classify(tiny_model_dir, folder, index)
    from clipcli import pipeline

    reads: list[str] = []
    real = pipeline.read_image_file
    monkeypatch.setattr(pipeline, "read_image_file", lambda path: reads.append(path) or real(path))
    before = dict(calls)
    assert classify(tiny_model_dir, folder, index) == first
    assert reads == [] and calls == before  # stat memo + stored features and prompts: no model, no bytes


@pytest.mark.parametrize("dev", [-1, (1 << 64) - 5])
def test_memo_matches_device_numbers_however_python_signs_them(tmp_path, dev):
    # SQLite stores signed 64-bit integers; os.stat may give a device number as -1 (NODEV) or above 2**63.
    from clipcli.index import FileRecord, Index

    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    real = os.stat(image)
    fields = list(real)[:10]
    fields[2] = dev
    state = os.stat_result(fields, {k: getattr(real, k) for k in ("st_atime_ns", "st_mtime_ns", "st_ctime_ns")})
    index = Index(tmp_path / "index.db", lambda message: pytest.fail(message))
    try:
        index.remember_files([FileRecord(str(image), state, b"d" * 16, time.time_ns() + 10 ** 10)])
        assert index.known_digests([(str(image), state)]) == {str(image): b"d" * 16}
    finally:
        index.close()


@pytest.mark.parametrize("path", ["a.jpg", "/y.png", "./a.jpg", "sub/a.jpg", "sub//a.jpg", "/abs/x/y.png",
                                  "../up/z.jpg", "sub/./a.jpg", "a/b/../c.jpg", "caf\udce9.jpg", "dir/", "//x.jpg",
                                  "/", ".", "sub/..", "~/home.jpg"])
def test_memo_keys_are_absolute_paths_as_bytes(path):
    # The stat memo keys a file by os.fsencode(os.path.abspath(path)); _PathKeys computes that per folder once.
    keys = index_module._PathKeys()
    for _ in range(2):  # the second time from its cache of folders
        assert b"".join(keys(path)) == os.fsencode(os.path.abspath(path))


def test_the_text_tower_alone_gives_the_same_text_features(tiny_model_dir):
    from clipcli.resolve import resolve

    files = resolve(str(tiny_model_dir))
    full, text = loader.load_files(files, device="cpu"), loader.load_files(files, device="cpu", text_only=True)
    texts = ["a photo of a cat.", "two dogs on a sofa", ""]
    np.testing.assert_array_equal(text.text_features(texts), full.text_features(texts))
    assert text.logit_scale == full.logit_scale and text.text_only
    assert all(p.is_meta for name, p in text.model.named_parameters() if name.startswith("vision_model."))
    with pytest.raises(loader.UsageError, match="texts only"):
        text.image_features([np.zeros((3, 32, 32), dtype=np.float32)])


def test_a_warm_run_imports_no_torch(tiny_model_dir, folder, tmp_path):
    index = tmp_path / "index.db"
    classify(tiny_model_dir, folder, index)
    code = ("import sys, json; from typer.testing import CliRunner; from clipcli.cli import app; "
            "r = CliRunner().invoke(app, sys.argv[1:]); print(json.dumps([r.exit_code, 'torch' in sys.modules]))")
    args = ["classify", str(folder), "-l", LABELS, "-f", "jsonl", "-m", str(tiny_model_dir), "--index", str(index)]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=clip_env())
    assert json.loads(done.stdout.splitlines()[-1]) == [0, False], done.stderr


def test_prompts_are_cached_and_new_labels_cost_only_their_text(tiny_model_dir, folder, tmp_path, calls):
    index = tmp_path / "index.db"
    classify(tiny_model_dir, folder, index, "-t", "a photo of a {}.", "-t", "a {}")
    # The prompts first, with the text tower alone; then images to compute: the whole model.
    assert calls == {"images": 6, "texts": 6, "loads": 1, "text-only loads": 1}
    classify(tiny_model_dir, folder, index, "-t", "a photo of a {}.", "-t", "a {}")
    assert calls == {"images": 6, "texts": 6, "loads": 1, "text-only loads": 1}
    got = scores(run("classify", folder, "-l", LABELS + ",rocket", "-f", "jsonl", "-m", tiny_model_dir,
                     "-t", "a photo of a {}.", "-t", "a {}", index=index))
    # Only rocket's two prompts, by the text tower alone; no image.
    assert calls == {"images": 6, "texts": 8, "loads": 1, "text-only loads": 2}
    expected = scores(run("classify", folder, "-l", LABELS + ",rocket", "-f", "jsonl", "-m", tiny_model_dir,
                          "-t", "a photo of a {}.", "-t", "a {}", index=None))
    assert_close(got, expected)


def test_changed_content_with_the_same_size_and_mtime_is_computed_again(tiny_model_dir, tmp_path, calls,
                                                                      monkeypatch):
    monkeypatch.setattr(index_module, "RACY_NS", 0)  # trust the memo: only the changed ctime/inode can tell
    index = tmp_path / "index.db"
    target = tmp_path / "one"
    target.mkdir()
    image = target / "x.png"
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(image, compress_level=0)
    before = image.stat()
    first = classify(tiny_model_dir, target, index)
    Image.fromarray(255 - noise).save(image, compress_level=0)  # other pixels, same size
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert image.stat().st_size == before.st_size and image.stat().st_mtime_ns == before.st_mtime_ns
    second = classify(tiny_model_dir, target, index)
    assert calls["images"] == 2 and second != first
    assert_close(second, classify(tiny_model_dir, target, None))


def test_a_file_changed_while_the_run_waits_to_read_it_is_stored_under_what_was_read(tiny_model_dir, tmp_path,
                                                                                       monkeypatch):
    # The stat memo knows the file's digest (from a run with another model), so the run does not hash it when it
    # stats it; the file changes before the run reads it. Its features must be stored under the digest of the bytes
    # that were read, or a copy of the old content would later get the new content's features.
    from clipcli import pipeline

    monkeypatch.setattr(index_module, "RACY_NS", 0)
    index = tmp_path / "index.db"
    target = tmp_path / "one"
    target.mkdir()
    image = target / "x.png"
    photo(40, 30, seed=1).save(image)
    other = make_hf_checkpoint(tmp_path / "other", seed=1)
    classify(other, target, index)  # the memo now knows x.png's digest; no features for tiny_model_dir yet
    original = image.read_bytes()
    real = pipeline.read_image_file

    def changed_before_read(path):
        photo(40, 30, seed=2).save(path)  # changed after the run's stat, before its read
        return real(path)

    monkeypatch.setattr(pipeline, "read_image_file", changed_before_read)
    classify(tiny_model_dir, target, index)
    monkeypatch.setattr(pipeline, "read_image_file", real)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "y.png").write_bytes(original)  # the old content, elsewhere
    assert_close(classify(tiny_model_dir, copy, index), classify(tiny_model_dir, copy, None))


def test_the_size_limit_applies_to_images_answered_from_the_index(tiny_model_dir, folder, tmp_path, calls):
    # --max-megapixels refuses an image whether its features are computed or found: the same failures either way.
    index = tmp_path / "index.db"
    classify(tiny_model_dir, folder, index)
    limited = ["classify", folder, "-l", LABELS, "-f", "jsonl", "-m", tiny_model_dir, "--max-megapixels", "0.0017"]
    warm, cold = run(*limited, index=index, expect=1), run(*limited, index=None, expect=1)
    assert calls["images"] == 6 + 3  # the warm run computed nothing; --no-index decoded the three small enough
    rows = [json.loads(line) for line in warm.stdout.splitlines()]
    assert rows == [json.loads(line) for line in cold.stdout.splitlines()]
    refused = [row["path"] for row in rows if "error" in row]
    assert len(refused) == 3 and all("image too large" in row["error"] for row in rows if "error" in row)
    assert warm.stderr == cold.stderr


def test_a_moved_folder_is_not_computed_again(tiny_model_dir, folder, tmp_path, calls):
    index = tmp_path / "index.db"
    before = classify(tiny_model_dir, folder, index)
    moved = tmp_path / "moved"
    os.rename(folder, moved)
    after = classify(tiny_model_dir, moved, index)
    assert calls["images"] == 6  # the digests are read again, the model does not run
    assert list(after.values()) == list(before.values())
    shutil.copytree(moved, tmp_path / "copy")  # a copy too
    classify(tiny_model_dir, tmp_path / "copy", index)
    assert calls["images"] == 6


def test_other_models_precisions_and_decode_modes_never_share_entries(tiny_model_dir, folder, tmp_path, calls):
    index = tmp_path / "index.db"
    other = make_hf_checkpoint(tmp_path / "other", seed=1)
    classify(tiny_model_dir, folder, index)
    assert calls["images"] == 6
    for extra in (["--fast-decode"], ["--dtype", "bf16"]):
        classify(tiny_model_dir, folder, index, *extra)
    assert calls["images"] == 18
    assert_close(classify(other, folder, index), classify(other, folder, None))
    assert calls["images"] == 30
    for extra in ([], ["--fast-decode"], ["--dtype", "bf16"]):
        classify(tiny_model_dir, folder, index, *extra)
    assert calls["images"] == 30  # each variant kept its own entries


def test_a_model_with_other_weights_under_the_same_path_is_a_new_model(tiny_model_dir, folder, tmp_path, calls):
    index = tmp_path / "index.db"
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    first = classify(model, folder, index)
    shutil.rmtree(model)
    make_hf_checkpoint(model, seed=2)
    assert_close(classify(model, folder, index), classify(model, folder, None))
    assert calls["images"] == 18 and classify(model, folder, index) != first


# ---------------------------------------------------------------------------------------------------------------
# `clip index`


def summary(result) -> tuple[int, int, int, int]:
    line = result.stderr.strip().splitlines()[-1]
    found = re.search(r"indexed (\d+) image\(s\) in .*: (\d+) new, (\d+) updated, (\d+) unchanged, (\d+) failed; "
                      r"the model ran on (\d+)$", line)
    assert found, result.stderr
    indexed, new, updated, unchanged, failed, computed = (int(n) for n in found.groups())
    assert indexed == new + updated + unchanged and computed <= new + updated, line
    return new, updated, unchanged, failed


def model_runs(result) -> int:
    return int(result.stderr.strip().splitlines()[-1].rsplit(" ", 1)[1])


def test_index_command_counts_new_updated_unchanged_and_failed(tiny_model_dir, folder, tmp_path):
    index = tmp_path / "index.db"
    assert summary(run("index", folder, "-m", tiny_model_dir, index=index)) == (6, 0, 0, 0)
    assert summary(run("index", folder, "-m", tiny_model_dir, index=index)) == (0, 0, 6, 0)
    photo(50, 50, seed=99).save(folder / "p0.png")  # changed in place
    photo(20, 20, seed=98).save(folder / "new.png")
    (folder / "broken.png").write_bytes(b"not a png")
    os.symlink("gone.png", folder / "dangling.png")  # fails in the walk, not when read
    result = run("index", folder, "-m", tiny_model_dir, index=index, expect=1)
    assert summary(result) == (1, 1, 5, 2) and model_runs(result) == 2
    assert f"{folder / 'broken.png'}: not an image file" in result.stderr
    os.rename(folder / "new.png", folder / "renamed.png")  # a new path, known content: nothing to compute
    renamed = run("index", folder, "-m", tiny_model_dir, index=index, expect=1)
    assert summary(renamed) == (1, 0, 6, 2) and model_runs(renamed) == 0


def test_index_info_prune_and_clear(tiny_model_dir, folder, tmp_path):
    index = tmp_path / "index.db"
    run("index", folder, "-m", tiny_model_dir, index=index)
    run("classify", folder, "-l", LABELS, "-m", tiny_model_dir, index=index)
    info = run("index", index=index).stdout
    assert str(index) in info and str(tiny_model_dir) in info
    assert re.search(r"fp32, exact decode: 6 images, 3 prompts", info), info
    (folder / "p0.png").unlink()
    pruned = run("index", "--prune", index=index)
    assert "1 file(s) that are gone, 1 embedding(s)" in pruned.stderr
    assert "5 images" in run("index", index=index).stdout
    assert stored_rows(index)[:2] == (5 + 3, 5 + 3)
    run("index", "--clear", index=index)
    assert stored_rows(index) == (0, 0, 0) and free_pages(index) == 0
    assert "no embeddings yet" in run("index", index=index).stdout


def test_info_with_paths_or_prune_shows_the_index_after_the_work(tiny_model_dir, folder, tmp_path):
    index = tmp_path / "index.db"
    added = run("index", folder, "--info", "-m", tiny_model_dir, index=index)
    assert summary(added) == (6, 0, 0, 0)
    assert re.search(r"fp32, exact decode: 6 images, 0 prompts", added.stdout), added.stdout
    (folder / "p0.png").unlink()
    pruned = run("index", "--prune", "--info", index=index)
    assert "1 file(s) that are gone" in pruned.stderr and "5 images" in pruned.stdout


def free_pages(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("PRAGMA freelist_count").fetchone()[0]


def stored_rows(db: Path) -> tuple[int, int, int]:
    """(rows in blocks, keys pointing to them, blocks) of an index."""
    with sqlite3.connect(db) as con:
        rows, blocks = con.execute("SELECT coalesce(sum(rows), 0), count(*) FROM blocks").fetchone()
        keys = sum(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                   for table in ("image_keys", "prompt_keys"))
    return rows, keys, blocks


def test_rows_span_blocks_and_prune_compacts_them(tiny_model_dir, many_images, tmp_path, calls, monkeypatch):
    # Blocks of a few rows: a run's rows fill several blocks, some rows join the newest block of an earlier run, and
    # prune moves the rows that stay out of blocks that lost some, so the file holds no dead rows.
    monkeypatch.setattr(index_module, "_block_rows", lambda page_size, width: 4)
    index = tmp_path / "index.db"
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted(many_images.iterdir())[:23]:
        shutil.copy(path, photos)
    first = classify(tiny_model_dir, photos, index, "--batch-size", "5")
    rows, keys, blocks = stored_rows(index)
    assert rows == keys == 23 + 3 and blocks == 7
    computed = calls["images"]
    assert classify(tiny_model_dir, photos, index) == first and calls["images"] == computed
    for path in sorted(photos.iterdir())[3:20:2]:  # 9 images from the middle of the blocks
        path.unlink()
        first.pop(str(path))
    pruned = run("index", "--prune", index=index)
    assert "9 file(s) that are gone, 9 embedding(s)" in pruned.stderr
    rows, keys, _ = stored_rows(index)
    assert rows == keys == 14 + 3 and free_pages(index) == 0  # no dead rows left, their space given back
    assert classify(tiny_model_dir, photos, index) == first and calls["images"] == computed  # the rows that moved
    photo(20, 20, seed=999).save(photos / "new.png")
    assert classify(tiny_model_dir, photos, index).keys() == {*first, str(photos / "new.png")}
    assert calls["images"] == computed + 1 and stored_rows(index)[:2] == (18, 18)


# The layout of schema 1 (clipcli before blocks): a row per vector, the memo keyed by whole paths.
SCHEMA_1 = """
CREATE TABLE models (id INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL UNIQUE, name TEXT NOT NULL, info TEXT NOT NULL);
CREATE TABLE variants (id INTEGER PRIMARY KEY, model INTEGER NOT NULL, dtype TEXT NOT NULL,
    fast_decode INTEGER NOT NULL, UNIQUE (model, dtype, fast_decode));
CREATE TABLE vectors (id INTEGER PRIMARY KEY, data BLOB NOT NULL, crc INTEGER NOT NULL);
CREATE TABLE image_keys (variant INTEGER NOT NULL, digest BLOB NOT NULL, vector INTEGER NOT NULL,
    pixels INTEGER NOT NULL, PRIMARY KEY (variant, digest)) WITHOUT ROWID;
CREATE TABLE prompt_keys (model INTEGER NOT NULL, text TEXT NOT NULL, vector INTEGER NOT NULL,
    truncated INTEGER NOT NULL, PRIMARY KEY (model, text)) WITHOUT ROWID;
CREATE TABLE files (path BLOB PRIMARY KEY, dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, racy INTEGER NOT NULL, digest BLOB NOT NULL,
    crc INTEGER NOT NULL) WITHOUT ROWID
"""


def as_schema_1(source: Path, target: Path) -> None:
    """Write the entries of the (current) index `source` into `target` as clipcli with schema 1 kept them."""
    with sqlite3.connect(source) as con:
        models = con.execute("SELECT * FROM models").fetchall()
        variants = con.execute("SELECT * FROM variants").fetchall()
        folders = dict(con.execute("SELECT id, path FROM folders"))
        files = [(folders[folder] + name, *rest) for folder, name, *rest in con.execute("SELECT * FROM files")]
        blocks = {block: (width, data) for block, width, data in con.execute("SELECT id, width, data FROM blocks")}

        def row(block: int, slot: int) -> bytes:
            width, data = blocks[block]
            return data[slot * width:(slot + 1) * width]

        images = [(variant, digest, row(block, slot), pixels, crc)
                  for variant, digest, block, slot, pixels, crc in con.execute("SELECT * FROM image_keys")]
        prompts = [(model, text, row(block, slot), truncated, crc)
                   for model, text, block, slot, truncated, crc in con.execute("SELECT * FROM prompt_keys")]
    con = sqlite3.connect(target, isolation_level=None)
    con.execute("PRAGMA page_size=65536")
    con.execute("PRAGMA auto_vacuum=INCREMENTAL")
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(SCHEMA_1)
    con.executemany("INSERT INTO models VALUES (?, ?, ?, ?)", models)
    con.executemany("INSERT INTO variants VALUES (?, ?, ?, ?)", variants)
    con.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", files)
    for table, entries in (("image_keys", images), ("prompt_keys", prompts)):
        for first, second, data, third, crc in entries:
            vector = con.execute("INSERT INTO vectors (data, crc) VALUES (?, ?)", (data, crc)).lastrowid
            con.execute(f"INSERT INTO {table} VALUES (?, ?, ?, ?)", (first, second, vector, third))
    con.execute(f"PRAGMA application_id={index_module.APPLICATION_ID}")
    con.execute("PRAGMA user_version=1")
    con.close()


def test_an_index_of_schema_1_is_upgraded_with_every_entry(tiny_model_dir, folder, tmp_path, calls, monkeypatch):
    monkeypatch.setattr(index_module, "RACY_NS", 0)  # so that the memo's entries are used, as in a later session
    current, old = tmp_path / "current.db", tmp_path / "old.db"
    first = classify(tiny_model_dir, folder, current)
    as_schema_1(current, old)
    before = dict(calls)
    reads: list[str] = []
    from clipcli import pipeline

    real = pipeline.read_image_file
    monkeypatch.setattr(pipeline, "read_image_file", lambda path: reads.append(path) or real(path))
    result = run("classify", folder, "-l", LABELS, "-f", "jsonl", "-m", tiny_model_dir, index=old)
    assert result.stderr == "" and scores(result) == first
    assert calls == before and reads == []  # features, prompts and stat memo all kept
    with sqlite3.connect(old) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == index_module.SCHEMA_VERSION
        tables = dict(con.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
    assert tables.keys() == {"models", "variants", "blocks", "image_keys", "prompt_keys", "folders", "files",
                             "sqlite_sequence"}
    assert "AUTOINCREMENT" in tables["models"] and "AUTOINCREMENT" in tables["variants"]  # ids never reused
    assert stored_rows(old)[:2] == (6 + 3, 6 + 3) and free_pages(old) == 0  # the old tables' space given back
    assert classify(tiny_model_dir, folder, old) == first and calls == before


def test_damaged_entries_of_schema_1_are_left_out_of_the_upgrade(tiny_model_dir, folder, tmp_path, reference, calls):
    # A cache entry that fails its checksum is not worth the whole index: the rest is upgraded and kept, with one
    # warning, and the entry is computed again.
    current, old = tmp_path / "current.db", tmp_path / "old.db"
    classify(tiny_model_dir, folder, current)
    as_schema_1(current, old)
    with sqlite3.connect(old) as con:
        con.execute("UPDATE vectors SET crc = crc + 1 WHERE id = 2")  # an image's row (images come first)
    before = dict(calls)
    result = invoke("classify", folder, "-l", LABELS, "-f", "jsonl", "-m", tiny_model_dir, "--index", old)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == (f"warning: the index {old} had 1 damaged entry (failing its checksum), left out when "
                             "it was upgraded to this clipcli's format\n")
    assert_close(scores(result), reference)
    assert calls["images"] == before["images"] + 1 and calls["texts"] == before["texts"]
    assert classify(tiny_model_dir, folder, old).keys() == reference.keys()  # then a warm run: no warning
    assert calls["images"] == before["images"] + 1


def test_a_damaged_index_of_schema_1_is_not_written_by_the_upgrade(tiny_model_dir, folder, tmp_path, reference):
    current, old = tmp_path / "current.db", tmp_path / "old.db"
    classify(tiny_model_dir, folder, current)
    as_schema_1(current, old)
    before = damage_a_table_page(old, "sqlite_autoindex_models_1")  # a page the upgrade itself does not read
    assert "damaged" in faulty_run(tiny_model_dir, folder, old, reference)
    assert old.read_bytes() == before  # checked whole before the upgrade's first write


def test_an_index_of_schema_1_that_cannot_be_written_is_left_alone(tiny_model_dir, folder, tmp_path, reference,
                                                                   monkeypatch):
    current, old = tmp_path / "current.db", tmp_path / "old.db"
    classify(tiny_model_dir, folder, current)
    as_schema_1(current, old)
    monkeypatch.setattr(index_module, "_writable", lambda path: False)
    before = old.read_bytes()
    assert "older clipcli (schema 1) and cannot be upgraded here (read-only)" in faulty_run(
        tiny_model_dir, folder, old, reference)
    shown = invoke("index", "--index", old)
    assert shown.exit_code == 2 and shown.stderr.endswith("; give --index a file you may write\n"), shown.stderr
    assert old.read_bytes() == before


@pytest.mark.parametrize(("problem", "fix"), [
    (index_module._describe(sqlite3.OperationalError("database or disk is full")), "make room on its disk"),
    (index_module._describe(sqlite3.OperationalError("database is locked")), "once the other clip run is done"),
    (index_module._describe(sqlite3.OperationalError("attempt to write a readonly database")), "a file you may write"),
    (index_module._describe(PermissionError(13, "Permission denied")), "a file you may write"),
    (index_module._describe(sqlite3.DatabaseError("file is not a database")), "the path of a clipcli index"),
    ("is damaged (an entry fails its checksum)", "delete the file"),
    ("was written by a newer clipcli (schema 3, this one reads 2); upgrade clipcli or use another --index", None),
    ("is not a clipcli index (another program's SQLite file); give --index a new file name", None),
    ("was cleared by another run while this one used it", "run it again"),
])
def test_the_index_command_names_the_fix_for_each_problem(problem, fix):
    # `clip index` stops on a problem the other commands only warn about: its one-line error says what to do.
    remedy = index_module.remedy(problem)
    assert remedy == "" if fix is None else (remedy.startswith("; ") and fix in remedy), (problem, remedy)


def test_a_cold_run_leaves_no_free_pages_and_stores_identical_files_once(many_images, tmp_path):
    # Each batch rewrites the newest block with its rows added; the pages of the old copies are given back when the
    # run ends. Two files with the same bytes in one batch are one entry.
    model = make_hf_checkpoint(tmp_path / "wide", projection_dim=512)
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted(many_images.iterdir())[:60]:
        shutil.copy(path, photos)
    shutil.copy(photos / "000.png", photos / "000-again.png")
    index = tmp_path / "index.db"
    run("classify", photos, "-l", LABELS, "-f", "jsonl", "-m", model, "--batch-size", "4", index=index)
    assert free_pages(index) == 0
    assert stored_rows(index)[:2] == (60 + 3, 60 + 3)


def test_index_command_without_an_index_file(tmp_path):
    result = invoke("index", "--index", tmp_path / "nothing.db")
    assert result.exit_code == 2 and "no index" in result.stderr
    assert not (tmp_path / "nothing.db").exists()


@pytest.mark.parametrize("action", [[], ["--prune"], ["--clear"]])
def test_index_command_on_a_file_that_is_not_an_index_is_a_usage_error(tmp_path, action):
    target = tmp_path / "notes.txt"
    target.write_text("my notes\n" * 100)
    result = invoke("index", *action, "--index", target)
    assert result.exit_code == 2 and result.stdout == "", result.stderr
    assert result.stderr.startswith(f"error: the index {target} is damaged or not an index")
    assert len(result.stderr.splitlines()) == 1
    assert target.read_text() == "my notes\n" * 100


# ---------------------------------------------------------------------------------------------------------------
# location and privacy


def test_default_location_is_private_and_no_index_touches_nothing(tiny_model_dir, folder, tmp_path):
    cache = tmp_path / "cache"
    env = {"XDG_CACHE_HOME": str(cache), "CLIP_INDEX": ""}
    result = invoke("classify", folder, "-l", LABELS, "-m", tiny_model_dir, "--no-index", env=env)
    assert result.exit_code == 0 and not cache.exists()
    result = invoke("classify", folder, "-l", LABELS, "-m", tiny_model_dir, env=env)
    assert result.exit_code == 0, result.stderr
    db = cache / "clipcli" / "index.db"
    assert db.is_file()
    assert (cache / "clipcli").stat().st_mode & 0o777 == 0o700
    assert cache.stat().st_mode & 0o777 == 0o700  # every folder the tool creates for it
    assert db.stat().st_mode & 0o777 == 0o600
    before = db.read_bytes()
    result = invoke("classify", folder, "-l", "x,y", "-m", tiny_model_dir, "--no-index", env=env)
    assert result.exit_code == 0 and db.read_bytes() == before
    elsewhere = tmp_path / "elsewhere.db"
    result = invoke("classify", folder, "-l", LABELS, "-m", tiny_model_dir,
                    env={**env, "CLIP_INDEX": str(elsewhere)})
    assert result.exit_code == 0 and elsewhere.is_file() and db.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# interrupted and concurrent runs (real processes)


def index_rows(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT count(*) FROM image_keys").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_sigkill_mid_run_keeps_the_finished_batches_and_a_rerun_completes(tiny_model_dir, many_images, tmp_path):
    db = tmp_path / "index.db"
    args = [*clip_command(), "index", str(many_images), "-m", str(tiny_model_dir), "--index", str(db),
            "--batch-size", "4", "--workers", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clip_env())
    try:
        deadline = time.monotonic() + 60
        while index_rows(db) < 16 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    kept = index_rows(db)
    assert 16 <= kept < 400
    rerun = subprocess.run(args, capture_output=True, text=True, env=clip_env(), timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    new, updated, unchanged, failed = summary(subprocess.CompletedProcess(args, 0, "", rerun.stderr))
    assert (new + unchanged, updated, failed) == (400, 0, 0) and unchanged >= kept  # only the rest was computed
    assert index_rows(db) == 400


def test_an_interrupted_index_run_says_its_work_is_kept(tiny_model_dir, many_images, tmp_path):
    db = tmp_path / "index.db"
    proc = interrupt(["index", many_images, "-m", tiny_model_dir, "--index", db, "--batch-size", "4", "--workers", "1"],
                     signal.SIGINT, lambda pid: index_rows(db) >= 8)
    assert proc.returncode == 130
    assert proc.stderr.decode().splitlines() == ["interrupted; the images indexed so far are kept; run it again to "
                                                 "finish"]
    assert index_rows(db) >= 8


def test_an_interrupt_between_a_transactions_start_and_its_body_leaves_no_traceback(tmp_path, monkeypatch):
    # SIGINT can land after _transaction's generator yielded but before the with body began: __exit__ never runs,
    # the generator is finalised later, after close(). It printed "Exception ignored in: <generator ...>" and a
    # traceback under the one-line message (seen once in CI).
    from clipcli.index import FileRecord, Index

    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    index = Index(tmp_path / "index.db", lambda message: pytest.fail(message))
    left_open = index._transaction()
    left_open.__enter__()  # the interrupt: no __exit__
    index.close()  # what the command's cleanup does
    del left_open
    gc.collect()
    assert unraisable == []
    again = Index(tmp_path / "index.db", lambda message: pytest.fail(message))  # the file is usable, not locked
    try:
        state = os.stat(image)
        again.remember_files([FileRecord(str(image), state, b"d" * 16, time.time_ns() + 10 ** 10)])
        assert again.known_digests([(str(image), state)]) == {str(image): b"d" * 16}
    finally:
        again.close()


def test_two_concurrent_runs_on_one_index_both_complete(tiny_model_dir, many_images, tmp_path):
    db = tmp_path / "index.db"
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    procs = [subprocess.Popen([*clip_command(), "classify", str(many_images), "-l", LABELS, "-f", "jsonl",
                               "-o", str(out), "-m", str(tiny_model_dir), "--index", str(db), "--batch-size", "8"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clip_env()) for out in outs]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0 and b"warning" not in stderr, stderr
    first, second = ({r["path"]: r["scores"] for r in map(json.loads, out.read_text().splitlines())} for out in outs)
    assert len(first) == 400
    assert_close(first, second)
    assert index_rows(db) == 400


# ---------------------------------------------------------------------------------------------------------------
# faults: one warning, a correct run, nothing of the user's lost


@pytest.fixture
def reference(tiny_model_dir, folder) -> dict:
    return classify(tiny_model_dir, folder, None)


def faulty_run(tiny_model_dir, folder, index: Path, reference: dict) -> str:
    result = invoke("classify", folder, "-l", LABELS, "-f", "jsonl", "-m", tiny_model_dir, "--index", index)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert_close(scores(result), reference)
    return one_warning(result.stderr)


@pytest.mark.parametrize("content", [
    pytest.param(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40, id="a-png"),
    pytest.param(b"", id="empty-but-a-folder"),
])
def test_a_file_that_is_not_an_index_is_left_alone(tiny_model_dir, folder, tmp_path, reference, content):
    target = tmp_path / "photo.png"
    if content:
        target.write_bytes(content)
    else:
        target.mkdir()
    line = faulty_run(tiny_model_dir, folder, target, reference)
    assert "damaged or not an index" in line or "is a folder" in line
    if content:
        assert target.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["photo.png", "photos"])  # no -wal/-shm beside it


def test_another_programs_sqlite_file_is_left_alone(tiny_model_dir, folder, tmp_path, reference):
    target = tmp_path / "other.db"
    with sqlite3.connect(target) as con:
        con.execute("CREATE TABLE notes (body TEXT)")
        con.execute("INSERT INTO notes VALUES ('keep me')")
    before = target.read_bytes()
    assert "not a clipcli index" in faulty_run(tiny_model_dir, folder, target, reference)
    assert target.read_bytes() == before


def test_an_empty_sqlite_file_of_another_program_is_left_alone(tiny_model_dir, folder, tmp_path, reference):
    # No tables yet, but a schema version of its own: another program's database, not a blank file to take over.
    target = tmp_path / "other.db"
    with sqlite3.connect(target) as con:
        con.execute("PRAGMA user_version=7")
    before = target.read_bytes()
    assert before and "not a clipcli index" in faulty_run(tiny_model_dir, folder, target, reference)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db", "photos"]


def damage_a_table_page(target: Path, table: str) -> bytes:
    """Overwrite the cell area at the end of `table`'s root page with random bytes (a structural damage that
    PRAGMA quick_check finds); the file's new bytes."""
    with sqlite3.connect(target) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
        root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    data = bytearray(target.read_bytes())
    end = root * page_size
    data[end - 1900:end] = np.random.default_rng(5).integers(0, 256, 1900, dtype=np.uint8).tobytes()
    target.write_bytes(bytes(data))
    with pytest.raises(sqlite3.DatabaseError), sqlite3.connect(target) as con:  # the damage is real
        if con.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("quick_check")
    return bytes(data)


@pytest.mark.parametrize("table", ["files", "folders", "image_keys", "blocks"])
def test_a_damaged_page_is_noticed_before_anything_is_written(tiny_model_dir, folder, tmp_path, reference, table):
    # The run has new images to store: the damage must be noticed when the page is read, before it is written to.
    target = tmp_path / "index.db"
    others = tmp_path / "others"
    others.mkdir()
    photo(30, 30, seed=50).save(others / "q.png")
    classify(tiny_model_dir, others, target)
    before = damage_a_table_page(target, table)
    assert "damaged" in faulty_run(tiny_model_dir, folder, target, reference)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.db", "others", "photos"]


def test_a_read_only_index_is_read_and_never_written(tiny_model_dir, folder, tmp_path, reference, calls,
                                                     monkeypatch):
    # A shared index the user may not write: what it has is used, nothing is written, and no -wal/-shm file is left
    # beside it. (Root may write anything: there, the check of the permission bits is made to say no.)
    shared = tmp_path / "team-index"
    shared.mkdir()
    target = shared / "index.db"
    classify(tiny_model_dir, folder, target)
    target.chmod(0o444)
    if os.geteuid() == 0:
        monkeypatch.setattr(index_module, "_writable", lambda path: False)
    before, computed = target.read_bytes(), calls["images"]
    warm = invoke("classify", folder, "-l", LABELS, "-f", "jsonl", "-m", tiny_model_dir, "--index", target)
    assert warm.exit_code == 0 and warm.stderr == "", warm.stderr
    assert_close(scores(warm), reference)
    assert calls["images"] == computed  # read from the index
    extra = tmp_path / "more"
    shutil.copytree(folder, extra)
    photo(30, 30, seed=50).save(extra / "new.png")  # must be computed, and cannot be stored
    result = invoke("classify", extra, "-l", LABELS, "-f", "jsonl", "-m", tiny_model_dir, "--index", target)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == (f"warning: the index {target} cannot be written (read-only): what it holds is used, but "
                             "this run's new image embeddings are not stored\n")
    assert_close(scores(result), classify(tiny_model_dir, extra, None))
    assert calls["images"] == computed + 1 + 7  # only the new image (then 7 without the index, for the reference)
    assert target.read_bytes() == before
    assert os.listdir(shared) == ["index.db"]
    for action in (["--prune"], ["--clear"], [extra, "-m", tiny_model_dir]):
        refused = invoke("index", *action, "--index", target)
        assert refused.exit_code == 2 and "read-only" in refused.stderr, refused.stderr
    assert target.read_bytes() == before


def test_an_index_from_a_newer_clipcli_is_left_alone(tiny_model_dir, folder, tmp_path, reference):
    target = tmp_path / "index.db"
    classify(tiny_model_dir, folder, target)
    with sqlite3.connect(target) as con:
        con.execute(f"PRAGMA user_version={index_module.SCHEMA_VERSION + 1}")
    before = target.read_bytes()
    assert "newer clipcli" in faulty_run(tiny_model_dir, folder, target, reference)
    assert target.read_bytes() == before


def test_a_damaged_index_gives_a_warning_and_correct_results(tiny_model_dir, folder, tmp_path, reference):
    target = tmp_path / "index.db"
    classify(tiny_model_dir, folder, target)
    with sqlite3.connect(target) as con:  # everything in the main file
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(target.read_bytes())
    with sqlite3.connect(target) as con:
        width, block = con.execute("SELECT width, data FROM blocks LIMIT 1").fetchone()
    vector = block[:width]  # the first row of a block of rows
    at = bytes(data).find(vector)
    assert at > 0
    data[at + 8:at + 12] = b"\x7f\x7f\x7f\x7f"  # one float of a stored vector
    target.write_bytes(bytes(data))
    assert "damaged" in faulty_run(tiny_model_dir, folder, target, reference)


def test_a_damaged_model_record_gives_a_warning_and_correct_results(tiny_model_dir, folder, tmp_path, reference):
    # A warm run takes the model's logit scale from the index: a damaged value that is still valid JSON (a digit
    # changed) must be noticed, not used.
    target = tmp_path / "index.db"
    classify(tiny_model_dir, folder, target)
    with sqlite3.connect(target) as con:
        info = json.loads(con.execute("SELECT info FROM models").fetchone()[0])
        info["logit_scale"] = info["logit_scale"] * 3
        con.execute("UPDATE models SET info = ?", (json.dumps(info, sort_keys=True),))
    assert "damaged" in faulty_run(tiny_model_dir, folder, target, reference)


def test_a_truncated_index_gives_a_warning_and_correct_results(tiny_model_dir, folder, tmp_path, reference):
    target = tmp_path / "index.db"
    classify(tiny_model_dir, folder, target)
    with sqlite3.connect(target) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(target, "r+b") as handle:
        handle.truncate(target.stat().st_size // 2)
    faulty_run(tiny_model_dir, folder, target, reference)


def test_an_unwritable_location_gives_a_warning_and_correct_results(tiny_model_dir, folder, tmp_path, reference):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "cannot be written" in faulty_run(tiny_model_dir, folder, blocker / "index.db", reference)
    if Path("/proc/self").is_dir():  # a read-only place even for root
        faulty_run(tiny_model_dir, folder, Path("/proc/self/clipcli-index.db"), reference)


def test_a_locked_index_gives_a_warning_and_correct_results(tiny_model_dir, folder, tmp_path, reference,
                                                          monkeypatch):
    target = tmp_path / "index.db"
    classify(tiny_model_dir, folder, target)
    monkeypatch.setattr(index_module, "BUSY_TIMEOUT_MS", 200)
    holder = sqlite3.connect(target, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert "locked" in faulty_run(tiny_model_dir, folder, target, reference)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_a_full_disk_gives_a_warning_and_correct_results(tiny_model_dir, many_images, tmp_path):
    # No file may grow past 200 kB, as on a full disk: the index's write-ahead log hits that after a few batches (the
    # whole run's would be about 400 kB), so its writes fail part-way through the run.
    import resource

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    target = tmp_path / "index.db"
    subset = tmp_path / "subset"
    subset.mkdir()
    for path in sorted(many_images.iterdir())[:120]:
        shutil.copy(path, subset)
    args = ["classify", str(subset), "-l", LABELS, "-f", "jsonl", "-m", str(tiny_model_dir), "--batch-size", "8"]
    full = subprocess.run([*clip_command(), *args, "--index", str(target)], capture_output=True, text=True,
                          env=clip_env(), preexec_fn=limit_file_size, timeout=120)
    assert full.returncode == 0, full.stderr
    assert "disk is full" in one_warning(full.stderr) or "cannot be used" in one_warning(full.stderr)
    plain = subprocess.run([*clip_command(), *args, "--no-index"], capture_output=True, text=True, env=clip_env(),
                           timeout=120)
    assert_close({r["path"]: r["scores"] for r in map(json.loads, full.stdout.splitlines())},
                 {r["path"]: r["scores"] for r in map(json.loads, plain.stdout.splitlines())})


# ---------------------------------------------------------------------------------------------------------------
# found by a black-box pass (stop 21): each test fails on the code before its fix


def test_a_clear_during_a_run_never_gives_another_model_its_rows(tmp_path):
    # A run keeps the model and variant ids it has read. Before: `clip index --clear` beside it removed them, the run
    # went on storing rows under them, and the next model recorded got the same ids and was served those rows.
    from clipcli.index import Index, Variant

    db = tmp_path / "index.db"
    one, two = Variant("one", "fp32", False), Variant("two", "fp32", False)
    row = np.ones(4, dtype=np.float32) / 2
    warnings: list[str] = []
    writer, reader = Index(db, warnings.append), Index(db, lambda message: pytest.fail(message))
    try:
        writer.add_model("one", "m1", {"projection_dim": 4})
        writer.add_image_features(one, [(b"a" * 16, row, 100)])
        assert b"a" * 16 in reader.image_features(one, [b"a" * 16])  # the reader has read one's ids
        cleared = Index(db, lambda message: pytest.fail(message))
        assert cleared.clear()
        cleared.close()
        writer.add_image_features(one, [(b"b" * 16, row, 100)])  # the run's next batch
        assert warnings == [f"the index {db} was cleared by another run while this one used it; this run goes on "
                            "without it"]
        second = Index(db, lambda message: pytest.fail(message))
        second.add_model("two", "m2", {"projection_dim": 4})
        second.add_image_features(two, [(b"c" * 16, -row, 100)])
        second.close()
        assert len(reader.image_features(one, [b"a" * 16, b"b" * 16, b"c" * 16])) == 0  # two's rows: not one's
        check = Index(db, lambda message: pytest.fail(message))
        assert len(check.image_features(two, [b"a" * 16, b"b" * 16])) == 0
        np.testing.assert_array_equal(check.image_features(two, [b"c" * 16])[b"c" * 16][0], -row)
        check.close()
    finally:
        writer.close()
        reader.close()
    assert stored_rows(db)[:2] == (1, 1)  # nothing was stored under the cleared ids


def test_a_running_index_command_whose_index_is_cleared_stops_with_one_error(tiny_model_dir, folder, tmp_path,
                                                                            monkeypatch):
    db = tmp_path / "index.db"
    add = index_module.Index.add_image_features
    done = []

    def clear_after_the_first_batch(self, *args, **kwargs):
        add(self, *args, **kwargs)
        if not done:
            done.append(True)
            other = index_module.Index(db, lambda message: pytest.fail(message))
            other.clear()
            other.close()

    monkeypatch.setattr(index_module.Index, "add_image_features", clear_after_the_first_batch)
    result = run("index", folder, "-m", tiny_model_dir, "--batch-size", "2", index=db, expect=2)
    assert result.stderr == (f"error: the index {db} was cleared by another run while this one used it; run it "
                             "again\n")


def test_an_index_command_whose_index_fails_part_way_stops_with_one_error(tiny_model_dir, folder, tmp_path,
                                                                         monkeypatch):
    # Before: one warning that the run "goes on without it", then a summary counting every image as indexed, exit 0.
    db = tmp_path / "index.db"
    append, batches = index_module._append_rows, []

    def disk_full_at_the_second_batch(con, rows, *args, **kwargs):
        batches.append(len(rows))
        if len(batches) == 2:
            raise sqlite3.OperationalError("database or disk is full")
        return append(con, rows, *args, **kwargs)

    monkeypatch.setattr(index_module, "_append_rows", disk_full_at_the_second_batch)
    result = run("index", folder, "-m", tiny_model_dir, "--batch-size", "2", index=db, expect=2)
    assert result.stderr == (f"error: the index {db} cannot grow: the disk is full (database or disk is full); make "
                             "room on its disk and run it again; the images indexed before that are kept\n")
    assert len(batches) == 2  # the work stopped there: nothing more could be stored
    monkeypatch.setattr(index_module, "_append_rows", append)
    assert summary(run("index", folder, "-m", tiny_model_dir, index=db)) == (4, 0, 2, 0)


@pytest.mark.parametrize("kind", ["not-sqlite", "folder"])
def test_index_command_with_paths_on_an_unusable_index_says_one_line(tiny_model_dir, folder, tmp_path, kind):
    # Before: a warning that the run "goes on without it" (it did not), then the error.
    target = tmp_path / "notes.txt"
    if kind == "folder":
        target.mkdir()
    else:
        target.write_text("my notes\n" * 100)
    result = invoke("index", folder, "-m", tiny_model_dir, "--index", target)
    assert result.exit_code == 2 and result.stdout == ""
    problem = "is a folder" if kind == "folder" else "is damaged or not an index"
    assert result.stderr.startswith(f"error: the index {target} {problem}"), result.stderr
    assert result.stderr.endswith("; nothing was indexed\n") and len(result.stderr.splitlines()) == 1


def test_an_index_behind_a_symbolic_link_not_made_yet_is_created_there(tiny_model_dir, folder, tmp_path):
    # Before: the dangling link was taken for an unwritable index; an empty 0644 file was left at its target.
    link, real = tmp_path / "link.db", tmp_path / "store" / "real.db"
    real.parent.mkdir()
    link.symlink_to(real)
    assert summary(run("index", folder, "-m", tiny_model_dir, index=link)) == (6, 0, 0, 0)
    assert link.is_symlink() and stat.S_IMODE(real.stat().st_mode) == 0o600
    assert summary(run("index", folder, "-m", tiny_model_dir, index=link)) == (0, 0, 6, 0)
    shown = run("index", index=link).stdout
    assert "6 images" in shown and f"{real.stat().st_size / 1e6:.1f} MB" in shown


def test_prune_forgets_a_file_whose_path_is_now_a_folder(tiny_model_dir, folder, tmp_path):
    db = tmp_path / "index.db"
    run("index", folder, "-m", tiny_model_dir, index=db)
    (folder / "p0.png").unlink()
    (folder / "p0.png").mkdir()
    pruned = run("index", "--prune", index=db)
    assert "1 file(s) that are gone, 1 embedding(s)" in pruned.stderr
    assert "5 images" in run("index", index=db).stdout


def test_one_file_given_under_two_spellings_is_known_under_both(tiny_model_dir, folder, tmp_path, monkeypatch,
                                                                calls):
    # Before: the stat memo looked up one spelling only, so the other was read and hashed again, and counted new, on
    # every run.
    monkeypatch.chdir(folder)
    monkeypatch.setattr(index_module, "RACY_NS", 0)  # files made a moment ago are "racy" (re-read) otherwise
    assert summary(run("index", "p0.png", "./p0.png", "-m", tiny_model_dir, index=tmp_path / "index.db")) == \
        (2, 0, 0, 0)
    reads = []
    digest = index_module.content_digest
    monkeypatch.setattr(pipeline_module, "content_digest", lambda data: reads.append(1) or digest(data))
    again = run("index", "p0.png", "./p0.png", ".", "-m", tiny_model_dir, index=tmp_path / "index.db")
    assert summary(again) == (5, 0, 2, 0) and model_runs(again) == 5
    assert len(reads) == 5 and calls["images"] == 1 + 5


def test_damage_in_a_unique_index_is_found_before_anything_is_written(tiny_model_dir, folder, tmp_path, reference):
    # One character of the models' UNIQUE index changed: PRAGMA quick_check passes it; a run then stored the model a
    # second time and computed every image again. integrity_check finds it.
    db = tmp_path / "index.db"
    run("index", folder, "-m", tiny_model_dir, index=db)
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_models_1'").fetchone()[0]
        fingerprint = con.execute("SELECT fingerprint FROM models").fetchone()[0].encode()
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
    data = bytearray(db.read_bytes())
    at = data.find(fingerprint, (root - 1) * page_size, root * page_size)
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    db.write_bytes(bytes(data))
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    others = tmp_path / "others"
    others.mkdir()
    photo(30, 30, seed=50).save(others / "q.png")
    result = invoke("index", others, "-m", tiny_model_dir, "--index", db)
    assert result.exit_code == 2, result.stderr
    assert result.stderr == (f"error: the index {db} is damaged (row 1 missing from index sqlite_autoindex_models_1); "
                             "delete the file (it holds only what clipcli can compute again); nothing was indexed\n")
    assert db.read_bytes() == bytes(data)
    shown = invoke("index", "--index", db)  # showing what it holds checks it too
    assert shown.exit_code == 2 and shown.stdout == "" and "is damaged (row 1 missing" in shown.stderr
    assert "damaged" in faulty_run(tiny_model_dir, folder, db, reference)
    assert db.read_bytes() == bytes(data)


def test_copies_in_one_batch_go_through_the_model_once(tiny_model_dir, folder, tmp_path, calls, reference):
    for n in range(3):
        shutil.copy(folder / "p0.png", folder / f"copy{n}.png")
    result = scores(run("classify", folder, "-l", LABELS, "-f", "jsonl", "-m", tiny_model_dir, index=tmp_path / "i.db"))
    assert calls["images"] == 6 + 6  # the reference's 6 without the index, then 6 distinct contents
    assert all(result[str(folder / f"copy{n}.png")] == result[str(folder / "p0.png")] for n in range(3))
    assert_close({path: row for path, row in result.items() if "copy" not in path}, reference)
