"""The one training loop: a head's steps are exactly torch.optim.SGD's (fused, as tlx runs it), and the
folds of a selection, trained stacked, end where each, trained alone, would."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import assert_user_error, recipe_for
from tests.test_run import EPOCH_LINE
from tlx.errors import TlxError
from tlx.recipe import TrainConfig
from tlx.tensors import Features
from tlx.train import class_weights, stackable, train_head, train_heads

#: fold sizes whose epochs differ in steps at batch size 4 (4, 5 and 4 steps) and in their last batch
SIZES = (15, 17, 16)


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


def folds(sizes: tuple[int, ...] = SIZES, classes: int = 3, width: int = 6) -> list[Features]:
    g = torch.Generator().manual_seed(0)
    return [Features(torch.randn(n, width, generator=g), torch.arange(n) % classes, []) for n in sizes]


def linears(k: int, bias: bool = True) -> list[nn.Linear]:
    made = []
    for _ in range(k):
        torch.manual_seed(3)
        made.append(nn.Linear(6, 3, bias=bias))
    return made


def mlps(k: int, width: int = 6, dropout: float = 0.0) -> list[nn.Sequential]:
    made = []
    for _ in range(k):
        torch.manual_seed(3)
        made.append(nn.Sequential(nn.Linear(width, 5), nn.GELU(), nn.Dropout(dropout), nn.Linear(5, 3)))
    return made


def assert_alone_and_together_agree(make: object, fits: list[Features], config: TrainConfig) -> None:
    together, alone = make(len(fits)), make(len(fits))  # type: ignore[operator]
    weights = [class_weights(f.y, 3, config.class_weight) for f in fits]
    torch.manual_seed(0)  # dropout's masks: the same draws, in the same order
    train_heads(together, fits, config, seed=7, weights=weights)
    torch.manual_seed(0)
    for head, fit, weight in zip(alone, fits, weights):
        train_heads([head], [fit], config, seed=7, weights=[weight])
    for ours, theirs in zip(together, alone):
        for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        first = make(1)[0].state_dict()  # type: ignore[operator]
        assert any(not torch.equal(v, first[k]) for k, v in ours.state_dict().items())  # it did train


@pytest.mark.parametrize(
    ("options", "bias"),
    [
        ({}, True),
        ({"class_weight": "balanced", "label_smoothing": 0.1, "weight_decay": 0.01}, True),
        ({"momentum": 0.0}, False),
        ({"schedule": "cosine", "warmup_epochs": 1}, True),  # all folds of SIZES[:1] * 3: the same steps
    ],
)
def test_stacked_folds_end_where_each_would_alone(options: dict, bias: bool) -> None:
    config = TrainConfig(epochs=4, lr=0.05, batch_size=4, **options)
    fits = folds(SIZES[:1] * 3 if "schedule" in options else SIZES)
    assert stackable(linears(len(fits), bias), fits, config)
    assert_alone_and_together_agree(lambda k: linears(k, bias), fits, config)


def test_stacked_mlp_folds_end_where_each_would_alone() -> None:
    config = TrainConfig(epochs=4, lr=0.05, batch_size=4, class_weight="balanced")
    assert stackable(mlps(3), folds(), config)
    assert_alone_and_together_agree(mlps, folds(), config)


def test_what_cannot_be_stacked_exactly_trains_one_by_one() -> None:
    fits = folds()
    assert not stackable(mlps(3, dropout=0.1), fits, TrainConfig())  # other random masks than alone
    wide = [nn.Sequential(nn.Linear(1280, 512), nn.ReLU(), nn.Linear(512, 2)) for _ in fits]
    assert not stackable(wide, fits, TrainConfig())  # k copies would not fit the cache
    frozen = mlps(3)
    for head in frozen:
        head[0].requires_grad_(False)
    assert not stackable(frozen, fits, TrainConfig())

    class Residual(nn.Sequential):  # its own forward: its layers in turn are not what it computes
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self[1](x + self[0](x))

    assert not stackable([Residual(nn.Linear(6, 6), nn.Linear(6, 3)) for _ in fits], fits, TrainConfig())
    assert not stackable(linears(3), fits, TrainConfig(optimizer="adamw"))
    # the folds' epochs differ in steps, and the learning rate depends on the step within the epoch
    assert not stackable(linears(3), fits, TrainConfig(schedule="cosine"))
    assert not stackable(linears(3), fits, TrainConfig(warmup_epochs=1))
    assert stackable(linears(3), fits, TrainConfig(schedule="cosine", batch_size=32))  # one step each
    # what is not stackable trains one by one, in the same loop: exactly as alone
    assert_alone_and_together_agree(lambda k: mlps(k, dropout=0.1), fits, TrainConfig(epochs=2, lr=0.05))
    assert_alone_and_together_agree(linears, fits, TrainConfig(epochs=2, optimizer="adamw"))


#: a step this large sends every weight past the largest float at once
DIVERGING = {"lr": 1e30, "weight_decay": 1e30}


def test_a_diverging_head_stops_at_its_first_epoch_naming_the_rates() -> None:
    train = folds()[0]
    epochs: list = []
    with pytest.raises(TlxError) as info:
        train_head(linears(1)[0], train, train, TrainConfig(**DIVERGING), seed=0, on_epoch=epochs.append)
    assert str(info.value) == (
        "training diverged at epoch 1: the loss is nan; "
        "lower train.lr (now 1e+30) or train.weight_decay (now 1e+30)"
    )
    assert epochs == []  # no epoch of a broken head is reported


@pytest.mark.parametrize("make", [linears, lambda k: mlps(k, dropout=0.1)])  # stacked, one by one
def test_diverging_folds_stop_at_their_first_epoch(make: object) -> None:
    config, fits = TrainConfig(**DIVERGING), folds()
    weights = [None] * len(fits)
    with pytest.raises(TlxError, match=r"^training diverged at epoch 1: .*lower train\.lr \(now 1e\+30\)"):
        train_heads(make(len(fits)), fits, config, seed=0, weights=weights)  # type: ignore[operator]


def test_a_diverging_run_is_one_line_and_leaves_no_run_folder(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, invoke
) -> None:
    recipe_for(tmp_path, tiny_dataset)
    out = tmp_path / "out"
    result = invoke(
        "run", tmp_path / "r.yaml", "--out", out, "--set", "train.lr=1e30", "--set", "train.weight_decay=1e30"
    )
    assert_user_error(result, "training diverged at epoch 1", "lower train.lr (now 1e+30)")
    assert not EPOCH_LINE.search(result.stdout)  # no epoch of a broken head is reported
    assert not out.exists()
