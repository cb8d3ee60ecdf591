"""The `clip` command against cli-contract.md: Typer's CliRunner for most cases, the installed entry point as a real
process where a process matters (entry point, stderr without a terminal, signals). Every number printed is checked
against transformers' CLIPModel on the same tiny checkpoint."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from clipcli.cli import app
from tests.conftest import assert_usage_error

LABELS = ["cat", "dog", "red car", "rocket ship"]
TWO_TEMPLATES = ["a photo of a {}.", "a blurry drawing of the {}."]
PROB_ATOL = 1e-4
CLIP_BIN = Path(sys.executable).with_name("clip")  # the installed console script beside this interpreter

RUNNER = CliRunner()


# ---------------------------------------------------------------------------------------------------------------
# helpers shared with test_hostile.py


def invoke(*args: object, env: dict[str, str] | None = None, input: str | bytes | None = None):
    """Run the Typer app in-process; stdout and stderr come back separately (result.stdout, result.stderr)."""
    return RUNNER.invoke(app, [os.fspath(a) if isinstance(a, Path) else str(a) for a in args], env=env, input=input)


def assert_click_usage_error(result, *fragments: str) -> str:
    """Parsing errors Typer/click detect (unknown option, bad value, missing argument): one 'error: ...' line like
    every other usage error (the contract's one-line rule), pointing at the command's --help."""
    line = assert_usage_error(result, *fragments)
    assert re.search(r"; see 'clip( [a-z-]+)? --help'$", line), line
    return line


def clip_env(**extra: str) -> dict[str, str]:
    """Environment for a real `clip` process: offline, no CLIP_MODEL from the user's shell."""
    env = {k: v for k, v in os.environ.items() if k != "CLIP_MODEL"}
    env.update(HF_HUB_OFFLINE="1", **extra)
    return env


def clip_command() -> list[str]:
    """The installed `clip` script, else the module (the package is not installed beside this interpreter)."""
    return [str(CLIP_BIN)] if CLIP_BIN.exists() else [sys.executable, "-m", "clipcli"]


def run_clip(*args: object, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the installed `clip` as a real process (stdin closed, stdout and stderr pipes, so no terminal)."""
    return subprocess.run([*clip_command(), *map(os.fspath, args)], capture_output=True, stdin=subprocess.DEVNULL,
                          env=clip_env(), timeout=timeout)


def interrupt(args: list[object], signum: int, started: Callable[[int], bool], times: int = 1,
              ) -> subprocess.CompletedProcess:
    """Start `clip args`, wait until `started(pid)` says it is at work, then send `signum` (`times` times, 2 ms
    apart); the finished process."""
    proc = subprocess.Popen([*clip_command(), *map(os.fspath, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=clip_env())
    deadline = time.monotonic() + 60
    try:
        while not started(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, f"clip ended before it was interrupted: {proc.communicate()}"
        time.sleep(0.01)  # inside the run: a few hundred images at batch size 1 take far longer
        for _ in range(times):
            if proc.poll() is None:
                proc.send_signal(signum)
                time.sleep(0.002)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def reading_images_in(folder: Path, output: Path | None = None) -> Callable[[int], bool]:
    """started() for interrupt(): true once the process has a file under `folder` open (it is decoding images),
    or, given `output`, once a temp file has appeared beside it (embed streams rows to a .rows file, classify to
    a .part file, from the first image on)."""
    prefix = str(folder.resolve()) + os.sep

    def started(pid: int) -> bool:
        if output is not None and any(any(output.parent.glob(f".{output.name}.*.{kind}")) for kind in ("rows", "part")):
            return True
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            return False
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                    return True
            except OSError:
                continue
        return False

    return started


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(),
                                reason="watching a process's open files needs Linux /proc")


def temp_files(folder: Path) -> list[str]:
    """Files that only a run in progress should have: clipcli's temp files are hidden names beside the output."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------------------------
# the reference: transformers on the same checkpoint


class Reference:
    """transformers.CLIPModel + CLIPImageProcessorPil + CLIPTokenizer loaded from the tiny model directory."""

    def __init__(self, directory: Path) -> None:
        import transformers

        self.model = transformers.CLIPModel.from_pretrained(directory).eval()
        processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        self.processor = processor.from_pretrained(directory)
        self.tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)

    def pixels(self, paths: list[str]) -> torch.Tensor:
        images = [Image.open(p).convert("RGB") for p in paths]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(texts, padding=True, return_tensors="pt"))

    @torch.no_grad()
    def image_features(self, paths: list[str]) -> np.ndarray:
        out = self.model.get_image_features(pixel_values=self.pixels(paths))
        return getattr(out, "pooler_output", out).numpy()

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> np.ndarray:
        out = self.model.get_text_features(**self.texts(texts))
        return getattr(out, "pooler_output", out).numpy()

    @torch.no_grad()
    def probs(self, paths: list[str], labels: list[str], templates: list[str] = ("a photo of a {}.",)) -> np.ndarray:
        """(N, L): with one template exactly CLIPModel(...).logits_per_image.softmax(-1); several are ensembled."""
        if len(templates) == 1:
            prompts = [templates[0].replace("{}", label) for label in labels]
            out = self.model(pixel_values=self.pixels(paths), **self.texts(prompts))
            return out.logits_per_image.softmax(-1).numpy()
        # The CLIP paper's ensemble: mean of the L2-normalised prompt embeddings per label, re-normalised.
        prompts = [t.replace("{}", label) for label in labels for t in templates]
        text = unit(torch.from_numpy(self.text_features(prompts))).reshape(len(labels), len(templates), -1)
        text = unit(text.mean(dim=1))
        image = unit(torch.from_numpy(self.image_features(paths)))
        return (self.model.logit_scale.exp() * image @ text.T).softmax(-1).numpy()


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def expected_paths(folder: str) -> list[str]:
    """The images of conftest's image_folder as `clip` names them when given `folder`: found paths, sorted."""
    return [f"{folder}/a.jpg", f"{folder}/b.png", f"{folder}/sub/c.webp", f"{folder}/sub/d.BMP"]


# ---------------------------------------------------------------------------------------------------------------
# classify: formats and numbers


def parse(fmt: str, text: str, labels: list[str]) -> list[dict]:
    """csv/json/jsonl output -> [{path, label, score, scores}] (scores as given in the output)."""
    if fmt == "jsonl":
        assert text.endswith("\n")
        return [json.loads(line) for line in text.splitlines()]
    if fmt == "json":
        rows = json.loads(text)
        assert isinstance(rows, list)
        return rows
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    assert header == ["path", "label", "score", *labels, "error"]  # the error column is empty for images read
    rows = list(reader)
    assert all(row[-1] == "" for row in rows)
    return [{"path": row[0], "label": row[1], "score": float(row[2]),
             "scores": {label: float(v) for label, v in zip(labels, row[3:-1], strict=True)}} for row in rows]


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "jsonl"])
def test_classify_formats_match_transformers(tiny_model_dir, in_images_parent, reference, fmt):
    folder = in_images_parent
    result = invoke("classify", folder, "--labels", ",".join(LABELS), "--format", fmt, "-m", tiny_model_dir)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stderr == ""
    paths = expected_paths(folder)
    want = reference.probs(paths, LABELS)  # (4 images, 4 labels)
    if fmt == "table":
        lines = result.stdout.splitlines()
        assert "top label" in lines[0]
        for path, row in zip(paths, want, strict=True):
            line = next(line for line in lines if path in line)
            top = LABELS[int(row.argmax())]
            shown = re.search(re.escape(top) + r" (\d+\.\d)%", line)
            assert shown, (top, line)
            assert abs(float(shown.group(1)) - 100 * row.max()) <= 0.051
        return
    rows = parse(fmt, result.stdout, LABELS)
    assert [r["path"] for r in rows] == paths  # sorted paths, as found
    got = np.array([[r["scores"][label] for label in LABELS] for r in rows])
    np.testing.assert_allclose(got, want, atol=PROB_ATOL, rtol=0)
    assert [r["label"] for r in rows] == [LABELS[i] for i in want.argmax(-1)]
    np.testing.assert_allclose([r["score"] for r in rows], want.max(-1), atol=PROB_ATOL, rtol=0)
    for r in rows:
        assert list(r["scores"]) == LABELS  # every label, in the order given


def test_json_is_a_list_of_the_jsonl_objects(tiny_model_dir, in_images_parent):
    args = ("classify", in_images_parent, "-l", "cat,dog,car", "-m", tiny_model_dir)
    as_json, as_jsonl = invoke(*args, "-f", "json"), invoke(*args, "-f", "jsonl")
    assert as_json.exit_code == as_jsonl.exit_code == 0
    assert as_json.stderr == as_jsonl.stderr == ""
    objects = [json.loads(line) for line in as_jsonl.stdout.splitlines()]
    assert json.loads(as_json.stdout) == objects
    assert len(objects) == 4
    for obj in objects:
        assert {"path", "label", "score", "scores"} <= set(obj)
        assert obj["label"] == max(obj["scores"], key=obj["scores"].get)
        assert obj["score"] == obj["scores"][obj["label"]]
        assert sum(obj["scores"].values()) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("templates", [
    pytest.param(["-t", TWO_TEMPLATES[0], "-t", TWO_TEMPLATES[1]], id="two-t"),
    pytest.param(["--templates", "imagenet"], id="imagenet"),
])
def test_template_ensemble_matches_reference(tiny_model_dir, in_images_parent, reference, templates):
    from clipcli.templates import TEMPLATE_SETS

    result = invoke("classify", in_images_parent, "-l", ",".join(LABELS), *templates, "-f", "jsonl",
                    "-m", tiny_model_dir)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stderr == ""
    prompts = TWO_TEMPLATES if templates[0] == "-t" else TEMPLATE_SETS["imagenet"]
    assert len(prompts) in (2, 80)
    paths = expected_paths(in_images_parent)
    want = reference.probs(paths, LABELS, prompts)
    rows = parse("jsonl", result.stdout, LABELS)
    assert [r["path"] for r in rows] == paths
    got = np.array([[r["scores"][label] for label in LABELS] for r in rows])
    np.testing.assert_allclose(got, want, atol=PROB_ATOL, rtol=0)
    assert [r["label"] for r in rows] == [LABELS[i] for i in want.argmax(-1)]
    # An ensemble is not the single default template: the option really changed the prompts.
    assert not np.allclose(want, reference.probs(paths, LABELS), atol=1e-3)


def test_top_k(tiny_model_dir, in_images_parent, reference):
    paths = expected_paths(in_images_parent)
    want = reference.probs(paths, LABELS)
    result = invoke("classify", in_images_parent, "-l", ",".join(LABELS), "-k", "2", "-f", "jsonl",
                    "-m", tiny_model_dir)
    assert result.exit_code == 0 and result.stderr == ""
    for obj, row in zip(parse("jsonl", result.stdout, LABELS), want, strict=True):
        assert [t["label"] for t in obj["top"]] == [LABELS[i] for i in np.argsort(-row)[:2]]
        assert len(obj["scores"]) == len(LABELS)  # top-k trims the ranking, never the scores
    table = invoke("classify", in_images_parent, "-l", ",".join(LABELS), "--top-k", "1", "-m", tiny_model_dir)
    assert table.exit_code == 0 and table.stderr == ""
    assert "top label" in table.stdout and "#2" not in table.stdout
    assert table.stdout.count("%") == len(paths)


def test_output_file(tiny_model_dir, in_images_parent, reference, tmp_path):
    target = tmp_path / "out.csv"
    result = invoke("classify", in_images_parent, "-l", ",".join(LABELS), "-f", "csv", "-o", target,
                    "-m", tiny_model_dir)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout == "" and result.stderr == ""
    rows = parse("csv", target.read_text(encoding="utf-8"), LABELS)
    assert [r["path"] for r in rows] == expected_paths(in_images_parent)
    got = np.array([[r["scores"][label] for label in LABELS] for r in rows])
    np.testing.assert_allclose(got, reference.probs(expected_paths(in_images_parent), LABELS), atol=PROB_ATOL)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # what a plain open() gives, not a temp file's 0600
    assert sorted(os.listdir(tmp_path)) == ["out.csv"]  # no temp files left

    target.write_text("old\n")
    target.chmod(0o640)
    again = invoke("classify", in_images_parent, "-l", "cat,dog", "-o", target, "-m", tiny_model_dir)
    assert again.exit_code == 0 and again.stdout == "" and again.stderr == ""
    assert len(target.read_text().splitlines()) == 5  # csv, from the name: the header and a row per image
    assert target.stat().st_mode & 0o777 == 0o640  # replacing a file keeps its permissions


def test_output_through_a_link_or_into_a_pipe(tiny_model_dir, in_images_parent, tmp_path):
    # A link is written through (the link stays); a pipe is written in place, never replaced by a file.
    real, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    real.write_text("old\n")
    link.symlink_to(real)
    result = invoke("classify", in_images_parent, "-l", "cat,dog", "-f", "jsonl", "-o", link, "-m", tiny_model_dir)
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""
    assert link.is_symlink() and len(real.read_text().splitlines()) == 4
    if not hasattr(os, "mkfifo"):
        return
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    try:
        result = invoke("classify", in_images_parent, "-l", "cat,dog", "-f", "csv", "-o", fifo, "-m", tiny_model_dir)
    finally:
        reader.join(5)
        if reader.is_alive():  # the command never opened the pipe: let the reader go
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert received[0].decode().splitlines()[0] == "path,label,score,cat,dog,error"
    assert len(received[0].splitlines()) == 5
    # embed needs real files for the .npy and its sidecar: a pipe is refused before any work.
    npy_fifo = tmp_path / "pipe.npy"
    os.mkfifo(npy_fifo)
    assert_usage_error(invoke("embed", in_images_parent, "-o", npy_fifo, "-m", tiny_model_dir), str(npy_fifo),
                       "not a regular file")
    assert sorted(os.listdir(tmp_path)) == ["fifo", "link.jsonl", "pipe.npy", "real.jsonl"]


def test_labels_file(tiny_model_dir, in_images_parent, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\n\n   \n  red car  \ndog\n\n", encoding="utf-8")
    result = invoke("classify", in_images_parent, "--labels-file", labels, "-f", "csv", "-m", tiny_model_dir)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stderr == ""
    rows = parse("csv", result.stdout, ["cat", "red car", "dog"])  # blank lines ignored, items stripped
    assert len(rows) == 4


def classify_csv(*args: object, input: bytes | None = None) -> list[dict]:
    """`clip classify ... -f csv` on stdout, parsed; the labels are read from the header."""
    result = invoke("classify", *args, "-f", "csv", input=input)
    assert result.exit_code == 0 and result.stderr == "", (result.stderr, result.exception)
    header = next(csv.reader(io.StringIO(result.stdout)))
    return parse("csv", result.stdout, header[3:-1])


def test_labels_file_with_byte_order_mark_and_crlf(tiny_model_dir, in_images_parent, tmp_path):
    # Windows editors save UTF-8 with a BOM and CRLF: the first label must not carry the BOM into the prompt.
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_bytes(b"cat\ndog\n")
    marked.write_bytes(b"\xef\xbb\xbfcat\r\n\r\ndog\r\n")
    want = classify_csv(in_images_parent, "--labels-file", plain, "-m", tiny_model_dir)
    got = classify_csv(in_images_parent, "--labels-file", marked, "-m", tiny_model_dir)
    assert list(got[0]["scores"]) == ["cat", "dog"]
    assert got == want


def test_labels_repeat_and_stdin(tiny_model_dir, in_images_parent):
    want = classify_csv(in_images_parent, "-l", "cat,red car,dog", "-m", tiny_model_dir)
    assert classify_csv(in_images_parent, "-l", "cat", "-l", "red car, dog", "-m", tiny_model_dir) == want
    from_stdin = classify_csv(in_images_parent, "--labels-file", "-", "-m", tiny_model_dir,
                              input=b"\xef\xbb\xbfcat\nred car\n\ndog\n")
    assert from_stdin == want


def test_output_dash_is_stdout(tiny_model_dir, image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = str(image_folder)
    result = invoke("classify", images, "-l", "cat,dog", "-f", "jsonl", "-o", "-", "-m", tiny_model_dir)
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 4, (result.stderr, result.exception)
    assert os.listdir(tmp_path) == []  # no file named "-"
    assert_usage_error(invoke("embed", images, "-o", "-", "-m", tiny_model_dir), "not stdout", "-o")
    assert os.listdir(tmp_path) == []


USAGE_ERRORS = {
    "duplicate-label": (["{images}", "-l", "cat,dog,cat"], ["'cat'", "twice"]),
    "duplicate-after-strip": (["{images}", "-l", "cat, cat "], ["'cat'", "twice"]),
    "empty-labels": (["{images}", "-l", ",, ,"], ["no labels", "--labels"]),
    "no-labels": (["{images}"], ["no labels"]),
    "labels-and-file": (["{images}", "-l", "cat", "--labels-file", "{tmp}/labels.txt"], ["not both"]),
    "labels-file-missing": (["{images}", "--labels-file", "{tmp}/missing.txt"], ["missing.txt", "does not exist"]),
    "template-without-braces": (["{images}", "-l", "cat", "-t", "a photo"], ["'a photo'", "{}"]),
    "unknown-template-set": (["{images}", "-l", "cat", "--templates", "nope"], ["'nope'", "imagenet"]),
    "missing-path": (["{images}/nope.jpg", "-l", "cat"], ["nope.jpg", "does not exist"]),
    "no-paths": (["-l", "cat"], ["no images given", "--files-from"]),
    "unknown-model-path": (["{images}", "-l", "cat", "-m", "{tmp}/no-such-model"], ["no-such-model", "not found"]),
    "non-utf8-label": (["{images}", "-l", "caf\udce9,dog"], ["caf\\xe9", "UTF-8"]),
    "unknown-device": (["{images}", "-l", "cat", "--device", "tpu"], ["'tpu'", "cpu"]),
    "unknown-dtype": (["{images}", "-l", "cat", "--dtype", "fp8"], ["'fp8'", "fp32"]),
    "output-is-directory": (["{images}", "-l", "cat", "-o", "{tmp}"], ["is a directory"]),
    "label-named-like-a-csv-column": (["{images}", "-l", "cat,score", "-f", "csv"],
                                      ["'score'", "CSV column", "'a score'", "json"]),
}


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_classify_usage_errors(tiny_model_dir, image_folder, tmp_path, case):
    args, fragments = USAGE_ERRORS[case]
    (tmp_path / "labels.txt").write_text("cat\n")
    fill = {"images": str(image_folder), "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in args]
    if "-m" not in argv:
        argv += ["-m", str(tiny_model_dir)]
    assert_usage_error(invoke("classify", *argv), *fragments)
    assert sorted(os.listdir(tmp_path)) == ["labels.txt"]  # nothing written


@pytest.mark.parametrize("preprocessor, fragments", [
    ({"crop_size": {"height": 48, "width": 48}}, ["come out 48x48", "takes 32x32", "crop_size"]),
    ({"image_mean": [0.1, 0.2, 0.3]}, ["come out 224x224", "takes 32x32"]),  # the rest defaults to 224
    ({"do_center_crop": False, "size": {"shortest_edge": 32}}, ["keep their own shapes", "do_center_crop"]),
])
def test_preprocessing_that_does_not_fit_the_model_is_a_usage_error(tiny_model_dir, image_folder, tmp_path,
                                                                    preprocessor, fragments):
    model = tmp_path / "model"
    model.mkdir()
    for name in os.listdir(tiny_model_dir):
        (model / name).write_bytes((tiny_model_dir / name).read_bytes())
    config = json.loads((model / "preprocessor_config.json").read_text(encoding="utf-8"))
    assert config["crop_size"] == {"height": 32, "width": 32}  # the tiny model's own: 32 px
    if "image_mean" in preprocessor:
        config = {}
    (model / "preprocessor_config.json").write_text(json.dumps({**config, **preprocessor}), encoding="utf-8")
    for command in (["classify", image_folder, "-l", "cat"], ["embed", image_folder, "-o", tmp_path / "e.npy"]):
        assert_usage_error(invoke(*command, "-m", model), "preprocessor_config.json", *fragments)
    assert sorted(os.listdir(tmp_path)) == ["model"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_device_cuda_without_gpu(tiny_model_dir, image_folder):
    line = assert_usage_error(invoke("classify", image_folder, "-l", "cat", "--device", "cuda", "-m", tiny_model_dir),
                              "cuda")
    assert "--device cpu" in line


def test_bad_format_is_a_plain_usage_error(tiny_model_dir, image_folder):
    assert_click_usage_error(invoke("classify", image_folder, "-l", "cat", "-f", "xml", "-m", tiny_model_dir),
                             "--format", "xml", "jsonl")


@pytest.mark.parametrize("args, fragments", [
    (["classify", "{images}", "-l", "cat", "--bogus"], ["No such option: --bogus"]),
    (["classify", "{images}", "-l", "cat", "--batch-size", "0"], ["--batch-size"]),
    (["classify", "{images}", "-l", "cat", "--workers", "0"], ["--workers"]),
    (["embed", "{images}", "--top-k", "3"], ["No such option: --top-k", "clip embed --help"]),
    (["convert-weights", "only-one-argument"], ["Missing argument", "clip convert-weights --help"]),
    (["bogus"], ["No such command 'bogus'", "see 'clip --help'"]),
])
def test_parsing_errors_are_one_line(tiny_model_dir, image_folder, args, fragments):
    argv = [a.format(images=image_folder) for a in args]
    assert_click_usage_error(invoke(*argv), *fragments)


@pytest.mark.parametrize("raised, code, stderr", [
    (typer.Abort(), 1, "aborted\n"),
    (typer._click.exceptions.ClickException("cannot go on"), 1, "Error: cannot go on\n"),
], ids=["abort", "click-exception"])
def test_other_click_exits_keep_their_code_and_one_line(image_folder, monkeypatch, raised, code, stderr):
    from clipcli import cli

    def stop(*args, **kwargs):
        raise raised

    monkeypatch.setattr(cli, "_read_labels", stop)
    result = invoke("classify", image_folder, "-l", "cat")
    assert (result.exit_code, result.stdout, result.stderr) == (code, "", stderr)


def test_parsing_errors_are_one_line_from_the_installed_command(tiny_model_dir, image_folder):
    proc = run_clip("classify", image_folder, "-l", "cat", "--bogus", "-m", tiny_model_dir)
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode().splitlines() == ["error: No such option: --bogus; see 'clip classify --help'"]


def test_top_k_zero_is_a_plain_usage_error(tiny_model_dir, image_folder):
    assert_click_usage_error(invoke("classify", image_folder, "-l", "cat", "-k", "0", "-m", tiny_model_dir), "--top-k")


def test_hub_id_neither_cached_nor_reachable(image_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # never the user's cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    line = assert_usage_error(invoke("classify", image_folder, "-l", "cat", "-m", "someone/clip-not-cached"),
                              "'someone/clip-not-cached'", "--model")
    assert "cache" in line


def test_clip_model_env_var(tiny_model_dir, in_images_parent, reference, tmp_path):
    result = invoke("classify", in_images_parent, "-l", "cat,dog", "-f", "jsonl",
                    env={"CLIP_MODEL": str(tiny_model_dir)})
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stderr == ""
    got = np.array([[r["scores"]["cat"], r["scores"]["dog"]] for r in parse("jsonl", result.stdout, [])])
    np.testing.assert_allclose(got, reference.probs(expected_paths(in_images_parent), ["cat", "dog"]), atol=PROB_ATOL)
    missing = tmp_path / "env-model"
    assert_usage_error(invoke("classify", in_images_parent, "-l", "cat", env={"CLIP_MODEL": str(missing)}),
                       str(missing), "not found")


def test_quiet_changes_nothing_but_the_bar(tiny_model_dir, in_images_parent):
    args = ("classify", in_images_parent, "-l", "cat,dog", "-f", "jsonl", "-m", tiny_model_dir)
    loud, quiet = invoke(*args), invoke(*args, "--quiet")
    assert loud.exit_code == quiet.exit_code == 0
    assert loud.stderr == quiet.stderr == ""  # stderr is no terminal here: no progress bar either way
    assert quiet.stdout == loud.stdout and len(quiet.stdout.splitlines()) == 4


def test_version():
    from importlib.metadata import version

    result = invoke("--version")
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout == f"clip {version('clipcli')}\n"


@pytest.mark.parametrize("command, example", [
    ([], "clip classify photos/ --labels cat,dog,car"),
    (["classify"], "clip classify photos/ --labels cat,dog,car"),
    (["embed"], "clip embed photos/ -o emb.npy"),
    (["convert-weights"], "clip convert-weights ViT-B-32.pt"),
])
def test_help_shows_examples(command, example):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and result.stderr == ""
    assert "Examples:" in result.stdout or "Example:" in result.stdout
    assert example in result.stdout
    if command == ["classify"]:
        for option in ("--labels", "--labels-file", "--template", "--templates", "--top-k", "--format", "--output",
                       "--model", "CLIP_MODEL", "--batch-size", "--device", "--dtype", "--quiet"):
            assert option in result.stdout
        assert "table|csv|json|jsonl" in result.stdout


def test_python_m_clipcli_help():
    proc = subprocess.run([sys.executable, "-m", "clipcli", "--help"], capture_output=True, env=clip_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b""
    assert proc.stdout.startswith(b"Usage: clip ") and b"classify" in proc.stdout and b"embed" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# embed


def load_embeddings(npy: Path) -> tuple[np.ndarray, list[str]]:
    rows = np.load(npy, allow_pickle=False)
    names = npy.with_name(npy.name.removesuffix(".npy") + ".paths.txt").read_text(
        encoding="utf-8", errors="surrogateescape")
    assert names.endswith("\n") or names == ""
    return rows, names.splitlines()


def assert_wrote(result, npy: Path, rows: int, dims: int = 16) -> None:
    """Exit 0, nothing on stdout, and stderr exactly the one line saying what was written (rows x dims, files)."""
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert result.stdout == ""
    stem = npy.name[:-4]
    assert result.stderr.splitlines() == [
        f"wrote {rows} x {dims} embeddings to {npy} (names in {npy.with_name(stem + '.paths.txt')}, model details "
        f"in {npy.with_name(stem + '.meta.json')})"]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_embed_images_match_reference(tiny_model_dir, in_images_parent, reference, tmp_path):
    npy = tmp_path / "emb.npy"
    result = invoke("embed", in_images_parent, "-o", npy, "-m", tiny_model_dir)
    assert_wrote(result, npy, 4)
    rows, names = load_embeddings(npy)
    assert names == expected_paths(in_images_parent)  # line i names row i, sorted paths
    assert rows.dtype == np.float32 and rows.shape == (4, 16)
    want = reference.image_features(names)
    assert cosines(rows, want).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(rows, axis=-1), 1, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["emb.meta.json", "emb.npy", "emb.paths.txt"]


def test_embed_no_normalize_is_raw_features(tiny_model_dir, in_images_parent, reference, tmp_path):
    npy = tmp_path / "raw.npy"
    result = invoke("embed", in_images_parent, "-o", npy, "--no-normalize", "-m", tiny_model_dir)
    assert_wrote(result, npy, 4)
    rows, names = load_embeddings(npy)
    want = reference.image_features(names)
    np.testing.assert_allclose(rows, want, atol=1e-4, rtol=1e-4)
    assert not np.allclose(np.linalg.norm(rows, axis=-1), 1, atol=1e-2)


def test_embed_texts_match_reference(tiny_model_dir, reference, tmp_path):
    text_file = tmp_path / "texts.txt"
    text_file.write_text("a photo of a cat\n\n  a dog  \n \t\nsep\u2028arated\r\n\n", encoding="utf-8")
    npy = tmp_path / "text.npy"
    result = invoke("embed", "--text", "a red car", "--text", "two\nlines", "--text-file", text_file, "-o", npy,
                    "-m", tiny_model_dir)
    assert_wrote(result, npy, 5)
    rows, names = load_embeddings(npy)
    # --text first, then the file's lines as written: only line ends (LF, CRLF) split them, blank ones are skipped.
    texts = ["a red car", "two\nlines", "a photo of a cat", "  a dog  ", "sep\u2028arated"]
    # A line break inside a text is written as \n (and U+2028 as \u2028), so that each text keeps one line.
    assert names == [t.replace("\n", "\\n").replace("\u2028", "\\u2028") for t in texts]
    want = reference.text_features(texts)  # no template applied
    assert rows.shape == (5, 16)
    assert cosines(rows, want).min() >= 0.99999
    np.testing.assert_allclose(np.linalg.norm(rows, axis=-1), 1, atol=1e-5)
    raw = tmp_path / "raw.npy"
    assert invoke("embed", "--text", "a red car", "-o", raw, "--no-normalize", "-m", tiny_model_dir).exit_code == 0
    np.testing.assert_allclose(np.load(raw), want[:1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options", [["--dtype", "bf16"], ["--dtype", "fp16"], ["--fast-decode"],
                                     ["--dtype", "bf16", "--fast-decode"]])
def test_reduced_precision_and_fast_decode_stay_close_to_the_reference(tiny_model_dir, in_images_parent, reference,
                                                                       tmp_path, options):
    paths = expected_paths(in_images_parent)
    result = invoke("classify", in_images_parent, "-l", ",".join(LABELS), "-f", "jsonl", "-m", tiny_model_dir,
                    *options)
    assert result.exit_code == 0 and result.stderr == "", (result.stderr, result.exception)
    rows = parse("jsonl", result.stdout, LABELS)
    assert [r["path"] for r in rows] == paths
    got = np.array([[r["scores"][label] for label in LABELS] for r in rows])
    np.testing.assert_allclose(got.sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(got, reference.probs(paths, LABELS), atol=5e-3, rtol=0)
    npy = tmp_path / "emb.npy"
    assert invoke("embed", in_images_parent, "-o", npy, "-m", tiny_model_dir, *options).exit_code == 0
    embedded, names = load_embeddings(npy)
    assert names == paths and embedded.dtype == np.float32
    assert cosines(embedded, reference.image_features(names)).min() >= 0.999


def test_csv_column_names_are_fine_as_labels_in_other_formats(tiny_model_dir, in_images_parent):
    result = invoke("classify", in_images_parent, "-l", "path,label,score", "-f", "jsonl", "-m", tiny_model_dir)
    assert result.exit_code == 0
    assert list(json.loads(result.stdout.splitlines()[0])["scores"]) == ["path", "label", "score"]


def test_sidecar_name_and_an_unusable_sidecar_path(tiny_model_dir, image_folder, tmp_path):
    assert invoke("embed", image_folder, "-o", tmp_path / "up.NPY", "-m", tiny_model_dir).exit_code == 0
    assert sorted(os.listdir(tmp_path)) == ["up.NPY", "up.meta.json", "up.paths.txt"]
    (tmp_path / "sc.paths.txt").mkdir()
    assert_usage_error(invoke("embed", image_folder, "-o", tmp_path / "sc.npy", "-m", tiny_model_dir),
                       "sc.paths.txt", "is a directory")
    assert sorted(os.listdir(tmp_path)) == ["sc.paths.txt", "up.NPY", "up.meta.json", "up.paths.txt"]


def test_text_file_with_byte_order_mark_embeds_like_plain_text(tiny_model_dir, tmp_path):
    marked, plain, piped = tmp_path / "marked.npy", tmp_path / "plain.npy", tmp_path / "piped.npy"
    (tmp_path / "texts.txt").write_bytes(b"\xef\xbb\xbfa cat\r\na dog\r\n")
    assert invoke("embed", "--text-file", tmp_path / "texts.txt", "-o", marked, "-m", tiny_model_dir).exit_code == 0
    assert invoke("embed", "--text", "a cat", "--text", "a dog", "-o", plain, "-m", tiny_model_dir).exit_code == 0
    piping = invoke("embed", "--text-file", "-", "-o", piped, "-m", tiny_model_dir, input=b"a cat\na dog\n")
    assert piping.exit_code == 0
    for npy in (marked, piped):
        rows, names = load_embeddings(npy)
        assert names == ["a cat", "a dog"]
        np.testing.assert_array_equal(rows, np.load(plain))


def test_texts_are_embedded_in_float32_whatever_the_dtype(tiny_model_dir, reference, tmp_path):
    texts = ["a red car", "a photo of a cat"]
    for dtype in ("bf16", "fp16"):
        npy = tmp_path / f"{dtype}.npy"
        args = ["embed", "--text", texts[0], "--text", texts[1], "--no-normalize", "-o", npy, "--dtype", dtype]
        assert invoke(*args, "-m", tiny_model_dir).exit_code == 0
        np.testing.assert_allclose(np.load(npy), reference.text_features(texts), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("args, fragments", [
    (["{images}", "--text", "a cat"], ["not both"]),
    (["{images}", "--text-file", "{tmp}/texts.txt"], ["not both"]),
    ([], ["nothing to embed"]),
    (["--text-file", "{tmp}/empty.txt"], ["no text lines"]),
    (["--text", "caf\udce9"], ["caf\\xe9", "UTF-8"]),
    (["{images}", "-o", "{tmp}/no-folder/emb.npy"], ["no-folder", "does not exist"]),
])
def test_embed_usage_errors(tiny_model_dir, image_folder, tmp_path, args, fragments):
    (tmp_path / "texts.txt").write_text("a cat\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    fill = {"images": str(image_folder), "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in args]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "emb.npy")]
    assert_usage_error(invoke("embed", *argv, "-m", tiny_model_dir), *fragments)
    assert sorted(os.listdir(tmp_path)) == ["empty.txt", "texts.txt"]


# ---------------------------------------------------------------------------------------------------------------
# the installed command as a real process


def test_installed_clip_runs_and_reports_failures(tiny_model_dir, image_folder, reference, tmp_path):
    if not CLIP_BIN.exists():
        pytest.skip(f"no `clip` script beside {sys.executable}; install the package (pip install -e .)")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    proc = run_clip("classify", image_folder, broken, "-l", "cat,dog", "-f", "jsonl", "-m", tiny_model_dir)
    assert proc.returncode == 1, proc.stderr
    # stderr is a pipe: no progress bar, no library warnings; only the failed input and the summary.
    assert proc.stderr.decode().splitlines() == [f"{broken}: not an image file",
                                                 "1 input(s) failed; the others were processed"]
    rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)  # one path order, failures included
    assert [r for r in rows if "error" in r] == [{"path": str(broken), "error": "not an image file"}]
    rows = [r for r in rows if "error" not in r]
    paths = expected_paths(str(image_folder))
    assert [r["path"] for r in rows] == paths
    got = np.array([[r["scores"]["cat"], r["scores"]["dog"]] for r in rows])
    np.testing.assert_allclose(got, reference.probs(paths, ["cat", "dog"]), atol=PROB_ATOL)


def test_output_to_dev_stdout_redirected_to_a_file(tiny_model_dir, image_folder, tmp_path):
    # `-o /dev/stdout` with stdout sent to a file: the file is written through its descriptor, not renamed over.
    if not Path("/dev/stdout").exists():
        pytest.skip("no /dev/stdout on this system")
    redirected = tmp_path / "stdout.txt"
    redirected.write_text("earlier output\n")
    inode = redirected.stat().st_ino
    with open(redirected, "a") as stdout:
        proc = subprocess.run([*clip_command(), "classify", str(image_folder), "-l", "cat,dog", "-f", "csv",
                               "-o", "/dev/stdout", "-m", str(tiny_model_dir)], stdout=stdout,
                              stderr=subprocess.PIPE, env=clip_env(), timeout=60)
    assert proc.returncode == 0 and proc.stderr == b""
    assert redirected.stat().st_ino == inode
    lines = redirected.read_text().splitlines()
    assert lines[:2] == ["earlier output", "path,label,score,cat,dog,error"] and len(lines) == 6
    assert sorted(os.listdir(tmp_path)) == ["stdout.txt"]


@needs_proc
@pytest.mark.parametrize("signum, code, old_output", [
    pytest.param(signal.SIGINT, 130, True, id="sigint-keeps-old-files"),
    pytest.param(signal.SIGTERM, 143, False, id="sigterm-writes-nothing"),
])
def test_interrupted_embed_writes_nothing(tiny_model_dir, many_images, tmp_path, signum, code, old_output):
    npy, sidecar = tmp_path / "emb.npy", tmp_path / "emb.paths.txt"
    if old_output:
        np.save(npy, np.ones((2, 3), dtype=np.float32))
        sidecar.write_text("old-a\nold-b\n")
    proc = interrupt(["embed", many_images, "-o", npy, "--batch-size", "1", "--workers", "1", "--no-index",
                      "-m", tiny_model_dir],
                     signum, reading_images_in(many_images, npy))
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == b""
    word = "interrupted" if signum == signal.SIGINT else "terminated"
    assert proc.stderr.decode().splitlines() == [f"{word}; no output was written"]
    assert temp_files(tmp_path) == []
    if old_output:  # nothing already written is lost
        np.testing.assert_array_equal(np.load(npy), np.ones((2, 3), dtype=np.float32))
        assert sidecar.read_text() == "old-a\nold-b\n"
    else:
        assert sorted(os.listdir(tmp_path)) == []


@needs_proc
@pytest.mark.parametrize("name", ["emb.npy", "emb.parquet", "rows.jsonl"])
def test_temp_files_a_killed_run_left_are_removed_by_the_next_run(tiny_model_dir, many_images, image_folder,
                                                                   tmp_path, name):
    """SIGKILL leaves a run no time to remove its temp file (a .rows file holds every row embedded so far). The
    next run writing the same output removes such files once nothing holds them (each writer keeps its own locked)
    and they are older than a minute; other files, however they are named, are left alone."""
    target = tmp_path / name
    command = ["embed", "-o", target] if name.startswith("emb") else ["classify", "-l", "cat,dog", "-o", target]
    proc = interrupt([*command, many_images, "--batch-size", "1", "--workers", "1", "--no-index",
                      "-m", tiny_model_dir], signal.SIGKILL, reading_images_in(many_images, target))
    assert proc.returncode == -signal.SIGKILL
    (left,) = temp_files(tmp_path)  # what the killed run left
    hour_ago = time.time() - 3600
    os.utime(tmp_path / left, (hour_ago, hour_ago))
    suffix = left.rsplit(".", 1)[1]
    fresh = tmp_path / f".{name}.clipcli-abcd1234.{suffix}"  # as a run that has only just begun would have
    fresh.write_bytes(b"x")
    others = [tmp_path / f".{name}.backup.{suffix}", tmp_path / f".{name}.clipcli-mine.{suffix}.keep"]
    for other in others:
        other.write_bytes(b"mine")
        os.utime(other, (hour_ago, hour_ago))
    done = run_clip(*command, image_folder, "--no-index", "-m", tiny_model_dir)
    assert done.returncode == 0, done.stderr
    assert temp_files(tmp_path) == sorted(p.name for p in [fresh, *others])
    assert target.exists()


@pytest.mark.parametrize("output", [[], ["-o", "/dev/stdout"]], ids=["stdout", "dev-stdout"])
def test_reader_gone_exits_quietly(tiny_model_dir, image_folder, output):
    # `clip classify ... | head -0`: the reader has closed the pipe before anything is written.
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([*clip_command(), "classify", image_folder, "-l", "cat,dog", "-f", "jsonl", *output,
                               "-m", tiny_model_dir], stdout=write, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              env=clip_env(), timeout=60)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == b"", proc.stderr


@pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])
def test_reader_leaving_mid_output_exits_141_never_0(tiny_model_dir, image_folder, unbuffered):
    # Several pipe-fulls of output; the reader takes the first bytes and quits. With python -u semantics one write()
    # may be only partly accepted: the rest must not be dropped silently with exit 0.
    labels = ",".join(f"label{i}" for i in range(2000))
    env = clip_env(**({"PYTHONUNBUFFERED": "1"} if unbuffered else {}))
    if not unbuffered:
        env.pop("PYTHONUNBUFFERED", None)
    proc = subprocess.Popen([*clip_command(), "classify", image_folder, "-l", labels, "-f", "jsonl", "-q",
                             "-m", tiny_model_dir], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env)
    try:
        assert len(proc.stdout.read(1000)) == 1000
        proc.stdout.close()
        stderr = proc.stderr.read()
        assert proc.wait(timeout=60) == 141, stderr
        assert stderr == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_output_that_is_an_input_image_is_refused(tiny_model_dir, image_folder, tmp_path):
    target = tmp_path / "a.jpg"
    target.write_bytes((image_folder / "a.jpg").read_bytes())
    before = target.read_bytes()
    result = invoke("classify", tmp_path, "-l", "cat,dog", "-f", "csv", "-o", target, "-m", tiny_model_dir)
    assert_usage_error(result, "a.jpg", "one of the input images", "--output")
    result = invoke("embed", target, "-o", tmp_path / "b.npy", "-m", tiny_model_dir)
    assert result.exit_code == 0  # a different output is fine
    linked = tmp_path / "link.npy"
    linked.symlink_to(target)  # the same file under another name
    result = invoke("embed", tmp_path, "-o", linked, "-m", tiny_model_dir)
    assert_usage_error(result, "link.npy", "one of the input images")
    assert target.read_bytes() == before and linked.is_symlink()


@needs_proc
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_repeated_interrupts_still_clean_up_quietly(tiny_model_dir, many_images, tmp_path, signum, code):
    # An impatient user presses Ctrl-C again while the first one is being handled: same exit, same one line.
    npy = tmp_path / "emb.npy"
    np.save(npy, np.ones((2, 3), dtype=np.float32))
    for attempt in range(3):
        proc = interrupt(["embed", many_images, "-o", npy, "--batch-size", "1", "--workers", "1", "--no-index",
                          "-m", tiny_model_dir], signum, reading_images_in(many_images, npy), times=5)
        assert proc.returncode == code, proc.stderr
        word = "interrupted" if signum == signal.SIGINT else "terminated"
        assert proc.stderr.decode().splitlines() == [f"{word}; no output was written"], attempt
        assert temp_files(tmp_path) == []
        np.testing.assert_array_equal(np.load(npy), np.ones((2, 3), dtype=np.float32))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_command_has_ended_changes_nothing(tmp_path, signum):
    # A Ctrl-C that lands after the work is done, while the interpreter shuts down (a black-box pass saw it after
    # `clip index` printed its summary), killed the process by the signal. Here it arrives at the latest moment, in
    # an atexit callback.
    script = ("import atexit, os, sys, time\n"
              "from clipcli import cli\n"
              f"atexit.register(lambda: (os.kill(os.getpid(), {int(signum)}), time.sleep(0.2)))\n"
              "sys.argv = ['clip', 'index', '--index', sys.argv[1]]\n"
              "cli.main()\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "none.db")], capture_output=True, text=True,
                          env=clip_env(), timeout=60)
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [f"error: there is no index at {tmp_path / 'none.db'} yet; `clip index PATH` "
                                        "or any classify/embed run makes it"]


def test_empty_folder_warns_and_writes_empty_results(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from clipcli.cli import app

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    result = CliRunner().invoke(app, ["classify", str(tmp_path / "empty"), "-l", "cat,dog", "-m",
                                      str(tiny_model_dir), "-f", "json"])
    assert result.exit_code == 0
    assert result.stdout.strip() == "[]"
    assert result.stderr.startswith("warning: no images found;") and "jpg" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_embed_warns_once_per_truncated_text(tmp_path, tiny_model_dir):
    import numpy as np
    from typer.testing import CliRunner

    from clipcli.cli import app

    long_text = " ".join(["word"] * 100)
    out_path = tmp_path / "t.npy"
    result = CliRunner().invoke(app, ["embed", "--text", "a cat", "--text", long_text, "-o", str(out_path),
                                      "-m", str(tiny_model_dir)])
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("warning: text 'word word") and "truncated" in lines[0]
    assert lines[1].startswith(f"wrote 2 x 16 embeddings to {out_path}")
    assert np.load(out_path).shape == (2, 16)
    assert (tmp_path / "t.paths.txt").read_text().splitlines() == ["a cat", long_text]


def test_a_temp_file_a_live_writer_holds_is_never_removed(tmp_path):
    from clipcli.fsutil import STALE_AFTER_S, open_temp_file, remove_stale_temp_files

    target = tmp_path / "out.jsonl"
    handle, temp = open_temp_file(target)  # a writer at work (for hours: its file looks old)
    old = time.time() - 10 * STALE_AFTER_S
    os.utime(temp, (old, old))
    assert remove_stale_temp_files(target, ".part") == [] and os.path.exists(temp)
    second, other = open_temp_file(target)  # a second writer of the same output starts: the first keeps its file
    assert os.path.exists(temp)
    handle.close()  # the writer is gone without removing it (as after SIGKILL)
    assert remove_stale_temp_files(target, ".part") == [temp] and not os.path.exists(temp)
    second.close()
    os.unlink(other)


def test_a_full_disk_when_the_last_rows_go_out_is_one_error(tmp_path):
    # The rows file is flushed once more when it is closed: that second failure must not replace the error line.
    import errno

    from clipcli.embedfile import EmbeddingMeta, NpyWriter
    from clipcli.errors import UsageError

    writer = NpyWriter(tmp_path / "e.npy", EmbeddingMeta("m", "m", None, "fp32", True))
    writer.add(["a.png"], np.ones((1, 4), dtype=np.float32))

    class Full(io.BytesIO):
        def flush(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    real, writer._rows = writer._rows, Full()
    with pytest.raises(UsageError, match="no space left"):
        writer.close(4)
    real.close()
    assert sorted(os.listdir(tmp_path)) == []


def test_long_output_names_still_get_a_temp_file_beside_them(tmp_path):
    from clipcli.output import RowWriter, classify_layout

    target = tmp_path / ("日" * 78 + ".jsonl")  # 240 bytes: a temp name after it must not pass 255
    with RowWriter(target, "jsonl", classify_layout(["cat"])) as rows:
        rows.write([{"path": "a.png", "label": "cat", "score": 1.0, "top": [], "scores": {"cat": 1.0}}])
    assert target.read_text().startswith('{"path": "a.png"') and os.listdir(tmp_path) == [target.name]
