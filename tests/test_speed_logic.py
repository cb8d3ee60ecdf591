"""The logic behind the fast paths, checked on CPU without timing anything: device and dtype selection, results
that leave as float32 whatever the model dtype, text padded to the longest prompt, bounded and ordered decoding,
batches of exactly --batch-size, and the opt-in JPEG draft decode."""

from __future__ import annotations

import platform
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from clipcli import api, pipeline, scoring
from clipcli.errors import UsageError
from clipcli.inputs import Failure
from clipcli.loader import load, place_model, resolve_device, resolve_dtype
from clipcli.preprocess import load_image, preprocess
from tests.conftest import photo


@pytest.fixture(scope="module")
def clip(tiny_model_dir: Path):
    return load(str(tiny_model_dir), device="cpu", dtype="fp32")


def session(model_dir: Path, **settings) -> pipeline.Session:
    """A Session on the tiny model without an index (these tests are about computing, not remembering)."""
    return pipeline.Session(pipeline.Settings(model=str(model_dir), **{"device": "cpu", **settings}))


def features(model_dir: Path, paths: list[str], **settings) -> np.ndarray:
    return np.concatenate([b.features for b in session(model_dir, **settings).image_features(paths)])


def probabilities(model_dir: Path, paths: list[str], labels: list[str], **settings) -> np.ndarray:
    run = session(model_dir, **settings)
    label_set = pipeline.label_embeddings(run, labels, [pipeline.DEFAULT_TEMPLATE])
    return np.concatenate([b.scores for b in pipeline.classify(run, paths, label_set)])


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
    # The library names its own parameter (`device`); the CLI words it as the flag (tests/test_cli.py).
    with pytest.raises(UsageError, match=f"device '{name}': .*available; use device cpu or auto"):
        resolve_device(name)


def test_unknown_device_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="device 'tpu': unknown device; use device auto, cpu, cuda or mps"):
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
    with pytest.raises(UsageError, match=r"dtype 'bf16': cannot run on cpu here \(torch .* has no autocast for "
                                         r"cpu\); use dtype fp16 or fp32"):
        resolve_dtype("bf16", torch.device("cpu"))
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32


def test_bf16_on_a_gpu_without_it_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a pre-Ampere GPU: torch's autocast refuses bf16 there, which must not surface inside the model.
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(UsageError, match=r"dtype 'bf16': cannot run on cuda here \(.*bfloat16.*\); use dtype fp16"):
        resolve_dtype("bf16", torch.device("cuda"))
    assert resolve_dtype("fp16", torch.device("cuda")) == torch.float16


def test_a_dtype_that_autocast_would_disable_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where torch only warns and turns autocast off (e.g. a dtype MPS's autocast lacks), the model would fail later.
    class WarningAutocast:
        def __init__(self, device_type: str, dtype: torch.dtype) -> None:
            warnings.warn("In CPU autocast, but the target dtype is not supported. Disabling autocast.", stacklevel=2)

    monkeypatch.setattr(torch, "autocast", WarningAutocast)
    with pytest.raises(UsageError, match=r"dtype 'fp16': cannot run on cpu here \(In CPU autocast, but the "
                                         r"target dtype is not supported\); use dtype fp32"):
        resolve_dtype("fp16", torch.device("cpu"))


def test_unknown_dtype_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="dtype 'int8': unknown dtype"):
        resolve_dtype("int8", torch.device("cpu"))


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_sets_glibc_malloc_options() -> None:
    # In a child process: the setting is process-wide, and this test process should keep its defaults.
    code = "from clipcli.process import keep_freed_memory; print(keep_freed_memory())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"


def test_loading_and_classifying_never_import_torch_dynamo(tiny_model_dir: Path, photos: list[str]) -> None:
    # Importing torch._dynamo costs about a second of every start; building the model on the meta device used to
    # pull it in through nn.Embedding's random init. Checked in a child process, without timing anything.
    code = ("import sys; from clipcli import api; clip = api.load(sys.argv[1], device='cpu', dtype=sys.argv[2]); "
            "api.zero_shot(clip, sys.argv[3:], ['cat', 'dog']); print('torch._dynamo' in sys.modules)")
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
    full = features(tiny_model_dir, photos)
    rows = features(tiny_model_dir, photos, dtype=dtype)
    assert rows.dtype == np.float32 and rows.shape == full.shape
    cosine = (scoring.normalize(rows) * scoring.normalize(full)).sum(-1)
    assert cosine.min() > 0.99
    texts = low.text_features(["a photo of a cat.", "a rocket"])
    assert texts.dtype == np.float32
    probs = probabilities(tiny_model_dir, photos, ["cat", "dog", "rocket"], dtype=dtype)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
    expected = probabilities(tiny_model_dir, photos, ["cat", "dog", "rocket"])
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
    np.testing.assert_array_equal(low.text_features(texts), clip.text_features(texts))
    full = features(tiny_model_dir, photos)
    mixed = features(tiny_model_dir, photos, dtype="bf16")
    # The naive alternative: everything, residual sums included, in bf16.
    cast = load(str(tiny_model_dir), device="cpu", dtype="fp32").model.to(torch.bfloat16)
    with torch.inference_mode():
        pixels = torch.stack([torch.from_numpy(preprocess(load_image(Path(p)), clip.preprocess)) for p in photos])
        whole = cast.encode_image(pixels.to(torch.bfloat16)).float().numpy()
    mixed_error = np.abs(mixed - full).max()
    assert 0 < mixed_error < np.abs(whole - full).max()


# 3. text: encoded once, padded to the longest prompt


def test_text_is_padded_to_the_longest_prompt_and_matches_77_padding(clip, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = ["a photo of a cat.", "a blurry photo of a very large golden retriever.", "x"]
    widths: list[int] = []
    encode_text = clip.model.encode_text
    monkeypatch.setattr(clip.model, "encode_text", lambda ids: widths.append(ids.shape[1]) or encode_text(ids))
    ours = clip.text_features(texts)
    ids = clip.tokenizer.encode(texts)
    assert widths == [ids.shape[1]] and ids.shape[1] < 77
    padded = torch.full((len(texts), 77), clip.tokenizer.pad_token_id, dtype=torch.long)
    padded[:, :ids.shape[1]] = ids
    with torch.inference_mode():
        reference = encode_text(padded).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_labels_are_encoded_once_per_run(tiny_model_dir: Path, photos: list[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run = session(tiny_model_dir, batch_size=2)
    calls: list[int] = []
    encode_text = run.clip.model.encode_text
    monkeypatch.setattr(run.clip.model, "encode_text", lambda ids: calls.append(ids.shape[0]) or encode_text(ids))
    label_set = pipeline.label_embeddings(run, ["cat", "dog"], ["a photo of a {}.", "a {}"])
    batches = list(pipeline.classify(run, photos, label_set))
    assert sum(len(b.paths) for b in batches) == len(photos)
    assert calls == [4]  # labels x templates, one model call


def test_a_cold_run_reads_the_tokenizer_once(tiny_model_dir: Path, photos: list[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The labels load the text tower alone, then the images the whole model: the tokenizer read for the first
    # serves the second (the same files).
    from clipcli import loader

    reads: list[Path] = []
    read_tokenizer = loader.read_tokenizer
    monkeypatch.setattr(loader, "read_tokenizer", lambda files, config: reads.append(files) or read_tokenizer(files,
                                                                                                            config))
    run = session(tiny_model_dir, batch_size=2)
    label_set = pipeline.label_embeddings(run, ["cat", "dog"], ["a photo of a {}."])
    tokenizer = run.text_clip.tokenizer
    assert run.text_clip.text_only
    assert sum(len(b.paths) for b in pipeline.classify(run, photos, label_set)) == len(photos)
    assert not run.clip.text_only and run.clip.tokenizer is tokenizer and len(reads) == 1


# 4. batching and decoding


def model_calls(run: pipeline.Session) -> list[int]:
    """Record the batch size of every image-tower call of the session's model."""
    calls: list[int] = []
    image_features = run.clip.image_features
    # Clip is a frozen dataclass: patch the method on the instance through object.__setattr__.
    object.__setattr__(run.clip, "image_features", lambda pixels: calls.append(len(pixels)) or image_features(pixels))
    return calls


def test_batches_hold_exactly_batch_size_images_despite_failures(tiny_model_dir: Path, photos: list[str],
                                                                 tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff" + b"\0" * 40)
    paths = [*photos[:3], str(broken), *photos[3:]]
    run = session(tiny_model_dir, batch_size=4, workers=3)
    calls = model_calls(run)
    done: list[int] = []
    batches = list(run.image_features(paths, progress=done.append))
    assert calls == [4, 4, 3]
    assert [p for b in batches for p in b.paths] == photos
    assert [f.path for b in batches for f in b.failures] == [str(broken)]
    assert sum(done) == len(paths)


@pytest.mark.parametrize(("batch_size", "workers"), [(1, 1), (3, 2), (32, 4)])
def test_results_do_not_depend_on_batching_or_workers(tiny_model_dir: Path, clip, photos: list[str],
                                                      batch_size: int, workers: int) -> None:
    expected = api.encode_images(clip, photos, normalized=False)
    batches = list(session(tiny_model_dir, batch_size=batch_size, workers=workers).image_features(photos))
    assert [p for b in batches for p in b.paths] == photos
    rows = np.concatenate([b.features for b in batches])
    assert rows.dtype == np.float32
    np.testing.assert_allclose(rows, expected, atol=1e-5)


def counting_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count image decodes in the pipeline's worker threads."""
    started: list[int] = []
    lock = threading.Lock()
    real = pipeline.decode_image

    def counting(data: bytes, draft_size: int | None = None):
        with lock:
            started.append(len(data))
        return real(data, draft_size)

    monkeypatch.setattr(pipeline, "decode_image", counting)
    return started


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_decoding_is_bounded_and_ordered(tiny_model_dir: Path, photos: list[str], monkeypatch: pytest.MonkeyPatch,
                                         device_type: str) -> None:
    # On CPU nothing is decoded ahead of the model; on an accelerator two stretches are.
    started = counting_decodes(monkeypatch)
    run = session(tiny_model_dir, batch_size=4, workers=2)
    run.clip  # noqa: B018  # loaded, then told it runs on `device_type` (only the decode-ahead policy reads it)
    run._device_type = device_type
    ahead = 0 if device_type == "cpu" else 2
    paths = photos * 3  # 33 paths
    seen: list[str] = []
    with ThreadPoolExecutor(2) as pool:
        for chunk in run._prepared(pool, paths, None):
            # Everything decoded so far belongs to the stretches handed out or at most `ahead` more.
            assert len(started) <= len(seen) + (ahead + 1) * 4
            assert len(chunk) == min(4, len(paths) - len(seen))
            seen.extend(work.path for work in chunk)
    assert seen == paths


def test_cpu_decodes_nothing_while_the_model_runs(tiny_model_dir: Path, photos: list[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    started = counting_decodes(monkeypatch)
    for index, _ in enumerate(session(tiny_model_dir, batch_size=4).image_features(photos)):
        # While the caller holds batch `index`, no image of a later batch has been started.
        assert len(started) == min(4 * (index + 1), len(photos))


def test_stopping_early_cancels_pending_work(tiny_model_dir: Path, photos: list[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    started = counting_decodes(monkeypatch)
    run = session(tiny_model_dir, batch_size=2, workers=1)
    run.clip  # noqa: B018
    run._device_type = "cuda"  # decode ahead
    with ThreadPoolExecutor(1) as pool:
        chunks = run._prepared(pool, photos * 10, None)
        assert len(next(chunks)) == 2
        chunks.close()  # the generator's finally: queued work cancelled
    assert len(started) <= 4 * 2  # the stretch handed out, the two ahead and one starting, not the 110 paths


def test_failures_keep_their_place_and_reason(tiny_model_dir: Path, photos: list[str], tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.jpg")
    batches = list(session(tiny_model_dir, batch_size=2, workers=2).image_features([missing, *photos]))
    assert batches[0].failures == [Failure(missing, "file not found")]
    assert [p for b in batches for p in b.paths] == photos


def test_bad_batch_size_is_a_usage_error(tiny_model_dir: Path) -> None:
    with pytest.raises(UsageError, match="batch_size '0': must be at least 1"):
        session(tiny_model_dir, batch_size=0)


# 5. fast decode: opt-in, close to exact


def test_default_decode_is_exact(tiny_model_dir: Path, clip, photos: list[str]) -> None:
    got = features(tiny_model_dir, photos[-1:])
    expected = clip.image_features([preprocess(load_image(Path(photos[-1])), clip.preprocess)])
    np.testing.assert_array_equal(got, expected)


def test_fast_decode_drafts_jpegs_and_stays_close(tiny_model_dir: Path, clip, photos: list[str]) -> None:
    big = photos[-1]
    config = clip.preprocess
    assert config.draft_size == 40  # 1.25 x the tiny model's 32 px
    assert load_image(Path(big), draft_size=config.draft_size).size < load_image(Path(big)).size  # really drafted
    exact = features(tiny_model_dir, photos)
    fast = features(tiny_model_dir, photos, fast_decode=True)
    cosine = (scoring.normalize(exact) * scoring.normalize(fast)).sum(-1)
    assert cosine.min() > 0.95 and not np.array_equal(exact, fast)
