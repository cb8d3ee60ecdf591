"""Hostile inputs for `clip`: an adversarial corpus built here (never committed binaries), damaged checkpoints,
random bytes and random labels, interruption and unwritable outputs. The rule under test (cli-contract.md): no
traceback; a bad input is named on stderr as `path: reason` and left out, the rest is processed, exit 1; a bad
setup is one `error: ...` line, exit 2, before any work."""

from __future__ import annotations

import builtins
import csv
import errno
import functools
import io
import json
import os
import shutil
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import photo
from tests.test_cli import (
    assert_usage_error,
    interrupt,
    invoke,
    needs_proc,
    reading_images_in,
    run_clip,
    temp_files,
)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def shown(path: str) -> str:
    """How `clip` prints a path on stderr: non-UTF-8 bytes as \\xNN, line breaks and control characters escaped."""
    text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    for char, escaped in [("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"), ("\x1b", "\\x1b"), ("\u2028", "\\u2028")]:
        text = text.replace(char, escaped)
    return text


def in_json(path: str) -> str:
    """How `clip` gives a path in json/jsonl/csv: as found, non-UTF-8 bytes as \\xNN (JSON escapes the rest)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def in_sidecar(path: str) -> str:
    """A line of emb.paths.txt read back with surrogateescape: the name's bytes, line breaks escaped (\\n)."""
    return path.replace("\r", "\\r").replace("\n", "\\n").replace("\u2028", "\\u2028")


def split_rows(stdout: str) -> tuple[list[dict], dict[str, str]]:
    """jsonl output -> (the rows of images read, {path: error} of the failure rows); every row in one sorted path
    order, failures between the others (paths as shown compare like the names they escape here)."""
    rows = [json.loads(line) for line in stdout.splitlines()]
    failed = {r["path"]: r["error"] for r in rows if "error" in r}
    assert all(set(r) == {"path", "error"} for r in rows if "error" in r), rows
    assert len(failed) == sum("error" in r for r in rows)
    return [r for r in rows if "error" not in r], failed


def stderr_failures(stderr: str, expected: list[str]) -> dict[str, str]:
    """Check stderr is one `path: reason` line per expected (shown) path, then the summary; {path: reason}."""
    lines = stderr.splitlines()
    assert "Traceback" not in stderr, stderr
    assert lines[-1] == f"{len(expected)} input(s) failed; the others were processed", stderr
    failures = {}
    for line in lines[:-1]:
        path = max((p for p in expected if line.startswith(p + ": ")), key=len, default=None)
        assert path is not None and path not in failures, (line, expected)
        failures[path] = line[len(path) + 2:]
        assert failures[path].strip(), line  # a reason is given
    assert set(failures) == set(expected), stderr
    return failures


# ---------------------------------------------------------------------------------------------------------------
# the adversarial corpus


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header claims width x height pixels (Pillow refuses it before decoding)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def encoded(image: Image.Image | list[Image.Image], fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    if isinstance(image, list):
        image[0].save(buffer, fmt, save_all=True, append_images=image[1:], duration=40, **options)
    else:
        image.save(buffer, fmt, **options)
    return buffer.getvalue()


JPG = encoded(photo(48, 40, 1), "JPEG", quality=90)
PNG = encoded(photo(40, 48, 2), "PNG")
WEBP = encoded(photo(40, 40, 3), "WEBP")


class Corpus:
    """Good and bad inputs in one folder; `bad` maps each bad path to a fragment its reason must contain."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.good: list[str] = []
        self.bad: dict[str, str] = {}
        frames = [photo(32, 32, seed) for seed in range(3)]
        for name, data in [
            ("good.jpg", JPG), ("good.png", PNG), ("good.webp", WEBP), ("UPPER.JPG", JPG),
            ("png-named.jpg", PNG),  # wrong extension, real image: works
            ("with space.png", PNG), ("new\nline.png", PNG), ("ünï €  ✓.jpg", JPG), ("para\u2028sep.png", PNG),
            ("[bold]rich[/] markup.png", PNG),
            ("tiny.png", encoded(photo(1, 1, 4), "PNG")), ("wide.png", encoded(photo(20000, 20, 5), "PNG")),
            ("anim.gif", encoded(frames, "GIF", loop=0)), ("anim.webp", encoded(frames, "WEBP")),
            ("x.jpg/inner.png", PNG),  # a directory named like an image is walked as a folder
        ]:
            self.add_good(name, data)
        for name, data, reason in [
            ("zero.jpg", b"", "empty"),
            ("trunc.jpg", JPG[: len(JPG) // 2], ""), ("trunc.png", PNG[: len(PNG) // 2], ""),
            ("trunc.webp", WEBP[: len(WEBP) // 2], ""),
            ("text.png", b"just some text, not an image\n" * 20, "not an image"),
            ("crc.png", PNG[:29] + bytes(b ^ 0xFF for b in PNG[29:33]) + PNG[33:], ""),  # IHDR checksum broken
            ("bomb.png", bomb_png(100_000, 100_000), "too large"),  # beyond 2x Pillow's limit: an error there
            ("bomb-warn.png", bomb_png(10_000, 10_000), "too large"),  # between 1x and 2x: only a warning there
            ("bad\nname.png", b"text\n", "not an image"),
            ("esc\x1b[31m.png", b"", "empty"), ("tab\tand\u2028sep.jpg", b"", "empty"),
        ]:
            self.add_bad(name, data, reason)
        os.symlink("good.png", root / "link.png")
        self.good.append(str(root / "link.png"))
        os.symlink("nowhere.jpg", root / "broken.jpg")
        self.bad[str(root / "broken.jpg")] = "symbolic link"
        os.symlink("selfloop.jpg", root / "selfloop.jpg")
        self.bad[str(root / "selfloop.jpg")] = "symbolic link"
        os.symlink(".", root / "loop")  # a folder loop: walked once, no error
        (root / ".hidden.jpg").write_bytes(b"")  # hidden: skipped, not a failure
        (root / "notes.txt").write_text("not an image extension: ignored")
        if hasattr(os, "mkfifo"):
            os.mkfifo(root / "fifo.png")  # opening it would block: must be refused without opening
            self.bad[str(root / "fifo.png")] = "regular file"
        try:  # non-UTF-8 names (bytes paths); some file systems refuse them
            self.add_good(os.fsdecode(b"caf\xe9.png"), PNG)
            self.add_bad(os.fsdecode(b"bad\xff.jpg"), b"", "empty")
        except (OSError, UnicodeError):
            pass
        self.good.sort()

    def add_good(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        self.good.append(str(path))

    def add_bad(self, name: str, data: bytes, reason: str) -> None:
        (self.root / name).write_bytes(data)
        self.bad[str(self.root / name)] = reason

    def check_failures(self, stderr: str) -> None:
        failures = stderr_failures(stderr, [shown(p) for p in self.bad])
        for path, fragment in self.bad.items():
            assert fragment in failures[shown(path)], (path, failures[shown(path)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("corpus"))


def test_classify_corpus_as_a_real_process(tiny_model_dir, corpus):
    proc = run_clip("classify", corpus.root, "-l", "cat,dog", "-f", "jsonl", "-m", tiny_model_dir)
    assert proc.returncode == 1, proc.stderr
    stderr = proc.stderr.decode("utf-8")
    corpus.check_failures(stderr)
    all_rows = [json.loads(line)["path"] for line in proc.stdout.decode("utf-8").splitlines()]
    assert all_rows == [in_json(p) for p in sorted([*corpus.good, *corpus.bad])]  # every input has a row, sorted
    rows, failed = split_rows(proc.stdout.decode("utf-8"))
    assert [r["path"] for r in rows] == [in_json(p) for p in corpus.good]  # every good image, sorted
    # A failure row carries the reason stderr gives.
    assert {shown(p): failed[in_json(p)] for p in corpus.bad} == stderr_failures(stderr, [shown(p) for p in corpus.bad])
    for r in rows:
        assert set(r["scores"]) == {"cat", "dog"} and sum(r["scores"].values()) == pytest.approx(1, abs=1e-5)


def test_embed_corpus(tiny_model_dir, corpus, tmp_path):
    npy = tmp_path / "emb.npy"
    result = invoke("embed", corpus.root, "-o", npy, "-m", tiny_model_dir)
    assert result.exit_code == 1, (result.stderr, result.exception)
    assert result.stdout == ""
    wrote, *failures = result.stderr.splitlines(keepends=True)
    assert wrote.startswith(f"wrote {len(corpus.good)} x 16 embeddings to {npy} ")  # first, then the failures
    corpus.check_failures("".join(failures))
    rows = np.load(npy)
    names = (tmp_path / "emb.paths.txt").read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    assert names == [in_sidecar(p) for p in corpus.good]  # one line per row, non-UTF-8 bytes kept
    assert rows.shape == (len(corpus.good), 16) and np.isfinite(rows).all()
    np.testing.assert_allclose(np.linalg.norm(rows, axis=-1), 1, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["emb.meta.json", "emb.npy", "emb.paths.txt"]


def test_classify_corpus_table_and_csv(tiny_model_dir, corpus):
    for fmt in ("table", "csv"):
        result = invoke("classify", corpus.root, "-l", "cat,dog", "-f", fmt, "-m", tiny_model_dir)
        assert result.exit_code == 1, (result.stderr, result.exception)
        corpus.check_failures(result.stderr)
        if fmt == "csv":
            rows = list(csv.reader(io.StringIO(result.stdout)))
            assert rows[0] == ["path", "label", "score", "cat", "dog", "error"]
            assert [row[0] for row in rows[1:]] == [in_json(p) for p in sorted([*corpus.good, *corpus.bad])]
            assert [row[0] for row in rows[1:] if row[-1] == ""] == [in_json(p) for p in corpus.good]
            for row in rows[1:]:  # a failure has only its path and reason; an image read has no error
                assert (row[1:-1] == ["", "", "", ""]) == (row[-1] != "")
        else:
            assert result.stdout.count("%") == 2 * len(corpus.good)  # two labels shown for each good image


def test_bad_files_named_explicitly(tiny_model_dir, corpus):
    # Given on the command line, a file is tried whatever its extension; a folder named like an image is walked.
    text_as_png, png_as_jpg = corpus.root / "text.png", corpus.root / "png-named.jpg"
    result = invoke("classify", text_as_png, png_as_jpg, corpus.root / "x.jpg", "-l", "cat,dog", "-f", "jsonl",
                    "-m", tiny_model_dir)
    assert result.exit_code == 1, (result.stderr, result.exception)
    assert stderr_failures(result.stderr, [str(text_as_png)]) == {str(text_as_png): "not an image file"}
    rows, failed = split_rows(result.stdout)
    assert [r["path"] for r in rows] == [str(png_as_jpg), str(corpus.root / "x.jpg" / "inner.png")]
    assert failed == {str(text_as_png): "not an image file"}


def test_unreadable_file(tiny_model_dir, tmp_path, monkeypatch):
    good, locked = tmp_path / "good.png", tmp_path / "locked.png"
    good.write_bytes(PNG)
    locked.write_bytes(PNG)
    if IS_ROOT:
        # root reads any file whatever its mode: simulate the permission error the kernel would give anyone else.
        real_open = builtins.open

        def guarded_open(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and os.fsdecode(file) == str(locked):
                raise PermissionError(errno.EACCES, "Permission denied", str(locked))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
    else:
        locked.chmod(0)
    result = invoke("classify", tmp_path, "-l", "cat,dog", "-f", "jsonl", "-m", tiny_model_dir)
    assert result.exit_code == 1, (result.stderr, result.exception)
    assert stderr_failures(result.stderr, [str(locked)]) == {str(locked): "permission denied"}
    second = json.loads(result.stdout.splitlines()[1])
    assert second == {"path": str(locked), "error": "permission denied"}
    assert [r["path"] for r in split_rows(result.stdout)[0]] == [str(good)]


def test_tree_deeper_than_the_recursion_limit(tiny_model_dir, tmp_path):
    folders = [str(tmp_path / "deep")]
    for _ in range(1100):  # beyond Python's default recursion limit of 1000
        folders.append(folders[-1] + "/d")
    try:
        for folder in folders:
            os.mkdir(folder)
        Path(folders[-1], "deepest.png").write_bytes(PNG)
        result = invoke("classify", folders[0], "-l", "cat,dog", "-f", "jsonl", "-m", tiny_model_dir)
    finally:  # bottom-up: shutil.rmtree (and so pytest's cleanup) recurses and would fail on this tree
        Path(folders[-1], "deepest.png").unlink(missing_ok=True)
        for folder in reversed(folders):
            if os.path.isdir(folder):
                os.rmdir(folder)
    assert result.exit_code == 0, (result.stderr[-500:], result.exception)
    assert result.stderr == ""
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == [f"{folders[-1]}/deepest.png"]


def test_unreadable_folder_is_named(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "ok.png").write_bytes(PNG)
    closed = tmp_path / "closed"
    closed.mkdir()
    (closed / "inside.png").write_bytes(PNG)
    if IS_ROOT:
        real_scandir = os.scandir

        def guarded_scandir(path="."):
            if os.fsdecode(path) == str(closed):
                raise PermissionError(errno.EACCES, "Permission denied", str(closed))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", guarded_scandir)
    else:
        closed.chmod(0)
    try:
        result = invoke("classify", tmp_path, "-l", "cat,dog", "-f", "jsonl", "-m", tiny_model_dir)
    finally:
        closed.chmod(0o755)
    assert result.exit_code == 1, (result.stderr, result.exception)
    assert stderr_failures(result.stderr, [str(closed)]) == {str(closed): "permission denied"}
    # The folder the walk could not list has its row too, in path order.
    first = json.loads(result.stdout.splitlines()[0])
    assert first == {"path": str(closed), "error": "permission denied"}
    assert [r["path"] for r in split_rows(result.stdout)[0]] == [str(tmp_path / "ok.png")]


# ---------------------------------------------------------------------------------------------------------------
# properties: random bytes as an image, random label lists


@pytest.fixture(scope="module")
def loaded_once(tiny_model_dir):
    """Load the tiny model once for the property tests (they are about inputs, not loading)."""
    from clipcli import loader

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loader, "load_files", functools.cache(loader.load_files))
        yield tiny_model_dir


HEADERS = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"RIFF\0\0\0\0WEBPVP8 ", b"BM", b"II*\0"]
random_files = st.one_of(
    st.builds(bytes.__add__, st.sampled_from(HEADERS), st.binary(max_size=300)),
    st.builds(lambda data, cut: data[:cut], st.sampled_from([PNG, JPG, WEBP]), st.integers(0, 2000)),
    st.builds(lambda data, at, value: data[:at] + bytes([value]) + data[at + 1:],
              st.sampled_from([PNG, JPG, WEBP]), st.integers(0, 600), st.integers(0, 255)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=random_files, ext=st.sampled_from(["png", "jpg", "webp", "gif"]))
def test_random_bytes_as_an_image(loaded_once, tmp_path_factory, data, ext):
    folder = tmp_path_factory.mktemp("random")
    good, odd = folder / "good.png", folder / f"odd.{ext}"
    good.write_bytes(PNG)
    odd.write_bytes(data)
    result = invoke("classify", folder, "-l", "cat,dog", "-f", "jsonl", "-m", loaded_once)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    rows, failed = split_rows(result.stdout)
    paths = [r["path"] for r in rows]
    if result.exit_code == 0:
        assert result.stderr == ""
        assert paths == [str(good), str(odd)] and failed == {}
    else:
        assert result.exit_code == 1, result.stderr
        assert failed == stderr_failures(result.stderr, [str(odd)])  # the row's reason is stderr's
        assert paths == [str(good)]


label_items = st.one_of(st.sampled_from(["cat", "dog", " cat ", "", " ", "\t", "猫", "a b", "{}", "é", "x,y",
                                         "a\u2028b", "x\x85y", "\x00", "😀"]),
                        st.text(max_size=6))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(label_items, max_size=6))
def test_random_label_lists(loaded_once, image_folder, items):
    given_labels = ",".join(items)
    result = invoke("classify", image_folder / "a.jpg", f"--labels={given_labels}", "-f", "jsonl", "-m", loaded_once)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    labels = [item.strip() for item in given_labels.split(",") if item.strip()]
    if not labels:
        assert_usage_error(result, "no labels")
    elif len(set(labels)) < len(labels):
        assert_usage_error(result, "twice")
    else:
        assert result.exit_code == 0, (result.stderr, result.exception)
        if len(labels) == 1:  # with one label every image scores 100%: said in one warning line
            assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("warning: "), result.stderr
        else:
            assert result.stderr == ""
        (row,) = [json.loads(line) for line in result.stdout.splitlines()]
        assert list(row["scores"]) == labels  # as given, stripped, in order
        assert row["label"] in labels and sum(row["scores"].values()) == pytest.approx(1, abs=1e-5)


def test_label_longer_than_the_context_warns_once(tiny_model_dir, image_folder):
    long_label = " ".join(["word"] * 100)  # 100 tokens > 77
    result = invoke("classify", image_folder / "a.jpg", "-l", f"cat,{long_label}", "-t", "a photo of a {}.",
                    "-t", "a drawing of a {}.", "-f", "jsonl", "-m", tiny_model_dir)
    assert result.exit_code == 0, (result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # one line per label, however many templates it is truncated in
    assert lines[0].startswith(f"warning: label '{long_label}'") and "truncated" in lines[0] and "77" in lines[0]
    (row,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert list(row["scores"]) == ["cat", long_label]


# ---------------------------------------------------------------------------------------------------------------
# damaged checkpoints: exit 2, exactly one line


class Evil:
    """A pickle that runs a shell command when loaded; torch.load(weights_only=True) must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_config(directory: Path, **vision) -> None:
    config = json.loads((directory / "config.json").read_text())
    config["vision_config"].update(vision)
    (directory / "config.json").write_text(json.dumps(config))


def _pickle_with_code(directory: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(directory / "model.safetensors")
    state["evil"] = Evil(directory.parent / "PWNED")
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()


DAMAGE = {
    "truncated-safetensors": (lambda d: _truncate(d / "model.safetensors"), ["model.safetensors"]),
    "empty-safetensors": (lambda d: (d / "model.safetensors").write_bytes(b""), ["model.safetensors"]),
    "config-missing": (lambda d: (d / "config.json").unlink(), ["config.json"]),
    "config-invalid-json": (lambda d: (d / "config.json").write_text('{"text_config": {'), ["config.json", "JSON"]),
    "config-not-an-object": (lambda d: (d / "config.json").write_text("[1, 2]"), ["config.json"]),
    "wrong-shapes": (lambda d: _edit_config(d, hidden_size=64, intermediate_size=128), ["shape"]),
    "weights-missing": (lambda d: (d / "model.safetensors").unlink(), ["model.safetensors"]),
    "tokenizer-invalid-json": (lambda d: (d / "tokenizer.json").write_text('{"model": '), ["tokenizer.json"]),
    "pickle-with-code": (_pickle_with_code, ["pytorch_model.bin"]),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_is_one_line(tiny_model_dir, image_folder, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    make_damage, fragments = DAMAGE[damage]
    make_damage(model)
    out = tmp_path / "out.jsonl"
    assert_usage_error(invoke("classify", image_folder, "-l", "cat,dog", "-o", out, "-m", model), *fragments)
    assert not (tmp_path / "PWNED").exists()  # the pickle's code never ran
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no output, no temp file


# ---------------------------------------------------------------------------------------------------------------
# outputs: unwritable, interrupted


def unwritable_folder(tmp_path: Path) -> Path:
    if not IS_ROOT:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    if Path("/proc/self").is_dir():
        return Path("/proc")  # root may write anywhere its mode allows, but never create files in /proc
    pytest.skip("running as root without /proc: no folder is unwritable")


@pytest.mark.parametrize("command", ["classify", "embed"])
@pytest.mark.parametrize("where, fragments", [
    ("missing", ["does not exist"]),
    ("under-a-file", ["not a folder"]),
    ("unwritable", ["not writable"]),
])
def test_output_that_cannot_be_written_fails_before_any_work(image_folder, tmp_path, command, where, fragments):
    (tmp_path / "a-file").write_text("x")
    folder = {"missing": tmp_path / "missing", "under-a-file": tmp_path / "a-file",
              "unwritable": unwritable_folder(tmp_path) if where == "unwritable" else None}[where]
    target = folder / ("out.npy" if command == "embed" else "out.jsonl")
    extra = ["-l", "cat,dog"] if command == "classify" else []
    # The model does not exist either: the output is checked first, before anything is loaded or read.
    line = assert_usage_error(invoke(command, image_folder, *extra, "-o", target, "-m", tmp_path / "no-model"),
                              str(folder), *fragments)
    assert "no-model" not in line
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "read-only") == ["a-file"]


@needs_proc
@pytest.mark.parametrize("signum, code, old_output", [
    pytest.param(signal.SIGINT, 130, False, id="sigint-writes-nothing"),
    pytest.param(signal.SIGTERM, 143, True, id="sigterm-keeps-old-file"),
])
def test_interrupted_classify_writes_nothing(tiny_model_dir, many_images, tmp_path, signum, code, old_output):
    out = tmp_path / "out.jsonl"
    if old_output:
        out.write_text("old results\n")
    proc = interrupt(["classify", many_images, "-l", "cat,dog", "-f", "jsonl", "-o", out, "--batch-size", "1",
                      "--workers", "1", "--no-index", "-m", tiny_model_dir], signum,
                     reading_images_in(many_images, out))
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == b""
    word = "interrupted" if signum == signal.SIGINT else "terminated"
    assert proc.stderr.decode().splitlines() == [f"{word}; no output was written"]
    assert temp_files(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == (["out.jsonl"] if old_output else [])
    if old_output:
        assert out.read_text() == "old results\n"
