"""Findings of a black-box pass over cli-contract.md (model specification, classify, embed, convert-weights, output
streams, exit codes, inputs, model names): each test failed before its fix. Numbers are checked against
transformers' CLIPModel on the same weights."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_usage_error, make_hf_checkpoint
from tests.test_cli import Reference, clip_command, clip_env, interrupt, invoke, needs_proc, reading_images_in, unit


def ok(result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stderr, result.exception)
    return result.stdout


def run_closed(args: list[object], close: int) -> subprocess.CompletedProcess:
    """The installed `clip` as a real process started with file descriptor `close` (0: stdin, 1: stdout, 2: stderr)
    closed, as a shell's `<&-`, `>&-` or `2>&-` leaves it; stdout and stderr are otherwise pipes."""
    if not Path(clip_command()[0]).exists() and clip_command()[0] != sys.executable:
        pytest.skip("the clip script is not installed beside this interpreter")
    keep = subprocess.PIPE
    return subprocess.run([*clip_command(), *map(os.fspath, args)], stdin=None if close == 0 else subprocess.DEVNULL,
                          stdout=None if close == 1 else keep, stderr=None if close == 2 else keep,
                          preexec_fn=lambda: os.close(close), env=clip_env(), timeout=120)


# ---------------------------------------------------------------------------------------------------------------
# model specification


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved by transformers in shards so small that some hold image-tower tensors only."""
    import transformers

    source = make_hf_checkpoint(tmp_path_factory.mktemp("whole"))
    folder = tmp_path_factory.mktemp("sharded")
    transformers.CLIPModel.from_pretrained(source).save_pretrained(folder, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(source / name, folder / name)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shards = {}
    for key, shard in index.items():
        shards.setdefault(shard, set()).add(key.split(".")[0])
    assert any(owners == {"vision_model"} for owners in shards.values()), shards  # the case this is about
    return folder


def test_sharded_checkpoint_with_image_only_shards(sharded_model, image_folder, tmp_path):
    """Labels and texts are embedded with the text tower alone; shards without text tensors must not stop that."""
    reference = Reference(sharded_model)
    texts = ["a photo of a cat.", "a red car"]
    ok(invoke("embed", "--text", texts[0], "--text", texts[1], "-m", sharded_model, "-o", tmp_path / "t.npy",
              "--no-index"))
    expected = unit(__import__("torch").from_numpy(reference.text_features(texts))).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "t.npy"), expected, atol=1e-5)
    paths = [str(image_folder / "a.jpg"), str(image_folder / "b.png")]
    rows = [json.loads(line) for line in ok(invoke("classify", *paths, "-l", "cat,dog", "-m", sharded_model,
                                                    "-f", "jsonl", "--no-index")).splitlines()]
    probs = np.array([[row["scores"]["cat"], row["scores"]["dog"]] for row in rows])
    np.testing.assert_allclose(probs, reference.probs(paths, ["cat", "dog"]), atol=1e-4)


def prefixed_copy(source: Path, folder: Path, prefix: str = "module.") -> Path:
    """`source` (a folder with model.safetensors, or shards and their index) with every tensor name under `prefix`,
    as a checkpoint saved from a wrapped model (DataParallel, torch.compile) has them."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    for shard in folder.glob("*.safetensors"):
        save_file({prefix + name: tensor for name, tensor in load_file(shard).items()}, shard)
    listing = folder / "model.safetensors.index.json"
    if listing.exists():
        index = json.loads(listing.read_text())
        index["weight_map"] = {prefix + name: shard for name, shard in index["weight_map"].items()}
        listing.write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("sharded", [False, True])
def test_wrapped_tensor_names_load_for_texts_and_images(sharded, sharded_model, tiny_model_dir, image_folder,
                                                        tmp_path):
    """Tensor names under module./_orig_mod./model. load as the bare names do, the text tower alone included (it
    chose its tensors by their wrapped names, found none, and every classify failed)."""
    source = sharded_model if sharded else tiny_model_dir
    model = prefixed_copy(source, tmp_path / "wrapped", "module._orig_mod.")
    reference = Reference(source)
    texts = ["a photo of a cat.", "a red car"]
    ok(invoke("embed", "--text", texts[0], "--text", texts[1], "-m", model, "-o", tmp_path / "t.npy", "--no-index"))
    expected = unit(__import__("torch").from_numpy(reference.text_features(texts))).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "t.npy"), expected, atol=1e-5)
    paths = [str(image_folder / "a.jpg"), str(image_folder / "b.png")]
    rows = [json.loads(line) for line in ok(invoke("classify", *paths, "-l", "cat,dog", "-m", model, "-f", "jsonl",
                                                    "--index", tmp_path / "index.db")).splitlines()]
    probs = np.array([[row["scores"]["cat"], row["scores"]["dog"]] for row in rows])
    np.testing.assert_allclose(probs, reference.probs(paths, ["cat", "dog"]), atol=1e-4)


def test_tokenizer_larger_than_the_model_vocabulary_is_a_setup_error(tmp_path, image_folder):
    """A tokenizer whose ids do not fit the model's token embedding: exit 2 naming both, not an IndexError."""
    model = make_hf_checkpoint(tmp_path / "m", text_config=dict(vocab_size=1000, eos_token_id=999, bos_token_id=998))
    for args in (("embed", "--text", "a cat", "-o", tmp_path / "t.npy"),
                 ("classify", image_folder, "-l", "cat,dog")):
        assert_usage_error(invoke(*args, "-m", model, "--no-index"), "vocab_size", "1000", "49408")


def test_a_model_folder_without_tokenizer_files(tmp_path, image_folder, tiny_model_dir, reference):
    """OpenAI's BPE stands in for missing tokenizer files when the model has exactly its vocabulary (the same
    results); a model with another vocabulary would get the wrong tokens: exit 2 naming the missing files."""
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    assert invoke("embed", "--text", "a cat", "-m", bare, "-o", tmp_path / "b.npy", "--no-index").exit_code == 0
    np.testing.assert_allclose(np.load(tmp_path / "b.npy"), unit(__import__("torch").from_numpy(
        reference.text_features(["a cat"]))).numpy(), atol=1e-5)
    other = make_hf_checkpoint(tmp_path / "other", text_config=dict(vocab_size=60000))
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (other / name).unlink(missing_ok=True)
    assert_usage_error(invoke("classify", image_folder, "-l", "cat,dog", "-m", other, "--no-index"),
                       "no tokenizer files", "tokenizer.json", "60000", "49408")


def test_empty_model_name_is_named_as_such(image_folder):
    line = assert_usage_error(invoke("classify", image_folder, "-l", "cat,dog", "-m", ""), "empty")
    assert "'.'" not in line


def test_uncached_alias_names_what_was_typed_and_the_hub_id(image_folder, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert_usage_error(invoke("classify", image_folder, "-l", "cat", "-m", "vit-l-14"),
                       "'vit-l-14'", "openai/clip-vit-large-patch14", "--model")


# ---------------------------------------------------------------------------------------------------------------
# stdin, stdout and stderr


@pytest.mark.parametrize("command", [("classify",), ("organize", "--into", "sorted")])
def test_two_stdin_readers_are_refused_before_either_reads(image_folder, command):
    """--labels-file - with --files-from -: the usage error says so, even when stdin is empty (it said "no labels")."""
    assert_usage_error(invoke(*command, "--files-from", "-", "--labels-file", "-", input=""),
                       "--labels-file", "--files-from", "stdin")


@pytest.mark.parametrize("args, code, fragment", [
    (("classify", "IMAGES", "--labels-file", "-"), 2, "error: no labels"),
    (("classify", "--files-from", "-", "-l", "cat,dog"), 0, "warning: no images found"),  # as an empty list
    (("embed", "--text-file", "-", "-o", "OUT"), 2, "error: - has no text lines")])
def test_closed_stdin_reads_as_empty(tiny_model_dir, image_folder, tmp_path, args, code, fragment):
    """`clip ... --labels-file - <&-`: '-' reads nothing, and the run goes on as with an empty file: the usual usage
    error or warning, not a traceback."""
    args = [image_folder if a == "IMAGES" else tmp_path / "e.npy" if a == "OUT" else a for a in args]
    proc = run_closed([*args, "-m", tiny_model_dir, "--no-index"], close=0)
    lines = proc.stderr.decode().splitlines()
    assert proc.returncode == code, proc.stderr.decode()
    assert len(lines) == 1 and lines[0].startswith(fragment), lines


@pytest.mark.parametrize("args", [("classify", "IMAGES", "-l", "cat,dog", "-f", "jsonl"),  # streamed rows
                                  ("classify", "IMAGES", "-l", "cat,dog")])  # the table, written at the end
def test_closed_stdout_is_one_error_line(tiny_model_dir, image_folder, args):
    """`clip classify ... >&-`: results cannot go anywhere; one error line and exit 2, not a traceback."""
    args = [image_folder if arg == "IMAGES" else arg for arg in args]
    proc = run_closed([*args, "-m", tiny_model_dir, "--no-index"], close=1)
    lines = proc.stderr.decode().splitlines()
    assert proc.returncode == 2, proc.stderr.decode()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "stdout" in lines[0], lines


def test_closed_stdout_does_not_matter_where_nothing_goes_to_it(tiny_model_dir, image_folder, tmp_path):
    proc = run_closed(["embed", image_folder, "-m", tiny_model_dir, "-o", tmp_path / "e.npy", "--no-index"], close=1)
    assert proc.returncode == 0, proc.stderr.decode()
    assert np.load(tmp_path / "e.npy").shape == (4, 16)
    assert proc.stderr.decode().startswith("wrote 4 x 16 embeddings")


def test_closed_stderr_keeps_messages_off_stdout(tiny_model_dir, image_folder, tmp_path):
    """`2>&-`: results still come, exit codes are kept, and no message lands among the results on stdout."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    proc = run_closed(["classify", image_folder, bad, "-l", "cat,dog", "-f", "jsonl", "-m", tiny_model_dir,
                       "--no-index"], close=2)
    rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert proc.returncode == 1
    assert [row.get("error") is not None for row in rows] == [False, False, False, False, True]
    proc = run_closed(["classify", image_folder, "-l", "cat,cat", "-m", tiny_model_dir], close=2)
    assert (proc.returncode, proc.stdout) == (2, b"")


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_interrupted_stream_does_not_claim_nothing_was_written(tiny_model_dir, many_images, signum, code, word):
    """Rows already streamed to stdout were written: the last line says they are incomplete, not 'no output was
    written'."""
    args = ["classify", many_images, "-l", "cat,dog", "-m", tiny_model_dir, "-f", "jsonl", "--no-index",
            "--batch-size", "1", "--workers", "1"]
    proc = subprocess.Popen([*clip_command(), *map(os.fspath, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=clip_env())
    try:
        first = proc.stdout.readline()  # a row is out: the run is streaming
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert json.loads(first)["path"].endswith("000.png")
    assert proc.returncode == code, stderr.decode()
    lines = stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(word) and "no output was written" not in lines[0], lines
    assert "incomplete" in lines[0], lines


@needs_proc
def test_interrupted_file_output_still_says_nothing_was_written(tiny_model_dir, many_images, tmp_path):
    target = tmp_path / "out.jsonl"
    args = ["classify", many_images, "-l", "cat,dog", "-m", tiny_model_dir, "-o", target, "--no-index",
            "--batch-size", "1", "--workers", "1"]
    proc = interrupt(args, signal.SIGINT, reading_images_in(many_images, target))
    assert proc.returncode == 130 and proc.stderr.decode() == "interrupted; no output was written\n"
    assert not target.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(("stop", "code", "word"), [("int", 130, "interrupted"), ("term", 143, "terminated")])
def test_an_error_raised_while_an_interrupt_unwinds_is_the_interrupt(stop, code, word, capsys):
    """The signal handler raises wherever the main thread is: inside threading's Condition.wait, the lock's own
    cleanup then fails ("cannot release un-acquired lock", seen once in CI), with the interrupt as its context.
    That is still Ctrl-C or SIGTERM: its exit code and one line, no traceback."""
    import typer

    from clipcli.process import Terminated, handle_errors

    @handle_errors
    def command(debug: bool = False) -> None:
        try:
            raise KeyboardInterrupt() if stop == "int" else Terminated()
        except BaseException:
            raise RuntimeError("cannot release un-acquired lock")  # noqa: B904 (as threading's code raises it)

    with pytest.raises(typer.Exit) as exited:
        command()
    assert exited.value.exit_code == code
    assert capsys.readouterr().err == f"{word}; no output was written\n"

    @handle_errors
    def own_words(debug: bool = False) -> None:  # a command that says what its interrupt left (organize does)
        try:
            raise KeyboardInterrupt()
        except KeyboardInterrupt:
            print("interrupted; what this command kept", file=sys.stderr)
            raise typer.Exit(130) from None

    with pytest.raises(typer.Exit) as exited:
        own_words()
    assert exited.value.exit_code == 130
    assert capsys.readouterr().err == "interrupted; what this command kept\n"  # one line, its own

    @handle_errors
    def failing(debug: bool = False) -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):  # any other error is not hidden
        failing()
