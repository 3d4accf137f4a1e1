"""The folds of a head trained as one stacked model end where each, trained alone, would."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tlx.recipe import TrainConfig
from tlx.span import in_span, narrowable, span_basis
from tlx.stacked import stackable, train_stacked
from tlx.tensors import Features
from tlx.train import class_weights, train_head

#: fold sizes whose epochs differ in steps at batch size 4 (4, 5 and 4 steps) and in their last batch
SIZES = (15, 17, 16)


def folds(sizes: tuple[int, ...] = SIZES, classes: int = 3, width: int = 6) -> list[Features]:
    g = torch.Generator().manual_seed(0)
    return [Features(torch.randn(n, width, generator=g), torch.arange(n) % classes, []) for n in sizes]


def heads(k: int, bias: bool = True) -> list[nn.Linear]:
    made = []
    for _ in range(k):
        torch.manual_seed(3)
        made.append(nn.Linear(6, 3, bias=bias))
    return made


@pytest.mark.parametrize(
    ("options", "bias"),
    [
        ({}, True),
        ({"class_weight": "balanced", "label_smoothing": 0.1, "weight_decay": 0.01}, True),
        ({"momentum": 0.0}, False),
        ({"schedule": "cosine", "warmup_epochs": 1}, True),  # all folds of SIZES[:1] * 3: the same steps
    ],
)
def test_each_fold_ends_where_it_would_alone(options: dict, bias: bool) -> None:
    config = TrainConfig(epochs=4, lr=0.05, batch_size=4, **options)
    fits = folds(SIZES[:1] * 3 if "schedule" in options else SIZES)
    stacked, alone = heads(len(fits), bias), heads(len(fits), bias)
    weights = [class_weights(f.y, 3, config.class_weight) for f in fits]
    assert stackable(stacked, fits, config)

    train_stacked(stacked, fits, config, seed=7, weights=weights)

    for head, fit, weight in zip(alone, fits, weights):
        train_head(head, fit, fit, config, seed=7, on_epoch=lambda e: None, weight=weight)
    for ours, theirs in zip(stacked, alone):
        for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert not torch.equal(ours.weight, heads(1, bias)[0].weight)  # it did train


def mlps(k: int, width: int = 6, dropout: float = 0.0) -> list[nn.Sequential]:
    made = []
    for _ in range(k):
        torch.manual_seed(3)
        made.append(nn.Sequential(nn.Linear(width, 5), nn.GELU(), nn.Dropout(dropout), nn.Linear(5, 3)))
    return made


@pytest.mark.parametrize("narrowed", [False, True])
def test_mlp_folds_end_where_they_would_alone(narrowed: bool) -> None:
    config = TrainConfig(epochs=4, lr=0.05, batch_size=4, class_weight="balanced")
    width = 128 if narrowed else 6  # narrowed: over twice as many features as the folds' rows
    fits = folds(width=width)
    stacked, alone = mlps(len(fits), width), mlps(len(fits), width)
    weights = [class_weights(f.y, 3, config.class_weight) for f in fits]
    trained, inputs = stacked, fits
    if narrowed:  # as selection_score does: one basis spanning every fold's rows
        basis = span_basis(torch.cat([fit.x for fit in fits]))
        assert narrowable(stacked[0], config)
        spans = [in_span(head, basis) for head in stacked]
        trained, inputs = [s.narrow for s in spans], [s.features(f) for s, f in zip(spans, fits)]
    assert stackable(trained, inputs, config)

    train_stacked(trained, inputs, config, seed=7, weights=weights)
    for span in spans if narrowed else []:
        span.write_back()

    for head, fit, weight in zip(alone, fits, weights):
        train_head(head, fit, fit, config, seed=7, on_epoch=lambda e: None, weight=weight)
    for ours, theirs in zip(stacked, alone):
        for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert not torch.equal(ours[0].weight, mlps(1, width)[0][0].weight)  # it did train


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
    assert not stackable(heads(3), fits, TrainConfig(optimizer="adamw"))
    # the folds' epochs differ in steps, and the learning rate depends on the step within the epoch
    assert not stackable(heads(3), fits, TrainConfig(schedule="cosine"))
    assert not stackable(heads(3), fits, TrainConfig(warmup_epochs=1))
    assert stackable(heads(3), fits, TrainConfig(schedule="cosine", batch_size=32))  # one step each
