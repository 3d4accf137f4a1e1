"""The cross-validation folds of a head, trained as one stacked model.

A small head's SGD step costs its fixed overhead (autograd, the optimizer's Python) more than its
arithmetic. The k heads of a k-fold selection, each layer's weights stacked into one ``(k, in, out)``
tensor, take one step for all k. Each fold still gets exactly what :func:`tlx.train.train_head` would
give it: the same initial weights, its own shuffling by the same seed, its own batches, class weights
and loss, the same learning rates, and no update on a step after its epoch has ended. The trained
weights agree with separately trained heads to float rounding. A head whose k copies no longer fit
the cache is bound by memory instead (an mlp's full first layer; narrowed to the span of the
training rows, :mod:`tlx.span`, it fits), so it keeps training one by one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tlx.optim import Optimizer, make_loss, param_groups
from tlx.recipe import TrainConfig
from tlx.span import SpanLinear
from tlx.tensors import Features, threads_set

#: the stacked parameters, gradients and momentum must fit in about this much cache: five unnarrowed
#: 1280×512 mlp layers (39 MB) trained slower stacked than one by one
CACHE_BYTES = 16 * 2**20

#: layers applied element by element, which act on stacked activations as they are
ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Identity)


def _layers(head: nn.Module) -> list[nn.Module]:
    """The layers ``head`` applies in turn (a subclass of ``nn.Sequential`` may have its own forward)."""
    return list(head) if type(head) is nn.Sequential else [head]


def _stackable_layer(layer: nn.Module) -> bool:
    if type(layer) is nn.Dropout:  # a mask per fold would draw other random numbers than one by one
        return layer.p == 0
    return type(layer) in (nn.Linear, SpanLinear) or type(layer) in ELEMENTWISE


def stackable(heads: list[nn.Module], fits: list[Features], config: TrainConfig) -> bool:
    """Whether :func:`train_stacked` can train ``heads`` on ``fits`` exactly as one by one, and faster.

    Heads of ``nn.Linear``, :class:`~tlx.span.SpanLinear`, element-wise activations and dropout of 0,
    whose stacked state fits in :data:`CACHE_BYTES`; SGD (AdamW counts its steps per tensor, so a fold
    cannot skip one); folds whose epochs differ in steps only where the learning rate does not depend
    on them.
    """
    if config.optimizer != "sgd" or not all(_stackable_layer(m) for m in _layers(heads[0])):
        return False
    if not all(param.requires_grad for param in heads[0].parameters()):
        return False
    if 3 * 4 * len(heads) * sum(p.numel() for p in heads[0].parameters()) > CACHE_BYTES:
        return False
    steps = {math.ceil(len(fit.y) / config.batch_size) for fit in fits}
    return len(steps) == 1 or (config.schedule == "constant" and not config.warmup_epochs)


class _Stack:
    """The ``k`` heads' parameters stacked layer by layer (a weight as ``(k, in, out)``, a bias as
    ``(k, 1, out)``) and their forward pass on ``(k, batch, in)`` inputs."""

    def __init__(self, heads: list[nn.Module]) -> None:
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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for column in self.layers:
            layer = column[0]
            if type(layer) is nn.Dropout:
                continue
            if type(layer) not in (nn.Linear, SpanLinear):
                x = layer(x)
                continue
            weight, bias = self._get(layer, "weight"), self._get(layer, "bias")
            if type(layer) is SpanLinear:
                x = torch.baddbmm(x[..., layer.rank :], x[..., : layer.rank], weight)
                x = x if bias is None else x + bias
            else:
                x = torch.bmm(x, weight) if bias is None else torch.baddbmm(bias, x, weight)
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


def train_stacked(
    heads: list[nn.Module],
    fits: list[Features],
    config: TrainConfig,
    *,
    seed: int,
    weights: list[torch.Tensor | None],
) -> None:
    """Train ``heads[i]`` on ``fits[i]`` with class weights ``weights[i]``, all at once, as
    :func:`tlx.train.train_head` trains one head (``stackable`` must hold)."""
    k, batch_size = len(heads), config.batch_size
    sizes = [len(fit.y) for fit in fits]
    stack = _Stack(heads)
    groups = [
        {**group, "params": [stack.params[param] for param in group["params"]]}
        for group in param_groups(heads[0].named_parameters(), config.lr, config.weight_decay)
    ]
    steps = [math.ceil(n / batch_size) for n in sizes]
    optimizer = Optimizer(groups, config, steps_per_epoch=max(steps))
    losses = [make_loss(config, w) for w in weights]
    # unweighted, a full batch's mean loss is the mean of its per-image losses: one call for all folds
    per_image = make_loss(config, reduction="none") if all(w is None for w in weights) else None
    n = max(sizes)
    x = torch.zeros(k, n, fits[0].x.shape[1])
    y = torch.zeros(k, n, dtype=torch.long)
    for i, fit in enumerate(fits):
        x[i, : sizes[i]], y[i, : sizes[i]] = fit.x, fit.y
    generators = [torch.Generator().manual_seed(seed) for _ in heads]
    folds = torch.arange(k).unsqueeze(1)
    with threads_set(1):
        for _ in range(config.epochs):
            order = torch.zeros(k, n + batch_size, dtype=torch.long)  # padding rows point at row 0, unused
            for i, generator in enumerate(generators):
                order[i, : sizes[i]] = torch.randperm(sizes[i], generator=generator)
            for step in range(max(steps)):
                start = step * batch_size
                batch = order[:, start : start + batch_size]
                logits = stack(x[folds, batch])
                targets = y[folds, batch]
                counts = [min(max(size - start, 0), batch_size) for size in sizes]
                optimizer.zero_grad()
                if per_image is not None and min(counts) == batch_size:
                    total = per_image(logits.flatten(0, 1), targets.flatten()).view(k, -1).mean(1).sum()
                else:
                    total = sum(losses[i](logits[i, :m], targets[i, :m]) for i, m in enumerate(counts) if m)
                total.backward()
                idle = [i for i, m in enumerate(counts) if not m]
                kept = _slices(optimizer, idle) if idle else []
                optimizer.step()
                _restore(kept)
    stack.write_back()


def _slices(optimizer: Optimizer, folds: list[int]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """Copies of the ``folds``' slices of every parameter and its optimizer state, to put back after a
    step those folds must not take (their epoch has ended)."""
    tensors = [p.data for g in optimizer.groups for p in g["params"]]
    tensors += [t for state in optimizer.state.values() for t in state.values() if t is not None]
    return [(t, i, t[i].clone()) for t in tensors for i in folds]


def _restore(kept: list[tuple[torch.Tensor, int, torch.Tensor]]) -> None:
    for tensor, i, copy in kept:
        tensor[i] = copy
