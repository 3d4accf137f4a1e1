"""Stratified, seeded partitions of the training split: a validation hold-out and k-fold cross-validation.

Model choices (early stopping, regularization strength) are made on these; the test split is only
ever used to report the final model. With groups (``dataset.group``: photos of one object), each group
lies in one fold, or on one side of the hold-out, so that no image is scored by a head trained on its
near copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tlx.data import group_folds, held_out_groups
from tlx.errors import TlxError
from tlx.tensors import Features


def fold_ids(y: torch.Tensor, k: int, seed: int, groups: Sequence[str] | None = None) -> torch.Tensor:
    """A fold number in ``0..k-1`` for every sample, each class dealt round-robin in a seeded order;
    with ``groups`` (one per sample), stratified group folds (:func:`tlx.data.group_folds`)."""
    if groups is not None:
        return torch.tensor(group_folds(y.tolist(), groups, k, seed), dtype=y.dtype)
    generator = torch.Generator().manual_seed(seed)
    folds = torch.empty_like(y)
    for label in torch.unique(y):
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        folds[members] = torch.arange(len(members)) % k
    return folds


def subset(features: Features, mask: torch.Tensor) -> Features:
    return Features(features.x[mask], features.y[mask], [])


def hold_out(
    features: Features, fraction: float, seed: int, groups: Sequence[str] | None = None
) -> tuple[Features, Features]:
    """(fit, validation): about ``fraction`` of each class goes to validation, at least one image;
    with ``groups``, one fold of :func:`tlx.data.held_out_groups`."""
    val = torch.zeros_like(features.y, dtype=torch.bool)
    if groups is not None:
        labels = features.y.tolist()
        classes = [str(c) for c in range(max(labels) + 1)]
        val[sorted(held_out_groups(labels, groups, classes, fraction, seed, "train.val_fraction"))] = True
        return subset(features, ~val), subset(features, val)
    generator = torch.Generator().manual_seed(seed)
    for label in torch.unique(features.y):
        members = torch.nonzero(features.y == label).flatten()
        n_val = max(1, round(fraction * len(members)))
        if n_val >= len(members):
            raise TlxError(
                f"train.val_fraction: {fraction} leaves class {int(label)} with no training image "
                f"({len(members)} in the training split); lower it or add images"
            )
        val[members[torch.randperm(len(members), generator=generator)[:n_val]]] = True
    return subset(features, ~val), subset(features, val)
