"""resolve(): `--model` as a directory, a checkpoint file, or a Hub id from the local Hugging Face cache.

Every test points huggingface_hub at an empty or hand-built cache under tmp_path and turns offline mode on, so no
test reads the user's cache or reaches the network."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clipcli.cli import app
from clipcli.errors import UsageError
from clipcli.loader import load
from clipcli.resolve import DEFAULT_MODEL, ModelFiles, resolve
from tests.conftest import assert_usage_error

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache in tmp_path, offline mode on; the working directory is tmp_path too."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    for name, value in (("HF_HOME", tmp_path / "hf-home"), ("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so "org/name" is not a local path by accident
    return cache


def cache_repo(cache: Path, repo_id: str, source: Path, names: list[str] | None = None) -> Path:
    """Lay `source`'s files out as huggingface_hub does: blobs by hash, snapshots/<sha>/ symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SHA
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)  # no newline: huggingface_hub reads the file as is
    for name in names if names is not None else sorted(os.listdir(source)):
        data = (source / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


# ------------------------------------------------------------------------------------------------ local paths


def test_directory(tiny_model_dir: Path) -> None:
    assert resolve(str(tiny_model_dir)) == ModelFiles(str(tiny_model_dir), tiny_model_dir, None)


def test_directory_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="no config.json.*convert-weights"):
        resolve(str(tmp_path))


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="no model.safetensors or pytorch_model.bin"):
        resolve(str(tmp_path))


def test_pytorch_model_bin_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert resolve(str(tmp_path)).directory == tmp_path


def test_weights_file_of_a_directory_means_the_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    for name in ("model.safetensors", "pytorch_model.bin"):
        (tmp_path / name).write_bytes(b"")
        assert resolve(str(tmp_path / name)) == ModelFiles(str(tmp_path / name), tmp_path, None)
    (tmp_path / "other.safetensors").write_bytes(b"")  # not the directory's weights file: a checkpoint of its own
    assert resolve(str(tmp_path / "other.safetensors")).checkpoint == tmp_path / "other.safetensors"


def test_weights_file_of_a_directory_loads_with_its_config(tmp_path: Path, image_folder: Path) -> None:
    # gelu, 2 heads and non-default normalisation: none of which the shapes alone would give.
    from tests.conftest import make_hf_checkpoint

    model = make_hf_checkpoint(tmp_path / "m", text_config={"hidden_act": "gelu", "num_attention_heads": 2},
                               vision_config={"hidden_act": "gelu", "num_attention_heads": 2})
    want = load(str(model), device="cpu")
    got = load(str(model / "model.safetensors"), device="cpu")
    assert got.config == want.config and got.preprocess == want.preprocess
    args = ["classify", str(image_folder), "-l", "cat,dog", "-f", "csv"]
    by_dir = CliRunner().invoke(app, [*args, "-m", str(model)])
    by_file = CliRunner().invoke(app, [*args, "-m", str(model / "model.safetensors")])
    assert by_dir.exit_code == 0 and by_file.stdout == by_dir.stdout


def test_checkpoint_file(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ViT-B-32.pt"
    checkpoint.write_bytes(b"")
    assert resolve(str(checkpoint)) == ModelFiles(str(checkpoint), None, checkpoint)


@pytest.mark.parametrize("spec", ["./missing", "missing.pt", "/nonexistent/model", "~/no-such-model.safetensors",
                                  "models/clip/vit", "no-slash-name", "bad id/with space"])
def test_missing_local_path_is_not_found(spec: str, hf_cache: Path) -> None:
    with pytest.raises(UsageError, match=f"model '{spec}' not found"):
        resolve(spec)
    assert os.listdir(hf_cache) == []


def test_special_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="neither a regular file nor a directory"):
        resolve(str(fifo))


# --------------------------------------------------------------------------------------------------- Hub ids


@pytest.mark.parametrize("offline_argument", [True, False])
def test_hub_id_not_cached_while_offline(offline_argument: bool, hf_cache: Path) -> None:
    with pytest.raises(UsageError) as caught:
        resolve("org/clip-tiny", offline=offline_argument)
    message = str(caught.value)
    assert "'org/clip-tiny'" in message and "offline" in message and "--model" in message
    assert "\n" not in message
    assert os.listdir(hf_cache) == []  # nothing written into the cache


def test_hub_id_not_cached_and_hub_unreachable(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    with pytest.raises(UsageError, match=r"model 'org/clip-tiny' .*cannot be reached \(OSError\).*--model"):
        resolve("org/clip-tiny")


def test_hub_id_from_the_cache(tiny_model_dir: Path, hf_cache: Path) -> None:
    snapshot = cache_repo(hf_cache, "org/clip-tiny", tiny_model_dir)
    files = resolve("org/clip-tiny")
    assert files.directory == snapshot and files.checkpoint is None

    cached, local = load("org/clip-tiny", device="cpu"), load(str(tiny_model_dir), device="cpu")
    assert cached.config == local.config and cached.preprocess == local.preprocess
    assert cached.source == f"org/clip-tiny ({snapshot})"
    texts = ["a photo of a cat.", "two dogs", ""]
    assert torch.equal(cached.tokenizer.encode(texts), local.tokenizer.encode(texts))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        for model in (cached.model, local.model):
            assert model.encode_image(pixels).shape == (2, 16)
        np.testing.assert_array_equal(cached.model.encode_image(pixels), local.model.encode_image(pixels))
        ids = local.tokenizer.encode(texts)
        np.testing.assert_array_equal(cached.model.encode_text(ids), local.model.encode_text(ids))


def sharded_copy(source: Path, destination: Path, safe: bool = True) -> Path:
    """`source` re-saved by transformers as a sharded checkpoint (several shards plus an .index.json)."""
    import transformers

    destination.mkdir()
    model = transformers.CLIPModel.from_pretrained(source)
    if safe:
        model.save_pretrained(destination, max_shard_size="20KB")
    else:  # transformers 5 always writes safetensors: lay out a torch-format sharded checkpoint by hand
        state, weight_map = model.state_dict(), {}
        keys = sorted(state)
        for index, start in enumerate(range(0, len(keys), 20)):
            name = f"pytorch_model-{index:05d}.bin"
            torch.save({k: state[k].contiguous() for k in keys[start:start + 20]}, destination / name)
            weight_map.update({k: name for k in keys[start:start + 20]})
        (destination / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        (destination / "config.json").write_bytes((source / "config.json").read_bytes())
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "preprocessor")):
            (destination / name).write_bytes((source / name).read_bytes())
    return destination


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "torch"])
def test_sharded_checkpoint_directory(tiny_model_dir: Path, tmp_path: Path, safe: bool) -> None:
    sharded = sharded_copy(tiny_model_dir, tmp_path / "sharded", safe)
    index = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
    assert (sharded / index).is_file() and len(list(sharded.glob("*-0000*"))) > 2
    want, got = load(str(tiny_model_dir), device="cpu"), load(str(sharded), device="cpu")
    for key, value in want.model.state_dict().items():
        assert torch.equal(got.model.state_dict()[key], value), key
    assert resolve(str(sharded / index)).directory == sharded  # the index names its directory


def test_sharded_checkpoint_with_a_missing_shard_or_damaged_index(tiny_model_dir: Path, tmp_path: Path) -> None:
    sharded = sharded_copy(tiny_model_dir, tmp_path / "sharded")
    index = sharded / "model.safetensors.index.json"
    shard = sorted(sharded.glob("model-0000*"))[1]
    shard.rename(tmp_path / "aside")
    line = assert_usage_error(CliRunner().invoke(app, ["info", str(sharded)]), shard.name, "missing")
    assert "index.json" in line
    (tmp_path / "aside").rename(shard)
    good = json.loads(index.read_text())
    index.write_text(json.dumps({"weight_map": {**good["weight_map"], "extra.weight": shard.name}}))
    assert_usage_error(CliRunner().invoke(app, ["info", str(sharded)]), "'extra.weight' is listed but in none")
    index.write_text('{"weight_map": {"a": "../escape.safetensors"}}')
    assert_usage_error(CliRunner().invoke(app, ["info", str(sharded)]), "weight_map", "shard files beside it")
    index.write_text("{not json")
    assert_usage_error(CliRunner().invoke(app, ["info", str(sharded)]), "shard index")


def test_sharded_hub_id_from_the_cache(tiny_model_dir: Path, hf_cache: Path, tmp_path: Path) -> None:
    sharded = sharded_copy(tiny_model_dir, tmp_path / "sharded")
    shards = sorted(n for n in os.listdir(sharded) if n.startswith("model-"))
    others = sorted(n for n in os.listdir(sharded) if not n.startswith("model-"))
    cache_repo(hf_cache, "org/clip-partial", sharded, names=others + shards[:-1])  # one shard not downloaded
    with pytest.raises(UsageError, match="'org/clip-partial' is not in the local Hugging Face cache"):
        resolve("org/clip-partial")
    snapshot = cache_repo(hf_cache, "org/clip-sharded", sharded)
    assert resolve("org/clip-sharded").directory == snapshot
    assert load("org/clip-sharded", device="cpu").config == load(str(tiny_model_dir), device="cpu").config


def test_cached_hub_id_without_weights_counts_as_not_cached(tiny_model_dir: Path, hf_cache: Path) -> None:
    cache_repo(hf_cache, "org/clip-tiny", tiny_model_dir, names=["config.json", "tokenizer.json"])
    with pytest.raises(UsageError, match="'org/clip-tiny' is not in the local Hugging Face cache"):
        resolve("org/clip-tiny")


# ------------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("model", [None, "org/clip-tiny"])
def test_cli_offline_error_is_one_line(model: str | None, hf_cache: Path, image_folder: Path) -> None:
    args = ["classify", str(image_folder), "--labels", "cat,dog"] + (["--model", model] if model else [])
    line = assert_usage_error(CliRunner().invoke(app, args))
    assert f"'{model or DEFAULT_MODEL}'" in line and "--model" in line
    line = assert_usage_error(CliRunner().invoke(app, ["info", model or DEFAULT_MODEL]))
    assert f"'{model or DEFAULT_MODEL}'" in line and "--model" in line


def test_cli_uses_a_cached_hub_id(tiny_model_dir: Path, hf_cache: Path) -> None:
    snapshot = cache_repo(hf_cache, "org/clip-tiny", tiny_model_dir)
    result = CliRunner().invoke(app, ["info", "org/clip-tiny"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert f"org/clip-tiny ({snapshot})" in result.stdout
