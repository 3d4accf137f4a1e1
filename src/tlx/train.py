"""Training a head on fixed features with the recipe's optimizer and schedule, test accuracy every epoch."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from tlx.features import Features, threads_set
from tlx.optim import make_loss, make_optimizer, make_schedule, param_groups
from tlx.recipe import TrainConfig


@dataclass(frozen=True)
class Epoch:
    epoch: int
    train_loss: float
    test_accuracy: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def train_head(
    head: nn.Module,
    train: Features,
    test: Features,
    config: TrainConfig,
    *,
    seed: int,
    on_epoch: Callable[[Epoch], None],
) -> list[Epoch]:
    """Train ``head`` on ``train`` for ``config.epochs`` epochs, shuffled by ``seed``.

    The head's small operations run on one thread; more only add overhead (same numbers).
    """
    generator = torch.Generator().manual_seed(seed)
    n = len(train.y)
    optimizer = make_optimizer(param_groups(head.named_parameters(), config.lr, config.weight_decay), config)
    schedule = make_schedule(optimizer, config, steps_per_epoch=math.ceil(n / config.batch_size))
    loss_fn = make_loss(config)
    history = []
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
                schedule.step()
                total += loss.item() * len(batch)
            record = Epoch(epoch, total / n, accuracy(head, test))
            history.append(record)
            on_epoch(record)
    return history


def predict(head: nn.Module, features: Features) -> torch.Tensor:
    head.eval()
    with torch.inference_mode():
        return head(features.x).argmax(dim=1)


def accuracy(head: nn.Module, features: Features) -> float:
    return (predict(head, features) == features.y).float().mean().item()
