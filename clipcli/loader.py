"""Assemble a ready-to-run CLIP (model, tokenizer, preprocessing) from resolved model files, and choose the
device and dtype once. Reading and key mapping live in weights.py; this module only puts the pieces together."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clipcli.config import ACTIVATIONS, CLIPConfig
from clipcli.errors import OptionError, UsageError
from clipcli.fsutil import read_json
from clipcli.model import CLIPModel
from clipcli.preprocess import PreprocessConfig
from clipcli.resolve import DEFAULT_MODEL, ModelFiles, resolve, shard_map, weights_file
from clipcli.tokenizer import ClipTokenizer
from clipcli.weights import (
    build_model,
    check_destination,
    hf_to_openai,
    is_hf_layout,
    is_openai_layout,
    openai_to_hf,
    read_state_dict,
    text_tower_names,
    wrapper_prefix,
    write_hf_directory,
)

DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Clip:
    """A loaded CLIP: the network on its device, its tokenizer and its image preprocessing, and the dtype the image
    tower computes in (see place_model)."""

    model: CLIPModel
    tokenizer: ClipTokenizer
    preprocess: PreprocessConfig
    source: str  # where it was loaded from, for people
    dtype: torch.dtype = torch.float32
    text_only: bool = False  # the image tower was not loaded (see load_files)
    weights_dtype: str = "float32"  # as stored in the checkpoint (see stored_dtype), whatever `dtype` computes in

    @property
    def config(self) -> CLIPConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype_name(self) -> str:
        """fp32, fp16 or bf16: the precision of the image tower."""
        return next(name for name, value in DTYPE_NAMES.items() if value == self.dtype)

    def image_precision(self) -> torch.autocast:
        """Context for running the image tower: autocast to `dtype` when that is reduced precision, else a no-op."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def image_features(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """B preprocessed (3, H, W) float32 images -> (B, D) float32 raw projected features, computed in `dtype`."""
        pinned = self.device.type == "cuda"
        # Stacked straight into page-locked memory on CUDA, so the copy to the GPU can run asynchronously.
        batch = torch.empty((len(pixels), *pixels[0].shape), dtype=torch.float32, pin_memory=pinned)  # (B, 3, H, W)
        torch.stack([torch.from_numpy(p) for p in pixels], out=batch)
        return self.batch_features(batch.to(device=self.device, non_blocking=pinned))

    def batch_features(self, batch: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) float32 pixels on the model's device -> (B, D) float32 raw features, computed in `dtype`."""
        if self.text_only:
            raise UsageError("this model was loaded for texts only; load it with text_only=False to embed images")
        with torch.inference_mode(), self.image_precision():
            return self.model.encode_image(batch).float().cpu().numpy()

    def text_features(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """N texts -> (N, D) float32 raw projected features, computed in float32 whatever `dtype` (see place_model);
        each batch is padded to its longest text, not to the context length."""
        rows = []
        for start in range(0, len(texts), batch_size):
            ids = self.tokenizer.encode(texts[start:start + batch_size]).to(self.device)  # (B, T) int64
            with torch.inference_mode():
                rows.append(self.model.encode_text(ids).float().cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, self.config.projection_dim), dtype=np.float32)

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale), the factor on cosine similarities in logits_per_image."""
        return float(self.model.logit_scale.float().exp())


def load(
    model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", hidden_act: str | None = None,
    offline: bool = False,
) -> Clip:
    """Load `model` (directory, checkpoint file or Hub id) onto `device` in `dtype`; UsageError when it cannot be."""
    return load_files(resolve(model, offline=offline), device=device, dtype=dtype, hidden_act=hidden_act)


def load_files(files: ModelFiles, device: str = "auto", dtype: str = "auto", hidden_act: str | None = None,
               text_only: bool = False, tokenizer: ClipTokenizer | None = None) -> Clip:
    """Load resolved model files onto `device` in `dtype`; UsageError when they cannot be loaded.

    `text_only` loads the text tower alone (a run whose images are all in the index needs no more): less to read,
    the same text features. `tokenizer`: the one an earlier load of the same files read (not read again)."""
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    config, state = read_model(files, hidden_act, text_only=text_only)
    stored = stored_dtype(state)
    model = check_model(files, config, state, text_only=text_only)
    clip_model = place_model(model, target_device, target_dtype, text_only=text_only)
    return Clip(clip_model, tokenizer or read_tokenizer(files, config), read_preprocess(files, config),
                _describe(files), target_dtype, text_only=text_only, weights_dtype=stored)


def stored_dtype(state: dict[str, torch.Tensor]) -> str:
    """The floating-point dtype a state dict's weights are stored in ("float16"); a mix is named most common first
    ("float32 + float16": OpenAI's fp16 files keep embeddings and layer norms in float32)."""
    counts: dict[str, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            name = str(tensor.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + tensor.numel()
    names = sorted(counts, key=lambda n: -counts[n])
    return " + ".join(names) if names else "float32"


def place_model(model: CLIPModel, device: torch.device, dtype: torch.dtype, text_only: bool = False) -> CLIPModel:
    """Move the float32 model to `device`; in reduced precision, store the image tower's matmul weights in `dtype`.

    The image tower then runs under autocast (Clip.image_precision): matmuls, convolution and attention in `dtype`,
    layer norms and the residual sums in float32. On random ViT-B/32 weights that makes bf16 image embeddings'
    1 - cosine to float32 6x smaller than a model cast whole does, at the same speed (benchmarks/README.md).
    The text tower stays float32: texts are encoded once per run, and every image's scores depend on them.
    `text_only`: the image tower is on the meta device and stays there."""
    if text_only:
        model.text_model.to(device=device)
        model.text_projection.to(device=device)
        model.logit_scale.data = model.logit_scale.data.to(device)
        return model
    model = model.to(device=device)
    if dtype != torch.float32:
        for module in [*model.vision_model.modules(), model.visual_projection]:
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.to(dtype=dtype)
    return model


def read_model(files: ModelFiles, hidden_act: str | None = None, text_only: bool = False,
               ) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    """Config and state dict (transformers' key names, stored dtype) of resolved model files.

    `hidden_act` sets the activation of both towers: the config of a checkpoint file has none (OpenAI's weights
    were trained with QuickGELU, the default), and for a directory it overrides config.json."""
    if hidden_act is not None and hidden_act not in ACTIVATIONS:
        raise OptionError("hidden_act", hidden_act, "unknown activation", f"use one of {', '.join(ACTIVATIONS)}")
    if files.directory is not None:
        config = CLIPConfig.from_dict(_read_json(files.directory / "config.json"))
        if hidden_act is not None:
            config = dataclasses.replace(config, text=dataclasses.replace(config.text, hidden_act=hidden_act),
                                         vision=dataclasses.replace(config.vision, hidden_act=hidden_act))
        weights = weights_file(files)
        state = read_weights(weights, text_only)
        with _about(weights):
            return config, openai_to_hf(state) if is_openai_layout(state) else state
    checkpoint = weights_file(files)
    state = read_state_dict(checkpoint)
    act = hidden_act or "quick_gelu"
    with _about(checkpoint):
        if is_openai_layout(state):
            return CLIPConfig.from_state_dict_shapes(_shapes(state), hidden_act=act), openai_to_hf(state)
        if not is_hf_layout(state):
            raise UsageError("not a CLIP checkpoint: no OpenAI key names (visual.conv1.weight, ...) nor "
                             "transformers' (vision_model.*, text_model.*); pass a CLIP ViT checkpoint")
        # A bare transformers state dict without config.json: infer the config from the same shapes.
        return CLIPConfig.from_state_dict_shapes(_shapes(hf_to_openai(state)), hidden_act=act), state


def read_weights(weights: Path, text_only: bool = False) -> dict[str, torch.Tensor]:
    """A weights file's state dict; for a sharded checkpoint's .index.json, all its shards' tensors merged.
    `text_only`: see read_state_dict."""
    listed = shard_map(weights)
    if not listed:
        return read_state_dict(weights, text_only)
    # With text_only, only the shards that hold text-tower tensors are read (a shard may hold image tensors alone);
    # OpenAI key names say nothing by prefix, so such a checkpoint is read whole.
    chosen = text_tower_names(listed) if text_only else None
    wanted = set(listed) if chosen is None else set(chosen)
    state: dict[str, torch.Tensor] = {}
    for name in sorted({listed[key] for key in wanted}):
        if not (weights.parent / name).is_file():
            raise UsageError(f"{weights}: shard {name} is missing; download or copy it beside the index")
        state.update(read_state_dict(weights.parent / name, chosen is not None))
    cut = len(wrapper_prefix(listed))  # the names each shard's tensors have once read
    missing = sorted({key[cut:] for key in wanted} - set(state))
    if missing:
        raise UsageError(f"{weights}: '{missing[0]}' is listed but in none of the shards; download the shards again")
    return state


def check_model(files: ModelFiles, config: CLIPConfig, state: dict[str, torch.Tensor],
                text_only: bool = False) -> CLIPModel:
    """The float32 CLIPModel of read_model's result, every key and shape checked (the text tower's alone when
    `text_only`); errors name the weights file."""
    fix = ("the weights do not belong to this config.json" if files.directory is not None
           else "the checkpoint is incomplete, damaged, or for another architecture")
    with _about(weights_file(files)):
        return build_model(config, state, fix, text_only=text_only)


@contextmanager
def _about(path: Path) -> Iterator[None]:
    """Prefix UsageErrors raised inside with the file they are about."""
    try:
        yield
    except UsageError as err:
        raise UsageError(f"{path}: {err}") from None


def read_tokenizer(files: ModelFiles, config: CLIPConfig) -> ClipTokenizer:
    """The model directory's tokenizer files, else the bundled OpenAI CLIP BPE."""
    context_length = config.text.max_position_embeddings
    directory = files.directory
    if directory is not None and any((directory / n).is_file() for n in ("tokenizer.json", "vocab.json")):
        tokenizer, source = ClipTokenizer.from_files(directory, context_length), f"the tokenizer in {directory}"
    else:
        tokenizer, source = ClipTokenizer.bundled(context_length), "OpenAI's CLIP tokenizer (the model has none)"
        # Every CLIP trained with OpenAI's BPE has exactly its vocabulary; a model with another one (a multilingual
        # CLIP) would take these ids as the wrong tokens and give wrong scores without a word.
        if tokenizer.vocab_size != config.text.vocab_size:
            where = f"the model folder {directory}" if directory is not None else "the checkpoint"
            raise UsageError(f"{where} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt), and its "
                             f"vocab_size {config.text.vocab_size} is not that of OpenAI's CLIP tokenizer "
                             f"({tokenizer.vocab_size}); add the model's tokenizer files")
    # Ids past the token embedding would fail inside the model on the first text (EOS, the largest, is in every one).
    if tokenizer.vocab_size > config.text.vocab_size:
        raise UsageError(f"{source} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{config.text.vocab_size}; the tokenizer and the weights belong to different models")
    return tokenizer


def read_preprocess(files: ModelFiles, config: CLIPConfig) -> PreprocessConfig:
    """preprocessor_config.json when the directory has one, else CLIP's defaults at the model's image size."""
    if files.directory is None or not (files.directory / "preprocessor_config.json").is_file():
        return PreprocessConfig.for_image_size(config.vision.image_size)
    path = files.directory / "preprocessor_config.json"
    preprocess = PreprocessConfig.from_json(_read_json(path))
    side = config.vision.image_size
    made = preprocess.output_size
    if made is None:
        raise UsageError(f"{path}: images would keep their own shapes (no centre crop, no fixed-size resize), "
                         f"but the model takes {side}x{side}; set do_center_crop with crop_size {side}")
    if made != (side, side):
        raise UsageError(f"{path}: images come out {made[0]}x{made[1]}, but the model takes {side}x{side}; "
                         f"set crop_size (or size) to {side}")
    return preprocess


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda, then mps, then cpu; an explicit device that is absent is a UsageError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise OptionError("device", name, "no CUDA GPU is available", "use {option} cpu or auto")
        return torch.device(name)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise OptionError("device", name, "Apple's MPS is not available", "use {option} cpu or auto")
        return torch.device("mps")
    raise OptionError("device", name, "unknown device", "use {option} auto, cpu, cuda or mps")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> float32 on CPU/MPS (reference-identical), float16 on CUDA; fp32/fp16/bf16 as asked."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise OptionError("dtype", name, "unknown dtype", "use {option} auto, fp32, fp16 or bf16")
    dtype = DTYPE_NAMES[name]
    if dtype != torch.float32:
        reason = _autocast_refusal(device, dtype)
        if reason is not None:
            other = "fp16 or fp32" if name == "bf16" else "fp32"
            raise OptionError("dtype", name, f"cannot run on {device.type} here ({reason})", "use {option} " + other)
    return dtype


def _autocast_refusal(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when autocast runs `dtype` on `device` (reduced precision needs it, see place_model), else why not.

    torch refuses some pairs outright (bf16 on a GPU without it) and merely warns and disables autocast for others
    (a dtype that MPS's autocast lacks), which would then fail inside the model; both become a reason here."""
    check = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    if check is not None and not check(device.type):
        return f"torch {torch.__version__} has no autocast for {device.type}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.autocast(device.type, dtype=dtype)
    except (RuntimeError, UserWarning) as err:
        return str(err).split(". ")[0].splitlines()[0].rstrip(".") if str(err) else type(err).__name__
    return None


def _read_json(path: Path) -> dict:
    data = read_json(path, "fix or re-download it")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object; fix or re-download it")
    return data


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _describe(files: ModelFiles) -> str:
    where = files.directory if files.directory is not None else files.checkpoint
    return files.spec if str(where) == files.spec else f"{files.spec} ({where})"


def convert(src: str, dst: Path, dtype: str = "fp32", hidden_act: str | None = None, force: bool = False) -> Path:
    """Write `src` (checkpoint file, HF directory or Hub id) to `dst` in Hugging Face CLIP layout; returns dst.

    Everything is read and checked (every key and shape) before anything is written; see write_hf_directory."""
    if dtype not in DTYPE_NAMES:
        raise OptionError("dtype", dtype, "unknown dtype", "use {option} fp32, fp16 or bf16")
    dst = Path(dst)
    check_destination(dst, force)  # fail before reading a large checkpoint
    files = resolve(src)
    source = files.checkpoint or files.directory
    if source is not None and source.resolve() != dst.resolve() and source.resolve().is_relative_to(dst.resolve()):
        raise UsageError(f"{src} lies inside {dst}, which would be replaced; choose another destination")
    config, state = read_model(files, hidden_act)
    check_model(files, config, state)  # every key and shape checked before anything is written
    tokenizer = read_tokenizer(files, config)
    preprocess = read_preprocess(files, config)

    def extra_files(directory: Path) -> None:
        tokenizer.save(directory)
        text = json.dumps(preprocess.to_json(), indent=2)
        (directory / "preprocessor_config.json").write_text(text + "\n", encoding="utf-8")

    write_hf_directory(dst, config, state, DTYPE_NAMES[dtype], extra_files, force=force)
    return dst
