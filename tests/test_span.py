"""An mlp's first layer trained within the span of its training rows takes plain SGD's steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tlx.recipe import TrainConfig
from tlx.span import in_span, narrowable, span_basis
from tlx.tensors import Features
from tlx.train import class_weights, fit_head, selection_score, train_head

#: over twice as many features as training rows, as with 1280 features of about 245 images
ROWS, WIDTH, CLASSES = 30, 128, 3


def data(n: int = ROWS, seed: int = 0) -> Features:
    g = torch.Generator().manual_seed(seed)
    return Features(torch.randn(n, WIDTH, generator=g).relu(), torch.arange(n) % CLASSES, [])


def mlp(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(WIDTH, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, CLASSES))


def test_training_in_the_span_takes_torch_optim_sgds_steps() -> None:
    train, test = data(), data(12, seed=1)
    config = TrainConfig(epochs=5, lr=0.05, batch_size=4, label_smoothing=0.1, class_weight="balanced")
    head, reference = mlp(dropout=0.3), mlp(dropout=0.3)
    assert narrowable(head, config) and in_span(head, span_basis(train.x)) is not None
    weight = class_weights(train.y, CLASSES, config.class_weight)

    torch.manual_seed(9)  # the dropout masks
    history = train_head(head, train, test, config, seed=1, on_epoch=lambda record: None, weight=weight)

    torch.manual_seed(9)
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD(reference.parameters(), lr=config.lr, momentum=config.momentum)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=0.1)
    for _ in range(config.epochs):
        reference.train()
        order = torch.randperm(ROWS, generator=generator)
        for start in range(0, ROWS, config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad()
            loss_fn(reference(train.x[batch]), train.y[batch]).backward()
            optimizer.step()
        reference.eval()  # as train_head scores every epoch
    for ours, theirs in zip(head.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert not torch.allclose(head[0].weight, mlp()[0].weight)  # the first layer did train
    reference.eval()
    with torch.no_grad():
        expected = (reference(test.x).argmax(1) == test.y).float().mean().item()
    assert history[-1].test_accuracy == pytest.approx(expected)


def test_early_stopping_keeps_the_best_epochs_full_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    config = TrainConfig(epochs=30, lr=0.2, batch_size=4, val_fraction=0.3, patience=2)
    train = data(40)
    assert span_basis(train.x) is not None  # nor then the rows left after the hold-out
    narrowed, plain = mlp(), mlp()
    fit = fit_head(narrowed, train, train, config, n_classes=CLASSES, seed=3, on_epoch=lambda e: None)
    monkeypatch.setattr("tlx.train.in_span", lambda *args: None)
    reference = fit_head(plain, train, train, config, n_classes=CLASSES, seed=3, on_epoch=lambda e: None)

    assert fit.chosen == reference.chosen and fit.chosen["epochs"] < len(fit.history) <= config.epochs
    for ours, theirs in zip(narrowed.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


class Residual(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[1](x + self[0](x))


def frozen_first() -> nn.Sequential:
    head = mlp()
    head[0].requires_grad_(False)
    return head


@pytest.mark.parametrize(
    ("head", "config", "rows"),
    [
        (mlp(), TrainConfig(weight_decay=0.01), ROWS),  # decay shrinks the initial weight too
        (mlp(), TrainConfig(optimizer="adamw"), ROWS),  # per coordinate: not blind to the rotation
        (mlp(), TrainConfig(), WIDTH // 2 + 1),  # over half as many rows as features: little to save
        (nn.Linear(WIDTH, CLASSES), TrainConfig(), ROWS),  # a linear head is bound by overhead
        (nn.Sequential(nn.ReLU(), nn.Linear(WIDTH, CLASSES)), TrainConfig(), ROWS),
        (Residual(nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, CLASSES)), TrainConfig(), ROWS),  # own forward
        (frozen_first(), TrainConfig(), ROWS),  # a first layer that does not train
    ],
)
def test_what_breaks_the_identity_trains_the_full_layer(
    head: nn.Module, config: TrainConfig, rows: int
) -> None:
    assert not narrowable(head, config) or in_span(head, span_basis(data(rows).x)) is None


def test_an_mlps_selection_score_is_the_one_its_full_folds_get(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(CLASSES, WIDTH, generator=g)
    y = torch.arange(45) % CLASSES
    train = Features(centers[y] + 6 * torch.randn(45, WIDTH, generator=g), y, [])
    config = TrainConfig(epochs=6, lr=0.02, batch_size=4)

    def score() -> list[float]:
        return selection_score(mlp(), mlp, train, config, n_classes=CLASSES, seed=4)["scores"]

    assert span_basis(train.x) is not None
    narrowed = score()  # the folds narrowed to one basis and stacked
    monkeypatch.setattr("tlx.train.in_span", lambda *args: None)
    monkeypatch.setattr("tlx.train.stackable", lambda *args: False)
    assert narrowed == score()
    assert 1 / CLASSES < sum(narrowed) / len(narrowed) < 1  # the folds learnt, and not everything
