"""`clip convert-weights` and OpenAI/OpenCLIP checkpoints.

The openai-small fixture is committed in tests/fixtures/openai-small/: a small OpenAI-format CLIP TorchScript archive
with random weights (fp16 where OpenAI's files are), its images, and open_clip's outputs for them — made once by
tests/make_openai_fixture.py with open_clip, an implementation we did not write. It is converted from each form a user
may have it in — TorchScript archive, plain state dict, wrapped {"state_dict": {"module.*"}} dict, safetensors — and
must give open_clip's outputs in clipcli and in transformers. Random transformers checkpoints survive
HF -> OpenAI -> HF. Then dtypes, --force, atomic writes, --activation, malformed inputs, config inference, `clip info`.
The fixture's input_ids against our tokenizer: tests/test_tokenizer.py::test_agrees_with_open_clip_fixture.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clipcli import api
from clipcli.cli import app
from clipcli.config import CLIPConfig
from clipcli.errors import UsageError
from clipcli.loader import Clip, convert, load
from clipcli.preprocess import PreprocessConfig, load_image, preprocess
from clipcli.weights import IGNORED_OPENAI_KEYS, build_model, hf_to_openai, openai_to_hf, read_state_dict
from tests.conftest import FIXTURE, assert_usage_error, make_hf_checkpoint

JIT = FIXTURE / "openai-small.jit.pt"
# The fixture's architecture (expected.json; checked against the archive's shapes below): only shapes carry it.
VISION_WIDTH, VISION_LAYERS, PATCH, IMAGE = 64, 3, 8, 32
TEXT_WIDTH, TEXT_LAYERS, EMBED_DIM = 16, 2, 24

COSINE = 0.99999  # per row, fp32 against open_clip's fp32 outputs from the same fp16-stored weights
PROB_ATOL = 1e-4
VARIANTS = ("torchscript", "state_dict", "wrapped", "safetensors")


# ---------------------------------------------------------------------------------------------------- helpers


def run(*args: str):
    return CliRunner().invoke(app, list(args))


error_line = assert_usage_error  # the single stderr line of a usage error (exit 2, nothing on stdout)


def convert_cli(src: Path | str, dst: Path, *options: str) -> Path:
    result = run("convert-weights", str(src), str(dst), *options)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert result.stderr.strip() == f"wrote {dst}"
    return dst


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def encode(clip: Clip, pixel_values: np.ndarray, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw projected (image, text) features of our model for given pixels and ids."""
    with torch.inference_mode():
        image = clip.model.encode_image(torch.from_numpy(pixel_values)).numpy()
        text = clip.model.encode_text(torch.from_numpy(input_ids).long()).numpy()
    return image, text


def hf_features(model, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """transformers' projected (image, text) features; v5 returns output objects, v4 tensors."""
    with torch.inference_mode():
        image = model.get_image_features(pixel_values=pixel_values)
        text = model.get_text_features(input_ids=input_ids)
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))
    return image.float().numpy(), text.float().numpy()


def load_hf(directory: Path, **kwargs):
    """transformers.CLIPModel from `directory`, asserting that every key matched."""
    import transformers

    model, info = transformers.CLIPModel.from_pretrained(directory, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def siblings(path: Path) -> set[str]:
    return set(os.listdir(path.parent))


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def expected() -> dict:
    """open_clip's outputs (expected.npz) plus expected.json (image order, texts, labels, template)."""
    data = dict(np.load(FIXTURE / "expected.npz"))
    meta = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
    return {**data, **meta, "paths": [FIXTURE / "images" / name for name in meta["images"]]}


@pytest.fixture(scope="module")
def fixture_state() -> dict[str, torch.Tensor]:
    """The archive's state dict as torch itself reads it (not through our reader)."""
    return dict(torch.jit.load(str(JIT), map_location="cpu").state_dict())


@pytest.fixture(scope="module")
def checkpoints(fixture_state: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fixture in each checkpoint form a user may hold."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("checkpoints")
    plain = folder / "plain.pt"
    torch.save(fixture_state, plain)
    wrapped = folder / "openclip-wrapped.pt"  # what OpenCLIP training saves: epoch, optimizer, DDP prefixes
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in fixture_state.items()}},
               wrapped)
    safetensors = folder / "openai.safetensors"
    save_file({k: v.contiguous() for k, v in fixture_state.items()}, str(safetensors))
    return {"torchscript": JIT, "state_dict": plain, "wrapped": wrapped, "safetensors": safetensors}


@pytest.fixture(scope="module")
def converted(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each checkpoint form converted by `clip convert-weights` (fp32)."""
    folder = tmp_path_factory.mktemp("converted")
    return {name: convert_cli(path, folder / name) for name, path in checkpoints.items()}


# ------------------------------------------------------------------------------ the fixture against open_clip


def test_preprocessing_gives_the_fixture_pixels(expected: dict) -> None:
    pixels = np.stack([preprocess(load_image(p), PreprocessConfig.for_image_size(32))
                       for p in expected["paths"]])
    np.testing.assert_allclose(pixels, expected["pixel_values"], rtol=0, atol=1e-6)


def test_config_inferred_from_fixture_shapes(fixture_state: dict, expected: dict) -> None:
    config = CLIPConfig.from_state_dict_shapes(shapes(fixture_state))
    vision, text, arch = config.vision, config.text, expected["architecture"]
    assert (vision.hidden_size, vision.num_hidden_layers) == (VISION_WIDTH, VISION_LAYERS)
    assert (vision.patch_size, vision.image_size, vision.intermediate_size) == (PATCH, IMAGE, 4 * VISION_WIDTH)
    assert (text.hidden_size, text.num_hidden_layers) == (TEXT_WIDTH, TEXT_LAYERS)
    # One head per tower: what OpenAI's rule (width // 64, at least one) infers, and what open_clip was built with.
    assert vision.num_attention_heads == text.num_attention_heads == 1
    assert (text.max_position_embeddings, text.vocab_size, text.intermediate_size) == (77, 49408, 4 * TEXT_WIDTH)
    assert config.projection_dim == EMBED_DIM == arch["embed_dim"]
    assert vision.hidden_act == text.hidden_act == arch["activation"] == "quick_gelu"
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size) == (
        arch["vision"]["width"], arch["vision"]["layers"], arch["vision"]["heads"], arch["vision"]["patch_size"])
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.vocab_size) == (
        arch["text"]["width"], arch["text"]["layers"], arch["text"]["heads"], arch["text"]["vocab_size"])


def test_key_mapping_covers_both_ways(fixture_state: dict) -> None:
    """Every source key is used, every model key produced, and hf_to_openai undoes openai_to_hf bit for bit."""
    config = CLIPConfig.from_state_dict_shapes(shapes(fixture_state))
    hf = openai_to_hf(fixture_state)
    model_keys = set(build_model(config, hf).state_dict())
    assert set(hf) == model_keys and len(hf) == len(model_keys)
    back = hf_to_openai(hf)
    source = {k: v for k, v in fixture_state.items() if k not in IGNORED_OPENAI_KEYS}
    assert set(back) == set(source)
    for key, value in source.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def check_against_open_clip(clip: Clip, expected: dict) -> None:
    """Features from the fixture's pixels/ids, from the image files, and zero-shot probabilities."""
    image, text = encode(clip, expected["pixel_values"], expected["input_ids"])
    assert cosines(image, expected["image_embeds"]).min() >= COSINE
    assert cosines(text, expected["text_embeds"]).min() >= COSINE
    np.testing.assert_allclose(image, expected["image_embeds"], atol=1e-4)
    np.testing.assert_allclose(text, expected["text_embeds"], atol=1e-4)
    assert float(clip.model.logit_scale) == pytest.approx(float(expected["logit_scale"]), abs=1e-6)
    # Through our image loading + preprocessing and our tokenizer, as `clip classify` computes them.
    from_files = api.encode_images(clip, expected["paths"], normalized=False)
    assert cosines(from_files, expected["image_embeds"]).min() >= COSINE
    prompts = [expected["template"].replace("{}", label) for label in expected["labels"]]
    assert cosines(clip.text_features(prompts), expected["label_text_embeds"]).min() >= COSINE
    probs = api.zero_shot(clip, expected["paths"], expected["labels"], templates=[expected["template"]])
    np.testing.assert_allclose(probs, expected["probs"], rtol=0, atol=PROB_ATOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_fixture_gives_open_clips_outputs(variant: str, converted: dict, expected: dict) -> None:
    directory = converted[variant]
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors", "preprocessor_config.json",
                                             "tokenizer.json", "tokenizer_config.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~umask  # as mkdir makes it, not mkdtemp's 0700
    clip = load(str(directory), device="cpu")
    assert clip.preprocess == PreprocessConfig.from_json(
        json.loads((directory / "preprocessor_config.json").read_text(encoding="utf-8")))
    pixels = np.stack([preprocess(load_image(p), clip.preprocess) for p in expected["paths"]])
    np.testing.assert_allclose(pixels, expected["pixel_values"], rtol=0, atol=1e-6)
    check_against_open_clip(clip, expected)


@pytest.mark.parametrize("variant", ["wrapped", "safetensors"])  # torchscript, state_dict: the CLI tests below
def test_checkpoint_file_used_directly_gives_open_clips_outputs(variant: str, checkpoints: dict,
                                                                expected: dict) -> None:
    """--model FILE: converted in memory, nothing written beside it."""
    before = siblings(checkpoints[variant])
    check_against_open_clip(load(str(checkpoints[variant]), device="cpu"), expected)
    assert siblings(checkpoints[variant]) == before


def test_every_checkpoint_form_converts_to_the_same_files(converted: dict) -> None:
    """So what is shown for one converted directory (e.g. that transformers loads it) holds for all."""
    reference = converted["torchscript"]
    for directory in converted.values():
        for name in os.listdir(reference):
            assert (directory / name).read_bytes() == (reference / name).read_bytes(), (directory, name)


def test_transformers_loads_converted_fixture(converted: dict, expected: dict) -> None:
    import transformers

    directory = converted["torchscript"]
    model = load_hf(directory)
    image, text = hf_features(model, torch.from_numpy(expected["pixel_values"]),
                              torch.from_numpy(expected["input_ids"]))
    assert cosines(image, expected["image_embeds"]).min() >= COSINE
    assert cosines(text, expected["text_embeds"]).min() >= COSINE
    ours = encode(load(str(directory), device="cpu"), expected["pixel_values"], expected["input_ids"])
    np.testing.assert_allclose(image, ours[0], atol=1e-5)
    np.testing.assert_allclose(text, ours[1], atol=1e-5)

    # Its processors load the directory too, and agree with open_clip's pixels and our tokenizer.
    processor = transformers.AutoProcessor.from_pretrained(directory)
    image_processor = transformers.CLIPImageProcessorPil.from_pretrained(directory)
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in expected["paths"]]
    for proc in (image_processor, processor.image_processor):
        pixels = proc(images=images, return_tensors="pt")["pixel_values"].numpy()
        np.testing.assert_allclose(pixels, expected["pixel_values"], rtol=0, atol=1e-6)
    prompts = [expected["template"].replace("{}", label) for label in expected["labels"]]
    ours_ids = load(str(directory), device="cpu").tokenizer.encode(prompts).tolist()
    for tokenizer in (transformers.CLIPTokenizer.from_pretrained(directory), processor.tokenizer):
        theirs = tokenizer(prompts)["input_ids"]
        assert [row[:len(ids)] for row, ids in zip(ours_ids, theirs, strict=True)] == theirs
    # And zero-shot probabilities as the contract defines them: logits_per_image.softmax(-1).
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.inference_mode():
        probs = model(**inputs).logits_per_image.softmax(-1).numpy()
    np.testing.assert_allclose(probs, expected["probs"], rtol=0, atol=PROB_ATOL)


# ------------------------------------------------------------------------------------ --model FILE in the CLI


def test_classify_with_pt_file_matches_open_clip(checkpoints: dict, expected: dict) -> None:
    before = siblings(checkpoints["state_dict"])
    result = run("classify", *map(str, expected["paths"]), "--labels", ",".join(expected["labels"]),
                 "-t", expected["template"], "-f", "jsonl", "--model", str(checkpoints["state_dict"]),
                 "--device", "cpu", "-q")
    assert result.exit_code == 0, (result.stderr, result.exception)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["path"]).name for r in rows] == sorted(expected["images"])
    for row in rows:
        index = expected["images"].index(Path(row["path"]).name)
        probs = [row["scores"][label] for label in expected["labels"]]
        np.testing.assert_allclose(probs, expected["probs"][index], rtol=0, atol=PROB_ATOL)
        assert row["label"] == expected["labels"][int(np.argmax(expected["probs"][index]))]
    assert siblings(checkpoints["state_dict"]) == before  # converted in memory only


def test_embed_with_jit_file_matches_open_clip(expected: dict, tmp_path: Path) -> None:
    output = tmp_path / "emb.npy"
    result = run("embed", *map(str, expected["paths"]), "-o", str(output), "--model", str(JIT), "--device", "cpu",
                 "-q")
    assert result.exit_code == 0, (result.stderr, result.exception)
    rows = np.load(output)
    paths = [Path(line).name for line in (tmp_path / "emb.paths.txt").read_text(encoding="utf-8").splitlines()]
    reference = expected["image_embeds"][[expected["images"].index(name) for name in paths]]
    assert rows.dtype == np.float32 and rows.shape == (5, EMBED_DIM)
    assert cosines(rows, reference).min() >= COSINE
    np.testing.assert_allclose(np.linalg.norm(rows, axis=-1), 1, atol=1e-5)


# ------------------------------------------------------------------- round trip of random transformers models

# OpenAI files carry no head count: it is inferred as width / 64 (openai/CLIP's rule), so these configs follow it.
ROUND_TRIP = {
    "wide-vision": dict(vision_config=dict(hidden_size=128, num_attention_heads=2, intermediate_size=96),
                        text_config=dict(hidden_size=64, num_attention_heads=1, num_hidden_layers=1)),
    "gelu-patch16-48px": dict(
        vision_config=dict(hidden_size=64, num_attention_heads=1, num_hidden_layers=3, patch_size=16, image_size=48,
                           hidden_act="gelu"),
        text_config=dict(hidden_size=128, num_attention_heads=2, intermediate_size=256, hidden_act="gelu",
                         max_position_embeddings=40),
        projection_dim=24),
    "patch4-16px": dict(vision_config=dict(hidden_size=64, num_attention_heads=1, patch_size=4, image_size=16),
                        text_config=dict(hidden_size=64, num_attention_heads=1), projection_dim=8),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_round_trip_through_openai_format(name: str, tmp_path: Path) -> None:
    """HF -> hf_to_openai -> torch.save -> convert-weights -> HF: same tensors, same outputs (transformers and ours)."""
    from safetensors.torch import load_file

    overrides = ROUND_TRIP[name]
    original = make_hf_checkpoint(tmp_path / "hf", seed=len(name), **overrides)
    reference = load_hf(original)
    hf_config = reference.config
    state = load_file(str(original / "model.safetensors"))
    checkpoint = tmp_path / "openai.pt"
    torch.save(hf_to_openai(state), checkpoint)

    act = hf_config.vision_config.hidden_act
    out = convert_cli(checkpoint, tmp_path / "out", *(["--activation", act] if act != "quick_gelu" else []))

    # Config inferred from the OpenAI file's shapes equals the original one.
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    for section, theirs in (("vision_config", hf_config.vision_config), ("text_config", hf_config.text_config)):
        fields = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act"]
        fields += ["patch_size", "image_size"] if section == "vision_config" else ["max_position_embeddings",
                                                                                 "vocab_size"]
        assert {f: config[section][f] for f in fields} == {f: getattr(theirs, f) for f in fields}, section
    assert config["projection_dim"] == hf_config.projection_dim
    # Same tensors, bit for bit.
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == {k for k in state if not k.endswith("position_ids")}
    for key, value in written.items():
        assert torch.equal(value, state[key]), key

    torch.manual_seed(1)
    size = hf_config.vision_config.image_size
    pixels = torch.randn(3, 3, size, size)
    clip = load(str(out), device="cpu")
    ids = clip.tokenizer.encode(["a photo of a cat.", "", "a much longer sentence about a dog on a red sofa"])
    want = hf_features(reference, pixels, ids)
    for got in (hf_features(load_hf(out), pixels, ids), encode(clip, pixels.numpy(), ids.numpy())):
        np.testing.assert_allclose(got[0], want[0], atol=1e-5)
        np.testing.assert_allclose(got[1], want[1], atol=1e-5)


def test_bare_hf_state_dict_file_infers_its_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A transformers state dict without config.json: config from shapes (heads by OpenAI's width / 64 rule)."""
    from safetensors.torch import load_file

    state = load_file(str(tiny_model_dir / "model.safetensors"))
    torch.save(state, tmp_path / "hf.bin")
    clip = load(str(tmp_path / "hf.bin"), device="cpu")
    vision, text = clip.config.vision, clip.config.text
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size) == (32, 2, 8, 32)
    assert (text.hidden_size, text.num_hidden_layers, text.max_position_embeddings) == (32, 2, 77)
    assert vision.num_attention_heads == text.num_attention_heads == 1  # 32 // 64, at least one
    assert clip.config.projection_dim == 16


# --------------------------------------------------------------------------------------- dtypes and re-saving


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_option_writes_that_dtype(dtype: str, torch_dtype: torch.dtype, expected: dict,
                                        tmp_path: Path) -> None:
    from safetensors import safe_open

    out = convert_cli(JIT, tmp_path / dtype, "--dtype", dtype)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118  # safe_open is not a dict == {"F16" if dtype == "fp16" else "BF16"}
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["torch_dtype"] == str(torch_dtype)[6:]
    model = load_hf(out, dtype=torch.float32)
    image, text = hf_features(model, torch.from_numpy(expected["pixel_values"]),
                              torch.from_numpy(expected["input_ids"]))
    floor = 0.999 if dtype == "fp16" else 0.99  # weights rounded to 10 (fp16) or 7 (bf16) mantissa bits
    assert cosines(image, expected["image_embeds"]).min() >= floor
    assert cosines(text, expected["text_embeds"]).min() >= floor
    ours = encode(load(str(out), device="cpu", dtype="fp32"), expected["pixel_values"], expected["input_ids"])
    np.testing.assert_allclose(ours[0], image, atol=1e-5)


def test_invalid_dtype_is_a_usage_error(tmp_path: Path) -> None:
    line = error_line(run("convert-weights", str(JIT), str(tmp_path / "out"), "--dtype", "int8"))
    assert "int8" in line and "fp16" in line
    assert not (tmp_path / "out").exists()


def test_resaves_pytorch_model_bin_directory_as_safetensors(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    state = load_file(str(tiny_model_dir / "model.safetensors"))
    # Older checkpoints carry the position_ids buffers, which are dropped by name.
    extra = {f"{tower}.embeddings.position_ids": torch.arange(n)[None] for tower, n in (("text_model", 77),
                                                                                       ("vision_model", 17))}
    torch.save({**state, **extra}, legacy / "pytorch_model.bin")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (legacy / name).write_bytes((tiny_model_dir / name).read_bytes())

    out = convert_cli(legacy, tmp_path / "out")
    assert "pytorch_model.bin" not in os.listdir(out)
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(state) and all(torch.equal(written[k], state[k]) for k in state)
    before, after = load(str(tiny_model_dir), device="cpu"), load(str(out), device="cpu")
    assert before.config == after.config
    ids = before.tokenizer.encode(["a cat", "two dogs on a sofa"])
    pixels = torch.randn(2, 3, 32, 32)
    pairs = zip(encode(before, pixels.numpy(), ids.numpy()), encode(after, pixels.numpy(), ids.numpy()), strict=True)
    for x, y in pairs:
        np.testing.assert_array_equal(x, y)
    load_hf(out)


# -------------------------------------------------------------------------------- destination: force, atomic


def test_refuses_a_non_empty_destination_without_force(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    line = error_line(run("convert-weights", str(JIT), str(dst)))
    assert str(dst) in line and "--force" in line
    assert os.listdir(dst) == ["notes.txt"] and (dst / "notes.txt").read_text() == "mine"
    # --force only ever deletes a model directory, never e.g. a home folder given by mistake.
    line = error_line(run("convert-weights", str(JIT), str(dst), "--force"))
    assert "config.json" in line and os.listdir(dst) == ["notes.txt"]
    # A file as DST.
    line = error_line(run("convert-weights", str(JIT), str(dst / "notes.txt")))
    assert "not a directory" in line
    assert siblings(dst) == {"out"}


def test_an_empty_destination_is_filled_and_force_replaces_a_model_directory(tiny_model_dir: Path,
                                                                            tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    convert_cli(tiny_model_dir, dst)  # empty: no --force needed
    (dst / "stale.txt").write_text("left from an older conversion")
    line = error_line(run("convert-weights", str(JIT), str(dst)))
    assert "--force" in line and "stale.txt" in os.listdir(dst)
    convert_cli(JIT, dst, "--force")
    assert "stale.txt" not in os.listdir(dst)
    assert load(str(dst), device="cpu").config.vision.hidden_size == VISION_WIDTH
    assert siblings(dst) == {"out"}  # no temp or old directories left beside it


def test_converting_a_directory_onto_itself_with_force(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for name in os.listdir(tiny_model_dir):
        (model / name).write_bytes((tiny_model_dir / name).read_bytes())
    convert_cli(model, model, "--force", "--dtype", "fp16")
    assert load(str(model), device="cpu").config == load(str(tiny_model_dir), device="cpu").config
    assert siblings(model) == {"model"}


@pytest.mark.parametrize("case", ["parent-is-a-file", "name-too-long", "parent-missing-and-unmakeable",
                                  "current-folder", "folder-holding-the-current-one"])
def test_unusable_destinations_are_one_line_usage_errors(case: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a-file").write_text("x")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    dst, fragment = {
        "parent-is-a-file": (str(tmp_path / "a-file" / "model"), "choose another destination"),
        "name-too-long": (str(tmp_path / ("x" * 300)), "file name too long"),
        "parent-missing-and-unmakeable": (str(tmp_path / "a-file" / "deeper" / "model"), "choose another"),
        "current-folder": (".", "current folder"),
        "folder-holding-the-current-one": ("..", "current folder"),
    }[case]
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(work))
    error_line(run("convert-weights", str(JIT), dst, "--force"), fragment)
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(work))) == before  # nothing left behind


def test_a_destination_that_links_to_an_empty_folder_is_written_through(tmp_path: Path) -> None:
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    convert_cli(JIT, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["link", "target"]


def test_converted_weights_are_readable_like_the_other_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    dst = convert_cli(tiny_model_dir, tmp_path / "out")
    modes = {f.name: f.stat().st_mode & 0o777 for f in dst.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_refuses_a_source_inside_the_destination(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "config.json").write_text("{}")  # a model directory, which --force may replace
    (dst / "orig.pt").write_bytes(JIT.read_bytes())
    line = error_line(run("convert-weights", str(dst / "orig.pt"), str(dst), "--force"))
    assert "inside" in line and (dst / "orig.pt").is_file()


@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_while_writing_leaves_the_destination_as_it_was(existing: bool, tiny_model_dir: Path,
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from clipcli.tokenizer import ClipTokenizer

    dst = tmp_path / "out"
    if existing:
        convert_cli(tiny_model_dir, dst)
    before = {name: (dst / name).read_bytes() for name in os.listdir(dst)} if existing else None

    def broken_save(self, directory: Path) -> None:
        (Path(directory) / "tokenizer.json").write_text("{half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ClipTokenizer, "save", broken_save)
    with pytest.raises(UsageError, match="cannot write .*out: no space left on device; choose another destination"):
        convert(str(tiny_model_dir), dst, force=True)
    if existing:
        assert {name: (dst / name).read_bytes() for name in os.listdir(dst)} == before
    else:
        assert not dst.exists()
    assert siblings(dst) == ({"out"} if existing else set())


# ------------------------------------------------------------------------------------------------- --activation


def test_activation_help_lists_every_accepted_value() -> None:
    from clipcli.config import ACTIVATIONS

    result = run("convert-weights", "--help")
    assert result.exit_code == 0
    words = " ".join(result.stdout.split())
    assert all(activation in words for activation in ACTIVATIONS), words


def test_activation_option_sets_hidden_act(converted: dict, tmp_path: Path) -> None:
    out = convert_cli(JIT, tmp_path / "gelu", "--activation", "gelu")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["text_config"]["hidden_act"] == config["vision_config"]["hidden_act"] == "gelu"
    assert load(str(out), device="cpu").config.vision.hidden_act == "gelu"
    default = json.loads((converted["torchscript"] / "config.json").read_text(encoding="utf-8"))
    assert default["text_config"]["hidden_act"] == default["vision_config"]["hidden_act"] == "quick_gelu"


def test_activation_option_overrides_a_directory_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = convert_cli(tiny_model_dir, tmp_path / "out", "--activation", "gelu_new")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["text_config"]["hidden_act"] == config["vision_config"]["hidden_act"] == "gelu_new"
    source = json.loads((tiny_model_dir / "config.json").read_text(encoding="utf-8"))
    assert config["vision_config"]["num_attention_heads"] == source["vision_config"]["num_attention_heads"] == 4


def test_invalid_activation_is_one_line_usage_error(tmp_path: Path) -> None:
    line = error_line(run("convert-weights", str(JIT), str(tmp_path / "out"), "--activation", "tanh"))
    assert "tanh" in line and "quick_gelu" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- malformed input


class RunsShellOnLoad:
    """A pickle that runs a shell command when unpickled by an unsafe loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _without(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def _with(state: dict, key: str, value: torch.Tensor) -> dict:
    return {**state, key: value}


MALFORMED = {
    # name: (build(state, folder) -> path, fragment expected in the error line)
    "truncated-torchscript": (lambda s, d: _truncated(JIT, d / "half.jit.pt"), "truncated"),
    "truncated-state-dict": (lambda s, d: _truncated(_saved(s, d / "full.pt"), d / "half.pt"), "truncated"),
    "truncated-safetensors": (lambda s, d: _truncated(_safetensors(s, d / "full.safetensors"),
                                                      d / "half.safetensors"), "cannot read checkpoint"),
    "empty-file": (lambda s, d: _written(d / "empty.pt", b""), "empty file"),
    "text-file": (lambda s, d: _written(d / "notes.pt", b"not weights\n"), "not a checkpoint"),
    "extra-key": (lambda s, d: _saved(_with(s, "visual.extra.weight", torch.zeros(3)), d / "x.pt"),
                  "unexpected checkpoint key 'visual.extra.weight'"),
    "missing-block": (lambda s, d: _saved(_without(s, "visual.transformer.resblocks.1."), d / "x.pt"),
                      "not numbered 0..N-1"),
    "missing-key": (lambda s, d: _saved(_without(s, "transformer.resblocks.1.ln_2.bias"), d / "x.pt"),
                    "missing 'text_model.encoder.layers.1.layer_norm2.bias'"),
    "positions-not-a-grid": (lambda s, d: _saved(_with(s, "visual.positional_embedding",
                                                       torch.zeros(18, VISION_WIDTH)), d / "x.pt"),
                             "inconsistent vision shapes"),
    "positions-wrong-width": (lambda s, d: _saved(_with(s, "visual.positional_embedding", torch.zeros(17, 100)),
                                                  d / "x.pt"), "inconsistent vision shapes"),
    "qkv-not-divisible-by-3": (lambda s, d: _saved(_with(s, "transformer.resblocks.0.attn.in_proj_weight",
                                                         torch.zeros(3 * TEXT_WIDTH - 1, TEXT_WIDTH)), d / "x.pt"),
                               "not 3 x width"),
    "qkv-wrong-width": (lambda s, d: _saved(_with(s, "transformer.resblocks.0.attn.in_proj_weight",
                                                  torch.zeros(3 * (TEXT_WIDTH + 2), TEXT_WIDTH)), d / "x.pt"),
                        "text_model.encoder.layers.0.self_attn.q_proj.weight' has shape "
                        f"({TEXT_WIDTH + 2}, {TEXT_WIDTH})"),
    "resnet": (lambda s, d: _saved({"visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
                                    "visual.attnpool.positional_embedding": torch.zeros(50, 2048),
                                    **_without(s, "visual.")}, d / "rn50.pt"), "ResNet"),
    # As OpenAI's RN50 really is: its ResNet stem has a visual.conv1 too, which must not pass it for a ViT.
    "resnet-with-stem": (lambda s, d: _saved({"visual.conv1.weight": torch.zeros(32, 3, 3, 3),
                                              "visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
                                              "visual.attnpool.c_proj.weight": torch.zeros(16, 2048),
                                              **_without(s, "visual.")}, d / "rn50.pt"), "ResNet CLIP"),
    "no-tensors": (lambda s, d: _saved({"epoch": 3, "note": "hello"}, d / "x.pt"), "no state dict of tensors"),
    "not-clip": (lambda s, d: _saved({"encoder.weight": torch.zeros(2, 2)}, d / "x.pt"), "not a CLIP checkpoint"),
}


def _saved(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _safetensors(state: dict, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(source: Path, path: Path) -> Path:
    data = source.read_bytes()
    return _written(path, data[:len(data) // 2])


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_checkpoint_is_one_line_usage_error(case: str, fixture_state: dict, tmp_path: Path) -> None:
    build, fragment = MALFORMED[case]
    source = tmp_path / "src"
    source.mkdir()
    path = build(fixture_state, source)
    dst = tmp_path / "out"
    line = error_line(run("convert-weights", str(path), str(dst)))
    assert fragment in line, line
    assert not dst.exists() and siblings(dst) == {"src"}
    # The same file as --model gives the same one line.
    assert error_line(run("info", str(path))) == line


def test_a_pickle_that_is_not_weights_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "it-ran"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"state_dict": RunsShellOnLoad(marker)}, checkpoint)
    legacy = tmp_path / "evil-legacy.pt"
    torch.save(RunsShellOnLoad(marker), legacy, _use_new_zipfile_serialization=False)
    for path in (checkpoint, legacy):
        line = error_line(run("convert-weights", str(path), str(tmp_path / "out")))
        assert "refused" in line and "posix.system" in line, line
        with pytest.raises(UsageError, match="refused"):
            read_state_dict(path)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_inconsistent_shapes_raise_usage_error(fixture_state: dict) -> None:
    good = shapes(fixture_state)
    CLIPConfig.from_state_dict_shapes(good)
    bad = [
        {"visual.conv1.weight": (VISION_WIDTH, 3, PATCH, PATCH - 1)},  # non-square patch
        {"visual.positional_embedding": (18, VISION_WIDTH)},  # 17 = 4 x 4 + 1 tokens; 18 is no grid
        {"visual.positional_embedding": (17, VISION_WIDTH - 1)},
        {"text_projection": (TEXT_WIDTH - 1, EMBED_DIM)},
        {"visual.proj": (VISION_WIDTH, EMBED_DIM + 1)},
        {"positional_embedding": (77, 2 * TEXT_WIDTH)},
        {"visual.conv1.weight": (VISION_WIDTH, 3, PATCH)},  # wrong rank
    ]
    for change in bad:
        with pytest.raises(UsageError):
            CLIPConfig.from_state_dict_shapes({**good, **change})
    for missing in ("visual.conv1.weight", "text_projection", "token_embedding.weight"):
        with pytest.raises(UsageError, match="conv1|lacks"):
            CLIPConfig.from_state_dict_shapes({k: v for k, v in good.items() if k != missing})


def test_hf_to_openai_names_what_is_missing_or_unknown(tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(tiny_model_dir / "model.safetensors"))
    with pytest.raises(UsageError, match="k_proj"):
        hf_to_openai({k: v for k, v in state.items() if "layers.0.self_attn.k_proj.bias" not in k})
    with pytest.raises(UsageError, match="differ in shape"):
        hf_to_openai({**state, "text_model.encoder.layers.0.self_attn.v_proj.bias": torch.zeros(31)})
    with pytest.raises(UsageError, match="unexpected checkpoint key 'text_model.pooler.weight'"):
        hf_to_openai({**state, "text_model.pooler.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------- clip info


@pytest.mark.parametrize("variant", ["torchscript", "converted"])
def test_info(variant: str, fixture_state: dict, converted: dict) -> None:
    model = str(JIT if variant == "torchscript" else converted["torchscript"])
    result = run("info", model)
    assert result.exit_code == 0, (result.stderr, result.exception)
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    params = sum(v.numel() for k, v in fixture_state.items() if k not in IGNORED_OPENAI_KEYS)
    assert fields["parameters"] == f"{params:,}"
    assert fields["image size"] == "32x32"
    assert fields["context length"] == "77"
    # As stored: OpenAI's fp16 files keep embeddings and layer norms in float32 (most elements here), the
    # converted directory is float32 throughout; both compute in float32 on the CPU.
    assert fields["dtype"] == ("float32 + float16" if variant == "torchscript" else "float32")
    assert fields["compute dtype"] == "float32"
    assert fields["source"] == model
    assert fields["embedding dim"] == str(EMBED_DIM) and fields["activation"] == "quick_gelu"
