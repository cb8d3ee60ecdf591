"""Checkpoints: read them safely, map OpenAI/OpenCLIP key names to ours (transformers' CLIPModel names), load them
into a CLIPModel with every key and shape checked, and write a Hugging Face CLIP directory atomically."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from clipcli.config import CLIPConfig
from clipcli.errors import UsageError
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


def read_state_dict(path: Path) -> StateDict:
    """Read a checkpoint file (safetensors, TorchScript archive, or plain torch state dict) without unpickling code."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if _is_torchscript(path):
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{path}: refused to load: the file holds Python objects, not just tensors ({first[:120]}); "
                         "use a weights-only checkpoint (safetensors, OpenAI .pt, or a plain state dict)") from None
    except UsageError:
        raise
    except Exception as err:  # torch/safetensors raise many types for damaged files
        raise UsageError(f"{path}: cannot read checkpoint ({_one_line(err)}); the file is damaged, truncated "
                         "or not a checkpoint") from None
    return _unwrap(data, path)


def _is_torchscript(path: Path) -> bool:
    # TorchScript archives are zips holding a code/ folder and constants.pkl beside data.pkl.
    if not zipfile.is_zipfile(path):
        return False
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
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_tensor_dict(data: Mapping) -> bool:
    return bool(data) and sum(isinstance(v, torch.Tensor) for v in data.values()) >= len(data) / 2


def is_openai_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """True for OpenAI key names (visual.conv1.weight, transformer.resblocks.*), False for transformers' names."""
    return any(k.startswith("visual.") for k in state)


_BLOCK_RENAMES = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                  "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_RENAMES = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre": "vision_model.pre_layrnorm",
    "visual.ln_post": "vision_model.post_layernorm",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final": "text_model.final_layer_norm",
    "logit_scale": "logit_scale",
}
# (N, D) projection matrices applied as x @ proj in OpenAI's code, stored as Linear (D_out, D_in) weights by HF.
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_TOWERS = {"visual.transformer.resblocks.": "vision_model.encoder.layers.",
           "transformer.resblocks.": "text_model.encoder.layers."}


def openai_to_hf(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Map an OpenAI/OpenCLIP-named state dict to transformers' CLIPModel names; every source key must be used."""
    out: StateDict = {}
    for key, value in state.items():
        if key in IGNORED_OPENAI_KEYS:
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif key in _RENAMES:
            out[_RENAMES[key]] = value
        elif (base := key.rsplit(".", 1)[0]) in _RENAMES and key.endswith((".weight", ".bias")):
            out[_RENAMES[base] + key[len(base):]] = value
        elif tower := next((t for t in _TOWERS if key.startswith(t)), None):
            out.update(_rename_block(key, tower, value))
        else:
            raise UsageError(f"unexpected checkpoint key '{key}'; not a CLIP ViT checkpoint with OpenAI key names")
    return out


def _rename_block(key: str, tower: str, value: torch.Tensor) -> StateDict:
    rest = key[len(tower):]
    if m := re.fullmatch(r"(\d+)\.attn\.in_proj_(weight|bias)", rest):
        # Fused (3 * width, ...) q/k/v projection: split into transformers' separate projections.
        layer, kind = m.groups()
        if value.shape[0] % 3:
            raise UsageError(f"'{key}' has shape {tuple(value.shape)}; its first dimension is not 3 x width")
        names = ("q_proj", "k_proj", "v_proj")
        return {f"{_TOWERS[tower]}{layer}.self_attn.{n}.{kind}": part.contiguous()
                for n, part in zip(names, value.chunk(3, dim=0))}
    if (m := re.fullmatch(r"(\d+)\.(.+)\.(weight|bias)", rest)) and m[2] in _BLOCK_RENAMES:
        return {f"{_TOWERS[tower]}{m[1]}.{_BLOCK_RENAMES[m[2]]}.{m[3]}": value}
    raise UsageError(f"unexpected checkpoint key '{key}'; not a CLIP ViT checkpoint with OpenAI key names")


def hf_to_openai(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Inverse of openai_to_hf (fuses q/k/v, transposes projections): writes OpenAI-layout checkpoints."""
    inverse = {v: k for k, v in _RENAMES.items()}
    inverse_blocks = {v: k for k, v in _BLOCK_RENAMES.items()}
    inverse_towers = {v: k for k, v in _TOWERS.items()}
    inverse_transposed = {v: k for k, v in _TRANSPOSED.items()}
    out: StateDict = {}
    for key, value in state.items():
        if key in DROPPED_HF_KEYS:
            continue
        if key in inverse_transposed:
            out[inverse_transposed[key]] = value.t().contiguous()
            continue
        base, kind = key.rsplit(".", 1) if "." in key else (key, "")
        if key in inverse:
            out[inverse[key]] = value
        elif base in inverse:
            out[f"{inverse[base]}.{kind}"] = value
        elif tower := next((t for t in inverse_towers if key.startswith(t)), None):
            layer, module = key[len(tower):].split(".", 1)
            module = module.rsplit(".", 1)[0]
            if module.startswith("self_attn.") and module != "self_attn.out_proj":
                if module == "self_attn.q_proj":
                    parts = [state[f"{tower}{layer}.self_attn.{n}.{kind}"] for n in ("q_proj", "k_proj", "v_proj")]
                    out[f"{inverse_towers[tower]}{layer}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
                continue
            out[f"{inverse_towers[tower]}{layer}.{inverse_blocks[module]}.{kind}"] = value
        else:
            raise UsageError(f"unexpected checkpoint key '{key}'")
    return out


def build_model(config: CLIPConfig, state: Mapping[str, torch.Tensor]) -> CLIPModel:
    """A float32 CLIPModel with `state` (transformers' names) loaded strictly; errors name keys and both shapes."""
    state = {k: v for k, v in state.items() if k not in DROPPED_HF_KEYS}
    model = CLIPModel(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected {_some(unexpected)}")
        raise UsageError(f"checkpoint keys do not match the CLIP model: {'; '.join(parts)}; "
                         "the weights do not belong to this config.json")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UsageError(f"checkpoint tensor '{key}' has shape {tuple(state[key].shape)}, the config implies "
                             f"{tuple(tensor.shape)}; the weights do not belong to this config.json")
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def _some(keys: list[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def write_hf_directory(
    destination: Path, config: CLIPConfig, state: Mapping[str, torch.Tensor], dtype: torch.dtype,
    extra_files: Callable[[Path], None], force: bool = False,
) -> None:
    """Write config.json + model.safetensors (+ whatever extra_files writes) into a temp dir, then rename it."""
    from safetensors.torch import save_file

    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise UsageError(f"{destination} exists and is not a directory; choose another destination")
    if destination.is_dir() and any(destination.iterdir()) and not force:
        raise UsageError(f"{destination} is not empty; choose an empty destination or pass --force to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        tensors = {k: v.detach().to(dtype=dtype).contiguous() for k, v in state.items() if k not in DROPPED_HF_KEYS}
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        text = json.dumps({**config.to_dict(), "torch_dtype": str(dtype).removeprefix("torch.")}, indent=2)
        (staging / "config.json").write_text(text + "\n")
        extra_files(staging)
        if destination.exists():
            old = destination.with_name(f".{destination.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(destination, old)
            os.replace(staging, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:160] + "…") if len(text) > 160 else (text or type(err).__name__)
