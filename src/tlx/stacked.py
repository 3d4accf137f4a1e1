"""The cross-validation folds of a linear head, trained as one stacked model.

A linear head's SGD step on a handful of features costs its fixed overhead (autograd, the optimizer's
Python), not arithmetic. The k heads of a k-fold selection, stacked into one ``(k, in, out)`` weight,
take one step for all k. Each fold still gets exactly what :func:`tlx.train.train_head` would give
it: the same initial weights, its own shuffling by the same seed, its own batches, class weights and
loss, the same learning rates, and no update on a step after its epoch has ended. The trained weights
agree with separately trained heads to float rounding. Larger heads are bound by memory instead, and
k of them at once no longer fit the cache, so they keep training one by one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tlx.features import Features, threads_set
from tlx.optim import Optimizer, make_loss, param_groups
from tlx.recipe import TrainConfig


def stackable(heads: list[nn.Module], fits: list[Features], config: TrainConfig) -> bool:
    """Whether :func:`train_stacked` can train ``heads`` on ``fits`` exactly as one by one.

    Plain ``nn.Linear`` heads with SGD (AdamW counts its steps per tensor, so a fold cannot skip one);
    folds whose epochs differ in steps only where the learning rate does not depend on them.
    """
    if not all(type(head) is nn.Linear for head in heads) or config.optimizer != "sgd":
        return False
    steps = {math.ceil(len(fit.y) / config.batch_size) for fit in fits}
    return len(steps) == 1 or (config.schedule == "constant" and not config.warmup_epochs)


def train_stacked(
    heads: list[nn.Linear],
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
    weight = nn.Parameter(torch.stack([head.weight.detach().t() for head in heads]))  # (k, in, out)
    bias = (
        nn.Parameter(torch.stack([head.bias.detach() for head in heads]).unsqueeze(1))
        if heads[0].bias is not None
        else None
    )
    stacked = {"weight": weight, "bias": bias}
    names = {id(param): name for name, param in heads[0].named_parameters()}
    groups = [
        {**group, "params": [stacked[names[id(param)]] for param in group["params"]]}
        for group in param_groups(heads[0].named_parameters(), config.lr, config.weight_decay)
    ]
    steps = [math.ceil(n / batch_size) for n in sizes]
    optimizer = Optimizer(groups, config, steps_per_epoch=max(steps))
    losses = [make_loss(config, w) for w in weights]
    # unweighted, a full batch's mean loss is the mean of its per-image losses: one call for all folds
    per_image = make_loss(config, reduction="none") if all(w is None for w in weights) else None
    n = max(sizes)
    x = torch.zeros(k, n, weight.shape[1])
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
                inputs = x[folds, batch]
                logits = torch.bmm(inputs, weight) if bias is None else torch.baddbmm(bias, inputs, weight)
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
    with torch.no_grad():
        for i, head in enumerate(heads):
            head.weight.copy_(weight[i].t())
            if bias is not None:
                head.bias.copy_(bias[i, 0])


def _slices(optimizer: Optimizer, folds: list[int]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """Copies of the ``folds``' slices of every parameter and its optimizer state, to put back after a
    step those folds must not take (their epoch has ended)."""
    tensors = [p.data for g in optimizer.groups for p in g["params"]]
    tensors += [t for state in optimizer.state.values() for t in state.values() if t is not None]
    return [(t, i, t[i].clone()) for t in tensors for i in folds]


def _restore(kept: list[tuple[torch.Tensor, int, torch.Tensor]]) -> None:
    for tensor, i, copy in kept:
        tensor[i] = copy
