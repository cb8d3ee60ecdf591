"""Scores from features, in numpy alone (a run answered from the index imports no torch): L2 normalisation, the
template ensemble of label embeddings, label probabilities as CLIPModel's logits_per_image.softmax(-1), and cosines.

Vocabulary: *features* are a tower's raw projected outputs; *embeddings* are features scaled to unit length."""

from __future__ import annotations

import numpy as np


def normalize(features: np.ndarray) -> np.ndarray:
    """(N, D) features -> (N, D) float32 embeddings (unit rows); an all-zero row stays zero."""
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return (features / np.where(norms == 0, 1, norms)).astype(np.float32)


def ensemble(prompt_features: np.ndarray, labels: int, templates: int) -> np.ndarray:
    """(labels * templates, D) prompt features, label-major -> (labels, D) label embeddings: per label the mean of
    its normalised template embeddings, re-normalised (the CLIP paper's prompt ensembling)."""
    per_label = normalize(prompt_features).reshape(labels, templates, -1)
    return normalize(per_label.mean(axis=1))


def cosines(image_features: np.ndarray, label_embeddings: np.ndarray) -> np.ndarray:
    """(N, D) image features and (L, D) label embeddings -> (N, L) float32 cosine similarities."""
    if not len(image_features):  # a stretch of inputs that all failed
        return np.zeros((0, len(label_embeddings)), dtype=np.float32)
    # np.dot, not @: for these shapes numpy's matmul measured 50x slower here (it bypasses BLAS for float32 with a
    # transposed operand); the results are the same float32 sums.
    return np.dot(normalize(image_features), label_embeddings.T).astype(np.float32, copy=False)


def cosines_to(image_features: np.ndarray, query: np.ndarray) -> np.ndarray:
    """(N, D) image features and one (D,) unit query -> (N,) float32 cosines, each row summed alone in the same order
    (einsum's loop), so that identical images get identical scores wherever they sit in a batch: a BLAS product
    rounds a row differently by its place (its kernels take rows in blocks), and equal scores must tie."""
    if not len(image_features):
        return np.zeros(0, dtype=np.float32)
    return np.einsum("ij,j->i", normalize(image_features), query.astype(np.float32, copy=False))


def probabilities(image_features: np.ndarray, label_embeddings: np.ndarray, logit_scale: float) -> np.ndarray:
    """(N, L) float32: softmax over labels of logit_scale * cosine, as CLIPModel's logits_per_image.softmax(-1);
    `logit_scale` is the factor itself (exp of the model's parameter)."""
    logits = cosines(image_features, label_embeddings) * np.float32(logit_scale)
    logits -= logits.max(axis=-1, keepdims=True)
    odds = np.exp(logits)
    return (odds / odds.sum(axis=-1, keepdims=True)).astype(np.float32)


SCORE_KINDS = ("prob", "cosine")  # what a label score is: softmax probability over the labels, or raw cosine


def score_range(kind: str) -> tuple[float, float]:
    """The values a score of `kind` can take: probabilities lie in [0, 1], cosines in [-1, 1]."""
    return (0.0, 1.0) if kind == "prob" else (-1.0, 1.0)


def top_labels(scores: np.ndarray, min_score: float | None = None) -> np.ndarray:
    """(N, L) label scores -> (N,) int64: each row's best label (the first of equal ones), or -1 where that best
    score is below `min_score` (the image gets no label)."""
    if not len(scores):
        return np.zeros(0, dtype=np.int64)
    best = scores.argmax(axis=-1).astype(np.int64)
    if min_score is not None:
        # Compared as the float64 value of each float32 score: the number printed in json is the number compared.
        best[scores.max(axis=-1).astype(np.float64) < min_score] = -1
    return best
