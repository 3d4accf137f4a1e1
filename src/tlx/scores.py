"""Scores of a classifier on a labelled split: accuracy, confusion matrix, per-class precision/recall/F1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Scores:
    classes: list[str]
    #: confusion[i][j]: images of class i predicted as class j
    confusion: list[list[int]]

    @classmethod
    def of(cls, classes: list[str], truth: torch.Tensor, predicted: torch.Tensor) -> Scores:
        n = len(classes)
        counts = np.bincount(np.asarray(truth) * n + np.asarray(predicted), minlength=n * n).reshape(n, n)
        return cls(classes, counts.tolist())

    @property
    def accuracy(self) -> float:
        total = sum(map(sum, self.confusion))
        return sum(self.confusion[i][i] for i in range(len(self.classes))) / total if total else 0.0

    def per_class(self) -> list[dict[str, float | int | str]]:
        """One row per class: precision, recall, F1 (0 where undefined) and support (true images)."""
        rows = []
        for i, name in enumerate(self.classes):
            hits = self.confusion[i][i]
            support = sum(self.confusion[i])
            predicted = sum(row[i] for row in self.confusion)
            precision = hits / predicted if predicted else 0.0
            recall = hits / support if support else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            rows.append(
                {"class": name, "precision": precision, "recall": recall, "f1": f1, "support": support}
            )
        return rows

    def weakest(self) -> dict[str, float | int | str]:
        """The class with the lowest F1 among those with test images (the first on a tie)."""
        rows = [r for r in self.per_class() if r["support"]] or self.per_class()
        return min(rows, key=lambda r: r["f1"])
