"""Training a head on fixed features: cross-entropy and SGD, the test accuracy after every epoch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.optim.sgd import sgd

from tlx.features import Features, threads_set
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

    The steps are ``torch.optim.SGD``'s, through its functional form: the optimizer class imports
    ``torch._dynamo`` on first use, seconds that a run whose features are cached would spend on nothing.
    The head's small operations run on one thread; more only add overhead (same numbers).
    """
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in head.parameters() if p.requires_grad]
    momentum_buffers: list[torch.Tensor | None] = [None] * len(params)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    n = len(train.y)
    with threads_set(1):
        for epoch in range(1, config.epochs + 1):
            head.train()
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, config.batch_size):
                batch = order[start : start + config.batch_size]
                for p in params:
                    p.grad = None
                loss = loss_fn(head(train.x[batch]), train.y[batch])
                loss.backward()
                with torch.no_grad():
                    sgd(
                        params,
                        [p.grad for p in params],
                        momentum_buffers,
                        weight_decay=0.0,
                        momentum=config.momentum,
                        lr=config.lr,
                        dampening=0.0,
                        nesterov=False,
                        maximize=False,
                    )
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
