"""`clip eval`: a labelled folder (one subfolder per class, ImageFolder layout) classified against all of its classes,
and the metrics of LAION's CLIP_benchmark zero-shot classification (acc1, acc5, mean_per_class_recall) with per-class
precision and recall and the confusion matrix. Returns data; text and HTML are output.py's and report.py's job."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from clipcli import pipeline
from clipcli.errors import OptionError, os_reason
from clipcli.inputs import IMAGE_EXTENSIONS, Exclude, Failure, find_images
from clipcli.pipeline import Progress, Session


@dataclass(frozen=True)
class Dataset:
    """A labelled folder: its classes (one per subfolder, in folder-name order) and their images.

    `labels[c]` is class c's text (its folder name unless --class-names maps it); `paths` are every image found under
    the class folders, sorted, and `targets[i]` (int64) the class of `paths[i]`. `failures` are folders that could not
    be walked; `stray` are images lying in the dataset folder itself, outside every class folder (left out);
    `unused_names` are the folders --class-names names that are not class folders here (a names file made for a
    larger dataset), in the file's order."""

    root: str
    folders: list[str]
    labels: list[str]
    paths: list[str]
    targets: np.ndarray
    failures: list[Failure]
    stray: list[str]
    unused_names: list[str] = dataclasses.field(default_factory=list)


def parse_class_names(lines: Iterable[str]) -> dict[str, str]:
    """`folder<TAB>label` lines -> {folder: label}; UsageError naming the line that does not fit."""
    names: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        folder, tab, label = line.partition("\t")
        folder, label = folder.strip(), label.strip()
        if not tab:
            raise OptionError("class_names", None, f"line {number} has no tab",
                              "write one 'folder<TAB>label' per line in {option}")
        if not folder or not label:
            raise OptionError("class_names", None, f"line {number} has an empty {'folder' if not folder else 'label'}",
                              "write one 'folder<TAB>label' per line in {option}")
        if folder in names:
            raise OptionError("class_names", None, f"folder '{folder}' is named twice (lines {number} and earlier)",
                              "name each folder once in {option}")
        names[folder] = label
    return names


def find_dataset(root: str, class_names: Mapping[str, str] | None = None, exclude: Exclude | None = None) -> Dataset:
    """The classes and images of `root` (ImageFolder layout: each non-hidden subfolder is a class, walked recursively).
    `exclude` patterns are relative to `root`: a class folder they match is no class.

    UsageError when `root` is not a folder with class folders, when `class_names` names none of them, or when two
    classes would get the same label."""
    if not os.path.lexists(root):
        raise OptionError("dataset", root, "does not exist", "give a folder with one subfolder of images per class")
    if not os.path.isdir(root):
        raise OptionError("dataset", root, "is not a folder", "give a folder with one subfolder of images per class")
    try:
        with os.scandir(root) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError as err:
        raise OptionError("dataset", root, f"cannot be read ({os_reason(err)})", "check its permissions") from None
    exclude = exclude or Exclude()
    folders: list[os.DirEntry] = []
    loose: list[os.DirEntry] = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if not exclude.matches(entry.name, entry.name, entry.path, is_dir):
            (folders if is_dir else loose).append(entry)
    if not folders:
        raise OptionError("dataset", root, "has no class folders",
                          "put each class's images in a subfolder named after the class")
    names = dict(class_names or {})
    unknown = [folder for folder in names if folder not in {entry.name for entry in folders}]
    if names and len(unknown) == len(names):
        raise OptionError("class_names", None, f"names none of the class folders of '{root}' (e.g. folder "
                          f"'{unknown[0]}' is not one)", "give {option} lines 'folder<TAB>label' for DATASET's folders")
    labels = [names.get(entry.name, entry.name) for entry in folders]
    _check_labels(labels, [entry.name for entry in folders])
    target_of: dict[str, int] = {}
    failures: list[Failure] = []
    for number, entry in enumerate(folders):
        images, failed = find_images([entry.path], dataclasses.replace(exclude, base=entry.name))
        failures.extend(failed)
        for path in images:
            target_of.setdefault(path, number)
    stray = [entry.path for entry in loose if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS]
    paths = sorted(target_of)
    return Dataset(root, [entry.name for entry in folders], labels, paths,
                   np.array([target_of[p] for p in paths], dtype=np.int64),
                   sorted(failures, key=lambda f: f.path), stray, unknown)


def _check_labels(labels: Sequence[str], folders: Sequence[str]) -> None:
    seen: dict[str, str] = {}
    for label, folder in zip(labels, folders, strict=True):
        try:
            label.encode("utf-8")
        except UnicodeEncodeError:
            shown = label.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise OptionError("class_names", None, f"class folder '{shown}' is not a valid UTF-8 name",
                              "give it a label with {option}") from None
        if label in seen:
            raise OptionError("class_names", None,
                              f"classes '{seen[label]}' and '{folder}' would both be labelled '{label}'",
                              "give each class its own label with {option}")
        seen[label] = folder


# ---------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metrics:
    """CLIP_benchmark's zero-shot classification metrics over `n` images and `labels` (fractions in [0, 1]), plus
    per-class figures in `labels` order. None where a figure is undefined: acc5 with fewer than 5 classes, a recall
    for a class without images, a precision for a class never predicted, everything when n is 0."""

    labels: list[str]
    n: int
    acc1: float | None
    acc5: float | None
    mean_per_class_recall: float | None
    recall: list[float | None]
    precision: list[float | None]
    support: list[int]  # images per class
    confusion: np.ndarray  # (L, L) int64: rows the true class, columns the predicted class

    def to_json(self) -> dict:
        """The `clip eval -f json` object (without the failed inputs)."""
        return {
            "n": self.n,
            "labels": list(self.labels),
            "acc1": self.acc1,
            "acc5": self.acc5,
            "mean_per_class_recall": self.mean_per_class_recall,
            "per_class_recall": dict(zip(self.labels, self.recall, strict=True)),
            "per_class_precision": dict(zip(self.labels, self.precision, strict=True)),
            "support": dict(zip(self.labels, self.support, strict=True)),
            "confusion_matrix": self.confusion.tolist(),
        }


def compute_metrics(scores: np.ndarray, targets: np.ndarray, labels: Sequence[str]) -> Metrics:
    """Metrics of (N, L) scores (any monotone score: logits or probabilities) against (N,) true class indices.

    As CLIP_benchmark's metrics/zeroshot_classification.py: acc1 and acc5 are the fractions of images whose class is
    among the 1 or 5 best-scored labels, acc5 only with at least 5 classes (else NaN there, None here);
    mean_per_class_recall is sklearn's balanced_accuracy_score of the top-1 predictions: the mean of the per-class
    recalls over the classes that have images (a class without images has no recall and is left out of the mean,
    whether or not it was predicted). Ties between scores go to the first label."""
    count = len(labels)
    scores = np.asarray(scores).reshape(-1, count)
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    n = len(targets)
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :5]  # (N, <=5) best labels first
    predicted = ranked[:, 0] if n else np.zeros(0, dtype=np.int64)
    confusion = np.zeros((count, count), dtype=np.int64)
    np.add.at(confusion, (targets, predicted), 1)
    support = confusion.sum(axis=1)
    predicted_count = confusion.sum(axis=0)
    correct = np.diag(confusion)
    recall = [float(correct[c] / support[c]) if support[c] else None for c in range(count)]
    precision = [float(correct[c] / predicted_count[c]) if predicted_count[c] else None for c in range(count)]
    defined = [value for value in recall if value is not None]
    in_top5 = (ranked == targets[:, None]).any(axis=1)
    return Metrics(
        labels=list(labels), n=n,
        acc1=float(correct.sum() / n) if n else None,
        acc5=float(in_top5.mean()) if n and count >= 5 else None,
        mean_per_class_recall=float(np.mean(defined)) if defined else None,
        recall=recall, precision=precision, support=[int(s) for s in support], confusion=confusion)


# ---------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Evaluation:
    """A dataset classified against its labels: the images that could be read (sorted), their (N,) true classes and
    (N, L) float32 label probabilities, the metrics, and the inputs that failed (walk and decode)."""

    dataset: Dataset
    paths: list[str]
    targets: np.ndarray
    scores: np.ndarray
    metrics: Metrics
    failures: list[Failure]
    truncated: list[str]  # labels a template cut to the model's context length


def evaluate(session: Session, dataset: Dataset, templates: Sequence[str], progress: Progress | None = None,
             ) -> Evaluation:
    """Classify every image of `dataset` against all of its labels (through the session's index) and score it."""
    label_set = pipeline.label_embeddings(session, dataset.labels, templates)
    target_of = dict(zip(dataset.paths, dataset.targets.tolist(), strict=True))
    paths: list[str] = []
    rows: list[np.ndarray] = []
    failures = list(dataset.failures)
    for batch in pipeline.classify(session, dataset.paths, label_set, progress):
        paths.extend(batch.paths)
        rows.append(batch.scores)
        failures.extend(batch.failures)
    scores = np.concatenate(rows) if rows else np.zeros((0, len(dataset.labels)), dtype=np.float32)
    targets = np.array([target_of[p] for p in paths], dtype=np.int64)
    return Evaluation(dataset, paths, targets, scores, compute_metrics(scores, targets, dataset.labels),
                      sorted(failures, key=lambda f: f.path), label_set.truncated)


__all__ = ["Dataset", "Evaluation", "Metrics", "compute_metrics", "evaluate", "find_dataset", "parse_class_names"]
