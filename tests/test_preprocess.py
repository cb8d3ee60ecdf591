"""Preprocessing parity with transformers' CLIPImageProcessorPil, image decoding, and preprocessor_config.json."""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, features

from clipcli.errors import InputError, UsageError
from clipcli.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PreprocessConfig,
    load_image,
    preprocess,
    to_rgb,
)

transformers = pytest.importorskip("transformers")
from transformers import CLIPImageProcessorPil  # noqa: E402

from tests.conftest import FIXTURE  # noqa: E402

TOL = 1e-5

# preprocessor_config.json dicts given to both implementations.
CONFIGS = {
    "default": {},
    "336": {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},
    "height-width": {"size": {"height": 256, "width": 200}, "crop_size": {"height": 224, "width": 224}},
    "no-crop": {"do_center_crop": False},
    "mean-std-bilinear": {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "resample": 2},
    "crop-beyond-resize": {"size": {"shortest_edge": 64}, "crop_size": {"height": 80, "width": 97}},
    "no-resize": {"do_resize": False, "crop_size": {"height": 48, "width": 41}},
    "no-rescale": {"do_rescale": False},
    "old-int-sizes": {"size": 240, "crop_size": 200},
}
SIZES = [(640, 480), (480, 640), (333, 517), (224, 224), (225, 223), (20, 30), (1, 1), (97, 3)]


def photo(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A photo-like test image: smooth colour gradients plus sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy = x / max(width, 1), y / max(height, 1)
    channels = [128 + 100 * np.sin(6 * fx + 3 * fy + phase) for phase in (0.0, 2.0, 4.0)]
    rgb = np.stack(channels, axis=-1) + rng.normal(0, 12, (height, width, 3))
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    return image if mode == "RGB" else image.convert(mode)


def reference(image: Image.Image, data: dict) -> np.ndarray:
    """transformers' pixel_values for one image: (3, H, W) float32."""
    processor = CLIPImageProcessorPil.from_dict(dict(data))
    return processor(images=image, return_tensors="np")["pixel_values"][0]


def ours(image: Image.Image, data: dict) -> np.ndarray:
    out = preprocess(image, PreprocessConfig.from_json(data))
    assert out.dtype == np.float32 and out.ndim == 3 and out.shape[0] == 3
    return out


def assert_parity(image: Image.Image, data: dict) -> None:
    expected, got = reference(image, data), ours(image, data)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL


# 1. parity on photo-like images, every config


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_parity_with_transformers(config_name: str, size: tuple[int, int]) -> None:
    assert_parity(photo(*size, seed=size[0] * 7 + size[1]), CONFIGS[config_name])


@pytest.mark.parametrize("size", [(20000, 20), (20, 3001)], ids=["20000x20", "20x3001"])
def test_parity_long_thin(size: tuple[int, int]) -> None:
    assert_parity(photo(*size), {})


def test_parity_is_bit_exact() -> None:
    # The table lookup reproduces the reference's float64-rescale / float32-normalize exactly, not just within TOL.
    image = photo(300, 200, seed=3)
    assert np.array_equal(ours(image, {}), reference(image, {}))


def test_too_elongated_is_an_input_error() -> None:
    with pytest.raises(InputError, match="too elongated"):
        preprocess(Image.new("RGB", (600_000, 1)), PreprocessConfig())


def test_input_image_untouched() -> None:
    image = photo(64, 48, mode="RGBA")
    before = image.tobytes()
    preprocess(image, PreprocessConfig.for_image_size(32))
    assert image.mode == "RGBA" and image.size == (64, 48) and image.tobytes() == before


def test_parity_on_real_photos() -> None:
    """Our preprocessing of the openai-small fixture's photos against transformers and against open_clip.

    The photos are sample_images/ at 32x32 (tests/fixtures/openai-small/images/); open_clip's pixel_values for them
    are in expected.npz beside them, made by tests/make_openai_fixture.py.
    """
    names = json.loads((FIXTURE / "expected.json").read_text())["images"]
    open_clip_pixels = np.load(FIXTURE / "expected.npz")["pixel_values"]
    for index, name in enumerate(names):
        path = FIXTURE / "images" / Path(name).name
        data = PreprocessConfig.for_image_size(32).to_json()
        image = load_image(path)
        assert np.abs(ours(image, data) - reference(Image.open(path), data)).max() <= TOL
        assert np.abs(ours(image, {}) - reference(Image.open(path), {})).max() <= TOL  # upscaled to 224
        # open_clip (torchvision ToTensor + Normalize) on the same 32x32 photos
        assert np.abs(ours(image, data) - open_clip_pixels[index]).max() <= TOL


# 2. every Pillow mode


def with_alpha() -> Image.Image:
    """RGBA with opaque, half transparent and fully transparent regions."""
    image = photo(45, 37, seed=5, mode="RGBA")
    alpha = np.full((37, 45), 255, dtype=np.uint8)
    alpha[:, 15:30] = 128
    alpha[:, 30:] = 0
    image.putalpha(Image.fromarray(alpha))
    return image


def mode_image(name: str) -> Image.Image:
    rgba = with_alpha()
    rgb = photo(45, 37, seed=5)
    if name == "P-transparency":
        image = rgb.convert("P")
        image.info["transparency"] = image.getpixel((0, 0))
        return image
    if name == "L-transparency":
        image = rgb.convert("L")
        image.info["transparency"] = image.getpixel((3, 3))
        return image
    if name == "RGB-tRNS":
        image = rgb.copy()
        image.info["transparency"] = rgb.getpixel((0, 0))
        return image
    if name in ("RGBA", "LA", "PA", "RGBa"):
        return rgba.convert(name)
    if name == "F":
        return rgb.convert("L").convert("F")
    return rgb.convert(name)


MODES = ["RGB", "RGBA", "LA", "L", "1", "P", "P-transparency", "PA", "L-transparency", "RGB-tRNS", "CMYK",
         "YCbCr", "HSV", "LAB", "RGBX", "RGBa", "F"]


@pytest.mark.parametrize("config_name", ["default", "no-resize"])
@pytest.mark.parametrize("name", MODES)
def test_mode_parity(name: str, config_name: str) -> None:
    image = mode_image(name)
    assert_parity(image, CONFIGS[config_name])
    assert to_rgb(image).mode == "RGB"


def test_transparency_composited_onto_white() -> None:
    rgb = np.asarray(to_rgb(with_alpha()))
    assert (rgb[:, 30:] == 255).all()  # fully transparent -> white
    assert (rgb[:, 15:30] >= 127).all()  # half transparent -> at least half white


def test_rgb_passthrough_is_the_same_object() -> None:
    image = photo(8, 8)
    assert to_rgb(image) is image


SIXTEEN = np.array([[0, 255, 32768, 65535, 100 * 257, 1000]], dtype=np.uint16)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_is_scaled_not_clipped(mode: str) -> None:
    if mode == "I;16B":
        image = Image.frombytes("I;16B", (6, 1), SIXTEEN.astype(">u2").tobytes())
    else:
        image = Image.fromarray(SIXTEEN if mode == "I;16" else SIXTEEN.astype(np.int32))
    assert image.mode == mode
    # No resize or crop and no normalization, so the output is level / 255.
    data = {"do_resize": False, "do_center_crop": False, "do_normalize": False}
    levels = np.rint(ours(image, data)[0, 0] * 255).astype(int)
    assert levels.tolist() == [0, 1, 128, 255, 100, 4]  # round(v / 257): our documented difference
    reference_levels = np.rint(reference(image, data)[0, 0] * 255).astype(int)
    assert reference_levels.tolist() == [0, 255, 255, 255, 255, 255]  # the reference clips to white
    assert np.asarray(to_rgb(image)).shape == (1, 6, 3)


@pytest.mark.parametrize("suffix", [".tif", ".pgm"])
def test_integer_image_holding_8_bit_values_converts_as_the_reference(tmp_path: Path, suffix: str) -> None:
    # Pillow opens a 32-bit TIFF (or a PGM) as "I" whatever its range: values 0..255 are 8-bit data, not dark 16-bit.
    values = (np.arange(12 * 10).reshape(12, 10) * 2 + 10).astype(np.int32)
    path = tmp_path / f"eight{suffix}"
    Image.fromarray(values if suffix == ".tif" else values.astype(np.uint16)).save(path)
    image = load_image(path)
    assert Image.open(path).mode == "I"
    raw = Image.open(path)
    data = {"do_resize": False, "do_center_crop": False}
    np.testing.assert_array_equal(ours(raw, data), reference(raw, data))
    assert np.asarray(image)[..., 0].tolist() == values.tolist()


def test_sixteen_bit_png_and_transparency_key(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(SIXTEEN).save(path)
    assert Image.open(path).mode == "I;16"
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 1, 128, 255, 100, 4]
    image = Image.fromarray(SIXTEEN)
    image.info["transparency"] = 0
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [255, 1, 128, 255, 100, 4]


def test_unconvertible_mode_is_an_input_error() -> None:
    with pytest.raises(InputError, match="unsupported image mode La"):
        to_rgb(with_alpha().convert("La"))


# 3. load_image


def save(image: Image.Image, path: Path, **params: object) -> Path:
    image.save(path, **params)
    return path


def test_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(photo(64, 48, seed=1), tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = load_image(path)
    assert image.size == (48, 64) and image.mode == "RGB"
    expected = ImageOps.exif_transpose(Image.open(path))
    assert expected.size == (48, 64)
    for data in ({}, CONFIGS["no-resize"]):
        assert np.abs(ours(image, data) - reference(expected, data)).max() <= TOL


def test_animated_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (40, 30), color) for color in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(path), "n_frames", 1) == 3
    assert np.asarray(load_image(path))[15, 20].tolist() == [255, 0, 0]


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_animated_webp_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (40, 30), color) for color in ((255, 0, 0), (0, 0, 255))]
    path = save(frames[0], tmp_path / "anim.webp", save_all=True, append_images=frames[1:], duration=50,
                lossless=True)
    assert getattr(Image.open(path), "n_frames", 1) == 2
    assert np.asarray(load_image(path))[15, 20].tolist() == [255, 0, 0]


def test_png_named_jpg(tmp_path: Path) -> None:
    image = photo(30, 20, mode="RGBA")
    path = save(image, tmp_path / "really-a-png.jpg", format="PNG")
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(to_rgb(image)))


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    photo(64, 64, seed=2).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    photo(64, 64, seed=2).save(buffer, "JPEG")
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def flip(data: bytes, index: int) -> bytes:
    corrupted = bytearray(data)
    corrupted[index] ^= 0xFF
    return bytes(corrupted)


def corrupt_idat(data: bytes) -> bytes:
    return flip(data, data.index(b"IDAT") + 4 + 10)  # inside the deflate stream


BAD_FILES = {
    "empty.png": (lambda: b"", "empty file"),
    "truncated.jpg": (lambda: jpeg_bytes()[: len(jpeg_bytes()) // 2], "truncated image data"),
    "truncated.png": (lambda: png_bytes()[: len(png_bytes()) // 2], "truncated image data"),
    "text.png": (lambda: b"this is not an image\n" * 20, "not an image file"),
    "bad-header-crc.png": (lambda: flip(png_bytes(), 29), "corrupt image header"),  # IHDR's CRC
    "bad-idat.png": (lambda: corrupt_idat(png_bytes()), "corrupt image data"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files(tmp_path: Path, name: str) -> None:
    make, reason = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(InputError) as raised:
        load_image(path)
    assert str(raised.value) == reason
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_directory_and_missing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="^is a directory$"):
        load_image(tmp_path)
    with pytest.raises(InputError, match="^file not found$"):
        load_image(tmp_path / "missing.png")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable(tmp_path: Path) -> None:
    path = save(photo(8, 8), tmp_path / "secret.png")
    path.chmod(0)
    try:
        with pytest.raises(InputError, match="^permission denied$"):
            load_image(path)
    finally:
        path.chmod(0o644)


def test_permission_denied_without_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may run as root, where chmod 000 does not stop reading: make open() itself refuse.
    import clipcli.preprocess as module

    path = save(photo(8, 8), tmp_path / "secret.png")

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(module, "open", refuse, raising=False)
    with pytest.raises(InputError, match="^permission denied$"):
        load_image(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_fifo_is_not_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(InputError, match="^not a regular file$"):
        load_image(tmp_path / "pipe.png")


@pytest.mark.parametrize("pixels", [1600, 2500], ids=["over-limit-warning", "over-twice-limit-error"])
def test_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pixels: int) -> None:
    side = int(pixels**0.5)
    path = save(photo(side, side), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match=rf"^image too large \({pixels:,} pixels, limit 1,000\); if you trust "
                                             r"it, raise the limit \(--max-megapixels\)$"):
            load_image(path)
    assert not caught  # the warning became our error, not a printed warning
    assert warnings.filters == filters


def test_threads_share_the_warning_filters_safely(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    small, bomb = save(photo(30, 30), tmp_path / "small.png"), save(photo(40, 40), tmp_path / "bomb.png")
    filters = list(warnings.filters)

    def outcome(path: Path) -> str:
        try:
            return load_image(path).mode
        except InputError as error:
            return str(error)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(outcome, [small, bomb] * 40))
    assert results == ["RGB", "image too large (1,600 pixels, limit 1,000); if you trust it, raise the limit "
                              "(--max-megapixels)"] * 40
    assert warnings.filters == filters


def test_garbage_exif_still_loads(tmp_path: Path) -> None:
    path = save(photo(20, 10), tmp_path / "odd-exif.jpg", exif=b"Exif\x00\x00garbagegarbage")
    assert load_image(path).size == (20, 10)


def test_png_header_claiming_huge_size(tmp_path: Path) -> None:
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 8))
            + png_chunk(b"IEND", b""))
    path = tmp_path / "huge.png"
    path.write_bytes(data)
    with pytest.raises(InputError, match=r"^image too large \(10,000,000,000 pixels, limit [\d,]+\); "):
        load_image(path)


# 4. draft mode


def test_draft_mode(tmp_path: Path) -> None:
    path = save(photo(2000, 1500, seed=4), tmp_path / "big.jpg", quality=90)
    config = PreprocessConfig()
    exact = load_image(path)
    drafted = load_image(path, draft_size=config.draft_size)
    assert exact.size == (2000, 1500)
    assert min(drafted.size) >= 224 and drafted.size[0] < 2000  # decoded at a reduced scale, still downsampled
    a, b = preprocess(exact, config).flatten(), preprocess(drafted, config).flatten()
    cosine = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert float(np.abs(a - b).max()) < 0.5 and cosine > 0.995


def test_draft_is_a_no_op_for_png(tmp_path: Path) -> None:
    path = save(photo(600, 400), tmp_path / "big.png")
    assert np.array_equal(np.asarray(load_image(path, draft_size=224)), np.asarray(load_image(path)))


def test_draft_size_from_config() -> None:
    assert PreprocessConfig().draft_size == 280  # 1.25 x 224
    assert PreprocessConfig.for_image_size(336).draft_size == 420
    assert PreprocessConfig.from_json(CONFIGS["height-width"]).draft_size == 320
    assert PreprocessConfig.from_json(CONFIGS["no-resize"]).draft_size is None


@pytest.mark.parametrize("size, drafted", [((4000, 3000), (500, 375)), ((2400, 1800), (600, 450)),
                                           ((1024, 768), (512, 384)), ((640, 480), (640, 480))])
def test_draft_leaves_the_exact_resize_at_least_a_quarter_to_shrink(tmp_path: Path, size: tuple[int, int],
                                                                   drafted: tuple[int, int]) -> None:
    # 2400x1800 at 1/8 would be 300x225, then a near 1:1 resize without anti-aliasing; 640x480 at 1/2, 320x240.
    path = save(Image.new("RGB", size, (90, 140, 200)), tmp_path / "flat.jpg", quality=90)
    assert load_image(path, draft_size=PreprocessConfig().draft_size).size == drafted


# 5. preprocessor_config.json


def test_defaults_match_transformers() -> None:
    config = PreprocessConfig.from_json({})
    assert config == PreprocessConfig() == PreprocessConfig.for_image_size(224)
    assert config.image_mean == OPENAI_CLIP_MEAN and config.image_std == OPENAI_CLIP_STD
    assert config.to_json() == json.loads(CLIPImageProcessorPil().to_json_string())


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_json_round_trip(config_name: str) -> None:
    config = PreprocessConfig.from_json(CONFIGS[config_name])
    assert PreprocessConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_from_json_forms() -> None:
    old = PreprocessConfig.from_json({"size": 240, "crop_size": 200, "feature_extractor_type": "CLIPFeatureExtractor"})
    assert (old.shortest_edge, old.crop_height, old.crop_width) == (240, 200, 200)
    square = PreprocessConfig.from_json({"size": {"height": 256, "width": 200}})
    assert (square.shortest_edge, square.size_height, square.size_width) == (None, 256, 200)
    assert PreprocessConfig.from_json({"image_mean": 0.5}).image_mean == (0.5, 0.5, 0.5)
    assert PreprocessConfig.from_json({"do_resize": None, "size": {"shortest_edge": 224, "height": None}}) == \
        PreprocessConfig()
    kosmos = PreprocessConfig.from_json({"size": {"shortest_edge": 224}, "use_square_size": True})
    assert (kosmos.size_height, kosmos.size_width) == (224, 224)


@pytest.mark.parametrize("data", [
    {"size": {"longest_edge": 224}},
    {"size": {"shortest_edge": 224, "longest_edge": 300}},
    {"size": {"shortest_edge": -1}},
    {"size": "224"},
    {"crop_size": {"shortest_edge": 224}},
    {"crop_size": {"height": 0, "width": 224}},
    {"resample": 99},
    {"do_resize": "yes"},
    {"image_mean": [0.5, 0.5]},
    {"image_std": [0.5, 0, 0.5]},
    {"rescale_factor": "1/255"},
    ["not", "a", "dict"],
], ids=repr)
def test_invalid_json_is_a_one_line_usage_error(data: object) -> None:
    with pytest.raises(UsageError) as raised:
        PreprocessConfig.from_json(data)  # type: ignore[arg-type]
    message = str(raised.value)
    assert "\n" not in message and "; " in message


@pytest.mark.parametrize("config_name", ["default", "336", "height-width", "no-crop", "mean-std-bilinear"])
def test_transformers_loads_our_json(tmp_path: Path, config_name: str) -> None:
    config = PreprocessConfig.from_json(CONFIGS[config_name])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config.to_json()))
    processor = CLIPImageProcessorPil.from_pretrained(tmp_path)
    for image in (photo(317, 211, seed=9), with_alpha()):
        expected = processor(images=image, return_tensors="np")["pixel_values"][0]
        assert np.abs(preprocess(image, config) - expected).max() <= TOL


def test_decode_reason_recognises_truncation_in_any_case():
    """Pillow words truncation several ways ("image file is truncated", "Truncated File Read")."""
    from clipcli.preprocess import _decode_reason

    assert _decode_reason(OSError("Truncated File Read")) == "truncated image data"
    assert _decode_reason(OSError("image file is truncated (3 bytes not processed)")) == "truncated image data"
    assert _decode_reason(OSError("broken PNG file")) == "corrupt image data"
    assert _decode_reason(ValueError("something else")) == "cannot decode image (something else)"
