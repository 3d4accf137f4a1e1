"""The one training loop: a head's steps are exactly torch.optim.SGD's (fused, as tlx runs it), and the
folds of a selection, trained stacked, end where each, trained alone, would."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import assert_user_error, recipe_for
from tests.test_run import EPOCH_LINE
from tlx.data import load_image, scan_class_folder
from tlx.errors import TlxError
from tlx.folds import fold_ids, hold_out
from tlx.recipe import TrainConfig
from tlx.tensors import Features
from tlx.train import class_weights, out_of_fold, stackable, train_head, train_heads

from .conftest import GROUPED, make_grouped_folder

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


def grouped_features(root: Path, objects: dict[str, int]) -> tuple[Features, list[str]]:
    """Mean colours of real grouped images as features, and the group of each."""
    train = scan_class_folder(make_grouped_folder(root, objects), 0.1, 0, re.compile(GROUPED)).train
    x = torch.tensor(np.array([np.asarray(load_image(p), np.float32).mean((0, 1)) for p, _ in train.samples]))
    assert train.groups is not None
    return Features(x, torch.tensor([y for _, y in train.samples]), []), list(train.groups)


def test_a_group_never_spans_two_folds(tmp_path: Path) -> None:
    train, groups = grouped_features(tmp_path / "d", {"a": 12, "b": 9, "c": 7})
    config = TrainConfig(epochs=1)
    held = out_of_fold(lambda: nn.Linear(3, 3), train, config, n_classes=3, seed=4, groups=groups)
    folds_of: dict[str, set[int]] = {}
    for group, fold in zip(groups, held.fold.tolist()):
        folds_of.setdefault(group, set()).add(fold)
    assert held.k == 5 and all(len(f) == 1 for f in folds_of.values())
    assert sorted(set(held.fold.tolist())) == [0, 1, 2, 3, 4]
    assert len(held.accuracies()) == 5
    ungrouped = fold_ids(train.y, 5, 4).tolist()
    assert any(len({f for g, f in zip(groups, ungrouped) if g == group}) > 1 for group in folds_of)
    fit, val = hold_out(Features(torch.arange(len(groups)).unsqueeze(1), train.y, []), 0.25, 4, groups)
    fit_groups = {groups[i] for i in fit.x.flatten().tolist()}
    val_groups = {groups[i] for i in val.x.flatten().tolist()}
    assert not fit_groups & val_groups and fit_groups | val_groups == set(groups) and len(val.y) > 0


def test_a_class_in_one_group_cannot_be_cross_validated(tmp_path: Path) -> None:
    train, groups = grouped_features(tmp_path / "d", {"a": 4, "b": 2})
    groups = [g if g.startswith("a") else "b" for g in groups]  # every photo of b: one object
    with pytest.raises(TlxError, match=r"^selection: a class has 1 group\(s\) of dataset.group, too few"):
        out_of_fold(lambda: nn.Linear(3, 2), train, TrainConfig(), n_classes=2, seed=0, groups=groups)
    with pytest.raises(TlxError, match=r"^train.val_fraction: class '1' has images in 1 group\(s\)"):
        hold_out(train, 0.2, 0, groups)


def test_fold_assignment_without_groups_is_unchanged() -> None:
    y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 2, 2, 2, 2, 0, 1])
    assert fold_ids(y, 3, 7).tolist() == [0, 1, 1, 2, 0, 0, 2, 0, 0, 0, 2, 1, 1, 1]
    _, val = hold_out(Features(torch.arange(14.0).unsqueeze(1), y, []), 0.25, 3)
    assert val.x.flatten().tolist() == [1.0, 2.0, 9.0]


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
