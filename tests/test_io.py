"""Inputs and outputs as people use them (cli-contract.md: "Output files and streams", "`clip embed`", "Inputs",
"Models: names people use"): formats chosen by -o's extension, rows streamed per batch with failure rows, the
terminal-aware table, .npy/.parquet embeddings with their metadata, --files-from/--exclude/--max-megapixels,
HEIC/AVIF, model aliases and `clip models`, `clip info --json`, help and error wording, shell completion and the
`clipcli` script. Through Typer's CliRunner, or the installed command where a process, a pipe or a terminal
matters."""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import assert_usage_error, photo
from tests.test_cli import (
    assert_click_usage_error,
    clip_command,
    clip_env,
    invoke,
    load_embeddings,
)

LABELS = "cat,dog,red car,rocket ship,a bowl of fruit"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def needs_installed(script: str = "clip") -> Path:
    path = Path(sys.executable).with_name(script)
    if not path.exists():
        pytest.skip(f"no `{script}` script beside {sys.executable}; install the package (pip install -e .)")
    return path


def ok(result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stderr, result.exception)
    return result.stdout


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture()
def pixel_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """--max-megapixels sets Pillow's limit process-wide: put it back after an in-process run."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


# ---------------------------------------------------------------------------------------------------------------
# output files: the extension picks the format


@pytest.mark.parametrize("name, fmt", [("r.json", "json"), ("r.jsonl", "jsonl"), ("r.ndjson", "jsonl"),
                                       ("R.CSV", "csv"), ("r.txt", "table"), ("results", "table")])
def test_output_extension_picks_the_format(tiny_model_dir, image_folder, tmp_path, name, fmt):
    args = ("classify", image_folder, "-l", "cat,dog", "-m", tiny_model_dir)
    target = tmp_path / name
    result = invoke(*args, "-o", target)
    assert ok(result) == "" and result.stderr == ""
    assert target.read_text(encoding="utf-8") == ok(invoke(*args, "-f", fmt))  # as --format writes it to a pipe
    assert sorted(os.listdir(tmp_path)) == [name]


def test_explicit_format_must_agree_with_the_extension(tiny_model_dir, image_folder, tmp_path):
    args = ("classify", image_folder, "-l", "cat,dog", "-m", tiny_model_dir)
    assert_usage_error(invoke(*args, "-o", tmp_path / "r.json", "-f", "csv"), "--format 'csv'", "r.json",
                       "json file")
    assert_usage_error(invoke(*args, "-o", tmp_path / "r.csv", "-f", "table"), "--format 'table'", "r.csv")
    assert os.listdir(tmp_path) == []
    # No contradiction: the same format, a name with no format of its own, or stdout.
    assert ok(invoke(*args, "-o", tmp_path / "r.json", "-f", "json")) == ""
    assert ok(invoke(*args, "-o", tmp_path / "r.txt", "-f", "csv")) == ""
    assert (tmp_path / "r.txt").read_text().startswith("path,label,score,cat,dog,error\n")
    assert ok(invoke(*args, "-o", "-", "-f", "jsonl")).count("\n") == 4


def test_html_extension_writes_the_report(tiny_model_dir, image_folder, tmp_path):
    # report.py makes the page (tested in test_report.py); here: -o NAME.html reaches it, and only it.
    report = tmp_path / "r.html"
    result = invoke("classify", image_folder, "-l", "cat,dog", "-m", tiny_model_dir, "-o", report)
    assert ok(result) == "" and result.stderr == ""
    page = report.read_text(encoding="utf-8")
    assert page.lstrip().lower().startswith("<!doctype html") and "a.jpg" in page
    assert_usage_error(invoke("classify", image_folder, "-l", "cat,dog", "-m", tiny_model_dir, "-o",
                              tmp_path / "r2.html", "-f", "json"), "--format 'json'", "r2.html", "html file")
    assert sorted(os.listdir(tmp_path)) == ["r.html"]


def test_json_is_streamed_exactly_as_one_dump(tiny_model_dir, image_folder, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(image_folder, folder)
    (folder / "bad.png").write_bytes(b"nope")
    result = invoke("classify", folder, "-l", "cat,dog", "-f", "json", "-m", tiny_model_dir, "--batch-size", "1",
                    "--no-index")
    assert result.exit_code == 1
    rows = json.loads(result.stdout)
    assert result.stdout == json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert {"path": str(folder / "bad.png"), "error": "not an image file"} in rows
    assert ok(invoke("classify", tmp_path / "in" / "sub", "--exclude", "*", "-l", "cat", "-f", "json", "-m",
                     tiny_model_dir)) == "[]\n"


def test_failure_rows_in_every_machine_format(tiny_model_dir, image_folder, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(image_folder, folder)
    (folder / "b2.png").write_bytes(b"")
    os.symlink("nowhere.png", folder / "sub" / "broken.png")  # a failure of the walk, not of decoding
    args = ("classify", folder, "-l", "cat,dog", "-m", tiny_model_dir)
    expected = [str(folder / "a.jpg"), str(folder / "b.png"), str(folder / "b2.png"),
                str(folder / "sub" / "broken.png"), str(folder / "sub" / "c.webp"), str(folder / "sub" / "d.BMP")]
    errors = {str(folder / "b2.png"): "empty file", str(folder / "sub" / "broken.png"): "broken symbolic link"}
    for fmt in ("jsonl", "json"):
        result = invoke(*args, "-f", fmt)
        assert result.exit_code == 1
        rows = jsonl(result.stdout) if fmt == "jsonl" else json.loads(result.stdout)
        assert [r["path"] for r in rows] == expected  # every input has a row, in sorted path order
        assert {r["path"]: r["error"] for r in rows if "error" in r} == errors
        assert all(set(r) == {"path", "error"} for r in rows if "error" in r)
    result = invoke(*args, "-f", "csv")
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["path"] for r in table] == expected
    assert {r["path"]: r["error"] for r in table if r["error"]} == errors
    assert all(r["label"] == r["score"] == r["cat"] == "" for r in table if r["error"])
    assert result.stderr.splitlines()[-1] == "2 input(s) failed; the others were processed"


def test_label_named_error_is_refused_for_csv(tiny_model_dir, image_folder):
    assert_usage_error(invoke("classify", image_folder, "-l", "cat,error", "-f", "csv", "-m", tiny_model_dir),
                       "'error'", "CSV column")


# ---------------------------------------------------------------------------------------------------------------
# streaming: rows leave as each batch completes


@pytest.mark.parametrize("fmt, header", [("jsonl", 0), ("csv", 1)])
def test_rows_are_on_stdout_before_the_next_batch_is_computed(tiny_model_dir, image_folder, monkeypatch, fmt,
                                                              header):
    from clipcli import pipeline

    real = pipeline.classify
    lines_out = []

    def watched(*args, **kwargs):
        for batch in real(*args, **kwargs):
            sys.stdout.flush()
            lines_out.append(sys.stdout.buffer.getvalue().count(b"\n"))  # written before this batch went out
            yield batch

    monkeypatch.setattr(pipeline, "classify", watched)
    result = invoke("classify", image_folder, "-l", "cat,dog", "-f", fmt, "--batch-size", "1", "--no-index",
                    "-m", tiny_model_dir)
    assert ok(result).count("\n") == 4 + header
    assert lines_out == [0, 1 + header, 2 + header, 3 + header]  # batch k's row was out before batch k+1 came


def test_a_slow_reader_gets_rows_while_the_run_goes_on(tiny_model_dir, many_images):
    needs_installed()
    proc = subprocess.Popen([*clip_command(), "classify", many_images, "-l", "cat,dog", "-f", "jsonl",
                             "--batch-size", "1", "--workers", "1", "--no-index", "-m", tiny_model_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=clip_env())
    chunks = []
    try:
        while chunk := os.read(proc.stdout.fileno(), 1 << 20):  # what is there each time the reader looks
            chunks.append(chunk)
            time.sleep(0.2)
        stderr = proc.stderr.read()
        assert proc.wait(timeout=120) == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rows = jsonl(b"".join(chunks).decode())
    assert [r["path"] for r in rows] == sorted(str(p) for p in many_images.iterdir())
    # Written all at the end, the 400 rows (~50 KB, less than a pipe holds) would come in one read.
    assert chunks[0].count(b"\n") < 400 and len(chunks) >= 3, [c.count(b"\n") for c in chunks]


def test_head_takes_the_first_row_and_the_run_stops_with_141(tiny_model_dir, many_images):
    needs_installed()
    if not shutil.which("bash") or not shutil.which("head"):
        pytest.skip("needs bash and head")
    command = " ".join(f"'{a}'" for a in [*clip_command(), "classify", str(many_images), "-l", "cat,dog", "-f",
                                          "jsonl", "--batch-size", "1", "--workers", "1", "--no-index", "-m",
                                          str(tiny_model_dir)])
    proc = subprocess.run(["bash", "-c", f"{command} | head -1; echo \"clip exit ${{PIPESTATUS[0]}}\" >&2"],
                          capture_output=True, env=clip_env(), timeout=120)
    (row,) = jsonl(proc.stdout.decode())
    assert row["path"] == str(many_images / "000.png")
    # 141: clip was still writing when head left. Written all at once at the end, it would have exited 0.
    assert proc.stderr.decode().splitlines() == ["clip exit 141"]


# ---------------------------------------------------------------------------------------------------------------
# the table: fits a terminal, one line per row elsewhere


@pytest.fixture(scope="module")
def long_paths(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("long")
    deep = root / "holiday photos 2023" / "beach day"  # run from root: ./holiday.../picture... is 71 characters
    deep.mkdir(parents=True)
    for i in range(3):
        photo(40, 30, i).save(deep / f"picture number {i} taken at the beach.png")
    photo(40, 30, 9).save(root / "short.png")
    photo(40, 30, 8).save(root / "two\nlines.png")
    return root


def run_in_terminal(args: list[object], columns: int, cwd: Path) -> list[str]:
    """The installed `clip` with stdout on a pseudo-terminal `columns` wide; its screen lines, colours removed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([*clip_command(), *map(os.fspath, args)], stdout=slave, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=clip_env(COLUMNS=str(columns)), cwd=cwd)
    os.close(slave)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the other end closed
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    text = ANSI.sub("", out.decode())
    return text.replace("\r\n", "\n").splitlines()


@pytest.mark.parametrize("columns", [80, 200])
def test_table_fits_the_terminal(tiny_model_dir, long_paths, columns):
    from rich.cells import cell_len

    needs_installed()
    lines = run_in_terminal(["classify", ".", "-l", LABELS, "-m", tiny_model_dir], columns, long_paths)
    assert len(lines) == 1 + 5  # the header and one line per image: nothing wrapped
    assert all(cell_len(line) <= columns for line in lines), [cell_len(line) for line in lines]
    assert lines[0].startswith("path") and "top label" in lines[0]
    rows = lines[1:]
    names = [f"number {i} taken at the beach.png" for i in range(3)]  # the end of each file name
    assert [sum(name in row for row in rows) for name in names] == [1, 1, 1]
    if columns == 80:  # long paths cut in the middle, the file name kept; label columns dropped
        assert sum("…" in row for row in rows) == 3 and "#2" in lines[0] and "#4" not in lines[0]
    else:  # room for every label column and the full paths
        assert "#5" in lines[0] and all("…" not in row for row in rows)
        assert sum("./holiday photos 2023/beach day/picture number" in row for row in rows) == 3
    assert any(r"two\nlines.png" in row for row in rows)  # a line break in a name never splits a row


def test_table_into_a_pipe_or_file_is_one_line_per_row(tiny_model_dir, long_paths, tmp_path):
    needs_installed()
    proc = subprocess.run([*clip_command(), "classify", long_paths, "-l", LABELS, "-m", tiny_model_dir],
                          capture_output=True, env=clip_env(COLUMNS="80"), timeout=120)  # COLUMNS: no terminal
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 6 and "\x1b" not in proc.stdout.decode()
    assert "#5" in lines[0] and all("…" not in line for line in lines)
    for path in sorted(p for p in long_paths.rglob("*.png")):
        assert sum(str(path).replace("\n", "\\n") in line for line in lines) == 1
    target = tmp_path / "table.txt"
    assert ok(invoke("classify", long_paths, "-l", LABELS, "-m", tiny_model_dir, "-o", target)) == ""
    assert target.read_text().splitlines() == lines


def test_shorten_middle_keeps_the_end_and_counts_wide_characters():
    from rich.cells import cell_len

    from clipcli.output import shorten_middle

    assert shorten_middle("short", 10) == "short"
    cut = shorten_middle("photos/2023/summer/holiday/beach-day-one.jpg", 20)
    assert cut.endswith("-day-one.jpg") and cut.startswith("phot") and "…" in cut and len(cut) == 20
    wide = shorten_middle("写真/夏休み/海辺の写真です.png", 16)
    assert cell_len(wide) <= 16 and wide.endswith(".png")


# ---------------------------------------------------------------------------------------------------------------
# clip embed: -o required, the extension picks .npy or .parquet, metadata, one line on success


def test_embed_needs_an_output_name(tiny_model_dir, image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_usage_error(invoke("embed", image_folder, "-m", tiny_model_dir), "-o", "emb.npy")
    assert_usage_error(invoke("embed", image_folder, "-o", "emb.txt", "-m", tiny_model_dir), "emb.txt", ".npy",
                       ".parquet")
    assert_usage_error(invoke("embed", image_folder, "-o", "emb", "-m", tiny_model_dir), ".npy")
    assert os.listdir(tmp_path) == []  # nothing written under a name the user did not give


def test_embed_npy_meta_and_success_line(tiny_model_dir, image_folder, tmp_path):
    npy = tmp_path / "emb.npy"
    result = invoke("embed", image_folder, "-o", npy, "-m", tiny_model_dir)
    assert ok(result) == ""
    assert result.stderr == (f"wrote 4 x 16 embeddings to {npy} (names in {tmp_path / 'emb.paths.txt'}, model "
                             f"details in {tmp_path / 'emb.meta.json'})\n")
    meta = json.loads((tmp_path / "emb.meta.json").read_text())
    assert meta == {"model": str(tiny_model_dir), "model_id": str(tiny_model_dir), "fingerprint": meta["fingerprint"],
                    "rows": 4, "dims": 16, "dtype": "float32", "normalized": True, "precision": "fp32",
                    "content": "images", "clipcli_version": version("clipcli")}
    assert re.fullmatch(r"[0-9a-f]{64}", meta["fingerprint"])
    # The fingerprint names the model's content, with or without the index.
    raw = tmp_path / "raw.npy"
    quiet = invoke("embed", image_folder, "-o", raw, "--no-normalize", "--no-index", "--quiet", "-m", tiny_model_dir)
    assert ok(quiet) == "" and quiet.stderr == ""  # --quiet: no line
    raw_meta = json.loads((tmp_path / "raw.meta.json").read_text())
    assert raw_meta["fingerprint"] == meta["fingerprint"] and raw_meta["normalized"] is False
    texts = tmp_path / "texts.npy"
    assert ok(invoke("embed", "--text", "a cat", "-o", texts, "-m", tiny_model_dir, "--dtype", "bf16")) == ""
    text_meta = json.loads((tmp_path / "texts.meta.json").read_text())
    assert text_meta["content"] == "texts" and text_meta["rows"] == 1 and text_meta["precision"] == "fp32"


def read_parquet(path: Path):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"clipcli"])
    return table, meta


def test_embed_parquet_matches_npy(tiny_model_dir, image_folder, tmp_path):
    import pyarrow as pa

    npy, parquet = tmp_path / "e.npy", tmp_path / "e.parquet"
    ok(invoke("embed", image_folder, "-o", npy, "-m", tiny_model_dir))
    result = invoke("embed", image_folder, "-o", parquet, "-m", tiny_model_dir)
    assert ok(result) == "" and result.stderr == f"wrote 4 x 16 embeddings to {parquet}\n"
    table, meta = read_parquet(parquet)
    assert table.schema.field("path").type == pa.string()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 16)  # fixed-size list of float32
    rows, names = load_embeddings(npy)
    assert table.column("path").to_pylist() == names
    np.testing.assert_array_equal(np.array(table.column("embedding").to_pylist(), dtype=np.float32), rows)
    npy_meta = json.loads((tmp_path / "e.meta.json").read_text())
    assert meta == {k: v for k, v in npy_meta.items() if k != "rows"}
    text = tmp_path / "t.parquet"
    ok(invoke("embed", "--text", "a cat", "--text", "a dog", "-o", text, "-m", tiny_model_dir))
    table, meta = read_parquet(text)
    assert table.column_names == ["path", "text", "embedding"]
    assert table.column("path").to_pylist() == table.column("text").to_pylist() == ["a cat", "a dog"]
    assert meta["content"] == "texts"


def test_parquet_is_streamed_in_row_groups(tiny_model_dir, many_images, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from clipcli.embedfile import ParquetWriter

    monkeypatch.setattr(ParquetWriter, "GROUP_BYTES", 64 * 16 * 4)  # a row group every 64 rows
    out = tmp_path / "many.parquet"
    ok(invoke("embed", many_images, "-o", out, "-m", tiny_model_dir, "--batch-size", "16"))
    file = pq.ParquetFile(out)
    assert file.metadata.num_rows == 400 and file.num_row_groups >= 6
    assert file.read().column("path").to_pylist() == sorted(str(p) for p in many_images.iterdir())


def test_parquet_without_pyarrow_names_the_extra(tiny_model_dir, image_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert_usage_error(invoke("embed", image_folder, "-o", tmp_path / "e.parquet", "-m", tiny_model_dir),
                       "pyarrow", "pip install 'clipcli[parquet]'")
    assert os.listdir(tmp_path) == []


def test_interrupted_parquet_leaves_nothing(tiny_model_dir, image_folder, tmp_path, monkeypatch):
    from clipcli import pipeline

    real = pipeline.embed_images

    def interrupted(*args, **kwargs):
        yield next(real(*args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "embed_images", interrupted)
    for name in ("e.parquet", "e.npy"):
        result = invoke("embed", image_folder, "-o", tmp_path / name, "--batch-size", "1", "--no-index",
                        "-m", tiny_model_dir)
        assert result.exit_code == 130 and result.stderr == "interrupted; no output was written\n"
        assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# inputs: --files-from, --exclude, HEIC/AVIF, --max-megapixels


def test_files_from_a_file_or_stdin(tiny_model_dir, image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(image_folder.parent)
    rel = f"{image_folder.name}/b.png"
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + f"{image_folder / 'sub' / 'c.webp'}\r\n\n{rel}\n".encode())
    args = ("-l", "cat,dog", "-f", "jsonl", "-m", tiny_model_dir)
    want = sorted([rel, str(image_folder / "sub" / "c.webp")])  # as given, in one sorted order
    assert [r["path"] for r in jsonl(ok(invoke("classify", "--files-from", listing, *args)))] == want
    from_stdin = invoke("classify", "--files-from", "-", *args, input=listing.read_bytes())
    assert [r["path"] for r in jsonl(ok(from_stdin))] == want
    nul = invoke("classify", "--files-from", "-", *args, input=f"{rel}\0{image_folder / 'a.jpg'}\0".encode())
    assert [r["path"] for r in jsonl(ok(nul))] == sorted([rel, str(image_folder / "a.jpg")])
    # Added to PATHs; a folder in the list is walked.
    both = invoke("classify", image_folder / "a.jpg", "--files-from", "-", *args,
                  input=f"{image_folder / 'sub'}\n".encode())
    assert len(jsonl(ok(both))) == 3


def test_files_from_with_a_stale_entry_and_usage_errors(tiny_model_dir, image_folder, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{image_folder / 'a.jpg'}\n{tmp_path / 'gone.jpg'}\n")
    result = invoke("classify", "--files-from", listing, "-l", "cat", "-f", "jsonl", "-m", tiny_model_dir)
    assert result.exit_code == 1
    assert jsonl(result.stdout)[1] == {"path": str(tmp_path / "gone.jpg"), "error": "no such file (named in the "
                                                                                    "file list)"}
    assert_usage_error(invoke("classify", "--files-from", tmp_path / "nope.txt", "-l", "cat", "-m", tiny_model_dir),
                       "--files-from", "nope.txt", "does not exist")
    assert_usage_error(invoke("classify", "--files-from", "-", "--labels-file", "-", "-m", tiny_model_dir,
                              input=b"cat\n"), "--labels-file and --files-from", "stdin")
    assert_usage_error(invoke("embed", "--files-from", listing, "--text", "a cat", "-o", tmp_path / "e.npy",
                              "-m", tiny_model_dir), "not both")


@pytest.mark.parametrize("patterns, kept", [
    (["*.png"], ["a.jpg", "sub/c.webp", "sub/d.BMP"]),  # a name, at any depth
    (["sub"], ["a.jpg", "b.png"]),  # a folder's name: not entered
    (["sub/*.webp"], ["a.jpg", "b.png", "sub/d.BMP"]),  # a path under the PATH walked
    (["*/sub/d.BMP"], ["a.jpg", "b.png", "sub/c.webp"]),  # the path as shown
    (["a.jpg/", "b.png/"], ["a.jpg", "b.png", "sub/c.webp", "sub/d.BMP"]),  # '/': folders only
    (["*.jpg", "sub/"], ["b.png"]),  # repeatable
    (["*.JPG"], ["a.jpg", "b.png", "sub/c.webp", "sub/d.BMP"]),  # case-sensitive
])
def test_exclude(tiny_model_dir, image_folder, patterns, kept):
    excludes = [arg for pattern in patterns for arg in ("--exclude", pattern)]
    rows = jsonl(ok(invoke("classify", image_folder, *excludes, "-l", "cat", "-f", "jsonl", "-m", tiny_model_dir)))
    assert [r["path"] for r in rows] == [str(image_folder / name) for name in kept]


def test_exclude_in_embed_and_index_and_for_listed_files(tiny_model_dir, image_folder, tmp_path):
    npy = tmp_path / "e.npy"
    ok(invoke("embed", image_folder, "--exclude", "sub", "-o", npy, "-m", tiny_model_dir))
    assert load_embeddings(npy)[1] == [str(image_folder / "a.jpg"), str(image_folder / "b.png")]
    listing = tmp_path / "list.txt"
    listing.write_text(f"{image_folder / 'a.jpg'}\n{image_folder / 'b.png'}\n")
    result = invoke("index", "--files-from", listing, "--exclude", "a.*", "--index", tmp_path / "idx.db",
                    "-m", tiny_model_dir)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("indexed 1 image(s)")
    assert_usage_error(invoke("classify", image_folder, "--exclude", "/", "-l", "cat", "-m", tiny_model_dir),
                       "--exclude '/'")


@pytest.fixture(scope="module")
def modern_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real HEIC (written by pillow-heif) and a real AVIF (written by Pillow), plus a PNG of the same photo."""
    import pillow_heif
    from PIL import features

    folder = tmp_path_factory.mktemp("modern")
    image = photo(64, 48, 21)
    image.save(folder / "same.png")
    pillow_heif.from_pillow(image).save(folder / "iphone.HEIC", quality=95)
    if features.check("avif"):
        image.save(folder / "web.avif", quality=95)
    return folder


def test_heic_and_avif_are_images(tiny_model_dir, modern_photos, tmp_path):
    import pillow_heif
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support: nothing could write the test file")
    rows = jsonl(ok(invoke("classify", modern_photos, "-l", "cat,dog", "-f", "jsonl", "--no-index",
                           "-m", tiny_model_dir)))
    assert [r["path"] for r in rows] == [str(modern_photos / n) for n in ("iphone.HEIC", "same.png", "web.avif")]
    # Decoded as the libraries decode them: the same embedding as the pixels they give, saved losslessly.
    reference = tmp_path / "ref"
    reference.mkdir()
    pillow_heif.open_heif(modern_photos / "iphone.HEIC").to_pillow().save(reference / "heic.png")
    with Image.open(modern_photos / "web.avif") as avif:
        avif.convert("RGB").save(reference / "avif.png")
    ok(invoke("embed", modern_photos, "-o", tmp_path / "m.npy", "--no-index", "-m", tiny_model_dir))
    ok(invoke("embed", reference, "-o", tmp_path / "r.npy", "--no-index", "-m", tiny_model_dir))
    got, want = load_embeddings(tmp_path / "m.npy")[0], load_embeddings(tmp_path / "r.npy")[0]
    np.testing.assert_allclose(got[0], want[1], atol=1e-6)  # iphone.HEIC = heic.png
    np.testing.assert_allclose(got[2], want[0], atol=1e-6)  # web.avif = avif.png


def test_missing_heif_support_is_a_failure_naming_the_extra(tiny_model_dir, modern_photos):
    # A real process whose `import pillow_heif` fails, as where the extra is not installed.
    code = ("import sys; sys.modules['pillow_heif'] = None; sys.argv = ['clip', *sys.argv[1:]]; "
            "from clipcli.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, "classify", modern_photos, "-l", "cat,dog", "-f", "jsonl",
                           "--no-index", "-m", tiny_model_dir], capture_output=True, env=clip_env(), timeout=120)
    assert proc.returncode == 1, proc.stderr
    reason = "HEIC/HEIF image, but HEIF support is not installed; pip install 'clipcli[heif]'"
    assert proc.stderr.decode().splitlines() == [f"{modern_photos / 'iphone.HEIC'}: {reason}",
                                                 "1 input(s) failed; the others were processed"]
    rows = jsonl(proc.stdout.decode())
    assert rows[0] == {"path": str(modern_photos / "iphone.HEIC"), "error": reason}
    assert str(modern_photos / "same.png") in [r["path"] for r in rows]


def test_missing_avif_support_is_a_failure_naming_what_to_install(tiny_model_dir, modern_photos, monkeypatch):
    from PIL import features

    if not (modern_photos / "web.avif").exists():
        pytest.skip("this Pillow has no AVIF support: nothing could write the test file")
    real = features.check
    monkeypatch.setattr(features, "check", lambda name: False if name == "avif" else real(name))
    result = invoke("classify", modern_photos / "web.avif", "-l", "cat", "-f", "jsonl", "--no-index",
                    "-m", tiny_model_dir)
    assert result.exit_code == 1
    (row,) = jsonl(result.stdout)
    assert "AVIF" in row["error"] and "pip install -U pillow" in row["error"]


def test_heif_opener_is_registered_at_first_need_only(tiny_model_dir, image_folder, modern_photos):
    code = ("import sys; sys.argv = ['clip', *sys.argv[1:]]; from clipcli.cli import main\n"
            "try:\n    main()\nexcept SystemExit as exit:\n"
            "    print(exit.code, 'pillow_heif' in sys.modules, file=sys.stderr)")
    for folder, loaded in [(image_folder, "False"), (modern_photos, "True")]:
        proc = subprocess.run([sys.executable, "-c", code, "classify", folder, "-l", "cat", "-f", "jsonl",
                               "--no-index", "-m", tiny_model_dir], capture_output=True, env=clip_env(), timeout=120)
        assert proc.stderr.decode().splitlines()[-1] == f"0 {loaded}", proc.stderr


def test_max_megapixels(tiny_model_dir, image_folder, pixel_limit):
    args = ("classify", image_folder, "-l", "cat", "-f", "jsonl", "--no-index", "-m", tiny_model_dir)
    strict = invoke(*args, "--max-megapixels", "0.0025")  # 2500 px: a.jpg (64x48) is over; the others are not
    assert strict.exit_code == 1
    failed = {r["path"]: r["error"] for r in jsonl(strict.stdout) if "error" in r}
    assert list(failed) == [str(image_folder / "a.jpg")]
    assert "too large" in failed[str(image_folder / "a.jpg")] and "--max-megapixels" in failed[
        str(image_folder / "a.jpg")]
    assert len(jsonl(ok(invoke(*args, "--max-megapixels", "none")))) == 4
    assert len(jsonl(ok(invoke(*args, "--max-megapixels", "1")))) == 4


def test_max_megapixels_lets_a_trusted_panorama_through(tiny_model_dir, tmp_path, pixel_limit):
    big = tmp_path / "panorama.png"
    Image.new("RGB", (12000, 8000), (90, 120, 200)).save(big, compress_level=1)  # 96 MP: over Pillow's ~89 MP
    args = ("classify", big, "-l", "sky,sea", "-f", "jsonl", "--no-index", "-m", tiny_model_dir)
    refused = invoke(*args)
    assert refused.exit_code == 1 and "too large" in jsonl(refused.stdout)[0]["error"]
    (row,) = jsonl(ok(invoke(*args, "--max-megapixels", "200")))
    assert row["path"] == str(big) and "error" not in row


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf", ""])
def test_max_megapixels_bad_values(tiny_model_dir, image_folder, value, pixel_limit):
    assert_usage_error(invoke("classify", image_folder, "-l", "cat", "--max-megapixels", value, "-m", tiny_model_dir),
                       "--max-megapixels", "none")


def test_a_folder_given_is_listed_under_its_own_name_whatever_links_to_it(tmp_path):
    from clipcli.inputs import find_images

    photos, other = tmp_path / "photos", tmp_path / "other"
    (photos / "2020").mkdir(parents=True)
    other.mkdir()
    for path in (photos / "a.jpg", photos / "2020" / "b.jpg", other / "c.jpg"):
        path.write_bytes(b"x")
    os.symlink("../photos", other / "link")  # other/link/... is photos/... again
    want = [str(other / "c.jpg"), str(photos / "2020" / "b.jpg"), str(photos / "a.jpg")]
    for order in ([other, photos], [photos, other]):  # whichever comes first
        assert find_images([str(p) for p in order])[0] == want
    # Not given itself, the linked folder is walked once, under the link's name.
    assert find_images([str(other)])[0] == [str(other / "c.jpg"), str(other / "link" / "2020" / "b.jpg"),
                                             str(other / "link" / "a.jpg")]
    # A folder given inside another one given: listed once, the same names either way.
    assert find_images([str(photos), str(photos / "2020")])[0] == [str(photos / "2020" / "b.jpg"),
                                                                   str(photos / "a.jpg")]
    listed = find_images([str(other)], listed=[str(photos)])[0]  # --files-from names folders too
    assert listed == want


def test_image_extensions_include_heic_heif_avif(tmp_path, tiny_model_dir):
    from clipcli.inputs import find_images

    for name in ("a.heic", "b.HEIF", "c.avif", "d.txt"):
        (tmp_path / name).write_bytes(b"x")
    images, _ = find_images([str(tmp_path)])
    assert [Path(p).name for p in images] == ["a.heic", "b.HEIF", "c.avif"]
    # Not decodable here: a failure each, named, never skipped silently.
    result = invoke("classify", tmp_path, "-l", "cat", "-f", "jsonl", "--no-index", "-m", tiny_model_dir)
    assert result.exit_code == 1 and len(jsonl(result.stdout)) == 3


# ---------------------------------------------------------------------------------------------------------------
# models: aliases, the local cache, clip info


def fake_hub_cache(root: Path, model_dir: Path) -> Path:
    """A Hugging Face cache holding the tiny model as openai/clip-vit-base-patch32, a non-CLIP model and a CLIP
    repo without weights (neither listed)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    others = {"someone/bert-tiny": {"config.json": b'{"model_type": "bert"}', "model.safetensors": b"x"},
              "someone/clip-no-weights": {"config.json": b'{"model_type": "clip"}'}}
    for repo, files in [("openai/clip-vit-base-patch32", None), *others.items()]:
        folder = root / f"models--{repo.replace('/', '--')}"
        snapshot = folder / "snapshots" / revision
        snapshot.mkdir(parents=True)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(revision)
        if files is None:
            for item in model_dir.iterdir():
                shutil.copy(item, snapshot / item.name)
        else:
            for name, data in files.items():
                (snapshot / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return fake_hub_cache(tmp_path_factory.mktemp("hub"), tiny_model_dir)


def test_clip_models_lists_the_cache_and_the_aliases(hub_cache, monkeypatch):
    needs_installed()
    proc = subprocess.run([*clip_command(), "models"], capture_output=True, timeout=60,
                          env=clip_env(HF_HUB_CACHE=str(hub_cache)))
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    text = proc.stdout.decode()
    assert f"({hub_cache})" in text
    assert re.search(r"openai/clip-vit-base-patch32\s+[\d.]+ MB\s+ViT-B-32", text), text
    assert "bert-tiny" not in text and "clip-no-weights" not in text
    for alias in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"):
        assert alias in text
    proc = subprocess.run([*clip_command(), "models", "--json"], capture_output=True, timeout=60,
                          env=clip_env(HF_HUB_CACHE=str(hub_cache)))
    listed = json.loads(proc.stdout)
    assert [m["id"] for m in listed["models"]] == ["openai/clip-vit-base-patch32"]
    assert listed["models"][0]["aliases"] == ["ViT-B-32"] and listed["models"][0]["size_bytes"] > 0
    assert listed["aliases"]["ViT-L-14-336"] == "openai/clip-vit-large-patch14-336"
    empty = subprocess.run([*clip_command(), "models"], capture_output=True, timeout=60,
                           env=clip_env(HF_HUB_CACHE=str(hub_cache / "none")))
    assert empty.returncode == 0 and "none yet" in empty.stdout.decode()
    a_file = hub_cache.parent / "not-a-folder"
    a_file.write_text("")
    empty = subprocess.run([*clip_command(), "models"], capture_output=True, timeout=60,
                           env=clip_env(HF_HUB_CACHE=str(a_file)))
    assert empty.returncode == 0 and "none yet" in empty.stdout.decode() and b"Traceback" not in empty.stderr


@pytest.mark.parametrize("alias", ["ViT-B-32", "vit-b-32", "VIT-B-32", "ViT-B/32"])
def test_alias_resolves_to_the_hub_id(tiny_model_dir, image_folder, hub_cache, monkeypatch, tmp_path, alias):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    args = ("classify", image_folder, "-l", "cat,dog", "-f", "jsonl")
    assert ok(invoke(*args, "-m", alias)) == ok(invoke(*args, "-m", tiny_model_dir))
    ok(invoke("embed", image_folder / "a.jpg", "-o", tmp_path / "e.npy", "-m", alias))
    meta = json.loads((tmp_path / "e.meta.json").read_text())
    assert (meta["model"], meta["model_id"]) == (alias, "openai/clip-vit-base-patch32")


def test_a_local_folder_named_like_an_alias_is_named_as_itself(tiny_model_dir, image_folder, tmp_path, monkeypatch):
    # The folder wins over the alias when loading, and so in what outputs record and `clip info` shows.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / "ViT-B-16")
    ok(invoke("embed", image_folder / "a.jpg", "-o", tmp_path / "e.npy", "-m", "ViT-B-16", "--no-index"))
    meta = json.loads((tmp_path / "e.meta.json").read_text())
    assert (meta["model"], meta["model_id"]) == ("ViT-B-16", "ViT-B-16")
    assert json.loads(ok(invoke("info", "ViT-B-16", "--json")))["model"] == "ViT-B-16"


def test_alias_not_cached_and_unknown_names(image_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert_usage_error(invoke("classify", image_folder, "-l", "cat", "-m", "ViT-L-14"),
                       "openai/clip-vit-large-patch14", "cache")
    assert_usage_error(invoke("classify", image_folder, "-l", "cat", "-m", "ViT-B-99"), "'ViT-B-99'", "ViT-B-32",
                       "clip models")


def test_info_reports_the_stored_dtype_and_json(tiny_model_dir, tmp_path):
    converted = tmp_path / "fp16"
    ok(invoke("convert-weights", tiny_model_dir, converted, "--dtype", "fp16"))
    text = ok(invoke("info", converted))
    assert re.search(r"^dtype:\s+float16$", text, re.M) and re.search(r"^compute dtype:\s+float32$", text, re.M)
    facts = json.loads(ok(invoke("info", converted, "--json")))
    assert facts["dtype"] == "float16" and facts["compute_dtype"] == "float32"
    assert facts["embedding_dim"] == 16 and facts["image_size"] == 32 and facts["parameters"] > 0
    assert json.loads(ok(invoke("info", tiny_model_dir, "--json")))["dtype"] == "float32"


# ---------------------------------------------------------------------------------------------------------------
# help, errors, completion, the clipcli script


@pytest.mark.parametrize("command", ["classify", "embed", "index", "convert-weights", "info", "models"])
def test_help_names_values_not_python_types(command):
    text = ok(invoke(command, "--help"))
    for python_type in ("<list[", "<str>", "<int", "<path>", "<float", "<bool"):
        assert python_type not in text, (python_type, text)
    if command in ("classify", "embed", "index"):
        for shown in ("[auto|fp32|fp16|bf16]", "[auto|cpu|cuda|mps]", "--files-from FILE", "--exclude GLOB",
                      "--max-megapixels N|none", "PATH"):
            assert shown in text, shown
    if command == "classify":
        assert "[table|csv|json|jsonl]" in text and ".jsonl" in text


@pytest.mark.parametrize("args, fragments", [
    (["classify", "{images}", "-l", "cat", "-f", "yaml"],
     ["--format 'yaml' is not one of the choices; use one of table, csv, json, jsonl"]),
    (["classify", "{images}", "-l", "cat", "--dtype", "fp8"], ["--dtype 'fp8'", "auto, fp32, fp16, bf16"]),
    (["classify", "{images}", "-l", "cat", "--batch-size", "many"], ["--batch-size 'many' is not a whole number"]),
    (["classify", "{images}", "-l", "cat", "-k", "0"], ["--top-k '0'", "at least 1"]),
    (["convert-weights", "a.pt", "out", "--dtype", "int8"], ["--dtype 'int8'", "fp32, fp16, bf16"]),
])
def test_bad_values_in_plain_words(image_folder, args, fragments):
    line = assert_click_usage_error(invoke(*[a.format(images=image_folder) for a in args]), *fragments)
    assert "Value error" not in line and "Input should" not in line


def test_clipcli_is_the_same_program():
    clipcli = needs_installed("clipcli")
    proc = subprocess.run([clipcli, "--help"], capture_output=True, env=clip_env(), timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith(b"Usage: clipcli ")
    assert b"classify" in proc.stdout and b"models" in proc.stdout
    version_line = subprocess.run([clipcli, "--version"], capture_output=True, env=clip_env(), timeout=60).stdout
    assert version_line == f"clip {version('clipcli')}\n".encode()


@pytest.mark.parametrize("script", ["clip", "clipcli"])
def test_shell_completion(script, tmp_path):
    path = needs_installed(script)
    var = f"_{script.upper()}_COMPLETE"
    shown = subprocess.run([path, "--show-completion", "bash"], capture_output=True, env=clip_env(), timeout=60)
    assert shown.returncode == 0 and var.encode() in shown.stdout and b"complete -o default -F" in shown.stdout

    def complete(words: str) -> list[str]:
        env = clip_env(**{var: "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - (
            0 if words.endswith(" ") else 1))})
        proc = subprocess.run([path], capture_output=True, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.decode().split()

    assert complete(f"{script} cla") == ["classify"]
    assert complete(f"{script} classify --format ") == ["table", "csv", "json", "jsonl"]
    assert complete(f"{script} embed --dtype b") == ["bf16"]
    home = tmp_path / "home"
    home.mkdir()
    installed = subprocess.run([path, "--install-completion", "bash"], capture_output=True, timeout=60,
                               env=clip_env(HOME=str(home), SHELL="/bin/bash"))
    assert installed.returncode == 0, installed.stderr
    assert script in (home / ".bashrc").read_text()
    assert any(var in p.read_text() for p in home.rglob("*") if p.is_file() and p.name != ".bashrc")


def test_warm_runs_import_no_torch_nor_optional_decoders(tiny_model_dir, image_folder, tmp_path):
    code = ("import sys; sys.argv = ['clip', *sys.argv[1:]]; from clipcli.cli import main\n"
            "try:\n    main()\nexcept SystemExit as exit:\n"
            "    print(exit.code, *(m in sys.modules for m in ('torch', 'pillow_heif', 'pyarrow')), file=sys.stderr)")
    env = clip_env(CLIP_INDEX=str(tmp_path / "index.db"))
    args = ["classify", image_folder, "-l", "cat,dog", "-f", "jsonl", "--exclude", "*.webp", "-m", tiny_model_dir]
    cold, warm = (subprocess.run([sys.executable, "-c", code, *map(os.fspath, args)], capture_output=True, env=env,
                                 timeout=120) for _ in range(2))
    assert cold.stderr.decode().splitlines()[-1] == "0 True False False"  # the first run loads the model
    assert warm.stderr.decode().splitlines()[-1] == "0 False False False"  # answered from the index
    assert warm.stdout == cold.stdout and len(jsonl(warm.stdout.decode())) == 3

