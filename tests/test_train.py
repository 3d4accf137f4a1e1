"""The head's training steps are exactly torch.optim.SGD's (fused, as tlx runs it)."""

from __future__ import annotations

import torch
from torch import nn

from tlx.recipe import TrainConfig
from tlx.tensors import Features
from tlx.train import train_head


def test_steps_match_torch_optim_sgd() -> None:
    torch.manual_seed(0)
    train = Features(torch.randn(30, 8), torch.randint(0, 3, (30,)), [])
    config = TrainConfig(epochs=3, lr=0.01, momentum=0.9, batch_size=4)
    head = nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
    reference = nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
    reference.load_state_dict(head.state_dict())

    train_head(head, train, train, config, seed=1, on_epoch=lambda record: None)

    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(reference.parameters(), lr=config.lr, momentum=config.momentum, fused=True)
    for _ in range(config.epochs):
        order = torch.randperm(30, generator=generator)
        for start in range(0, 30, config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad()
            nn.functional.cross_entropy(reference(train.x[batch]), train.y[batch]).backward()
            optimizer.step()
    for ours, theirs in zip(head.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(ours, theirs)
