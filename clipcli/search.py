"""Finding images: exact top-k ranking by cosine similarity to a query (texts and images, added and subtracted), and
near-duplicate groups (connected components of the pairs whose cosine reaches a threshold). numpy only, no torch:
every product is blocked, so memory is bounded by the block, never N x N. The run's features come through the
pipeline's Session (and so through the index); this module returns data, never text."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from clipcli import scoring
from clipcli.errors import OptionError
from clipcli.inputs import Failure
from clipcli.pipeline import Progress, Session

BLOCK = 4096  # rows per side of one block of pairwise products: 64 MiB of float32 cosines
PREFILTER_DIMS = 96  # columns of the cheap upper bound that rules out most pairs before the exact product
DENSE_FRACTION = 1 / 16  # a block where more pairs than this pass the bound is computed whole instead
BOUND_MARGIN = 1e-4  # float32 rounding of the bound is far below this; a pair is only ruled out beyond it


# ---------------------------------------------------------------------------------------------- the query


@dataclass(frozen=True)
class Query:
    """What to search for: the embeddings of `texts` and `images` (files) added, those of `minus_texts` and
    `minus_images` subtracted, each one normalised first (rclip's "beach" + "sunset" - "people")."""

    texts: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    minus_texts: tuple[str, ...] = ()
    minus_images: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueryEmbedding:
    """(D,) float32 unit query vector and the texts that were cut to the model's context length."""

    vector: np.ndarray
    truncated: list[str]


def combine(added: np.ndarray, subtracted: np.ndarray) -> np.ndarray:
    """(P, D) and (M, D) float32 features -> (D,) float32 unit vector: the sum of the normalised rows of `added`
    minus the sum of those of `subtracted`, re-normalised. OptionError when the terms cancel out."""
    total = scoring.normalize(added).astype(np.float64).sum(axis=0)
    if len(subtracted):
        total -= scoring.normalize(subtracted).astype(np.float64).sum(axis=0)
    norm = np.linalg.norm(total)
    if not np.isfinite(norm) or norm < 1e-6:
        raise OptionError("subtract", None, "the query's added and subtracted terms cancel out",
                          "subtract something other than what is searched for")
    return (total / norm).astype(np.float32)


def embed_query(session: Session, query: Query) -> QueryEmbedding:
    """The query's unit vector: texts embedded as given (no template) through the prompt cache, images through
    the index like any image. A query image that cannot be read is an OptionError (nothing can be searched)."""
    if not (query.texts or query.images):
        raise OptionError("query", None, "nothing to search for", "give a QUERY or --image FILE")
    texts = [*query.texts, *query.minus_texts]
    if any(not text.strip() for text in texts):
        raise OptionError("query", None, "a query text is empty", "give words to search for")
    images = [*query.images, *query.minus_images]
    rows: dict[str, np.ndarray] = {}
    if images:
        for batch in session.image_features(list(dict.fromkeys(images))):
            rows.update(zip(batch.paths, batch.features, strict=True))
            for failure in batch.failures:
                raise OptionError("query_image", failure.path, failure.reason, "give an image file that can be read")
    embedded = session.text_features(texts) if texts else None
    plus = [*([] if embedded is None else embedded.features[:len(query.texts)]), *(rows[p] for p in query.images)]
    minus = [*([] if embedded is None else embedded.features[len(query.texts):]),
             *(rows[p] for p in query.minus_images)]
    added = np.stack(plus).astype(np.float32)
    vector = combine(added, np.stack(minus).astype(np.float32) if minus else np.zeros((0, added.shape[1]), np.float32))
    truncated = [] if embedded is None else [t for t, cut in zip(texts, embedded.truncated, strict=True) if cut]
    return QueryEmbedding(vector, list(dict.fromkeys(truncated)))


# ---------------------------------------------------------------------------------------------- ranking


class TopK:
    """The k best of scores that arrive in input order, exactly: best first, equal scores in input order."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise OptionError("top_k", k, "must be at least 1", "use e.g. {option} 10")
        self.k = k
        self.count = 0  # scores seen so far
        self._positions = np.zeros(0, dtype=np.int64)
        self._scores = np.zeros(0, dtype=np.float32)

    def add(self, scores: np.ndarray) -> None:
        """The next (B,) float32 scores, at positions count .. count + B - 1."""
        scores = np.asarray(scores, dtype=np.float32)
        positions = np.arange(self.count, self.count + len(scores), dtype=np.int64)
        self.count += len(scores)
        if len(scores) > self.k:  # only scores at or above the k-th best of this batch can make the top k
            kth = np.partition(scores, len(scores) - self.k)[len(scores) - self.k]
            keep = scores >= kth
            scores, positions = scores[keep], positions[keep]
        scores = np.concatenate([self._scores, scores])
        positions = np.concatenate([self._positions, positions])
        order = np.lexsort((positions, -scores))[:self.k]  # by score descending, then position
        self._scores, self._positions = scores[order], positions[order]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions int64, scores float32) of the best, best first."""
        return self._positions.copy(), self._scores.copy()


@dataclass(frozen=True)
class Hit:
    path: str
    score: float  # cosine similarity to the query


@dataclass(frozen=True)
class SearchResult:
    """The best images, best first, the number ranked, and the inputs that could not be read."""

    hits: list[Hit]
    ranked: int
    failures: list[Failure] = field(default_factory=list)


def search(session: Session, paths: Sequence[str], query: QueryEmbedding, k: int,
           progress: Progress | None = None) -> SearchResult:
    """Rank `paths` by the cosine between their embeddings and the query's; images not in the index are embedded
    (and stored) first. Exact: every image is scored, a batch at a time."""
    best = TopK(k)
    ranked: list[str] = []
    failures: list[Failure] = []
    for batch in session.image_features(paths, progress):
        best.add(scoring.cosines_to(batch.features, query.vector))
        ranked.extend(batch.paths)
        failures.extend(batch.failures)
    positions, scores = best.result()
    return SearchResult([Hit(ranked[p], float(s)) for p, s in zip(positions, scores, strict=True)], len(ranked),
                        failures)


# ---------------------------------------------------------------------------------------------- near-duplicates


@dataclass(frozen=True)
class Group:
    """Row positions (ascending) of one group of near-duplicates, and the smallest cosine between two of them."""

    members: list[int]
    min_score: float


def duplicate_groups(embeddings: np.ndarray, threshold: float, block: int = BLOCK) -> list[Group]:
    """(N, D) float32 unit rows -> the groups of rows joined by pairs with cosine >= threshold (connected
    components, 2 rows or more), largest first, then by first row.

    Rows that are identical (exact copies of a file, found by content in the index) always share a group, their
    cosine counted as 1. min_score is the smallest cosine between any two members: at or above the threshold
    when every pair in the group is that close, below it when the group is a chain of close pairs. Every pair is
    examined (exact), a block of block x block products at a time: memory O(N D + block^2), never N x N."""
    if not -1.0 <= threshold <= 1.0:
        raise OptionError("threshold", threshold, "is not a cosine", "use {option} between -1 and 1, e.g. 0.95")
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    unique, copy_of = _unique_rows(embeddings)
    forest = _Forest(len(unique))
    for rows, cols in _close_pairs(unique, threshold, block):
        forest.union(rows, cols)
    roots = forest.roots()
    members: dict[int, list[int]] = {}
    for row, item in enumerate(copy_of):  # rows in order, so each member list is ascending
        members.setdefault(int(roots[item]), []).append(row)
    groups = []
    for group in members.values():
        if len(group) > 1:
            items = np.unique(copy_of[group])
            score = 1.0 if len(items) == 1 else _min_cosine(unique[items], block)
            groups.append(Group(group, min(score, 1.0)))
    groups.sort(key=lambda group: (-len(group.members), group.members[0]))
    return groups


def _unique_rows(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, D) distinct rows (first occurrence order) and, per input row, the index of its distinct row."""
    first: dict[bytes, int] = {}
    copy_of = np.empty(len(embeddings), dtype=np.int64)
    keep: list[int] = []
    for row, vector in enumerate(embeddings):
        item = first.setdefault(vector.tobytes(), len(keep))
        if item == len(keep):
            keep.append(row)
        copy_of[row] = item
    return embeddings[keep], copy_of


def _close_pairs(embeddings: np.ndarray, threshold: float, block: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, cols) with rows < cols of every pair whose cosine is >= threshold, a block at a time.

    Most pairs are ruled out by an upper bound that costs a fifth of the exact product: in an orthonormal basis
    ordered by energy (eigenvectors of E^T E), a.b = a1.b1 + a2.b2 <= a1.b1 + |a2||b2| (Cauchy-Schwarz), with a1
    the first coordinates; appending |a2| to a1 makes the bound one matrix product. Only pairs whose bound reaches
    the threshold get their exact cosine (a dot product of the original rows); a block where many do is computed
    whole."""
    count, width = embeddings.shape
    bounds = _bound_rows(embeddings, min(PREFILTER_DIMS, width + 1) - 1)
    cut = threshold - BOUND_MARGIN
    space = np.empty(min(block, count) ** 2, dtype=np.float32)  # every block's products, in place
    for start in range(0, count, block):
        stop = min(start + block, count)
        for other in range(start, count, block):
            end = min(other + block, count)
            bound = space[:(stop - start) * (end - other)].reshape(stop - start, end - other)
            np.dot(bounds[start:stop], bounds[other:end].T, out=bound)  # (b, b') upper bounds of the cosines
            if other == start:
                np.fill_diagonal(bound, -np.inf)  # a row with itself; pairs below the diagonal are dropped below
            if bound.max(initial=-np.inf) < cut:
                continue
            rows, cols = np.nonzero(bound >= cut)
            rows += start
            cols += other
            if other == start:
                rows, cols = rows[rows < cols], cols[rows < cols]
            if len(rows) > DENSE_FRACTION * bound.size:
                exact = np.dot(embeddings[start:stop], embeddings[other:end].T)[rows - start, cols - other]
            else:
                exact = np.einsum("ij,ij->i", embeddings[rows], embeddings[cols])
            close = exact >= threshold
            yield rows[close], cols[close]


def _bound_rows(embeddings: np.ndarray, dims: int) -> np.ndarray:
    """(N, dims + 1) float32: each row's coordinates on the `dims` directions of most energy, then an upper bound
    of the norm of the rest (norm squared minus the part in those directions, plus a margin for rounding); the
    dot product of two such rows bounds the cosine of the originals from above."""
    sample = embeddings[:: max(len(embeddings) // 20_000, 1)].astype(np.float64)  # the basis only steers speed
    _, vectors = np.linalg.eigh(sample.T @ sample)
    basis = vectors[:, ::-1][:, :dims].astype(np.float32)  # (D, dims), most energy first
    head = np.dot(embeddings, basis)
    rest = (np.einsum("ij,ij->i", embeddings, embeddings, dtype=np.float64)
            - np.einsum("ij,ij->i", head, head, dtype=np.float64))
    tail = np.sqrt(np.maximum(rest, 0.0) + 1e-6).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([head, tail[:, None]], axis=1))


def _min_cosine(embeddings: np.ndarray, block: int) -> float:
    """The smallest cosine between two different rows of (G, D) unit rows, G >= 2, a block at a time."""
    smallest = np.inf
    for start in range(0, len(embeddings), block):
        for other in range(start, len(embeddings), block):
            scores = np.dot(embeddings[start:start + block], embeddings[other:other + block].T)
            if other == start:
                np.fill_diagonal(scores, np.inf)
            smallest = min(smallest, float(scores.min(initial=np.inf)))
    return smallest


class _Forest:
    """Union-find over 0..n-1 whose unions take whole arrays of pairs: every tree hooks onto its smallest
    neighbouring root, then paths are halved to the root, until the pairs agree (no Python loop per pair)."""

    def __init__(self, count: int) -> None:
        self.parent = np.arange(count, dtype=np.int64)

    def roots(self) -> np.ndarray:
        """Each element's root (and the parent array flattened to point at it)."""
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent
            parent[:] = grand

    def union(self, left: np.ndarray, right: np.ndarray) -> None:
        while len(left):
            roots = self.roots()
            a, b = roots[left], roots[right]
            apart = a != b
            if not apart.any():
                return
            a, b = a[apart], b[apart]
            low, high = np.minimum(a, b), np.maximum(a, b)
            np.minimum.at(self.parent, high, low)  # a root hooks under a smaller root: no cycles
            left, right = left[apart], right[apart]


@dataclass(frozen=True)
class DuplicateResult:
    """Groups of paths (each in path order) with their min_score, largest first; the images compared; failures."""

    groups: list[tuple[list[str], float]]
    compared: int
    failures: list[Failure] = field(default_factory=list)


def duplicates(session: Session, paths: Sequence[str], threshold: float, progress: Progress | None = None,
               block: int = BLOCK) -> DuplicateResult:
    """Near-duplicate groups among `paths` (see duplicate_groups); images not in the index are embedded first."""
    found: list[str] = []
    failures: list[Failure] = []
    matrix: np.ndarray | None = None  # (len(paths), D), filled a batch at a time: no list of copies
    for batch in session.image_features(paths, progress):
        if len(batch.paths):
            if matrix is None:
                matrix = np.empty((len(paths), batch.features.shape[1]), dtype=np.float32)
            matrix[len(found):len(found) + len(batch.paths)] = scoring.normalize(batch.features)
        found.extend(batch.paths)
        failures.extend(batch.failures)
    groups = duplicate_groups(matrix[:len(found)], threshold, block) if matrix is not None else []
    return DuplicateResult([([found[row] for row in group.members], group.min_score) for group in groups],
                           len(found), failures)
