"""Training a head on fixed features: cross-entropy and SGD, the test accuracy after every epoch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from tlx.features import Features
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
    """Train ``head`` on ``train`` for ``config.epochs`` epochs, shuffled by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(head.parameters(), lr=config.lr, momentum=config.momentum)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    n = len(train.y)
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
