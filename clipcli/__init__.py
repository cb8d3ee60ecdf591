"""clipcli: zero-shot image classification and embeddings with CLIP, as a library and the `clip` command.

    import clipcli
    clip = clipcli.load("openai/clip-vit-base-patch32")
    probs = clipcli.zero_shot(clip, ["cat.jpg"], ["cat", "dog"])   # (1, 2) float32

Importing is cheap and has no side effects: the names below load their modules on first use."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load": "clipcli.api",
    "Clip": "clipcli.api",
    "encode_images": "clipcli.api",
    "encode_texts": "clipcli.api",
    "zero_shot": "clipcli.api",
    "label_embeddings": "clipcli.api",
    "convert": "clipcli.loader",
    "ClipError": "clipcli.errors",
    "UsageError": "clipcli.errors",
    "InputError": "clipcli.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clipcli' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
