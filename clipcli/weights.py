"""Checkpoints: read them safely, map OpenAI/OpenCLIP key names to ours (transformers' CLIPModel names), load them
into a CLIPModel with every key and shape checked, and write a Hugging Face CLIP directory atomically."""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from clipcli.config import CLIPConfig
from clipcli.errors import OptionError, UsageError, one_line, os_reason
from clipcli.fsutil import atomic_directory, umask
from clipcli.model import CLIPModel

# The only keys dropped by name before a strict load: buffers that older transformers checkpoints
# (openai/clip-vit-base-patch32 among them) still carry; the model recomputes them.
DROPPED_HF_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# Non-weight entries of OpenAI's TorchScript archives (the causal mask buffer, integer metadata).
IGNORED_OPENAI_KEYS = ("attn_mask", "input_resolution", "context_length", "vocab_size")
# Wrappers around a state dict in OpenCLIP/training checkpoints, and prefixes from DDP or torch.compile.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.", "model.")


StateDict = dict[str, torch.Tensor]
# transformers' names of everything the text tower needs: texts can be embedded without reading the image tower.
TEXT_PREFIXES = ("text_model.", "text_projection.", "logit_scale")


def is_text_key(name: str) -> bool:
    """True for a parameter (transformers' name) that text embeddings need."""
    return name.startswith(TEXT_PREFIXES)


def wrapper_prefix(names: Iterable[str]) -> str:
    """The wrapper prefixes (module., _orig_mod., model.) that every name carries, as they are stripped on reading."""
    names = list(names)
    found = ""
    for prefix in _PREFIXES:
        if names and all(name.startswith(found + prefix) for name in names):
            found += prefix
    return found


def text_tower_names(names: Iterable[str]) -> list[str] | None:
    """Of a checkpoint's tensor names (wrapper prefixes and all), those the text tower needs; None for OpenAI's
    layout, whose names say nothing by prefix (it is read whole)."""
    names = list(names)
    cut = len(wrapper_prefix(names))
    if is_openai_layout(name[cut:] for name in names):
        return None
    return [name for name in names if is_text_key(name[cut:])]


def read_state_dict(path: Path, text_only: bool = False) -> StateDict:
    """Read a checkpoint file (safetensors, TorchScript archive, or plain torch state dict) without unpickling code.

    `text_only`: a safetensors file in transformers' layout is read for the text tower's tensors alone (the image
    tower is most of a CLIP checkpoint); other files are read whole and the caller ignores the rest."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            head = file.read(16)
    except OSError as err:
        raise UsageError(f"{path}: cannot read ({err.strerror or type(err).__name__}); check the file") from None
    if not head:
        raise UsageError(f"{path}: empty file, not a checkpoint; check the path or download the file again")
    try:
        if path.suffix == ".safetensors" or head[8:9] == b"{":  # safetensors: u64 header length, then JSON
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as tensors:
                names = list(tensors.keys())
                text_names = text_tower_names(names) if text_only else None
                data: object = {name: tensors.get_tensor(name) for name in (text_names or names)}
        elif head.startswith(b"PK"):  # a zip: TorchScript archive or torch.save's format
            if not zipfile.is_zipfile(path):
                raise UsageError(f"{path}: truncated or damaged zip archive (no central directory); "
                                 "download or copy the checkpoint again")
            if _is_torchscript(path):
                # TorchScript runs no Python on load; its state dict holds only tensors.
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        elif head[0] == 0x80:  # a bare pickle (torch.save's legacy format): still only the weights-only unpickler
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise UsageError(f"{path}: not a checkpoint (neither safetensors, a zip archive nor a pickle); "
                             "pass a .pt/.bin/.safetensors CLIP weights file")
    except pickle.UnpicklingError as err:
        raise UsageError(f"{path}: refused to load: the file holds Python objects, not just tensors "
                         f"({_unpickling_reason(err)}); use a weights-only checkpoint (safetensors, OpenAI .pt, "
                         "or a plain state dict)") from None
    except UsageError:
        raise
    except Exception as err:  # torch/safetensors raise many types for damaged files
        raise UsageError(f"{path}: cannot read checkpoint ({one_line(err)}); the file is damaged, truncated "
                         "or not a checkpoint") from None
    return _unwrap(data, path)


def _unpickling_reason(err: pickle.UnpicklingError) -> str:
    # torch's message is paragraphs about the weights_only default; the useful part names the refused global.
    found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(err))
    if found:
        return f"it would load {found[1]}"
    detail = re.search(r"WeightsUnpickler error:\s*(\S.*?)(?:\n\n|$)", str(err), re.DOTALL)
    return " ".join(detail[1].split())[:120] if detail else one_line(err)


def _is_torchscript(path: Path) -> bool:
    # TorchScript archives are zips holding a code/ folder and constants.pkl beside data.pkl.
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _unwrap(data: object, path: Path) -> StateDict:
    while isinstance(data, Mapping) and not _is_tensor_dict(data):
        inner = next((data[k] for k in _WRAPPER_KEYS if isinstance(data.get(k), Mapping)), None)
        if inner is None:
            break
        data = inner
    if not isinstance(data, Mapping) or not _is_tensor_dict(data):
        raise UsageError(f"{path}: no state dict of tensors found in the checkpoint; pass a CLIP weights file")
    state = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    cut = len(wrapper_prefix(state))
    return {k[cut:]: v for k, v in state.items()} if cut else state


def _is_tensor_dict(data: Mapping) -> bool:
    return bool(data) and sum(isinstance(v, torch.Tensor) for v in data.values()) >= len(data) / 2


def is_openai_layout(names: Iterable[str]) -> bool:
    """True for OpenAI key names (visual.conv1.weight, transformer.resblocks.*), False for transformers' names."""
    return any(k.startswith("visual.") for k in names)


def is_hf_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """True for transformers' CLIPModel key names (vision_model.*, text_model.*)."""
    return any(k.startswith(("vision_model.", "text_model.")) for k in state)


# The conversion of style.md §6: a rename table (full key names, OpenAI -> transformers) plus three named special
# cases: transposed projections, fused q/k/v in transformer blocks, and the ignored non-weight entries above.
_LAYER_NORMS = {"visual.ln_pre": "vision_model.pre_layrnorm",  # typo kept: transformers' key name
                "visual.ln_post": "vision_model.post_layernorm", "ln_final": "text_model.final_layer_norm"}
_RENAMES = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    # OpenAI's positional embeddings are bare (tokens, width) parameters; transformers holds them in nn.Embedding.
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "logit_scale": "logit_scale",
    **{f"{old}.{kind}": f"{new}.{kind}" for old, new in _LAYER_NORMS.items() for kind in ("weight", "bias")},
}
# (N, D) projection matrices applied as x @ proj in OpenAI's code, stored as Linear (D_out, D_in) weights by HF.
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
# Inside transformer block i: names after "<tower prefix><i>.".
_TOWERS = {"visual.transformer.resblocks.": "vision_model.encoder.layers.",
           "transformer.resblocks.": "text_model.encoder.layers."}
_BLOCK_RENAMES = {
    f"{old}.{kind}": f"{new}.{kind}" for kind in ("weight", "bias") for old, new in (
        ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
        ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))
}
# OpenAI fuses the attention input projections into one (3 * width, ...) tensor, in q, k, v order.
_FUSED_QKV = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_QKV = ("q_proj", "k_proj", "v_proj")
_OPENAI_BLOCK_KEY = re.compile(r"(visual\.transformer\.resblocks\.|transformer\.resblocks\.)(\d+)\.(.+)")
_HF_BLOCK_KEY = re.compile(r"(vision_model\.encoder\.layers\.|text_model\.encoder\.layers\.)(\d+)\.(.+)")
_HF_QKV = re.compile(r"self_attn\.([qkv]_proj)\.(weight|bias)")  # inside a block


def openai_to_hf(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Map an OpenAI/OpenCLIP-named state dict to transformers' CLIPModel names; every source key must be used.

    Whether every target key is produced is checked against the model by build_model."""
    out: StateDict = {}
    for key, value in state.items():
        if key in IGNORED_OPENAI_KEYS:
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif key in _RENAMES:
            out[_RENAMES[key]] = value
        elif (m := _OPENAI_BLOCK_KEY.fullmatch(key)) and m[3] in _FUSED_QKV:
            if value.shape[0] % 3:
                raise UsageError(f"'{key}' has shape {tuple(value.shape)}; its first dimension is not 3 x width, "
                                 "so it cannot be split into q/k/v; the checkpoint is damaged or not CLIP")
            prefix = f"{_TOWERS[m[1]]}{m[2]}.self_attn"
            for name, part in zip(_QKV, value.chunk(3, dim=0), strict=True):
                out[f"{prefix}.{name}.{_FUSED_QKV[m[3]]}"] = part.contiguous()
        elif m and m[3] in _BLOCK_RENAMES:
            out[f"{_TOWERS[m[1]]}{m[2]}.{_BLOCK_RENAMES[m[3]]}"] = value
        else:
            raise UsageError(f"unexpected checkpoint key '{key}'; not a CLIP ViT checkpoint with OpenAI key names")
    return out


_INVERSE_RENAMES = {new: old for old, new in (*_RENAMES.items(), *_TRANSPOSED.items())}
_INVERSE_TOWERS = {new: old for old, new in _TOWERS.items()}
_INVERSE_BLOCK_RENAMES = {new: old for old, new in _BLOCK_RENAMES.items()}


def hf_to_openai(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Inverse of openai_to_hf (transposes projections, fuses q/k/v): transformers' names -> OpenAI's."""
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}  # fused OpenAI key -> {"q_proj": tensor, ...}
    for key, value in state.items():
        if key in DROPPED_HF_KEYS:
            continue
        if key in _INVERSE_RENAMES:
            out[_INVERSE_RENAMES[key]] = value.t().contiguous() if key in _TRANSPOSED.values() else value
        elif (m := _HF_BLOCK_KEY.fullmatch(key)) and m[3] in _INVERSE_BLOCK_RENAMES:
            out[f"{_INVERSE_TOWERS[m[1]]}{m[2]}.{_INVERSE_BLOCK_RENAMES[m[3]]}"] = value
        elif m and (q := _HF_QKV.fullmatch(m[3])):
            qkv.setdefault(f"{_INVERSE_TOWERS[m[1]]}{m[2]}.attn.in_proj_{q[2]}", {})[q[1]] = value
        else:
            raise UsageError(f"unexpected checkpoint key '{key}'; not a transformers CLIP state dict")
    for key, parts in qkv.items():
        if absent := [name for name in _QKV if name not in parts]:
            raise UsageError(f"checkpoint lacks {'/'.join(absent)} beside the other attention projections "
                             f"of '{key}'; the state dict is incomplete")
        if len({part.shape for part in parts.values()}) != 1:
            raise UsageError(f"attention projections for '{key}' differ in shape "
                             f"({', '.join(f'{n} {tuple(parts[n].shape)}' for n in _QKV)}); the state dict is damaged")
        out[key] = torch.cat([parts[name] for name in _QKV], dim=0)
    return out


def build_model(config: CLIPConfig, state: Mapping[str, torch.Tensor],
                fix: str = "the checkpoint is incomplete, damaged, or for another architecture",
                text_only: bool = False) -> CLIPModel:
    """A float32 CLIPModel with `state` (transformers' names) loaded strictly; errors name keys and both shapes.

    `text_only`: only the text tower's parameters are loaded and checked; the image tower stays on the meta device
    (shapes without storage), so the model can encode texts and nothing else."""
    keep = is_text_key if text_only else lambda name: True
    # float32 first: the loaded tensors become the parameters (assign=True), and checkpoints store fp16 too.
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()
             if k not in DROPPED_HF_KEYS and keep(k)}
    with torch.device("meta"):  # shapes only: no random init that the weights would overwrite at once
        model = CLIPModel(config)
    expected = {k: v for k, v in model.state_dict().items() if keep(k)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected {_some(unexpected)}")
        raise UsageError(f"checkpoint keys do not match the CLIP model: {', '.join(parts)}; {fix}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UsageError(f"checkpoint tensor '{key}' has shape {tuple(state[key].shape)}, the config implies "
                             f"{tuple(tensor.shape)}; {fix}")
    model.load_state_dict(state, strict=not text_only, assign=True)
    return model.eval().requires_grad_(False)


def _some(keys: list[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_destination(destination: Path, force: bool) -> None:
    """UsageError unless `destination` is absent, an empty directory, or (with force) a model directory to replace,
    and is neither the current folder nor one that holds it."""
    destination = Path(os.path.realpath(destination))
    if destination == Path.cwd() or destination in Path.cwd().parents:
        raise UsageError(f"{destination} is the current folder or holds it; give a new folder name for the model")
    try:
        _check_destination(destination, force)
    except OSError as err:
        raise UsageError(f"cannot use {destination}: {os_reason(err)}; choose another destination") from None


def _check_destination(destination: Path, force: bool) -> None:
    if destination.exists() and not destination.is_dir():
        raise UsageError(f"{destination} exists and is not a directory; choose another destination")
    if not destination.is_dir() or not any(destination.iterdir()):
        return
    if not force:
        raise OptionError("force", None, f"{destination} is not empty",
                          "choose an empty destination or pass {option} to replace it")
    # force deletes the old directory: only ever one that holds a model, never e.g. a home folder given by mistake.
    if not (destination / "config.json").is_file():
        raise OptionError("force", None, f"{destination} is not empty and holds no config.json, so it is not a model "
                          "directory", "{option} replaces only model directories; choose another destination or "
                          "empty it yourself")


def write_hf_directory(
    destination: Path, config: CLIPConfig, state: Mapping[str, torch.Tensor], dtype: torch.dtype,
    extra_files: Callable[[Path], None], force: bool = False,
) -> None:
    """Write config.json + model.safetensors (+ whatever extra_files writes) atomically into `destination` (see
    fsutil.atomic_directory), so a failure leaves it as it was; UsageError when it cannot be written."""
    from safetensors.torch import save_file

    # Through symlinks to the real folder, so a link to a folder is written through rather than renamed over.
    destination = Path(os.path.realpath(destination))
    check_destination(destination, force)
    try:
        with atomic_directory(destination) as staging:
            tensors = {k: v.detach().to(dtype=dtype).contiguous() for k, v in state.items()
                       if k not in DROPPED_HF_KEYS}
            save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
            os.chmod(staging / "model.safetensors", 0o666 & ~umask())  # as the other files: readable by others
            text = json.dumps({**config.to_dict(), "torch_dtype": str(dtype).removeprefix("torch.")}, indent=2)
            (staging / "config.json").write_text(text + "\n", encoding="utf-8")
            extra_files(staging)
    except OSError as err:
        raise UsageError(f"cannot write {destination}: {os_reason(err)}; choose another destination") from None
