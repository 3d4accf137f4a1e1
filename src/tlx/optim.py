"""Optimizers, learning-rate schedules and the loss, from the recipe's ``train`` section.

Both strategies (a head on fixed features, and fine-tuning) build their training from here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

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


def make_optimizer(groups: list[dict[str, object]], config: TrainConfig) -> torch.optim.Optimizer:
    """``sgd`` (momentum) or ``adamw`` (``momentum`` is its beta1) over ``groups``."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999))
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


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


def make_schedule(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule: call ``.step()`` after every ``optimizer.step()``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config, steps_per_epoch))


def make_loss(config: TrainConfig, weight: torch.Tensor | None = None) -> nn.CrossEntropyLoss:
    """Cross-entropy with the recipe's label smoothing; ``weight`` per class (``class_weight``)."""
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
