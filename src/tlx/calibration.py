"""Probabilities a user can act on: a temperature, "unknown" for images of none of the classes, and
prediction sets; each fitted on held-out training predictions, never on the test split.

- **Temperature** (Guo et al., ICML 2017): the held-out logits divided by one number ``T`` that
  minimizes their negative log-likelihood; the argmax does not change. A bounded 1-D search
  (SciPy); scikit-learn's calibrators fit per class and would change the argmax.
- **Unknown**: an image's mean cosine distance to its :data:`NEIGHBOURS` nearest training features
  (the training features are kept, unit length, float16). The threshold accepts ``accept`` of the
  training images, each scored without itself (leave-one-out): split-conformal's quantile, or the
  largest score where there are too few images for it.
  Measured against Mahalanobis, energy and the largest softmax probability in ``bench/ood.py``.
- **Prediction sets** (split conformal, Vovk et al.; Angelopoulos and Bates 2021): the held-out
  score ``1 - p(true class)``; for coverage ``1 - α`` a set holds the classes whose calibrated
  probability is at least ``1 - q``, ``q`` the ⌈(n+1)(1-α)⌉-th smallest score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: the training features whose mean distance is an image's "unknown" score
NEIGHBOURS = 5
#: the share of held-out training images the "unknown" threshold accepts, unless the recipe says
ACCEPT = 0.95
#: the bins of the expected calibration error
BINS = 15
#: the temperatures searched, as log10
LOG_T = (-2.0, 2.0)


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity is then a dot product)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits / temperature))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels ``y``."""
    return float(-log_softmax(logits / temperature)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimizes the held-out NLL (searched in 10^-2 … 10^2)."""
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(lambda t: nll(logits, y, 10.0**t), bounds=LOG_T, method="bounded")
    return float(10.0**found.x)


def ece(probabilities: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the confidence's mean gap to the accuracy over equal-width bins,
    weighted by the bin's share of images."""
    confidence = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(confidence[members].mean() - right[members].mean())
    return float(total)


def reliability(probabilities: np.ndarray, y: np.ndarray, bins: int = BINS) -> list[dict[str, float]]:
    """Per non-empty bin: its mean confidence, its accuracy and its number of images (the diagram)."""
    confidence = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return [
        {"confidence": float(confidence[m].mean()), "accuracy": float(right[m].mean()), "n": int(m.sum())}
        for m in (which == b for b in range(bins))
        if m.any()
    ]


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ⌈(n+1)·level⌉-th smallest of ``scores``: a new exchangeable score is at most it with
    probability at least ``level``; infinity where there are too few scores for ``level``."""
    n = len(scores)
    rank = math.ceil((n + 1) * level)
    return float(np.sort(scores)[rank - 1]) if rank <= n else math.inf


def distances(train: np.ndarray, queries: np.ndarray, *, same: bool) -> np.ndarray:
    """The mean cosine distance of each query to its :data:`NEIGHBOURS` nearest rows of ``train``
    (unit rows); ``same``: the queries are those rows, each left out of its own neighbours."""
    from sklearn.neighbors import NearestNeighbors

    k = min(NEIGHBOURS, len(train) - int(same))
    index = NearestNeighbors(n_neighbors=k + int(same), algorithm="brute").fit(train)
    found, _ = index.kneighbors(queries)
    return (found[:, int(same) :] ** 2 / 2.0).mean(axis=1)


@dataclass(frozen=True)
class Calibration:
    """What a run keeps to calibrate its answers (``calibration.safetensors`` in the run folder)."""

    temperature: float
    #: held-out ``1 - p(true class)`` of the training images, calibrated: the conformal scores
    scores: np.ndarray
    #: the training features, unit length (float16): the neighbours of the "unknown" score
    train: np.ndarray
    #: the "unknown" threshold, and the share of held-out training images it accepts
    threshold: float
    accept: float

    @classmethod
    def fit(
        cls, logits: np.ndarray, y: np.ndarray, train_x: np.ndarray, accept: float = ACCEPT
    ) -> Calibration:
        """From held-out ``logits`` of the training images labelled ``y`` and their features."""
        temperature = fit_temperature(logits, y)
        held = softmax(logits, temperature)
        train = unit(train_x.astype(np.float32)).astype(np.float16)
        own = distances(train.astype(np.float32), train.astype(np.float32), same=True)
        threshold = float(np.sort(own)[min(math.ceil((len(own) + 1) * accept), len(own)) - 1])
        return cls(temperature, 1.0 - held[np.arange(len(y)), y], train, threshold, accept)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities of ``logits``."""
        return softmax(logits, self.temperature)

    def ood_scores(self, x: np.ndarray) -> np.ndarray:
        """The "unknown" score of features ``x``: larger is farther from every training image."""
        return distances(self.train.astype(np.float32), unit(x.astype(np.float32)), same=False)

    def sets(self, probabilities: np.ndarray, coverage: float) -> list[list[int]]:
        """The classes of each image's prediction set for ``coverage`` (most probable first). A set may
        be empty: a classifier right 99% of the time leaves about 9% of images with no class at 0.9."""
        q = conformal_quantile(self.scores, coverage)
        return [
            [int(c) for c in np.argsort(-row, kind="stable") if row[c] >= 1.0 - q] for row in probabilities
        ]
