"""The CLIP network only: attention, MLP, encoder layer, text and vision towers, CLIPModel.
Parameter names are transformers' CLIPModel names, so its state dicts load with strict=True. Imports torch and
config only; no I/O, no tokenization, no preprocessing."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from clipcli.config import CLIPConfig, TextConfig, VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI's approximation, which their released weights were trained with: x * sigmoid(1.702 * x), computed in
    # one new buffer instead of three (the same float32 values; the (B, T, 4D) activations are the largest).
    return torch.sigmoid_(1.702 * x).mul_(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    # transformers' "gelu_new"/"gelu_fast" spell the tanh approximation out; kept literally for bit parity.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACT2FN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "gelu_fast": gelu_new,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class CLIPAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, is_causal: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.is_causal = is_causal
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H = self.num_heads
        q = self.q_proj(x).view(B, T, H, D // H).transpose(1, 2)  # (B, heads, T, head_dim)
        k = self.k_proj(x).view(B, T, H, D // H).transpose(1, 2)  # (B, heads, T, head_dim)
        v = self.v_proj(x).view(B, T, H, D // H).transpose(1, 2)  # (B, heads, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal)  # (B, heads, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.out_proj(y)


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.act = ACT2FN[hidden_act]
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: TextConfig | VisionConfig, is_causal: bool) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads, is_causal)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextConfig | VisionConfig, is_causal: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, is_causal) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def empty_embedding(rows: int, width: int) -> nn.Embedding:
    # Uninitialised: checkpoints fill it. nn.Embedding's own random init, on the meta device where models are built,
    # runs through torch's Python decompositions and imports torch._dynamo: almost a second of every start.
    return nn.Embedding(rows, width, _weight=torch.empty(rows, width))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.token_embedding = empty_embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = empty_embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:T]  # (B, T, D)


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.eos_token_id = config.eos_token_id
        self.max_length = config.max_position_embeddings
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config, is_causal=True)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 token ids -> (B, D) hidden state at the end-of-text position."""
        if input_ids.shape[1] > self.max_length:
            raise ValueError(f"input_ids has {input_ids.shape[1]} positions, the model has {self.max_length}")
        x = self.final_layer_norm(self.encoder(self.embeddings(input_ids)))  # (B, T, D)
        if self.eos_token_id == 2:
            # Legacy configs (OpenAI's Hub repos) carry eos_token_id 2; transformers then pools at the argmax of
            # the ids, which is the end-of-text token because it is the largest id in the CLIP vocabulary.
            eos_position = input_ids.argmax(dim=-1)
        else:
            # First end-of-text token; the pad id may equal it, so "first" matters.
            eos_position = (input_ids == self.eos_token_id).int().argmax(dim=-1)
        # The causal mask means padding after this position never reaches it: no padding mask is needed.
        return x[torch.arange(x.shape[0], device=x.device), eos_position]


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size,
            bias=False,
        )
        num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = empty_embedding(num_positions, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values)  # (B, D, grid, grid)
        patches = patches.flatten(2).transpose(1, 2)  # (B, grid*grid, D)
        cls = self.class_embedding.expand(B, 1, -1)  # (B, 1, D)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 1 + grid*grid, D)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # typo kept: HF key name
        self.encoder = CLIPEncoder(config, is_causal=False)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float pixels -> (B, D) normalised class-token state."""
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values are {tuple(pixel_values.shape[-2:])}, the model takes "
                             f"{self.image_size}x{self.image_size}")
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))  # (B, 1 + grid*grid, D)
        return self.post_layernorm(x[:, 0])


class CLIPModel(nn.Module):
    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config.text)
        self.vision_model = CLIPVisionTransformer(config.vision)
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixels -> (N, projection_dim) image features, not normalised."""
        return self.visual_projection(self.vision_model(pixel_values))

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, T) int64 ids, T <= context length -> (N, projection_dim) text features, not normalised."""
        return self.text_projection(self.text_model(input_ids))

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(N, D) image and (M, D) text features -> (N, M) logit_scale.exp() * cosine, as logits_per_image."""
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        return image_features @ text_features.t() * self.logit_scale.exp()

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixels and (M, T) ids -> (N, M) logits_per_image."""
        return self.logits(self.encode_image(pixel_values), self.encode_text(input_ids))
