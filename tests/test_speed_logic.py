"""The logic behind the fast paths, checked on CPU without timing anything: device and dtype selection, results
that leave as float32 whatever the model dtype, text padded to the longest prompt, bounded and ordered decoding,
batches of exactly --batch-size, and the opt-in JPEG draft decode."""

from __future__ import annotations

import platform
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from clipcli import pipeline
from clipcli.errors import UsageError
from clipcli.loader import load, place_model, resolve_device, resolve_dtype
from clipcli.preprocess import load_image, preprocess
from tests.conftest import photo


@pytest.fixture(scope="module")
def clip(tiny_model_dir: Path):
    return load(str(tiny_model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Eleven JPEGs, large enough for draft mode to decode them at reduced scale."""
    folder = tmp_path_factory.mktemp("speed-photos")
    paths = []
    for index in range(11):
        path = folder / f"p{index:02d}.jpg"
        photo(160 + 8 * index, 120 + 4 * index, seed=index).save(path, quality=90)
        paths.append(str(path))
    return paths


# 1. device and dtype selection


@pytest.fixture
def no_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_device_is_cpu_without_accelerators(no_accelerator: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_device_prefers_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("name", ["cuda", "cuda:1", "mps"])
def test_absent_device_is_a_usage_error(no_accelerator: None, name: str) -> None:
    with pytest.raises(UsageError, match="--device cpu or auto"):
        resolve_device(name)


def test_unknown_device_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.parametrize(("name", "device", "expected"), [
    ("auto", "cpu", torch.float32),  # reference-identical by default
    ("auto", "mps", torch.float32),
    ("auto", "cuda", torch.float16),
    ("auto", "cuda:1", torch.float16),
    ("fp32", "cuda", torch.float32),
    ("bf16", "cpu", torch.bfloat16),  # lower precision on CPU only when asked for
    ("fp16", "cpu", torch.float16),
])
def test_dtype_selection(name: str, device: str, expected: torch.dtype) -> None:
    assert resolve_dtype(name, torch.device(device)) == expected


def test_reduced_precision_without_autocast_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.raises(UsageError, match=r"--dtype bf16 cannot run on cpu here \(torch .* has no autocast for cpu\); "
                                         "use --dtype fp16 or fp32"):
        resolve_dtype("bf16", torch.device("cpu"))
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32


def test_bf16_on_a_gpu_without_it_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a pre-Ampere GPU: torch's autocast refuses bf16 there, which must not surface inside the model.
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(UsageError, match=r"--dtype bf16 cannot run on cuda here \(.*bfloat16.*\); use --dtype fp16"):
        resolve_dtype("bf16", torch.device("cuda"))
    assert resolve_dtype("fp16", torch.device("cuda")) == torch.float16


def test_a_dtype_that_autocast_would_disable_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where torch only warns and turns autocast off (e.g. a dtype MPS's autocast lacks), the model would fail later.
    class WarningAutocast:
        def __init__(self, device_type: str, dtype: torch.dtype) -> None:
            warnings.warn("In CPU autocast, but the target dtype is not supported. Disabling autocast.", stacklevel=2)

    monkeypatch.setattr(torch, "autocast", WarningAutocast)
    with pytest.raises(UsageError, match=r"--dtype fp16 cannot run on cpu here \(In CPU autocast, but the target "
                                         r"dtype is not supported\); use --dtype fp32"):
        resolve_dtype("fp16", torch.device("cpu"))


def test_unknown_dtype_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", torch.device("cpu"))


def test_decode_ahead_only_on_accelerators() -> None:
    # CPU: the model uses every core, so batches are decoded between model calls; a GPU overlaps them.
    assert pipeline.decode_ahead(torch.device("cpu")) == 0
    assert pipeline.decode_ahead(torch.device("cuda")) > 0
    assert pipeline.decode_ahead(torch.device("mps")) > 0


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_sets_glibc_malloc_options() -> None:
    # In a child process: the setting is process-wide, and this test process should keep its defaults.
    code = "from clipcli.pipeline import keep_freed_memory; print(keep_freed_memory())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


def test_loading_and_classifying_never_import_torch_dynamo(tiny_model_dir: Path, photos: list[str]) -> None:
    # Importing torch._dynamo costs about a second of every start; building the model on the meta device used to
    # pull it in through nn.Embedding's random init. Checked in a child process, without timing anything.
    code = ("import sys; from clipcli import pipeline; from clipcli.loader import load; "
            "clip = load(sys.argv[1], device='cpu', dtype=sys.argv[2]); "
            "list(pipeline.classify(clip, sys.argv[3:], ['cat', 'dog'])); print('torch._dynamo' in sys.modules)")
    for dtype in ("fp32", "bf16"):
        done = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir), dtype, *photos[:2]],
                              capture_output=True, text=True, check=True)
        assert done.stdout.strip() == "False", dtype


# 2. lower precision: float32 results, close to fp32


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_gives_float32_results_close_to_fp32(tiny_model_dir: Path, clip, photos: list[str],
                                                           dtype: str) -> None:
    low = load(str(tiny_model_dir), device="cpu", dtype=dtype)
    assert low.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    full = np.concatenate([b.rows for b in pipeline.image_features(clip, photos)])
    rows = np.concatenate([b.rows for b in pipeline.image_features(low, photos)])
    assert rows.dtype == np.float32 and rows.shape == full.shape
    cosine = (pipeline.normalize(rows) * pipeline.normalize(full)).sum(-1)
    assert cosine.min() > 0.99
    texts = pipeline.text_features(low, ["a photo of a cat.", "a rocket"])
    assert texts.dtype == np.float32
    probs = np.concatenate([b.rows for b in pipeline.classify(low, photos, ["cat", "dog", "rocket"])])
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
    expected = np.concatenate([b.rows for b in pipeline.classify(clip, photos, ["cat", "dog", "rocket"])])
    assert np.abs(probs - expected).max() < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_stores_only_image_matmul_weights_low(tiny_model_dir: Path, dtype: torch.dtype) -> None:
    model = load(str(tiny_model_dir), device="cpu", dtype="fp32").model
    placed = place_model(model, torch.device("cpu"), dtype)
    low = {name for name, p in placed.named_parameters() if p.dtype == dtype}
    matmuls = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    expected = {name for name, _ in placed.named_parameters() if name.startswith("vision_model.encoder.")
                and name.rsplit(".", 2)[-2] in matmuls}
    expected |= {"vision_model.embeddings.patch_embedding.weight", "visual_projection.weight"}
    assert low == expected and len(expected) == 2 + 12 * placed.config.vision.num_hidden_layers
    # Layer norms, class and position embeddings, logit_scale and the whole text tower stay float32.
    assert all(p.dtype == torch.float32 for name, p in placed.named_parameters() if name not in low)


def test_reduced_precision_keeps_text_in_float32_and_image_tower_closer_than_a_whole_cast(
        tiny_model_dir: Path, clip, photos: list[str]) -> None:
    low = load(str(tiny_model_dir), device="cpu", dtype="bf16")
    texts = ["a photo of a cat.", "a blurry photo of a very large golden retriever."]
    np.testing.assert_array_equal(pipeline.text_features(low, texts), pipeline.text_features(clip, texts))
    full = np.concatenate([b.rows for b in pipeline.image_features(clip, photos)])
    mixed = np.concatenate([b.rows for b in pipeline.image_features(low, photos)])
    # The naive alternative: everything, residual sums included, in bf16.
    cast = load(str(tiny_model_dir), device="cpu", dtype="fp32").model.to(torch.bfloat16)
    with torch.inference_mode():
        pixels = torch.stack([preprocess(load_image(Path(p)), clip.preprocess) for p in photos])
        whole = cast.encode_image(pixels.to(torch.bfloat16)).float().numpy()
    mixed_error = np.abs(mixed - full).max()
    assert 0 < mixed_error < np.abs(whole - full).max()


# 3. text: encoded once, padded to the longest prompt


def test_text_is_padded_to_the_longest_prompt_and_matches_77_padding(clip, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = ["a photo of a cat.", "a blurry photo of a very large golden retriever.", "x"]
    widths: list[int] = []
    encode_text = clip.model.encode_text
    monkeypatch.setattr(clip.model, "encode_text", lambda ids: widths.append(ids.shape[1]) or encode_text(ids))
    ours = pipeline.text_features(clip, texts)
    ids = clip.tokenizer.encode(texts)
    assert widths == [ids.shape[1]] and ids.shape[1] < 77
    padded = torch.full((len(texts), 77), clip.tokenizer.pad_token_id, dtype=torch.long)
    padded[:, :ids.shape[1]] = ids
    with torch.inference_mode():
        reference = encode_text(padded).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_labels_are_encoded_once_per_run(clip, photos: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    encode_text = clip.model.encode_text
    monkeypatch.setattr(clip.model, "encode_text", lambda ids: calls.append(ids.shape[0]) or encode_text(ids))
    batches = list(pipeline.classify(clip, photos, ["cat", "dog"], ["a photo of a {}.", "a {}"], batch_size=2))
    assert len(batches) == 6
    assert calls == [4]  # labels x templates, one model call


# 4. batching and decoding


def test_batches_hold_exactly_batch_size_images_despite_failures(clip, photos: list[str], tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff" + b"\0" * 40)
    paths = photos[:3] + [str(broken)] + photos[3:]
    failures: list[pipeline.Failure] = []
    done: list[int] = []
    batches = list(pipeline.image_features(clip, paths, batch_size=4, workers=3, on_failure=failures.append,
                                           progress=done.append))
    assert [len(b.paths) for b in batches] == [4, 4, 3]
    assert [p for b in batches for p in b.paths] == photos
    assert [f.path for f in failures] == [str(broken)]
    assert sum(done) == len(paths)


@pytest.mark.parametrize(("batch_size", "workers"), [(1, 1), (3, 2), (32, 4)])
def test_results_do_not_depend_on_batching_or_workers(clip, photos: list[str], batch_size: int, workers: int) -> None:
    expected = pipeline.encode_images(clip, photos, normalized=False)
    batches = list(pipeline.image_features(clip, photos, batch_size=batch_size, workers=workers))
    assert [p for b in batches for p in b.paths] == photos
    rows = np.concatenate([b.rows for b in batches])
    assert rows.dtype == np.float32
    np.testing.assert_allclose(rows, expected, atol=1e-5)


@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_decoding_is_bounded_and_ordered(clip, photos: list[str], monkeypatch: pytest.MonkeyPatch,
                                         ahead: int) -> None:
    started: list[str] = []
    lock = threading.Lock()
    real = pipeline.load_image

    def counting(path: Path, draft_size: int | None = None):
        with lock:
            started.append(str(path))
        return real(path, draft_size=draft_size)

    monkeypatch.setattr(pipeline, "load_image", counting)
    paths = photos * 3  # 33 paths
    seen: list[str] = []
    for chunk in pipeline.decode_chunks(clip, paths, chunk_size=4, workers=2, ahead=ahead):
        # Everything decoded so far belongs to the chunks handed out or at most `ahead` more.
        assert len(started) <= len(seen) + (ahead + 1) * 4
        assert len(chunk) == min(4, len(paths) - len(seen))
        seen.extend(path for path, _ in chunk)
        assert all(isinstance(item, torch.Tensor) for _, item in chunk)
    assert seen == paths


def test_cpu_decodes_nothing_while_the_model_runs(clip, photos: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    real = pipeline.load_image
    monkeypatch.setattr(pipeline, "load_image", lambda path, draft_size=None: started.append(path) or real(path))
    for index, batch in enumerate(pipeline.image_features(clip, photos, batch_size=4)):
        # While the caller holds batch `index`, no image of a later batch has been started.
        assert len(started) == min(4 * (index + 1), len(photos))


def test_stopping_early_cancels_pending_work(clip, photos: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    real = pipeline.load_image
    monkeypatch.setattr(pipeline, "load_image", lambda path, draft_size=None: started.append(path) or real(path))
    chunks = pipeline.decode_chunks(clip, photos * 10, chunk_size=2, workers=1, ahead=2)
    assert len(next(chunks)) == 2
    chunks.close()  # the generator's finally: queued work cancelled, the pool shut down
    assert len(started) <= 3 * 2  # the chunk handed out and the two ahead, not the 110 paths


def test_decode_chunks_keeps_order_and_reports_failures(clip, photos: list[str], tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.jpg")
    items = [item for chunk in pipeline.decode_chunks(clip, [missing, *photos], chunk_size=2, workers=2)
             for item in chunk]
    assert [path for path, _ in items] == [missing, *photos]
    assert isinstance(items[0][1], pipeline.Failure) and items[0][1].reason == "file not found"
    assert all(tuple(item.shape) == (3, 32, 32) for _, item in items[1:])


def test_bad_batch_size_is_a_usage_error(clip, photos: list[str]) -> None:
    with pytest.raises(UsageError, match="--batch-size"):
        next(pipeline.image_features(clip, photos, batch_size=0))


# 5. fast decode: opt-in, close to exact


def test_default_decode_is_exact(clip, photos: list[str]) -> None:
    [(path, pixels)], = pipeline.decode_chunks(clip, photos[-1:], chunk_size=1)
    expected = preprocess(load_image(Path(path)), clip.preprocess)
    assert torch.equal(pixels, expected)


def test_fast_decode_drafts_jpegs_and_stays_close(clip, photos: list[str]) -> None:
    big = photos[-1]
    config = clip.preprocess
    assert config.draft_size == 40  # 1.25 x the tiny model's 32 px
    assert load_image(Path(big), draft_size=config.draft_size).size < load_image(Path(big)).size  # really drafted
    exact = np.concatenate([b.rows for b in pipeline.image_features(clip, photos)])
    fast = np.concatenate([b.rows for b in pipeline.image_features(clip, photos, draft=True)])
    cosine = (pipeline.normalize(exact) * pipeline.normalize(fast)).sum(-1)
    assert cosine.min() > 0.95
