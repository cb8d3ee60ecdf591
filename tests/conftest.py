"""Shared fixtures: tiny random-weight CLIP checkpoints written by transformers, and the OpenAI-format fixture.

FIXTURE (tests/fixtures/openai-small/) is a small OpenAI-format CLIP archive with random weights made by open_clip, an
implementation we did not write, with open_clip's outputs for its images and texts. tests/make_openai_fixture.py made
it once, in a throwaway environment; the files are committed and the tests only read them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "openai-small"

# Tests never reach the network, the user's Hugging Face cache or the user's embedding index.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["CLIP_INDEX"] = os.path.join(tempfile.mkdtemp(prefix="clipcli-tests-"), "index.db")

TINY = dict(
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", eos_token_id=49407),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8, hidden_act="quick_gelu"),
    projection_dim=16,
)


def make_hf_checkpoint(directory: Path, seed: int = 0, logit_scale: float = 2.0, **overrides) -> Path:
    """Save a random transformers.CLIPModel (TINY config unless overridden) with tokenizer and preprocessor files."""
    import transformers

    from clipcli.preprocess import PreprocessConfig
    from clipcli.tokenizer import ClipTokenizer

    kwargs = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for key, value in overrides.items():
        if isinstance(value, dict):
            kwargs[key].update(value)
        else:
            kwargs[key] = value
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(**kwargs)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
        # Random init gives near-identical embeddings for every input; spread them so tests can see differences.
        for name, param in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name or "logit_scale" in name:
                continue
            param.normal_(0, 0.2 if param.dim() > 1 else 0.05)
    model.save_pretrained(directory)
    ClipTokenizer.bundled(config.text_config.max_position_embeddings).save(directory)
    image_size = config.vision_config.image_size
    import json

    (directory / "preprocessor_config.json").write_text(
        json.dumps(PreprocessConfig.for_image_size(image_size).to_json()))
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP in Hugging Face layout (config.json, model.safetensors, tokenizer, preprocessor)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path):
    """transformers' CLIPModel and CLIPImageProcessor for tiny_model_dir (tests.test_cli.Reference), made once."""
    from tests.test_cli import Reference

    return Reference(tiny_model_dir)


@pytest.fixture()
def in_images_parent(image_folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run from the image folder's parent and name the folder relatively: short paths, as a user types them."""
    monkeypatch.chdir(image_folder.parent)
    return image_folder.name


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour gradients plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / max(width, 1), y / max(height, 1), (x + y) / max(width + height, 1)], axis=-1)
    phase = rng.uniform(0, 6.28, size=3)
    waves = 0.5 + 0.5 * np.sin(base * rng.uniform(3, 12, size=3) + phase)
    pixels = np.clip(waves * 255 + rng.normal(0, 12, size=waves.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of a few photo-like images in several formats and a nested subfolder."""
    folder = tmp_path_factory.mktemp("images")
    photo(64, 48, 1).save(folder / "a.jpg", quality=90)
    photo(40, 60, 2).save(folder / "b.png")
    (folder / "sub").mkdir()
    photo(50, 50, 3).save(folder / "sub" / "c.webp")
    photo(33, 70, 4).save(folder / "sub" / "d.BMP")
    return folder


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """In-process runs of a tiny model are fastest on one intra-op thread, which also keeps OpenMP from spinning
    against the decode threads on a small or busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 small PNGs: at --batch-size 1 --workers 1 a run over them lasts long enough to be interrupted."""
    folder = tmp_path_factory.mktemp("many")
    for i in range(400):
        photo(24, 24, seed=i).save(folder / f"{i:03d}.png")
    return folder


def assert_usage_error(result, *fragments: str) -> str:
    """Exit 2, nothing on stdout, stderr exactly one line 'error: ...' that contains every fragment; returns it."""
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]
