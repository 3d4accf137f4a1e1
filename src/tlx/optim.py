"""Optimizers, learning-rate schedules and the loss, from the recipe's ``train`` section.

Both strategies (a head on fixed features, and fine-tuning) build their training from here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

from tlx.recipe import TrainConfig


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float
) -> list[dict[str, object]]:
    """Trainable parameters at ``lr``; weight decay on weight matrices and kernels, not biases or norms."""
    decay, no_decay = [], []
    for _, param in named:
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay}]
    groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


class Optimizer:
    """``sgd`` (momentum) or ``adamw`` (``momentum`` is its beta1) over parameter groups, per-step schedule.

    The arithmetic is torch's own (``torch.optim.sgd.sgd`` and ``torch.optim.adamw.adamw``, the functions
    behind ``torch.optim.SGD`` and ``AdamW``): this class keeps their state and the learning rate. SGD
    takes torch's fused kernel, as ``SGD(fused=True)`` does: one pass over each tensor instead of two,
    which matters for a head's small steps, bound by memory (the same numbers to float rounding).
    The classes themselves import ``torch._dynamo`` when first built, which a run whose features
    are all cached cannot afford.
    """

    def __init__(self, groups: list[dict[str, object]], config: TrainConfig, steps_per_epoch: int) -> None:
        self.config, self.steps_per_epoch, self.steps = config, steps_per_epoch, 0
        self.groups = [
            {"params": list(g["params"]), "base_lr": g["lr"], "weight_decay": g["weight_decay"]}
            for g in groups
        ]
        self.state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}

    @property
    def lrs(self) -> list[float]:
        """Each group's learning rate for the next step."""
        factor = lr_factor(self.steps, self.config, self.steps_per_epoch)
        return [g["base_lr"] * factor for g in self.groups]

    def zero_grad(self) -> None:
        for group in self.groups:
            for param in group["params"]:
                param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient, then on to the next step of the schedule."""
        for group, lr in zip(self.groups, self.lrs):
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(params, lr, group["weight_decay"])
        self.steps += 1

    def _update(self, params: list[nn.Parameter], lr: float, weight_decay: float) -> None:
        grads = [p.grad for p in params]
        states = [self.state.setdefault(p, {}) for p in params]
        if self.config.optimizer == "sgd":
            buffers = [s.get("momentum_buffer") for s in states]
            sgd(
                params,
                grads,
                buffers,
                weight_decay=weight_decay,
                momentum=self.config.momentum,
                lr=lr,
                dampening=0.0,
                nesterov=False,
                maximize=False,
                fused=True,
            )
            for s, buffer in zip(states, buffers):
                s["momentum_buffer"] = buffer
            return
        for s, p in zip(states, params):
            if not s:
                s.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        adamw(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            amsgrad=False,
            beta1=self.config.momentum,
            beta2=0.999,
            lr=lr,
            weight_decay=weight_decay,
            eps=1e-8,
            maximize=False,
        )


def lr_factor(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """The learning rate at optimizer step ``step`` (from 0) as a fraction of the configured one.

    A linear warm-up over ``warmup_epochs``, then ``constant``, ``step`` (times ``gamma`` every
    ``step_size`` epochs, counted from the start) or ``cosine`` (from 1 down to 0 at the last step).
    """
    warmup = config.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "step":
        return config.gamma ** ((step // steps_per_epoch) // config.step_size)
    if config.schedule == "cosine":
        total = config.epochs * steps_per_epoch
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def make_loss(
    config: TrainConfig, weight: torch.Tensor | None = None, reduction: str = "mean"
) -> nn.CrossEntropyLoss:
    """Cross-entropy with the recipe's label smoothing; ``weight`` per class (``class_weight``)."""
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing, reduction=reduction)
