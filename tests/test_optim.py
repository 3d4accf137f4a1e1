"""Optimizers, schedules, weight decay and label smoothing: their values, and that training obeys them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tlx.errors import TlxError
from tlx.optim import Optimizer, lr_factor, make_loss, param_groups
from tlx.recipe import TrainConfig, load_recipe
from tlx.tensors import Features
from tlx.train import train_head

from .conftest import write_recipe


def separable(n: int = 40, seed: int = 0) -> Features:
    """Two well separated Gaussian clusters in 8 dimensions."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 8, generator=g) + 4.0 * (2 * y[:, None] - 1).float()
    return Features(x, y, [])


def train(config: TrainConfig, seed: int = 0) -> tuple[nn.Linear, list]:
    torch.manual_seed(seed)
    head = nn.Linear(8, 2)
    history = train_head(head, separable(), separable(seed=1), config, seed=seed, on_epoch=lambda e: None)
    return head, history


def test_warmup_rises_linearly_then_holds() -> None:
    config = TrainConfig(epochs=5, warmup_epochs=2)
    factors = [lr_factor(step, config, steps_per_epoch=10) for step in range(50)]
    assert factors[0] == pytest.approx(0.05) and factors[9] == pytest.approx(0.5)
    assert factors[19] == pytest.approx(1.0) and set(factors[20:]) == {1.0}


def test_step_schedule_multiplies_by_gamma_every_step_size_epochs() -> None:
    config = TrainConfig(epochs=9, schedule="step", step_size=3, gamma=0.5)
    per_epoch = [lr_factor(epoch * 4, config, steps_per_epoch=4) for epoch in range(9)]
    assert per_epoch == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]


def test_cosine_schedule_after_warmup_falls_from_one_to_zero() -> None:
    config = TrainConfig(epochs=11, schedule="cosine", warmup_epochs=1)
    assert lr_factor(9, config, steps_per_epoch=10) == pytest.approx(1.0)  # end of warm-up
    assert lr_factor(10, config, steps_per_epoch=10) == pytest.approx(1.0)
    assert lr_factor(60, config, steps_per_epoch=10) == pytest.approx(0.5)
    assert lr_factor(109, config, steps_per_epoch=10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))
    factors = [lr_factor(s, config, 10) for s in range(10, 110)]
    assert factors == sorted(factors, reverse=True)


def test_schedule_scales_every_group_of_the_optimizer() -> None:
    a, b = nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
    config = TrainConfig(epochs=2, schedule="step", step_size=1, gamma=0.1)
    groups = [
        {"params": [a], "lr": 1.0, "weight_decay": 0.0},
        {"params": [b], "lr": 0.01, "weight_decay": 0.0},
    ]
    optimizer = Optimizer(groups, config, steps_per_epoch=3)
    assert optimizer.lrs == pytest.approx([1.0, 0.01])
    for _ in range(3):
        optimizer.step()
    assert optimizer.lrs == pytest.approx([0.1, 0.001])


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(lr=0.05, momentum=0.9, weight_decay=0.01, schedule="step", step_size=1, gamma=0.5),
        TrainConfig(
            lr=0.05, optimizer="adamw", momentum=0.85, weight_decay=0.1, schedule="cosine", warmup_epochs=1
        ),
    ],
    ids=["sgd-step", "adamw-cosine-warmup"],
)
def test_updates_are_exactly_torch_optims(config: TrainConfig) -> None:
    """Same groups, same gradients: the same weights as ``torch.optim.SGD``/``AdamW`` with ``LambdaLR``."""
    config = config.model_copy(update={"epochs": 3})
    torch.manual_seed(0)
    ours, theirs = nn.Linear(4, 3), nn.Linear(4, 3)
    theirs.load_state_dict(ours.state_dict())
    optimizer = Optimizer(param_groups(ours.named_parameters(), 0.05, config.weight_decay), config, 2)
    groups = param_groups(theirs.named_parameters(), 0.05, config.weight_decay)
    if config.optimizer == "sgd":
        reference = torch.optim.SGD(groups, lr=0.05, momentum=config.momentum, fused=True)
    else:
        reference = torch.optim.AdamW(groups, lr=0.05, betas=(config.momentum, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(reference, lambda step: lr_factor(step, config, 2))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(6):
        for model, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        schedule.step()
        for mine, reference_param in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(mine, reference_param)


def test_adamw_trains_a_different_head_than_sgd() -> None:
    sgd, _ = train(TrainConfig(epochs=3))
    adamw, history = train(TrainConfig(epochs=3, optimizer="adamw", lr=0.01))
    assert not torch.allclose(sgd.weight, adamw.weight)
    assert history[-1].test_accuracy == 1.0


def test_weight_decay_shrinks_weights_but_not_biases() -> None:
    groups = param_groups(nn.Linear(8, 2).named_parameters(), lr=0.1, weight_decay=0.5)
    assert [tuple(p.shape) for g in groups for p in g["params"]] == [(2, 8), (2,)]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]  # weight, then bias
    assert [g["lr"] for g in groups] == [0.1, 0.1]
    plain, _ = train(TrainConfig(epochs=10, lr=0.01))
    decayed, _ = train(TrainConfig(epochs=10, lr=0.01, weight_decay=0.5))
    assert decayed.weight.norm() < 0.8 * plain.weight.norm()


def test_training_follows_the_schedule() -> None:
    """With the learning rate cut a millionfold after epoch 1, later epochs barely move the head."""
    one, _ = train(TrainConfig(epochs=1, lr=0.05))
    three, _ = train(TrainConfig(epochs=3, lr=0.05, schedule="step", step_size=1, gamma=1e-6))
    constant, _ = train(TrainConfig(epochs=3, lr=0.05))
    assert torch.allclose(one.weight, three.weight, atol=1e-5)
    assert not torch.allclose(one.weight, constant.weight, atol=1e-3)


def test_label_smoothing_is_in_the_loss() -> None:
    logits, labels = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([0])
    smoothed = make_loss(TrainConfig(label_smoothing=0.3))(logits, labels)
    log_p = logits.log_softmax(dim=1)
    assert smoothed.item() == pytest.approx((-(0.7 * log_p[0, 0]) - 0.1 * log_p[0].sum()).item())
    _, plain = train(TrainConfig(epochs=10))
    _, smooth = train(TrainConfig(epochs=10, label_smoothing=0.3))
    assert smooth[-1].train_loss > plain[-1].train_loss + 0.2  # the loss cannot reach 0 any more


VALID = "dataset: {root: data}\nbackbone: {name: resnet18}\n"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.optimizer=adam"], r"train.optimizer: Input should be 'sgd' or 'adamw' \(got 'adam'\)"),
        (["train.weight_decay=-0.1"], r"train.weight_decay: .*greater than or equal to 0"),
        (["train.label_smoothing=1"], r"train.label_smoothing: .*less than 1"),
        (["train.schedule=linear"], r"train.schedule: .*'constant', 'step' or 'cosine'"),
        (["train.warmup_epochs=20"], r"train: warmup_epochs \(20\) must be fewer than epochs \(20\)"),
        (["train.schedule=step", "train.gamma=0"], r"train.gamma: .*greater than 0"),
    ],
)
def test_training_keys_are_validated(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(TlxError, match=message):
        load_recipe(write_recipe(tmp_path / "r.yaml", VALID), tuple(overrides))
