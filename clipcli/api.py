"""The scripting API: load a model, then embed images and texts or score images against labels, in memory.

    import clipcli
    clip = clipcli.load("openai/clip-vit-base-patch32")
    probs = clipcli.zero_shot(clip, ["cat.jpg"], ["cat", "dog"])   # (1, 2) float32

No index and no files written: that is the command line's job (pipeline.Session)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from clipcli import scoring
from clipcli.loader import Clip, load
from clipcli.pipeline import DEFAULT_TEMPLATE, check_labels, check_templates
from clipcli.preprocess import load_image, preprocess, to_rgb

ImageLike = str | Path | Image.Image


def encode_images(clip: Clip, images: Sequence[ImageLike], *, normalized: bool = True,
                  batch_size: int = 32) -> np.ndarray:
    """Image paths or PIL images -> (N, D) float32 embeddings (raw features unless `normalized`); an unreadable
    file raises InputError."""
    def pixels(item: ImageLike) -> np.ndarray:
        image = item if isinstance(item, Image.Image) else load_image(Path(item))
        return preprocess(to_rgb(image), clip.preprocess)

    rows = [clip.image_features([pixels(i) for i in images[start:start + batch_size]])
            for start in range(0, len(images), batch_size)]
    features = np.concatenate(rows) if rows else np.zeros((0, clip.config.projection_dim), dtype=np.float32)
    return scoring.normalize(features) if normalized else features


def encode_texts(clip: Clip, texts: Sequence[str], *, normalized: bool = True) -> np.ndarray:
    """Texts -> (N, D) float32 embeddings, no template (raw features unless `normalized`)."""
    features = clip.text_features(texts)
    return scoring.normalize(features) if normalized else features


def label_embeddings(clip: Clip, labels: Sequence[str], templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> np.ndarray:
    """(L, D) float32 unit label embeddings: per label the mean of its normalised template embeddings, re-normalised."""
    check_labels(labels)
    check_templates(templates)
    prompts = [template.replace("{}", label) for label in labels for template in templates]
    return scoring.ensemble(clip.text_features(prompts), len(labels), len(templates))


def zero_shot(clip: Clip, images: Sequence[ImageLike], labels: Sequence[str], *,
              templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> np.ndarray:
    """(N, L) float32 label probabilities for images (paths or PIL images), as logits_per_image.softmax(-1)."""
    return scoring.probabilities(encode_images(clip, images, normalized=False),
                                 label_embeddings(clip, labels, templates), clip.logit_scale)


__all__ = ["Clip", "encode_images", "encode_texts", "label_embeddings", "load", "zero_shot"]
