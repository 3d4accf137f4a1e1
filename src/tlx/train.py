"""Training a head on fixed features.

Two kinds of head: a plain ``nn.Module`` is trained by SGD epochs (cross-entropy, the test accuracy
printed after every epoch, never used to choose anything); a :class:`ClosedFormHead` fits itself in
one call (logistic regression by L-BFGS). SGD heads use the recipe's optimizer, schedule and loss
(:mod:`tlx.optim`). Both may hold out ``train.val_fraction`` of the training
split for their choices (early stopping; the regularization strength).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from pydantic import BaseModel
from torch import nn

from tlx.errors import TlxError
from tlx.folds import fold_ids, hold_out, subset
from tlx.optim import Optimizer, make_loss, param_groups
from tlx.recipe import TrainConfig
from tlx.span import in_span, narrowable, span_basis
from tlx.stacked import stackable, train_stacked
from tlx.tensors import Features, threads_set


@dataclass(frozen=True)
class Epoch:
    epoch: int
    train_loss: float
    test_accuracy: float
    val_loss: float | None = None
    val_accuracy: float | None = None

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@runtime_checkable
class ClosedFormHead(Protocol):
    """A head that fits itself in one call instead of by epochs.

    ``fit`` leaves the module ready to predict and returns the rows of its model selection (e.g. one
    per regularization strength, with its validation or cross-validation score) and what it chose.
    """

    def fit(
        self, train: Features, val: Features | None, *, class_weight: torch.Tensor | None, seed: int
    ) -> tuple[list[dict[str, float]], dict[str, Any]]: ...


@dataclass
class Fit:
    """What training produced: the history rows, how many images fit and validated, the choices made."""

    history: list[dict[str, float]]
    n_fit: int
    n_val: int
    chosen: dict[str, Any] = field(default_factory=dict)


@dataclass
class BestEpoch:
    """Early stopping: the epoch with the lowest validation loss so far, and what was kept of it."""

    patience: int
    epoch: int = 0
    loss: float = math.inf
    kept: Any = None

    def update(self, record: Epoch, keep: Callable[[], Any]) -> bool:
        """Note ``record`` (``keep()`` is stored if it is the best yet); True once patience has run out."""
        assert record.val_loss is not None
        if record.val_loss < self.loss:
            self.epoch, self.loss, self.kept = record.epoch, record.val_loss, keep()
        return record.epoch - self.epoch >= self.patience


def class_weights(y: torch.Tensor, n_classes: int, how: str | None) -> torch.Tensor | None:
    """The loss's class weights ``train.class_weight`` (``how``) asks for: None when unset; ``balanced``:
    n / (n_classes · n_c), so every class weighs the same in the loss."""
    if how is None:
        return None
    counts = torch.bincount(y, minlength=n_classes).float()
    return len(y) / (n_classes * counts.clamp(min=1))


def fit_head(
    head: nn.Module,
    train: Features,
    test: Features,
    config: TrainConfig,
    *,
    n_classes: int,
    seed: int,
    on_epoch: Callable[[Epoch], None],
) -> Fit:
    """Hold out the validation share, weigh the classes, then fit ``head`` the way its kind needs."""
    fit, val = hold_out(train, config.val_fraction, seed) if config.val_fraction else (train, None)
    weight = class_weights(fit.y, n_classes, config.class_weight)
    n_val = len(val.y) if val is not None else 0
    if isinstance(head, ClosedFormHead):
        rows, chosen = head.fit(fit, val, class_weight=weight, seed=seed)
        return Fit(rows, len(fit.y), n_val, chosen)
    best = BestEpoch(config.patience) if config.patience and val is not None else None
    history = train_head(
        head, fit, test, config, seed=seed, on_epoch=on_epoch, val=val, weight=weight, best=best
    )
    chosen = {"epochs": best.epoch} if best else {}
    return Fit([h.as_dict() for h in history], len(fit.y), n_val, chosen)


#: cross-validation folds of the selection score
SELECTION_FOLDS = 5


def selection_score(
    trained: nn.Module,
    make_head: Callable[[], nn.Module],
    train: Features,
    config: TrainConfig,
    *,
    n_classes: int,
    seed: int,
    folds: int = SELECTION_FOLDS,
) -> dict[str, Any]:
    """How well the head, trained as the recipe says, classifies training images it did not see.

    With ``train.val_fraction`` it is ``trained``'s accuracy on that hold-out (the split
    :func:`fit_head` held out); otherwise the mean and standard deviation (population) of the
    accuracy over stratified folds, a new head (``make_head``) fitted on the rest each time (an mlp's
    first layer within the span of the training rows, :mod:`tlx.span`; the heads of all folds at once
    where that is exact and fits the cache, :mod:`tlx.stacked`). The test split plays no part: a sweep
    chooses its winner by this score.

    ``make_head`` may fix what ``trained`` chose on the whole training split (:func:`with_choices`):
    choosing again inside every fold (nested cross-validation) multiplies a closed-form head's
    selection by the folds, for a score that is then slightly less optimistic.
    """
    started = time.perf_counter()
    if config.val_fraction:
        _, val = hold_out(train, config.val_fraction, seed)
        scores, how = (
            [accuracy(trained, val)],
            f"validation split (train.val_fraction {config.val_fraction:g})",
        )
    else:
        smallest = int(torch.bincount(train.y, minlength=n_classes).min())
        if smallest < 2:
            raise TlxError(
                f"selection: a class has {smallest} training image(s), too few to cross-validate; "
                "add images to every class"
            )
        k = min(folds, smallest)
        ids = fold_ids(train.y, k, seed)
        parts = [(subset(train, ids != fold), subset(train, ids == fold)) for fold in range(k)]
        heads = []
        for _ in parts:
            torch.manual_seed(seed)
            heads.append(make_head())
        if narrowable(heads[0], config):  # every fold's head is of one kind
            basis = span_basis(train.x)  # spans every fold's rows: one basis lets the folds stack
            spans = [in_span(head, basis) for head in heads]
            if all(spans):
                heads = [span.narrow for span in spans]
                parts = [(span.features(rest), span.features(out)) for span, (rest, out) in zip(spans, parts)]
        fits = [rest for rest, _ in parts]
        if stackable(heads, fits, config):
            weights = [class_weights(fit.y, n_classes, config.class_weight) for fit in fits]
            train_stacked(heads, fits, config, seed=seed, weights=weights)
        else:
            for head, (rest, out) in zip(heads, parts):
                fit_head(head, rest, out, config, n_classes=n_classes, seed=seed, on_epoch=lambda _: None)
        with threads_set(1):  # as it trained: the same score on any number of threads
            scores = [accuracy(head, out) for head, (_, out) in zip(heads, parts)]
        how = f"{k}-fold cross-validation on the training split"
    return {
        "mean": statistics.fmean(scores),
        "std": statistics.pstdev(scores),
        "scores": scores,
        "selected_by": how,
        "seconds": round(time.perf_counter() - started, 3),
    }


def with_choices(options: Any, chosen: dict[str, Any]) -> Any:
    """Head ``options`` with each chosen value as the only candidate (``l2: [0.1]`` for ``l2=0.1``).

    A key of ``chosen`` that is not an option (``selected_by``, ``epochs``) changes nothing.
    """
    if not isinstance(options, BaseModel):
        return options
    current = options.model_dump()
    update = {
        key: [value] if isinstance(current[key], list) else value
        for key, value in chosen.items()
        if key in type(options).model_fields
    }
    return options.model_copy(update=update) if update else options


def train_head(
    head: nn.Module,
    train: Features,
    test: Features,
    config: TrainConfig,
    *,
    seed: int,
    on_epoch: Callable[[Epoch], None],
    val: Features | None = None,
    weight: torch.Tensor | None = None,
    best: BestEpoch | None = None,
) -> list[Epoch]:
    """Train ``head`` on ``train`` for ``config.epochs`` epochs, shuffled by ``seed``.

    The head's small operations run on one thread; more only add overhead (same numbers).
    With ``val`` and ``best``, training stops once the validation loss has not improved for
    ``best.patience`` epochs, and the head keeps the weights of its best validation epoch.
    An mlp's first layer trains within the span of the training rows where that is exact
    (:mod:`tlx.span`): the same steps, to float rounding, on a fraction of the memory.
    """
    span = in_span(head, span_basis(train.x)) if narrowable(head, config) else None
    if span is not None:
        head, train, test = span.narrow, span.features(train), span.features(test)
        val = span.features(val) if val is not None else None
    generator = torch.Generator().manual_seed(seed)
    n = len(train.y)
    groups = param_groups(head.named_parameters(), config.lr, config.weight_decay)
    optimizer = Optimizer(groups, config, steps_per_epoch=math.ceil(n / config.batch_size))
    loss_fn = make_loss(config, weight)
    history: list[Epoch] = []
    with threads_set(1):
        for epoch in range(1, config.epochs + 1):
            head.train()
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, config.batch_size):
                batch = order[start : start + config.batch_size]
                optimizer.zero_grad()
                loss = loss_fn(head(train.x[batch]), train.y[batch])
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            val_scores = _loss_and_accuracy(head, val, loss_fn) if val is not None else (None, None)
            record = Epoch(epoch, total / n, accuracy(head, test), *val_scores)
            history.append(record)
            on_epoch(record)
            if best is not None and best.update(record, lambda: copy.deepcopy(head.state_dict())):
                break
    if best is not None:
        head.load_state_dict(best.kept)
    if span is not None:
        span.write_back()
    return history


def _loss_and_accuracy(head: nn.Module, features: Features, loss_fn: nn.Module) -> tuple[float, float]:
    head.eval()
    with torch.inference_mode():
        logits = head(features.x)
        loss = loss_fn(logits, features.y).item()
    return loss, (logits.argmax(dim=1) == features.y).float().mean().item()


def predict(head: nn.Module, features: Features) -> torch.Tensor:
    head.eval()
    with torch.inference_mode():
        return head(features.x).argmax(dim=1)


def accuracy(head: nn.Module, features: Features) -> float:
    return (predict(head, features) == features.y).sum().item() / len(features.y)
