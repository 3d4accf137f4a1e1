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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
from pydantic import BaseModel
from torch import nn
from torch.nn import functional as F

from tlx.data import groups_per_class
from tlx.errors import TlxError
from tlx.folds import fold_ids, hold_out, subset
from tlx.optim import Optimizer, make_loss, param_groups
from tlx.recipe import TrainConfig
from tlx.tensors import Features, threads_set


@dataclass(frozen=True)
class Epoch:
    """One epoch's scores: the mean training loss, the loss and accuracy on the test split (shown, never
    used to choose), and on the validation split (``train.val_fraction``) when there is one."""

    epoch: int
    train_loss: float
    test_accuracy: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    test_loss: float | None = None
    #: how long the epoch took: shown, not a result, so not in :meth:`as_dict` (the history)
    seconds: float = field(default=0.0, compare=False)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "seconds"}


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
    groups: Sequence[str] | None = None,
) -> Fit:
    """Hold out the validation share (each of ``groups``, one per training image, on one side), weigh
    the classes, then fit ``head`` the way its kind needs."""
    fit, val = hold_out(train, config.val_fraction, seed, groups) if config.val_fraction else (train, None)
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


def held_out(
    trained: nn.Module,
    make_head: Callable[[], nn.Module],
    train: Features,
    config: TrainConfig,
    *,
    n_classes: int,
    seed: int,
    folds: int = SELECTION_FOLDS,
    groups: Sequence[str] | None = None,
) -> HeldOut:
    """Logits of training images from a head that did not train on them: the selection score and the
    calibration (:mod:`tlx.calibration`) come from these, never from the test split.

    With ``train.val_fraction`` they are ``trained``'s on that hold-out (the split :func:`fit_head`
    held out); otherwise every training image's from stratified folds, a new head (``make_head``)
    fitted on the rest each time (:func:`out_of_fold`). ``groups`` (one per training image): each group
    in one fold, or on one side of the hold-out, so near copies of an image do not train the head
    scoring it.

    ``make_head`` may fix what ``trained`` chose on the whole training split (:func:`with_choices`):
    choosing again inside every fold (nested cross-validation) multiplies a closed-form head's
    selection by the folds, for a score that is then slightly less optimistic.
    """
    started = time.perf_counter()
    if config.val_fraction:
        _, val = hold_out(train, config.val_fraction, seed, groups)
        with threads_set(1), torch.inference_mode():
            logits = trained.eval()(val.x)
        how = validation_split(config.val_fraction)
        held = HeldOut(logits, val.y, torch.zeros_like(val.y), 1, how)
    else:
        held = out_of_fold(
            make_head, train, config, n_classes=n_classes, seed=seed, folds=folds, groups=groups
        )
    return replace(held, seconds=round(time.perf_counter() - started, 3))


def validation_split(fraction: float) -> str:
    """How images held out by ``train.val_fraction`` were held out, in words."""
    return f"validation split (train.val_fraction {fraction:g})"


def selection_score(held: HeldOut) -> dict[str, Any]:
    """How well the head, trained as the recipe says, classifies training images it did not see: the
    mean and standard deviation (population) of the accuracy of each fold of ``held``. The test split
    plays no part: a sweep chooses its winner by this score."""
    scores = held.accuracies()
    return {
        "mean": statistics.fmean(scores),
        "std": statistics.pstdev(scores),
        "scores": scores,
        "selected_by": held.how,
        "seconds": held.seconds,
    }


@dataclass(frozen=True)
class HeldOut:
    """Logits of training images from heads that did not train on them, and their labels."""

    logits: torch.Tensor  # (n, classes) float32
    y: torch.Tensor  # (n,)
    fold: torch.Tensor  # (n,) the fold each image was held out in
    k: int
    #: how they were held out, in words
    how: str
    seconds: float = 0.0

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(dim=1)

    def accuracies(self) -> list[float]:
        """The accuracy of each fold's head on its held-out images."""
        right = self.logits.argmax(dim=1) == self.y
        return [right[self.fold == i].float().mean().item() for i in range(self.k)]


def out_of_fold(
    make_head: Callable[[], nn.Module],
    train: Features,
    config: TrainConfig,
    *,
    n_classes: int,
    seed: int,
    folds: int = SELECTION_FOLDS,
    groups: Sequence[str] | None = None,
) -> HeldOut:
    """Train a new head (``make_head``) on all but one of ``folds`` stratified folds of ``train``, for
    each fold, and keep its probabilities for the held-out images: the held-out predictions that
    selection scores and the audit's label quality come from (the heads of all folds in one
    :func:`train_heads`).

    ``groups`` (one per training image, e.g. ``Split.decoded_groups``): each group in one fold, so no
    image is predicted by a head trained on its near copies. There are fewer folds when the smallest
    class has fewer images (groups) than ``folds``; fewer than two is an error.
    """
    smallest = min(groups_per_class(train.y.tolist(), groups, n_classes))
    if smallest < 2:
        what = "training image(s)" if groups is None else "group(s) of dataset.group"
        raise TlxError(
            f"selection: a class has {smallest} {what}, too few to cross-validate; add images to every class"
        )
    k = min(folds, smallest)
    ids = fold_ids(train.y, k, seed, groups)
    parts = [(subset(train, ids != fold), subset(train, ids == fold)) for fold in range(k)]
    heads = []
    for _ in parts:
        torch.manual_seed(seed)
        heads.append(make_head())
    if isinstance(heads[0], ClosedFormHead):
        for fold, (head, (rest, out)) in enumerate(zip(heads, parts)):
            kept = [g for g, i in zip(groups, ids.tolist()) if i != fold] if groups is not None else None
            fit_head(
                head, rest, out, config, n_classes=n_classes, seed=seed, on_epoch=lambda _: None, groups=kept
            )
    else:
        fits = [rest for rest, _ in parts]
        weights = [class_weights(fit.y, n_classes, config.class_weight) for fit in fits]
        train_heads(heads, fits, config, seed=seed, weights=weights)
    logits = torch.empty(len(train.y), n_classes)
    with threads_set(1), torch.inference_mode():  # as it trained: the same numbers on any number of threads
        for fold, head in enumerate(heads):
            logits[ids == fold] = head.eval()(subset(train, ids == fold).x)
    how = f"{k}-fold cross-validation on the training split"
    if groups is not None:
        how += ", each group (dataset.group) in one fold"
    return HeldOut(logits, train.y, ids, k, how)


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
    """Train ``head`` on ``train`` (:func:`train_heads`), its accuracy on ``test`` after every epoch.

    With ``val`` and ``best``, training stops once the validation loss has not improved for
    ``best.patience`` epochs, and the head keeps the weights of its best validation epoch.
    """
    loss_fn = make_loss(config, weight)
    history: list[Epoch] = []
    started = time.perf_counter()

    def after(epoch: int, train_loss: float) -> bool:
        nonlocal started
        val_scores = _loss_and_accuracy(head, val, loss_fn) if val is not None else (None, None)
        test_loss, test_accuracy = _test_scores(head, test, loss_fn)
        seconds = time.perf_counter() - started
        record = Epoch(epoch, train_loss, test_accuracy, *val_scores, test_loss=test_loss, seconds=seconds)
        history.append(record)
        on_epoch(record)
        stop = best is not None and best.update(record, lambda: copy.deepcopy(head.state_dict()))
        started = time.perf_counter()
        return stop

    train_heads([head], [train], config, seed=seed, weights=[weight], after_epoch=after)
    if best is not None:
        head.load_state_dict(best.kept)
    return history


def train_heads(
    heads: list[nn.Module],
    fits: list[Features],
    config: TrainConfig,
    *,
    seed: int,
    weights: list[torch.Tensor | None],
    after_epoch: Callable[[int, float], bool] | None = None,
) -> None:
    """The one training loop: ``heads[i]`` on ``fits[i]`` with class weights ``weights[i]``, for
    ``config.epochs`` epochs, each head's batches shuffled by ``seed``, on one thread (a head's small
    operations only lose to more).

    Several heads (the folds of a selection) train as one stacked model where that is exact and fits
    the cache (:func:`stackable`): each layer's weights of all heads in one ``(k, in, out)`` tensor, one
    step for all, each fold with its own batches, loss and class weights and no update after its own
    epoch has ended; they end where each, trained alone, would (to float rounding). Otherwise they
    train one after the other. ``after_epoch(epoch, mean training loss)`` (one head) follows every
    epoch; it returns True to stop.
    """
    if len(heads) > 1 and not stackable(heads, fits, config):
        for head, fit, weight in zip(heads, fits, weights):
            train_heads([head], [fit], config, seed=seed, weights=[weight])
        return
    k, batch_size = len(heads), config.batch_size
    sizes = [len(fit.y) for fit in fits]
    steps = [math.ceil(n / batch_size) for n in sizes]
    stack = _Stack(heads) if k > 1 else None
    model = stack or heads[0]
    groups = param_groups(heads[0].named_parameters(), config.lr, config.weight_decay)
    if stack is not None:
        groups = [{**g, "params": [stack.params[p] for p in g["params"]]} for g in groups]
    optimizer = Optimizer(groups, config, steps_per_epoch=max(steps))
    losses = [make_loss(config, weight) for weight in weights]
    # unweighted, a full batch's mean loss is the mean of its per-image losses: one call for all folds
    per_image = make_loss(config, reduction="none") if all(w is None for w in weights) else None
    x, y = _padded(fits) if stack is not None else (fits[0].x, fits[0].y)
    generators = [torch.Generator().manual_seed(seed) for _ in heads]
    folds = torch.arange(k).unsqueeze(1)
    with threads_set(1):
        for epoch in range(1, config.epochs + 1):
            model.train()
            orders = [torch.randperm(n, generator=g) for n, g in zip(sizes, generators)]
            if stack is not None:  # padding rows point at row 0 and are left out of every loss
                order = torch.stack([F.pad(o, (0, max(sizes) + batch_size - len(o))) for o in orders])
            total = 0.0
            for step in range(max(steps)):
                start = step * batch_size
                counts = [min(max(n - start, 0), batch_size) for n in sizes]
                optimizer.zero_grad()
                if stack is None:
                    batch = orders[0][start : start + batch_size]
                    loss = losses[0](model(x[batch]), y[batch])
                else:
                    batch = order[:, start : start + batch_size]
                    logits, targets = stack(x[folds, batch]), y[folds, batch]
                    if per_image is not None and min(counts) == batch_size:
                        loss = per_image(logits.flatten(0, 1), targets.flatten()).view(k, -1).mean(1).sum()
                    else:
                        loss = sum(
                            losses[i](logits[i, :m], targets[i, :m]) for i, m in enumerate(counts) if m
                        )
                loss.backward()
                idle = [i for i, m in enumerate(counts) if not m]
                kept = _slices(optimizer, idle) if idle else []
                optimizer.step()
                _restore(kept)
                if after_epoch is not None:
                    total += loss.item() * counts[0]
            # one head's mean training loss; for the folds, the last step's (one read per epoch)
            epoch_loss = total / sizes[0] if after_epoch is not None else loss.item()
            params = [p for g in optimizer.groups for p in g["params"]]
            check_finite(
                epoch, epoch_loss, params, {"train.lr": config.lr, "train.weight_decay": config.weight_decay}
            )
            if after_epoch is not None and after_epoch(epoch, epoch_loss):
                break
    if stack is not None:
        stack.write_back()


def check_finite(epoch: int, loss: float, params: Iterable[torch.Tensor], rates: dict[str, float]) -> None:
    """Stop training that has diverged: a loss or weight that is no longer finite, which every later
    epoch would only carry on (and a run folder cannot hold). ``rates`` are the recipe keys that
    lowered bring it back, with their values: the :class:`TlxError` names those that are set.
    """
    if math.isfinite(loss) and all(bool(torch.isfinite(p).all()) for p in params):
        return
    what = f"the loss is {loss:g}" if not math.isfinite(loss) else "the weights are no longer finite"
    keys = " or ".join(f"{key} (now {value:g})" for key, value in rates.items() if value)
    raise TlxError(f"training diverged at epoch {epoch}: {what}; lower {keys}")


#: the stacked parameters, gradients and momentum must fit in about this much cache: five 1280×512 mlp
#: layers (39 MB) trained slower stacked than one by one (bench/RESULTS.md)
CACHE_BYTES = 16 * 2**20
#: layers applied element by element, which act on stacked activations as they are
ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Identity)


def _layers(head: nn.Module) -> list[nn.Module]:
    """The layers ``head`` applies in turn (a subclass of ``nn.Sequential`` may have its own forward)."""
    return list(head) if type(head) is nn.Sequential else [head]


def _stackable_layer(layer: nn.Module) -> bool:
    if type(layer) is nn.Dropout:  # a mask per fold would draw other random numbers than one by one
        return layer.p == 0
    return type(layer) is nn.Linear or type(layer) in ELEMENTWISE


def stackable(heads: list[nn.Module], fits: list[Features], config: TrainConfig) -> bool:
    """Whether ``heads`` can train stacked exactly as one by one, and faster: ``nn.Linear`` layers,
    element-wise activations and dropout of 0, all trainable, whose stacked state fits in
    :data:`CACHE_BYTES`; SGD (AdamW counts its steps per tensor, so a fold cannot skip one); folds whose
    epochs differ in steps only where the learning rate does not depend on them."""
    if config.optimizer != "sgd" or not all(_stackable_layer(m) for m in _layers(heads[0])):
        return False
    if not all(param.requires_grad for param in heads[0].parameters()):
        return False
    if 3 * 4 * len(heads) * sum(p.numel() for p in heads[0].parameters()) > CACHE_BYTES:
        return False
    steps = {math.ceil(len(fit.y) / config.batch_size) for fit in fits}
    return len(steps) == 1 or (config.schedule == "constant" and not config.warmup_epochs)


class _Stack(nn.Module):
    """``k`` heads' parameters stacked layer by layer (a weight as ``(k, in, out)``, a bias as
    ``(k, 1, out)``) and their forward pass on ``(k, batch, in)`` inputs."""

    def __init__(self, heads: list[nn.Module]) -> None:
        super().__init__()
        self.layers = [list(column) for column in zip(*(_layers(head) for head in heads))]
        self.params: dict[nn.Parameter, nn.Parameter] = {}  # the first head's parameter -> stacked
        for column in self.layers:
            for name in ("weight", "bias"):
                if getattr(column[0], name, None) is not None:
                    tensors = [getattr(m, name).detach() for m in column]
                    stacked = torch.stack([t.t() if name == "weight" else t.unsqueeze(0) for t in tensors])
                    self.params[getattr(column[0], name)] = nn.Parameter(stacked)

    def _get(self, layer: nn.Module, name: str) -> nn.Parameter | None:
        param = getattr(layer, name, None)
        return self.params[param] if param is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for column in self.layers:
            layer = column[0]
            if type(layer) is nn.Linear:
                weight, bias = self._get(layer, "weight"), self._get(layer, "bias")
                x = torch.bmm(x, weight) if bias is None else torch.baddbmm(bias, x, weight)
            elif type(layer) is not nn.Dropout:
                x = layer(x)
        return x

    @torch.no_grad()
    def write_back(self) -> None:
        """Give every head its trained parameters."""
        for column in self.layers:
            for name in ("weight", "bias"):
                stacked = self._get(column[0], name)
                if stacked is None:
                    continue
                for i, layer in enumerate(column):
                    getattr(layer, name).copy_(stacked[i].t() if name == "weight" else stacked[i, 0])


def _padded(fits: list[Features]) -> tuple[torch.Tensor, torch.Tensor]:
    """The folds' rows and labels as ``(k, n)`` tensors, the shorter folds padded with zeros."""
    n = max(len(fit.y) for fit in fits)
    x = torch.zeros(len(fits), n, fits[0].x.shape[1])
    y = torch.zeros(len(fits), n, dtype=torch.long)
    for i, fit in enumerate(fits):
        x[i, : len(fit.y)], y[i, : len(fit.y)] = fit.x, fit.y
    return x, y


def _slices(optimizer: Optimizer, folds: list[int]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """Copies of the ``folds``' slices of every parameter and its optimizer state, to put back after a
    step those folds must not take (their epoch has ended)."""
    tensors = [p.data for g in optimizer.groups for p in g["params"]]
    tensors += [t for state in optimizer.state.values() for t in state.values() if t is not None]
    return [(t, i, t[i].clone()) for t in tensors for i in folds]


def _restore(kept: list[tuple[torch.Tensor, int, torch.Tensor]]) -> None:
    for tensor, i, copy_ in kept:
        tensor[i] = copy_


def _loss_and_accuracy(head: nn.Module, features: Features, loss_fn: nn.Module) -> tuple[float, float]:
    head.eval()
    with torch.inference_mode():
        logits = head(features.x)
        loss = loss_fn(logits, features.y).item()
    return loss, (logits.argmax(dim=1) == features.y).float().mean().item()


def _test_scores(head: nn.Module, features: Features, loss_fn: nn.Module) -> tuple[float, float]:
    """(loss, accuracy) on the test split: right answers over images, as :class:`tlx.scores.Scores`."""
    head.eval()
    with torch.inference_mode():
        logits = head(features.x)
        loss = loss_fn(logits, features.y).item()
    return loss, (logits.argmax(dim=1) == features.y).sum().item() / len(features.y)


def predict(head: nn.Module, features: Features) -> torch.Tensor:
    head.eval()
    with torch.inference_mode():
        return head(features.x).argmax(dim=1)
