"""The local engine: image and text features for a run, read through the embedding index. Images are read and hashed
in parallel, looked up by content, and only the misses are decoded and run through the model, which is loaded on
first need; each computed batch is stored as it completes. classify() and embed() build on that and return data
(float32 arrays, paths, failures), never text or files.

Imports no torch: a run whose every image and prompt is already in the index needs no model at all."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clipcli import scoring
from clipcli.errors import InputError, OptionError, UsageError, os_reason
from clipcli.index import (
    NOTHING_STORED,
    FileRecord,
    Index,
    StoredImage,
    StoredImages,
    Variant,
    content_digest,
    unusable,
)
from clipcli.inputs import Failure
from clipcli.preprocess import (
    PreprocessConfig,
    check_size_limit,
    decode_image,
    max_image_pixels,
    preprocess,
    read_image_file,
    source_pixels,
)
from clipcli.resolve import DEFAULT_MODEL, ModelFiles, resolve

if TYPE_CHECKING:
    from concurrent.futures import Future, ThreadPoolExecutor

    from clipcli.loader import Clip

DEFAULT_TEMPLATE = "a photo of a {}."
DTYPES = ("auto", "fp32", "fp16", "bf16")
Progress = Callable[[int], None]  # called with the number of inputs just finished


@dataclass(frozen=True)
class Settings:
    """How a run computes features: which model, where, in what precision, how images are decoded and batched."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: str = "auto"
    fast_decode: bool = False
    batch_size: int = 32
    workers: int | None = None  # decoding threads; None: one per CPU core
    ahead: int | None = None  # stretches decoded during each model call; None: 0 on CPU, 2 on an accelerator

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise OptionError("batch_size", self.batch_size, "must be at least 1", "use e.g. {option} 32")
        if self.workers is not None and self.workers < 1:
            raise OptionError("workers", self.workers, "must be at least 1", "omit {option} for one per core")
        if self.dtype not in DTYPES:
            raise OptionError("dtype", self.dtype, "unknown dtype", f"use {{option}} {', '.join(DTYPES)}")


@dataclass(frozen=True)
class FeatureBatch:
    """Consecutive inputs: `features` (B, D) float32 rows for `paths` (those that could be read), and the inputs of
    the same stretch that failed. Raw projected features, or unit-length embeddings where a function says so."""

    paths: list[str]
    features: np.ndarray
    failures: list[Failure] = field(default_factory=list)


@dataclass(frozen=True)
class ScoreBatch:
    """Consecutive inputs: (B, L) float32 label scores for `paths`, and the inputs of the same stretch that failed."""

    paths: list[str]
    scores: np.ndarray
    failures: list[Failure] = field(default_factory=list)


@dataclass(frozen=True)
class TextFeatures:
    """(N, D) float32 features of `texts` and, per text, whether it was cut to the model's context length."""

    texts: list[str]
    features: np.ndarray
    truncated: list[bool]


@dataclass(frozen=True)
class ModelInfo:
    """What a run needs to know of its model when the index answers everything: no weights, no torch."""

    projection_dim: int
    logit_scale: float  # exp of the parameter: the factor on cosines
    context_length: int


class Session:
    """One run's model and index. Resolves the model's files and fingerprint without torch, loads the model only
    when something must be computed, and reads and writes features through the index (None: no index)."""

    def __init__(self, settings: Settings, index: Index | None = None, clip: Clip | None = None) -> None:
        """`clip`: a model already loaded for `settings` (scripts that run many sessions on one model)."""
        self.settings = settings
        self.index = index if index is not None and index.usable else None
        self._opened_index = index
        self._files: ModelFiles | None = None
        self._fingerprint: str | None = None
        self._info: ModelInfo | None = None
        self._clip: Clip | None = None
        self._text_clip: Clip | None = None  # the text tower alone, while no image had to be computed
        self._dtype: str | None = None
        self._device_type: str | None = None
        if clip is not None:
            self._use(clip)
        self.computed_images = 0  # images that went through the model in this session
        self.computed_texts = 0

    @property
    def index_location(self) -> Path | None:
        return self._opened_index.path if self._opened_index is not None else None

    @property
    def index_problem(self) -> str | None:
        """Why the run's index cannot be used (at the start or since), or None."""
        return self._opened_index.problem if self._opened_index is not None else None

    # ------------------------------------------------------------------------------------------ the model, lazily

    @property
    def files(self) -> ModelFiles:
        if self._files is None:
            self._files = resolve(self.settings.model)
        return self._files

    @property
    def fingerprint(self) -> str | None:
        """The model's key in the index (None without a usable index)."""
        if self.index is None or not self.index.usable:
            return None
        if self._fingerprint is None:
            files = self.files
            try:
                self._fingerprint = self.index.model_fingerprint(files)
            except OSError as err:
                raise UsageError(f"cannot read the model files of '{files.spec}' ({os_reason(err)}); check "
                                 "their permissions") from None
        return self._fingerprint

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            recorded = self.index.model_info(self.fingerprint) if self.fingerprint and self.index else None
            if recorded is not None and set(recorded) >= {"projection_dim", "logit_scale", "context_length"}:
                self._info = ModelInfo(int(recorded["projection_dim"]), float(recorded["logit_scale"]),
                                       int(recorded["context_length"]))
            else:
                self.text_clip  # loading records it  # noqa: B018
        assert self._info is not None
        return self._info

    @property
    def clip(self) -> Clip:
        """The loaded model (loaded now if this is the first time it is needed)."""
        if self._clip is None:
            from clipcli.loader import load_files

            # After the text tower alone (the labels came first), its tokenizer serves: the files are the same.
            known = self._text_clip.tokenizer if self._text_clip is not None else None
            self._use(load_files(self.files, device=self.settings.device, dtype=self.settings.dtype,
                                 tokenizer=known))
            assert self._clip is not None
        return self._clip

    @property
    def text_clip(self) -> Clip:
        """A model that can embed texts: the loaded model, else the text tower alone (loaded now)."""
        if self._clip is not None:
            return self._clip
        if self._text_clip is None:
            from clipcli.loader import load_files

            self._text_clip = load_files(self.files, device=self.settings.device, dtype=self.settings.dtype,
                                         text_only=True)
            if self._info is None:
                self._record(self._text_clip)
        return self._text_clip

    def _use(self, clip: Clip) -> None:
        self._device_type, self._dtype = clip.device.type, clip.dtype_name
        self._record(clip)
        self._clip = clip
        self._text_clip = None  # the whole model embeds texts too: the text tower alone is not kept beside it

    def _record(self, clip: Clip) -> None:
        """Keep what runs without a model need to know of it, here and in the index."""
        self._info = ModelInfo(clip.config.projection_dim, clip.logit_scale, clip.config.text.max_position_embeddings)
        if self.index is not None and self.fingerprint is not None:
            self.index.add_model(self.fingerprint, self.settings.model, {
                "projection_dim": self._info.projection_dim, "logit_scale": self._info.logit_scale,
                "context_length": self._info.context_length, "image_size": clip.config.vision.image_size,
                "source": clip.source})

    def _resolve_device(self) -> None:
        """Device type and dtype name of the run, importing torch only when the answer depends on it."""
        if self._dtype is not None:
            return
        device, dtype = self.settings.device, self.settings.dtype
        if (device == "cpu" or (device == "auto" and not _maybe_cuda())) and dtype in ("auto", "fp32"):
            self._device_type, self._dtype = "cpu", "fp32"
            return
        from clipcli.loader import DTYPE_NAMES, resolve_device, resolve_dtype

        target = resolve_device(device)
        chosen = resolve_dtype(dtype, target)
        self._device_type = target.type
        self._dtype = next(name for name, value in DTYPE_NAMES.items() if value == chosen)

    @property
    def precision(self) -> str:
        """fp32, fp16 or bf16: what the image tower runs in (found without torch where the answer allows)."""
        self._resolve_device()
        assert self._dtype is not None
        return self._dtype

    def model_fingerprint(self) -> str:
        """The model's content fingerprint (index.model_fingerprint): the index's when there is one, else the model
        files are hashed now."""
        if self.fingerprint is not None:
            return self.fingerprint
        from clipcli.index import model_fingerprint

        try:
            return model_fingerprint(self.files)
        except OSError as err:
            raise UsageError(f"cannot read the model files of '{self.files.spec}' ({os_reason(err)}); check "
                             "their permissions") from None

    @property
    def variant(self) -> Variant | None:
        """The key of this run's image features in the index (None without an index)."""
        if self.fingerprint is None:
            return None
        self._resolve_device()
        assert self._dtype is not None
        return Variant(self.fingerprint, self._dtype, self.settings.fast_decode)

    # ------------------------------------------------------------------------------------------ texts

    def text_features(self, texts: Sequence[str]) -> TextFeatures:
        """Raw features of each text (no template), from the index where it has them."""
        unique = list(dict.fromkeys(texts))
        found = self.index.text_features(self.fingerprint, unique) if self.index and self.fingerprint else {}
        missing = [text for text in unique if text not in found]
        if missing:
            clip = self.text_clip
            features = clip.text_features(missing)
            self.computed_texts += len(missing)
            rows = [(text, row, clip.tokenizer.is_truncated(text)) for text, row in zip(missing, features, strict=True)]
            found.update({text: (row, truncated) for text, row, truncated in rows})
            if self.index is not None and self.fingerprint is not None:
                self.index.add_text_features(self.fingerprint, rows)
        width = self.info.projection_dim
        matrix = np.stack([found[t][0] for t in texts]) if texts else np.zeros((0, width), dtype=np.float32)
        return TextFeatures(list(texts), matrix.astype(np.float32, copy=False), [found[t][1] for t in texts])

    # ------------------------------------------------------------------------------------------ images

    def image_features(self, paths: Sequence[str], progress: Progress | None = None) -> Iterator[FeatureBatch]:
        """Batches of (B, D) float32 raw image features in `paths` order, failures in the batch they fall in.

        Entries the index has (by path and stat, without reading the file; else by content) are not computed; the
        rest are decoded by `workers` threads and run through the model in batches of exactly batch_size (the last
        may be smaller), each batch stored as it completes. A batch is yielded as soon as it is complete."""
        stored: dict[str, int | Failure] = {}  # a row of found.matrix, or the failure decoding it would give now
        found = NOTHING_STORED
        variant = self.variant
        if self.index is not None and variant is not None:
            states = []
            for path in paths:
                try:
                    states.append((path, os.stat(path)))
                except OSError:
                    continue  # reported when it is read
            known = self.index.known_digests(states)
            found = self.index.image_features(variant, set(known.values()))
            oversized = _oversized(found)
            row_of = found.rows.get
            for path, digest in known.items():
                row = row_of(digest)
                if row is not None:
                    stored[path] = row if row not in oversized else Failure(path, oversized[row])
        todo = [path for path in paths if path not in stored]
        computed = self._computed(todo, variant)
        ready: deque[tuple[str, np.ndarray | Failure]] = deque()
        batch_paths: list[str] = []
        rows: list[np.ndarray | int] = []  # computed features, or a row of found.matrix
        computed_rows = 0
        failures: list[Failure] = []

        def flush() -> FeatureBatch:
            nonlocal computed_rows
            done = len(batch_paths) + len(failures)
            if not computed_rows and rows:  # all from the index: one gather
                features = found.matrix[np.asarray(rows, dtype=np.intp)]
            elif rows:
                features = np.stack([found.matrix[row] if isinstance(row, int) else row for row in rows])
            else:
                width = found.matrix.shape[1] if len(found) else (self._info.projection_dim if self._info else 0)
                features = np.zeros((0, width), np.float32)
            batch = FeatureBatch(list(batch_paths), features, list(failures))
            batch_paths.clear()
            rows.clear()
            computed_rows = 0
            failures.clear()
            if progress is not None:
                progress(done)
            return batch

        flush_at = max(self.settings.batch_size, 256)  # rows from the index come in larger batches
        for path in paths:
            item: np.ndarray | int | Failure | None = stored.get(path)
            if item is None:
                if not ready:
                    if batch_paths or failures:  # hand over what is ready before waiting for the model
                        yield flush()
                    ready.extend(next(computed))
                done_path, item = ready.popleft()
                assert done_path == path
                computed_rows += not isinstance(item, Failure)
            if isinstance(item, Failure):
                failures.append(item)
            else:
                batch_paths.append(path)
                rows.append(item)
            if len(batch_paths) + len(failures) >= flush_at:
                yield flush()
        if batch_paths or failures:
            yield flush()

    def _computed(self, todo: list[str], variant: Variant | None) -> Iterator[list[tuple[str, np.ndarray | Failure]]]:
        """Features (or failures) for `todo`, in order, a stretch at a time; see image_features."""
        waiting: list[_Work] = []  # decoded, until a batch is full
        queue: deque[_Work] = deque()  # in order; handed out once it and everything before it is done

        def run_model() -> None:
            # The same content twice in a batch (a copy, or one file under two spellings) goes through the model once.
            first: dict[bytes, int] = {}
            unique: list[_Work] = []
            places = []
            for work in waiting:
                place = first.get(work.digest) if work.digest else None
                if place is None:
                    place = len(unique)
                    unique.append(work)
                    if work.digest:
                        first[work.digest] = place
                places.append(place)
            features = self.clip.image_features([work.pixels for work in unique])
            self.computed_images += len(unique)
            rows = [(work.digest, row, work.pixel_count) for work, row in zip(unique, features, strict=True)
                    if work.digest]
            for work, place in zip(waiting, places, strict=True):
                work.result = features[place]
            if self.index is not None and variant is not None:
                self.index.add_image_features(variant, rows, [w.memo for w in waiting if w.memo is not None])
            waiting.clear()

        def done() -> list[tuple[str, np.ndarray | Failure]]:
            released = []
            while queue and not isinstance(queue[0].result, _Pixels):
                work = queue.popleft()
                released.append((work.path, work.outcome))
            return released

        from concurrent.futures import ThreadPoolExecutor  # here: a run answered from the index starts no threads

        with ThreadPoolExecutor(max_workers=self.settings.workers or default_workers(),
                                thread_name_prefix="clip-decode") as pool:
            for stretch in self._prepared(pool, todo, variant):
                queue.extend(stretch)
                for work in stretch:
                    if isinstance(work.result, _Pixels):
                        waiting.append(work)
                        if len(waiting) == self.settings.batch_size:
                            run_model()
                # Found by content (a moved or copied file): remember its path and stat for the next run.
                moved = [w.memo for w in stretch if w.memo is not None and isinstance(w.result, np.ndarray)]
                if moved and self.index is not None:
                    self.index.remember_files(moved)
                if released := done():
                    yield released
            if waiting:
                run_model()
            if released := done():
                yield released

    def _prepared(self, pool: ThreadPoolExecutor, todo: list[str], variant: Variant | None,
                  ) -> Iterator[list[_Work]]:
        """Stretches of batch_size paths read, hashed, looked up and (the misses) decoded by the pool. On an
        accelerator the next two stretches are prepared while the model runs; on CPU the model has every core, so
        each stretch is prepared when it is needed (measured faster on 2 cores, benchmarks/README.md)."""
        size = self.settings.batch_size
        chunks = [todo[start:start + size] for start in range(0, len(todo), size)]
        self._resolve_device()
        ahead = self.settings.ahead if self.settings.ahead is not None else 0 if self._device_type == "cpu" else 2
        if ahead == 0:
            for chunk in chunks:
                yield self._prepare(pool, chunk, variant)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-ahead") as background:
            queued: deque[Future] = deque()
            try:
                for chunk in chunks:
                    queued.append(background.submit(self._prepare, pool, chunk, variant))
                    if len(queued) > ahead:
                        yield queued.popleft().result()
                while queued:
                    yield queued.popleft().result()
            finally:  # the caller stopped early: drop what has not started
                for future in queued:
                    future.cancel()

    def _prepare(self, pool: ThreadPoolExecutor, chunk: list[str], variant: Variant | None) -> list[_Work]:
        """One stretch: read (and hash, with an index) every file, look the new digests up, decode the misses."""
        hashing = self.index is not None and variant is not None
        # Largest files first: the stretch is done when its slowest image is, so a big photo should not start last
        # while the other threads idle (measured about 1.5% faster on mixed photo sizes).
        order = sorted(range(len(chunk)), key=lambda i: _file_size(chunk[i]), reverse=True)
        # Hashed even when the stat memo knows the digest: the file may have changed since it was stat'ed, and
        # features must be stored under the digest of the bytes they were computed from.
        reads = {i: pool.submit(_read, chunk[i], hashing) for i in order}
        stretch = [reads[i].result() for i in range(len(chunk))]
        if hashing and self.index is not None and variant is not None:
            hashed = [work.digest for work in stretch if work.memo is not None and work.digest is not None]
            found = self.index.image_features(variant, hashed) if hashed else NOTHING_STORED
            for work in stretch:
                if work.digest is not None and work.digest in found:
                    work.result = _stored(work.path, found[work.digest])
        misses = [work for work in stretch if work.result is None]
        if misses:
            config = self.clip.preprocess
            draft = config.draft_size if self.settings.fast_decode else None
            decoded = {id(work): pool.submit(_decode, work, config, draft)
                       for work in sorted(misses, key=lambda work: len(work.data or b""), reverse=True)}
            for work in misses:
                work.result = decoded[id(work)].result()
        for work in stretch:
            work.data = None  # the bytes are done with
        return stretch


@dataclass(eq=False)
class _Work:
    """One image on its way through a stretch: read (and hashed), then found in the index or decoded for the
    model, then its features; or the reason it failed."""

    path: str
    data: bytes | None = None
    digest: bytes | None = None
    memo: FileRecord | None = None  # stat memo entry to store: the file was read and hashed now
    result: np.ndarray | _Pixels | Failure | None = None  # features, pixels waiting for the model, or why not

    @property
    def pixels(self) -> np.ndarray:
        assert isinstance(self.result, _Pixels)
        return self.result.pixels

    @property
    def outcome(self) -> np.ndarray | Failure:
        assert isinstance(self.result, (np.ndarray, Failure))
        return self.result


    @property
    def pixel_count(self) -> int:
        assert isinstance(self.result, _Pixels)
        return self.result.count


@dataclass(frozen=True)
class _Pixels:
    """A decoded image waiting for the model: (3, H, W) float32, and the image's pixel count as stored."""

    pixels: np.ndarray
    count: int


def _oversized(found: StoredImages) -> dict[int, str]:
    """Rows of `found` whose image is beyond the size limit now -> why decoding it would fail."""
    limit = max_image_pixels()
    reasons: dict[int, str] = {}
    if limit is None:
        return reasons
    for row, count in enumerate(found.pixels):
        if count > limit:
            try:
                check_size_limit(count)  # raises, with the message decoding would give
            except InputError as err:
                reasons[row] = str(err)
    return reasons


def _stored(path: str, entry: StoredImage) -> np.ndarray | Failure:
    """An image's features from the index, or the failure decoding it would give now (the size limit)."""
    features, pixels = entry
    try:
        check_size_limit(pixels)
    except InputError as err:
        return Failure(path, str(err))
    return features


def _read(path: str, hashing: bool) -> _Work:
    """The file's bytes, and when `hashing`, their digest and the stat memo entry to store; or why it failed."""
    seen = time.time_ns()
    state = None
    if hashing:
        try:
            state = os.stat(path)  # before reading: a change made while reading shows in the next run's stat
        except OSError:
            pass  # read_image_file names the reason
    try:
        data = read_image_file(path)
    except InputError as err:
        return _Work(path, result=Failure(path, str(err)))
    if not hashing:
        return _Work(path, data)
    digest = content_digest(data)
    return _Work(path, data, digest, None if state is None else FileRecord(path, state, digest, seen))


def _decode(work: _Work, config: PreprocessConfig, draft: int | None) -> _Pixels | Failure:
    assert work.data is not None
    try:
        return _Pixels(preprocess(decode_image(work.data, draft), config), source_pixels(work.data))
    except InputError as err:
        return Failure(work.path, str(err))


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # reported when it is read
        return 0


def _maybe_cuda() -> bool:
    """False when this machine certainly has no CUDA (or ROCm) GPU, found without importing torch."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")) or (
        os.name == "nt")


def default_workers() -> int:
    """Decode threads when none are given: one per CPU core this process may run on."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


# ---------------------------------------------------------------------------------------------- the commands' work


def check_templates(templates: Sequence[str]) -> None:
    """UsageError unless there is at least one template and each has a {} where the label goes."""
    if not templates:
        raise OptionError("templates", None, "no templates",
                          "pass {option} 'a photo of a {}.' or omit it for the default")
    for template in templates:
        if "{}" not in template:
            raise OptionError("templates", template, "has no {} where the label goes",
                              "e.g. {option} 'a photo of a {}.'")


def check_labels(labels: Sequence[str]) -> None:
    """UsageError unless there is at least one label and none is given twice."""
    if not labels:
        raise OptionError("labels", None, "no labels", "pass {option} cat,dog,car")
    seen: set[str] = set()
    for label in labels:
        if label in seen:
            raise OptionError("labels", label, "is given twice", "list each label once")
        seen.add(label)


@dataclass(frozen=True)
class Labels:
    """(L, D) float32 unit label embeddings (template ensembles) and the labels a template cut to the context."""

    labels: list[str]
    embeddings: np.ndarray
    truncated: list[str]


def label_embeddings(session: Session, labels: Sequence[str], templates: Sequence[str]) -> Labels:
    """Each label's embedding: the mean of its normalised template embeddings, re-normalised."""
    check_labels(labels)
    check_templates(templates)
    prompts = [template.replace("{}", label) for label in labels for template in templates]
    text = session.text_features(prompts)
    per_prompt = [label for label in labels for _ in templates]
    cut = {label for label, truncated in zip(per_prompt, text.truncated, strict=True) if truncated}
    return Labels(list(labels), scoring.ensemble(text.features, len(labels), len(templates)),
                  [label for label in labels if label in cut])


def check_score(score: str, min_score: float | None = None) -> None:
    """UsageError unless `score` is a score kind (scoring.SCORE_KINDS) and `min_score`, if given, a value such a
    score can take (a probability threshold of 50 meant as a percentage would leave every image unlabelled)."""
    if score not in scoring.SCORE_KINDS:
        raise OptionError("score", score, "unknown score", f"use {{option}} {' or '.join(scoring.SCORE_KINDS)}")
    if min_score is None:
        return
    low, high = scoring.score_range(score)
    if not low <= min_score <= high:  # NaN included
        what = "a probability" if score == "prob" else "a cosine"
        raise OptionError("min_score", min_score, f"must be between {low:g} and {high:g} ({what}, --score {score})",
                          f"e.g. {{option}} {0.5 if score == 'prob' else 0.25}")


def classify(session: Session, paths: Sequence[str], labels: Labels, progress: Progress | None = None, *,
             score: str = "prob") -> Iterator[ScoreBatch]:
    """Batches of (B, L) float32 label scores in `paths` order: with `score` "prob" the probabilities over the labels
    (softmax of logit_scale * cosine), with "cosine" each label's cosine similarity on its own."""
    check_score(score)
    for batch in session.image_features(paths, progress):
        if score == "cosine":
            scores = scoring.cosines(batch.features, labels.embeddings)
        else:
            scores = scoring.probabilities(batch.features, labels.embeddings, session.info.logit_scale)
        yield ScoreBatch(batch.paths, scores, batch.failures)


def embed_images(session: Session, paths: Sequence[str], *, normalized: bool = True,
                 progress: Progress | None = None) -> Iterator[FeatureBatch]:
    """Batches of (B, D) float32 image embeddings (unit rows; raw features when not `normalized`)."""
    for batch in session.image_features(paths, progress):
        yield FeatureBatch(batch.paths, scoring.normalize(batch.features) if normalized else batch.features,
                           batch.failures)


def embed_texts(session: Session, texts: Sequence[str], *, normalized: bool = True) -> TextFeatures:
    """(N, D) float32 text embeddings, no template (unit rows; raw features when not `normalized`)."""
    text = session.text_features(texts)
    if normalized:
        return TextFeatures(text.texts, scoring.normalize(text.features), text.truncated)
    return text


@dataclass(frozen=True)
class IndexCounts:
    """What `clip index PATH` did: paths seen for the first time, paths whose content changed since they were last
    indexed, paths already indexed as they are, and the inputs that failed."""

    new: int
    updated: int
    unchanged: int
    failures: list[Failure]


def index_images(session: Session, paths: Sequence[str], progress: Progress | None = None) -> IndexCounts:
    """Make sure the index holds every image's features for the session's model; count what that took."""
    if session.index is None or session.variant is None:
        raise UsageError(unusable(session.index_location, session.index_problem, indexed=0))
    if session.index.read_only:
        raise UsageError(f"the index {session.index.path} cannot be written (read-only); nothing was indexed; give "
                         "--index a file you may write")
    states = []
    for path in paths:
        try:
            states.append((path, os.stat(path)))
        except OSError:
            continue
    before = session.index.file_entries(states)
    present = session.index.image_features(session.variant, {digest for digest, _ in before.values()})
    done: list[str] = []
    failures: list[Failure] = []
    for batch in session.image_features(paths, progress):
        done.extend(batch.paths)
        failures.extend(batch.failures)
        if session.index_problem is not None:  # nothing more can be stored: the work stops here
            raise UsageError(unusable(session.index_location, session.index_problem, session.index.images_stored))
    after = session.index.file_entries([(path, state) for path, state in states if path in before])
    updated = kept = 0
    for path in done:
        if path in before and path in after:
            if after[path][0] != before[path][0]:
                updated += 1
            elif before[path][0] in present:
                kept += 1
    return IndexCounts(len(done) - updated - kept, updated, kept, failures)


__all__ = ["DEFAULT_TEMPLATE", "FeatureBatch", "IndexCounts", "Labels", "ScoreBatch", "Session", "Settings",
           "TextFeatures", "classify", "embed_images", "embed_texts", "index_images", "label_embeddings"]
