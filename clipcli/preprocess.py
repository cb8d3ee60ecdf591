"""Image files -> bytes -> RGB PIL images -> normalized (3, H, W) float32 arrays, matching transformers'
CLIPImageProcessorPil. Owns image reading and decoding errors (as InputError) and preprocessor_config.json; knows
nothing of models or batching, and imports no torch."""

from __future__ import annotations

import io
import math
import os
import re
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image, ImageOps

from clipcli.errors import InputError, UsageError, os_reason

# OpenAI CLIP's normalisation constants (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow opens 16-bit greyscale (PNG, TIFF, PGM) as one of these; "I" is 32-bit signed but in practice holds
# 16-bit data (older Pillow opened 16-bit PNGs as "I"), so it is scaled the same way.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

# A shortest-edge resize of a very elongated image (1 x 100000 px) would allocate gigabytes before the crop;
# the reference does exactly that. We refuse beyond this many resized pixels (400 MB as RGB) instead.
_MAX_RESIZED_PIXELS = 1 << 27

# Leading bytes of formats Pillow decodes: an unidentifiable file that starts like one is corrupt, not a non-image.
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")

# Fast decode drafts JPEGs to no less than this many times the resize target (PreprocessConfig.draft_size).
_DRAFT_MARGIN = 1.25

_BOMB_MESSAGE = re.compile(r"\((\d+) pixels\)")

# warnings.catch_warnings swaps process-wide filters and is not thread-safe, while the pipeline decodes in threads;
# this lock serialises our use of it around Image.open (header parsing only; decoding runs outside it).
_WARNINGS_LOCK = threading.Lock()


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"invalid preprocessing config: {name} must be a positive integer, got {value!r}; "
                         "fix preprocessor_config.json")


def _check_triple(name: str, value: object) -> None:
    ok = isinstance(value, tuple) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok:
        raise UsageError(f"invalid preprocessing config: {name} must be 3 finite numbers, got {value!r}; "
                         "fix preprocessor_config.json")


@dataclass(frozen=True)
class PreprocessConfig:
    """The fields of a CLIP preprocessor_config.json (HF names; size and crop_size flattened)."""

    do_resize: bool = True
    # size: either {"shortest_edge": n} (aspect kept, as CLIP) or {"height": h, "width": w} (squashed).
    shortest_edge: int | None = 224
    size_height: int | None = None
    size_width: int | None = None
    resample: int = int(Image.Resampling.BICUBIC)
    do_center_crop: bool = True
    crop_height: int = 224
    crop_width: int = 224
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        for name in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"invalid preprocessing config: {name} must be true or false, "
                                 f"got {getattr(self, name)!r}; fix preprocessor_config.json")
        if self.shortest_edge is not None:
            _check_positive_int("size.shortest_edge", self.shortest_edge)
            if self.size_height is not None or self.size_width is not None:
                raise UsageError("invalid preprocessing config: size has both shortest_edge and height/width; "
                                 "fix preprocessor_config.json")
        else:
            _check_positive_int("size.height", self.size_height)
            _check_positive_int("size.width", self.size_width)
        _check_positive_int("crop_size.height", self.crop_height)
        _check_positive_int("crop_size.width", self.crop_width)
        if isinstance(self.resample, bool) or self.resample not in {int(r) for r in Image.Resampling}:
            raise UsageError(f"invalid preprocessing config: resample must be a PIL resampling filter "
                             f"(0-{max(int(r) for r in Image.Resampling)}), got {self.resample!r}; "
                             "fix preprocessor_config.json")
        factor = self.rescale_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
            raise UsageError(f"invalid preprocessing config: rescale_factor must be a finite number, "
                             f"got {factor!r}; fix preprocessor_config.json")
        _check_triple("image_mean", self.image_mean)
        _check_triple("image_std", self.image_std)
        if 0 in self.image_std:
            raise UsageError("invalid preprocessing config: image_std contains 0; fix preprocessor_config.json")

    @classmethod
    def from_json(cls, data: dict) -> PreprocessConfig:
        """Build from a preprocessor_config.json dict; missing keys take CLIP defaults, unknown keys are ignored."""
        if not isinstance(data, dict):
            raise UsageError(f"invalid preprocessor_config.json: expected a JSON object, got {type(data).__name__}; "
                             "fix preprocessor_config.json")
        # A key set to null means "the processor's default", as in transformers.
        values = {k: v for k, v in data.items() if v is not None}
        fields: dict[str, Any] = {}
        for name in ("do_resize", "resample", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
                     "do_convert_rgb"):
            if name in values:
                fields[name] = values[name]
        for name in ("image_mean", "image_std"):
            if name in values:
                fields[name] = _as_triple(name, values[name])

        size = values.get("size", {"shortest_edge": 224})
        if isinstance(size, dict):
            size = {k: v for k, v in size.items() if v is not None}
        # Old configs give a bare int; CLIP's processor reads it as the shortest edge (default_to_square=False).
        if isinstance(size, int) and not isinstance(size, bool):
            size = {"shortest_edge": size}
        elif isinstance(size, (list, tuple)) and len(size) == 2:
            size = {"height": size[0], "width": size[1]}
        if isinstance(size, dict) and set(size) == {"shortest_edge"}:
            fields["shortest_edge"] = size["shortest_edge"]
        elif isinstance(size, dict) and set(size) == {"height", "width"}:
            fields.update(shortest_edge=None, size_height=size["height"], size_width=size["width"])
        else:
            raise UsageError(f'invalid preprocessor_config.json: size must be {{"shortest_edge": n}} or '
                             f'{{"height": h, "width": w}}, got {size!r}; fix preprocessor_config.json')
        # Kosmos-2 compatibility kept by CLIPImageProcessor: a square resize to the shortest edge.
        if values.get("use_square_size") is True and fields.get("shortest_edge") is not None:
            edge = fields["shortest_edge"]
            fields.update(shortest_edge=None, size_height=edge, size_width=edge)

        crop = values.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, dict):
            crop = {k: v for k, v in crop.items() if v is not None}
        if isinstance(crop, int) and not isinstance(crop, bool):
            crop = {"height": crop, "width": crop}
        elif isinstance(crop, (list, tuple)) and len(crop) == 2:
            crop = {"height": crop[0], "width": crop[1]}
        if not (isinstance(crop, dict) and set(crop) == {"height", "width"}):
            raise UsageError(f'invalid preprocessor_config.json: crop_size must be {{"height": h, "width": w}} '
                             f"or an int, got {crop!r}; fix preprocessor_config.json")
        fields.update(crop_height=crop["height"], crop_width=crop["width"])
        return cls(**fields)

    @classmethod
    def for_image_size(cls, image_size: int) -> PreprocessConfig:
        """CLIP's defaults for a model of this input resolution: shortest edge and square crop = image_size."""
        return cls(shortest_edge=image_size, crop_height=image_size, crop_width=image_size)

    def to_json(self) -> dict:
        """A preprocessor_config.json dict that transformers' CLIPImageProcessor loads to the same behaviour."""
        if self.shortest_edge is not None:
            size: dict[str, int] = {"shortest_edge": self.shortest_edge}
        else:
            size = {"height": self.size_height, "width": self.size_width}  # type: ignore[dict-item]
        return {
            "crop_size": {"height": self.crop_height, "width": self.crop_width},
            "do_center_crop": self.do_center_crop,
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.image_mean),
            "image_processor_type": "CLIPImageProcessor",
            "image_std": list(self.image_std),
            "resample": int(self.resample),
            "rescale_factor": self.rescale_factor,
            "size": size,
        }

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every preprocessed image, or None when it follows each image's own size."""
        if self.do_center_crop:
            return self.crop_height, self.crop_width
        if self.do_resize and self.shortest_edge is None:
            return self.size_height, self.size_width  # type: ignore[return-value]
        return None

    @property
    def draft_size(self) -> int | None:
        """The `draft_size` for load_image (fast decode); None when nothing is resized.

        1.25x the resize target, so the exact bicubic resize after drafting still shrinks by at least 1.25x and
        keeps its anti-aliasing: drafting to just above the target (e.g. 640x480 at 1/2 to 240 px, then 240 -> 224)
        left half again the pixel error, and flipped 2 of 200 top-1 labels against none, for 3% more decode time
        (benchmarks/README.md)."""
        if not self.do_resize:
            return None
        target = self.shortest_edge if self.shortest_edge is not None else max(self.size_height or 0,
                                                                                self.size_width or 0)
        return math.ceil(target * _DRAFT_MARGIN)


def _as_triple(name: str, value: object) -> tuple[float, float, float]:
    # transformers accepts one number for all channels.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value, value, value)
    if isinstance(value, list):
        return tuple(value)  # length and types are checked in __post_init__
    raise UsageError(f"invalid preprocessor_config.json: {name} must be a list of 3 numbers, got {value!r}; "
                     "fix preprocessor_config.json")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> "RGB" image (8-bit); transparency composited onto white. May return `image` itself."""
    if image.mode in _SIXTEEN_BIT_MODES and not _eight_bit_values(image):
        return _sixteen_bit_to_rgb(image)
    # As transformers' convert_to_rgb: any alpha band ("A"; not premultiplied "a") or a transparency key
    # (P, L, RGB with tRNS) is composited onto opaque white; everything else is Pillow's plain convert.
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if has_alpha:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        if image.mode == "RGB":
            return image
        # F (float) follows Pillow and the reference too: values are read as 0..255 and clipped. Float images have
        # no standard range, so any rescaling would be a guess.
        return image.convert("RGB")
    except ValueError as exc:  # modes Pillow cannot convert, e.g. "La"
        raise InputError(f"unsupported image mode {image.mode}") from exc


def _eight_bit_values(image: Image.Image) -> bool:
    """A 32-bit integer ("I") image whose values all lie in 0..255 (a TIFF or PGM saved from 8-bit data): converted
    as the reference does, not scaled as 16-bit data, which would turn it almost black."""
    if image.mode != "I":
        return False
    low, high = cast(tuple[int, int], image.getextrema())  # one band: (min, max)
    return low >= 0 and high <= 255


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit greyscale -> "RGB" by round(v / 257), so 0..65535 maps onto 0..255; transparency key -> white."""
    # Our one deliberate difference from the reference, whose Pillow convert clips every value above 255 to white
    # (a 16-bit photo becomes almost all white). v / 257 inverts the usual 8 -> 16 bit widening (v * 257) exactly;
    # "I" values outside 0..65535 are clipped.
    values = np.asarray(image)  # (H, W) uint16, >u2 or int32
    wide = np.clip(values, 0, 65535).astype(np.uint32)
    grey = ((wide + 128) // 257).astype(np.uint8)  # 257 is odd, so v / 257 never ties
    key = image.info.get("transparency")
    if isinstance(key, int) and not isinstance(key, bool):
        grey[values == key] = 255
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))


def resize_output_size(height: int, width: int, config: PreprocessConfig) -> tuple[int, int]:
    """(height, width) after the config's resize, computed exactly as the reference does."""
    if config.shortest_edge is None:
        return config.size_height, config.size_width  # type: ignore[return-value]
    # transformers' get_resize_output_image_size(default_to_square=False): the long side is truncated, not rounded.
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = config.shortest_edge, int(config.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _normalize_table(config: PreprocessConfig) -> np.ndarray:
    """(3, 256) float32: the output value of each uint8 level per channel, with the reference's dtypes."""
    levels = np.arange(256, dtype=np.float64)
    if config.do_rescale:
        levels = levels * config.rescale_factor  # rescale: multiply in float64, then cast to float32
    table = np.broadcast_to(levels.astype(np.float32), (3, 256))
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(config.image_std, dtype=np.float32)[:, None]
        table = (table - mean) / std  # normalize: subtract and divide in float32
    return np.ascontiguousarray(table, dtype=np.float32)


def preprocess(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """PIL image -> (3, H, W) float32 array; H, W = crop size (resized size when do_center_crop is false)."""
    # do_convert_rgb=false only skips the reference's transparency compositing for RGB; other modes must become
    # RGB anyway (where the reference would fail on a channel count that is not 3).
    if config.do_convert_rgb or image.mode != "RGB":
        image = to_rgb(image)
    if config.do_resize:
        height, width = resize_output_size(image.height, image.width, config)
        if height * width > _MAX_RESIZED_PIXELS:
            raise InputError(f"image too elongated to resize ({image.width}x{image.height} would become "
                             f"{width}x{height})")
        # Same call as the reference: PIL on the uint8 RGB image, no reducing_gap. Same size would be a copy.
        if (width, height) != image.size:
            image = image.resize((width, height), resample=config.resample)
    if config.do_center_crop:
        # transformers' center_crop: offset (size - crop) // 2, floored. When the image is smaller than the crop it
        # is zero-padded (ceil split), which is what PIL's crop with a box outside the image does with this offset.
        left = (image.width - config.crop_width) // 2
        top = (image.height - config.crop_height) // 2
        box = (left, top, left + config.crop_width, top + config.crop_height)
        if box != (0, 0, image.width, image.height):
            image = image.crop(box)
    pixels = np.asarray(image)  # (H, W, 3) uint8
    # Rescale + normalize depend only on (channel, uint8 level): one table lookup per pixel gives the reference's
    # float32 values bit for bit, in one pass and without float temporaries.
    table = _normalize_table(config)
    out = np.empty((3, pixels.shape[0], pixels.shape[1]), dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], pixels[:, :, channel], out=out[channel])
    return out


def load_image(path: Path, draft_size: int | None = None) -> Image.Image:
    """Decode an image file to an "RGB" PIL image: EXIF-transposed, first frame; raises InputError(reason)."""
    return decode_image(read_image_file(path), draft_size)


def read_image_file(path: str | Path) -> bytes:
    """The bytes of an image file; InputError naming why not (missing, unreadable, a folder, empty, ...)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputError("file not found") from None
    except PermissionError:
        raise InputError("permission denied") from None
    except OSError as exc:
        raise InputError(os_reason(exc)) from exc
    # stat first: opening a FIFO would block, and an empty file is worth naming as such.
    if stat.S_ISDIR(info.st_mode):
        raise InputError("is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise InputError("not a regular file")
    if info.st_size == 0:
        raise InputError("empty file")
    try:
        with open(path, "rb") as file:
            return file.read()
    except PermissionError:
        raise InputError("permission denied") from None
    except OSError as exc:
        raise InputError(os_reason(exc)) from exc


def decode_image(data: bytes, draft_size: int | None = None) -> Image.Image:
    """An image file's bytes -> "RGB" PIL image: EXIF-transposed, first frame; raises InputError(reason).

    `draft_size` (fast decode) lets JPEGs decode at 1/2, 1/4 or 1/8 scale while both sides stay >= draft_size."""
    if draft_size is not None and (isinstance(draft_size, bool) or not isinstance(draft_size, int) or draft_size <= 0):
        raise UsageError(f"draft_size must be a positive integer, got {draft_size!r}; pass e.g. 224 or None")
    if not data:
        raise InputError("empty file")
    return _decode(io.BytesIO(data), draft_size)


def _decode(file: Any, draft_size: int | None) -> Image.Image:
    """Open, optionally draft, fully decode, EXIF-transpose and convert; every decoder failure -> InputError."""
    try:
        # Pillow raises DecompressionBombError above 2 * MAX_IMAGE_PIXELS and only warns above MAX_IMAGE_PIXELS;
        # we refuse both, turning the warning into an error without touching the global filters.
        _ensure_decoder(file)
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(file)  # the first frame of an animation is the current one after open
        if draft_size is not None:
            # JPEG only (a no-op elsewhere): decode at 1/2, 1/4 or 1/8 scale while both sides stay >= draft_size.
            image.draft("RGB", (draft_size, draft_size))
        image.load()  # decode now so that truncated or corrupt data fails here, not in preprocess
        # Checked again after load: a plugin may change the size, and another thread's filters may have hidden
        # the warning.
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and image.width * image.height > limit:
            raise InputError(_too_large(image.width * image.height))
        try:
            ImageOps.exif_transpose(image, in_place=True)
        except Exception:  # unreadable EXIF: show the pixels as stored, as browsers do
            pass
        return to_rgb(image)
    except InputError:
        raise
    except Image.UnidentifiedImageError:
        raise InputError(_unidentified_reason(file)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = _BOMB_MESSAGE.search(str(exc))
        raise InputError(_too_large(int(found.group(1)) if found else None)) from None
    except Exception as exc:  # Pillow's decoders raise many types on bad data
        raise InputError(_decode_reason(exc)) from exc


def _unidentified_reason(file: Any) -> str:
    try:
        file.seek(0)
        head = file.read(16)
    except OSError:
        return "not an image file"
    if head.startswith(_IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "corrupt image header"
    if head[4:8] == b"ftyp":  # ISO media that is neither HEIF nor AVIF (those are checked before opening)
        return "unsupported image format"
    return "not an image file"


def source_pixels(data: bytes) -> int:
    """Width x height of an image file's first frame as stored (its header only): what the size limit is about.

    For an image that decode_image has read; 0 when it cannot be told."""
    try:
        _ensure_decoder(io.BytesIO(data))
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.width * image.height
    except Exception:  # the limit then cannot apply to it; decoding already accepted the image
        return 0


def check_size_limit(pixels: int) -> None:
    """InputError when an image of `pixels` pixels is beyond the decompression-bomb limit, as decoding it would be:
    for an image whose features come from the index, so a run gives the same failures with the index or without."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and pixels > limit:
        raise InputError(_too_large(pixels))


def max_image_pixels() -> int | None:
    """The decompression-bomb limit decoding applies now (None: none)."""
    return Image.MAX_IMAGE_PIXELS


PILLOW_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own default (about 89.5 megapixels)


def set_max_megapixels(megapixels: float | None) -> None:
    """Set Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) that decoding reads; None: no limit.

    Process-wide, like the limit itself: for a program to call once (the CLI's --max-megapixels), never a library."""
    Image.MAX_IMAGE_PIXELS = None if megapixels is None else max(1, int(megapixels * 1_000_000))


def reset_max_megapixels() -> None:
    """Pillow's default limit again (a command without --max-megapixels, after one with it in the same process)."""
    Image.MAX_IMAGE_PIXELS = PILLOW_MAX_PIXELS


def _too_large(pixels: int | None) -> str:
    """The reason for an image beyond Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, process-wide)."""
    size = f"{pixels:,} pixels, " if pixels else ""
    return (f"image too large ({size}limit {Image.MAX_IMAGE_PIXELS or 0:,}); if you trust it, raise the limit "
            "(--max-megapixels)")


# ISO base media brands (the `ftyp` box) of HEIF stills and sequences, and of AVIF. An AVIF file may carry the
# generic HEIF brand mif1 too, so AVIF's own brands are looked for first.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"})
HEIF_INSTALL = "pip install 'clipcli[heif]'"
_HEIF_LOCK = threading.Lock()
_heif_ready: bool | None = None  # None: not tried yet; registering is process-wide, done at first need


def iso_brands(head: bytes) -> set[bytes]:
    """The major and compatible brands of an ISO base media file's leading `ftyp` box; empty for other data."""
    if len(head) < 12 or head[4:8] != b"ftyp":
        return set()
    size = min(int.from_bytes(head[:4], "big"), len(head))
    return {head[8:12], *(head[i:i + 4] for i in range(16, size - 3, 4))}


def _ensure_decoder(file: Any) -> None:
    """Make sure Pillow can open a HEIF or AVIF file before trying, or raise InputError naming what to install.

    pillow-heif's opener is registered with Pillow on the first HEIF file, not at import: it is optional, and a
    run without HEIF files never loads it. AVIF is Pillow's own plugin (in a Pillow built with libavif)."""
    head = file.read(64)
    file.seek(0)
    brands = iso_brands(head)
    if not brands:
        return
    if brands & _AVIF_BRANDS:
        from PIL import features

        if not features.check("avif"):
            raise InputError("AVIF image, but this Pillow was built without AVIF support; install a Pillow that has "
                             "it (pip install -U pillow: recent wheels include it)")
    elif brands & _HEIF_BRANDS and not heif_available():
        raise InputError(f"HEIC/HEIF image, but HEIF support is not installed; {HEIF_INSTALL}")


def heif_available() -> bool:
    """True once pillow-heif's opener is registered with Pillow (done now if not yet); False without pillow-heif."""
    global _heif_ready
    with _HEIF_LOCK:
        if _heif_ready is None:
            try:
                import pillow_heif
            except ImportError:
                _heif_ready = False
            else:
                pillow_heif.register_heif_opener()
                _heif_ready = True
        return _heif_ready


def _decode_reason(exc: Exception) -> str:
    message = str(exc).strip()
    lowered = message.lower()
    if isinstance(exc, EOFError) or "truncated" in lowered or "end of file" in lowered:
        return "truncated image data"
    if "broken data stream" in lowered or "broken png" in lowered or "corrupt" in lowered:
        return "corrupt image data"
    detail = message.splitlines()[0][:100] if message else type(exc).__name__
    return f"cannot decode image ({detail})"
