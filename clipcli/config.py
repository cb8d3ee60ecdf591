"""CLIPConfig: frozen dataclasses mirroring Hugging Face's config.json, built from that dict or inferred from the
tensor shapes of an OpenAI-format state dict. Validates what it builds; imports nothing heavy."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clipcli.errors import UsageError

_DAMAGED = "the checkpoint is damaged, incomplete or not a CLIP ViT"
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish")


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class CLIPConfig:
    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CLIPConfig:
        """Build from a config.json dict; unknown keys are ignored, missing keys take the reference defaults."""
        if not isinstance(data, Mapping):
            raise UsageError("config.json is not a JSON object; use a CLIP config.json from Hugging Face")
        # Configs written before transformers 4.21 carry the sections under *_config_dict.
        text = data.get("text_config") or data.get("text_config_dict") or {}
        vision = data.get("vision_config") or data.get("vision_config_dict") or {}
        config = cls(
            text=_section(TextConfig, text, "text_config"),
            vision=_section(VisionConfig, vision, "vision_config"),
            projection_dim=_field(data, "projection_dim", int, cls.projection_dim, "config"),
            logit_scale_init_value=_field(
                data, "logit_scale_init_value", float, cls.logit_scale_init_value, "config"
            ),
        )
        config.validate()
        return config

    @classmethod
    def from_state_dict_shapes(
        cls, shapes: Mapping[str, tuple[int, ...]], hidden_act: str = "quick_gelu"
    ) -> CLIPConfig:
        """Infer the config of an OpenAI-format checkpoint from its tensor shapes, as openai/CLIP's build_model."""
        if any(key.startswith(("visual.layer1.", "visual.attnpool.")) for key in shapes):
            # OpenAI's RN50/RN101/RN50x4...: a modified ResNet image tower (it has a visual.conv1 too, its stem),
            # which transformers' CLIPModel, and so this tool, does not have.
            raise UsageError("ResNet CLIP checkpoints (RN50, RN101, RN50x4, ...) are not supported: their image "
                             "tower is a ResNet; use a ViT CLIP checkpoint (ViT-B/32, ViT-B/16, ViT-L/14, ...)")
        if "visual.conv1.weight" not in shapes:
            raise UsageError("not an OpenAI-format CLIP checkpoint (no 'visual.conv1.weight'); "
                             "pass a CLIP checkpoint with OpenAI key names or a Hugging Face CLIP directory")
        required = ("visual.positional_embedding", "visual.proj", "token_embedding.weight",
                    "positional_embedding", "text_projection", "visual.transformer.resblocks.0.mlp.c_fc.weight",
                    "transformer.resblocks.0.mlp.c_fc.weight")
        for key in required:
            if key not in shapes:
                raise UsageError(f"OpenAI-format checkpoint lacks '{key}'; the file is incomplete or not CLIP")
        vision_width, channels, patch, patch_w = _shape(shapes, "visual.conv1.weight", 4)
        grid_tokens, vision_width_pos = _shape(shapes, "visual.positional_embedding", 2)
        grid = round((grid_tokens - 1) ** 0.5)
        if patch != patch_w or grid * grid + 1 != grid_tokens or vision_width_pos != vision_width:
            raise UsageError(f"inconsistent vision shapes: conv1 {tuple(shapes['visual.conv1.weight'])}, "
                             f"positional_embedding {tuple(shapes['visual.positional_embedding'])} (expected "
                             f"(grid * grid + 1, {vision_width})); {_DAMAGED}")
        vocab_size, text_width = _shape(shapes, "token_embedding.weight", 2)
        context_length, text_width_pos = _shape(shapes, "positional_embedding", 2)
        text_proj_in, embed_dim = _shape(shapes, "text_projection", 2)
        vision_proj_in, vision_embed_dim = _shape(shapes, "visual.proj", 2)
        if text_width_pos != text_width or text_proj_in != text_width:
            raise UsageError(f"inconsistent text shapes: token_embedding width {text_width}, positional_embedding "
                             f"width {text_width_pos}, text_projection {tuple(shapes['text_projection'])}; {_DAMAGED}")
        if vision_proj_in != vision_width or vision_embed_dim != embed_dim:
            raise UsageError(f"inconsistent projection shapes: visual.proj {tuple(shapes['visual.proj'])}, "
                             f"text_projection {tuple(shapes['text_projection'])}; {_DAMAGED}")
        vision_mlp = _shape(shapes, "visual.transformer.resblocks.0.mlp.c_fc.weight", 2)[0]
        text_mlp = _shape(shapes, "transformer.resblocks.0.mlp.c_fc.weight", 2)[0]
        config = cls(
            text=TextConfig(
                vocab_size=vocab_size, hidden_size=text_width, intermediate_size=text_mlp,
                num_hidden_layers=_count_blocks(shapes, "transformer.resblocks."),
                # OpenAI's rule: one head per 64 channels.
                num_attention_heads=max(text_width // 64, 1), max_position_embeddings=context_length,
                hidden_act=hidden_act,
            ),
            vision=VisionConfig(
                hidden_size=vision_width, intermediate_size=vision_mlp,
                num_hidden_layers=_count_blocks(shapes, "visual.transformer.resblocks."),
                num_attention_heads=max(vision_width // 64, 1), num_channels=channels,
                image_size=patch * grid, patch_size=patch, hidden_act=hidden_act,
            ),
            projection_dim=embed_dim,
        )
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict that both clipcli and transformers.CLIPModel.from_pretrained read."""
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": {**dataclasses.asdict(self.text), "model_type": "clip_text_model",
                            "projection_dim": self.projection_dim},
            "vision_config": {**dataclasses.asdict(self.vision), "model_type": "clip_vision_model",
                              "projection_dim": self.projection_dim},
        }

    def validate(self) -> None:
        """Raise UsageError when the numbers cannot describe a working CLIP model."""
        for name, section in (("text_config", self.text), ("vision_config", self.vision)):
            if section.hidden_size % section.num_attention_heads:
                raise UsageError(f"{name}: hidden_size {section.hidden_size} is not divisible by "
                                 f"num_attention_heads {section.num_attention_heads}")
            if section.hidden_act not in ACTIVATIONS:
                raise UsageError(f"{name}: unsupported hidden_act '{section.hidden_act}'; "
                                 f"use one of {', '.join(ACTIVATIONS)}")
        if self.vision.image_size % self.vision.patch_size:
            raise UsageError(f"vision_config: image_size {self.vision.image_size} is not a multiple of "
                             f"patch_size {self.vision.patch_size}")
        if not 0 <= self.text.eos_token_id < self.text.vocab_size:
            raise UsageError(f"text_config: eos_token_id {self.text.eos_token_id} is outside the vocabulary "
                             f"of {self.text.vocab_size}")


def _section(kind: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise UsageError(f"config.json: {where} is not a JSON object")
    defaults = kind()
    values = {}
    for field in dataclasses.fields(kind):
        default = getattr(defaults, field.name)
        value = data.get(field.name, default)
        if field.name in ("image_size", "patch_size") and isinstance(value, (list, tuple)):
            # transformers allows [h, w]; the CLIP towers are square.
            if len(value) != 2 or value[0] != value[1]:
                raise UsageError(f"config.json: {where}.{field.name} {value} is not square")
            value = value[0]
        if field.name == "eos_token_id" and isinstance(value, list):
            value = value[0] if value else default
        values[field.name] = _field({field.name: value}, field.name, type(default), default, where)
    return kind(**values)


def _field(data: Mapping[str, Any], name: str, kind: type, default: Any, where: str) -> Any:
    value = data.get(name, default)
    if value is None:
        return default
    if kind is str:
        if not isinstance(value, str):
            raise UsageError(f"config.json: {where}.{name} should be a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"config.json: {where}.{name} should be a number, got {value!r}")
    if kind is int:
        if value != int(value) or value < 0 or (value == 0 and name not in ("bos_token_id", "eos_token_id",
                                                                           "pad_token_id")):
            raise UsageError(f"config.json: {where}.{name} should be a positive integer, got {value!r}")
        return int(value)
    return float(value)


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int) -> tuple[int, ...]:
    shape = tuple(shapes[key])
    if len(shape) != ndim:
        raise UsageError(f"'{key}' has shape {shape}, expected {ndim} dimensions; {_DAMAGED}")
    return shape


def _count_blocks(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in shapes if (m := pattern.match(key))}
    if indices != set(range(len(indices))):
        raise UsageError(f"checkpoint blocks under '{prefix}' are not numbered 0..N-1: {sorted(indices)}; "
                         f"{_DAMAGED}")
    return len(indices)
