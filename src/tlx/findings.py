"""What an audit finds in a dataset's features: label issues, duplicate pairs and outliers.

Pure array work on features and held-out probabilities, so each finding is checked on its own:

- label issues by confident learning (Northcutt, Jiang and Chuang, JAIR 2021): a class's threshold is
  the mean held-out probability of that class over the images labelled with it; an image whose most
  probable class above its threshold is not its given label is flagged, and images are ranked by
  self-confidence (the held-out probability of the given label). Written on NumPy: it is a few lines,
  and cleanlab is AGPL-3.0 where tlx is MIT.
- duplicates: the same bytes (SHA-256) or the same decoded pixels (``exact``), else a cosine similarity
  of features at or above a threshold (``near``), found by scikit-learn's ``NearestNeighbors`` radius
  search (no all-pairs table).
- outliers: the mean cosine distance to the nearest training images, flagged beyond Tukey's far-out
  fence (third quartile + 3 × the interquartile range) of the training images' own distances.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: cosine similarity of features at or above which two images are near-duplicates (bench/audit.py)
NEAR_THRESHOLD = 0.85
#: cosine similarity from which a near pair is decoded to compare its pixels
PIXEL_CHECK = 0.995
#: neighbours whose mean distance is an image's outlier score
OUTLIER_NEIGHBOURS = 5
#: the fence above the training scores' third quartile, in interquartile ranges
OUTLIER_FENCE = 3.0


@dataclass(frozen=True)
class LabelIssues:
    """Per training image: the held-out probability of its given label, the suggested label, a flag."""

    quality: np.ndarray  # (n,) float, self-confidence
    suggested: np.ndarray  # (n,) int
    flagged: np.ndarray  # (n,) bool
    thresholds: np.ndarray  # (classes,) each class's confident-learning threshold


def label_issues(probabilities: np.ndarray, given: np.ndarray) -> LabelIssues:
    """Confident learning on held-out ``probabilities`` (n, classes) of images labelled ``given``."""
    n, classes = probabilities.shape
    thresholds = np.array(
        [probabilities[given == c, c].mean() if (given == c).any() else 1.0 for c in range(classes)]
    )
    above = probabilities >= thresholds
    confident = np.where(above, probabilities, -1.0).argmax(axis=1)
    sure = above.any(axis=1)
    suggested = np.where(sure, confident, probabilities.argmax(axis=1))
    quality = probabilities[np.arange(n), given]
    return LabelIssues(quality, suggested, sure & (confident != given), thresholds)


@dataclass(frozen=True)
class Pair:
    """Two images (indices into the audited list) that are the same picture, or nearly."""

    a: int
    b: int
    kind: str  # "exact" or "near"
    similarity: float


def normalized(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity is then a dot product)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def duplicates(x: np.ndarray, hashes: list[str], threshold: float = NEAR_THRESHOLD) -> list[Pair]:
    """Pairs of the same bytes (``exact``) and of features at cosine ``threshold`` or above (``near``).

    ``x``: the images' features (n, d); ``hashes``: their files' digests.
    """
    from sklearn.neighbors import NearestNeighbors

    unit = normalized(x.astype(np.float32))
    similar: dict[tuple[int, int], float] = {}
    radius = float(np.sqrt(max(0.0, 2.0 - 2.0 * threshold)))  # unit vectors: |a-b|² = 2 - 2 cos
    index = NearestNeighbors(radius=radius, algorithm="brute").fit(unit)
    distances, neighbours = index.radius_neighbors(unit, return_distance=True)
    for i, (ds, js) in enumerate(zip(distances, neighbours)):
        for d, j in zip(ds, js):
            if j > i:
                similar[(i, int(j))] = round(1.0 - float(d) ** 2 / 2.0, 6)
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        by_hash.setdefault(h, []).append(i)
    exact = {(a, b) for group in by_hash.values() for k, a in enumerate(group) for b in group[k + 1 :]}
    pairs = [Pair(a, b, "exact", similar.get((a, b), 1.0)) for a, b in sorted(exact)]
    pairs += [Pair(a, b, "near", s) for (a, b), s in sorted(similar.items()) if (a, b) not in exact]
    return sorted(pairs, key=lambda p: (p.kind != "exact", -p.similarity, p.a, p.b))


def same_pixels(pairs: list[Pair], paths: list[Path]) -> list[Pair]:
    """``pairs`` with each near pair of nearly identical features (:data:`PIXEL_CHECK`) whose images
    decode to the same pixels made ``exact``: the same picture in another file format."""
    from dataclasses import replace

    from tlx.data import load_image

    def pixels(i: int) -> bytes | None:
        try:
            return load_image(paths[i]).tobytes()
        except Exception:  # undecodable since it was read: not the same picture
            return None

    checked = []
    for pair in pairs:
        if pair.kind == "near" and pair.similarity >= PIXEL_CHECK:
            a, b = pixels(pair.a), pixels(pair.b)
            if a is not None and a == b:
                pair = replace(pair, kind="exact")
        checked.append(pair)
    return sorted(checked, key=lambda p: (p.kind != "exact", -p.similarity, p.a, p.b))


def outlier_scores(train: np.ndarray, queries: np.ndarray, *, same: bool) -> np.ndarray:
    """The mean cosine distance of each query to its :data:`OUTLIER_NEIGHBOURS` nearest training images.

    ``same``: the queries are the training images themselves; each one's own row is left out.
    """
    from sklearn.neighbors import NearestNeighbors

    k = min(OUTLIER_NEIGHBOURS, len(train) - same)
    if k < 1:
        return np.zeros(len(queries))
    index = NearestNeighbors(n_neighbors=k + same, algorithm="brute").fit(normalized(train))
    distances, _ = index.kneighbors(normalized(queries))
    return (distances[:, int(same) :] ** 2 / 2.0).mean(axis=1)


def outlier_fence(train_scores: np.ndarray) -> float:
    """Tukey's far-out fence of the training images' outlier scores."""
    q1, q3 = np.percentile(train_scores, [25, 75])
    return float(q3 + OUTLIER_FENCE * (q3 - q1))
