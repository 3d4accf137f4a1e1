"""The cosine head plugin: registered through its entry point, its maths, and that it learns."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from tlx_prototype_head import CosineOptions
from tlx_prototype_head.head import CosineHead

from tlx import plugins, validate_options
from tlx.cli import cli
from tlx.components import resolve, with_head_defaults
from tlx.errors import TlxError
from tlx.recipe import Recipe, TrainConfig, make_recipe
from tlx.report import QuietConsole
from tlx.tensors import Features
from tlx.train import train_head


@pytest.fixture(autouse=True)
def _fresh_plugins():
    plugins.load.cache_clear()
    yield
    plugins.load.cache_clear()


def test_entry_point_registers_the_cosine_head() -> None:
    entry = plugins.load().heads.get("cosine", "head.type")
    assert entry.plugin == "tlx-prototype-head" and entry.options is CosineOptions
    info = next(p for p in plugins.load().plugins if p.name == "tlx-prototype-head")
    assert info.error is None and not info.builtin


def test_tlx_list_shows_the_head_and_its_plugin() -> None:
    result = CliRunner().invoke(cli, ["list", "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    assert {"name": "cosine", "plugin": "tlx-prototype-head"}.items() <= next(
        h for h in listing["heads"] if h["name"] == "cosine"
    ).items()
    assert any(p["name"] == "tlx-prototype-head" and p["error"] is None for p in listing["plugins"])


def test_logits_are_scaled_cosines_and_ignore_feature_length() -> None:
    torch.manual_seed(0)
    head = CosineHead(8, 3, scale=5.0, learn_scale=False)
    x = torch.randn(10, 8)
    logits = head(x)
    assert logits.shape == (10, 3)
    assert torch.allclose(head(7.5 * x), logits, atol=1e-5)
    assert logits.abs().max() <= 5.0 + 1e-5
    expected = 5.0 * torch.nn.functional.cosine_similarity(x[:, None], head.prototypes[None], dim=2)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_scale_is_fixed_unless_learned() -> None:
    assert [n for n, _ in CosineHead(4, 2, 16.0, learn_scale=False).named_parameters()] == ["prototypes"]
    assert {n for n, _ in CosineHead(4, 2, 16.0, learn_scale=True).named_parameters()} == {
        "prototypes",
        "log_scale",
    }


def test_it_learns_classes_told_apart_by_direction_not_length() -> None:
    """Class 0 points one way, class 1 another; lengths vary wildly within each class."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 2
    directions = torch.stack([torch.tensor([1.0, 0.2, 0.0, 0.0]), torch.tensor([0.0, 0.2, 1.0, 0.0])])
    length = torch.rand(60, 1, generator=g) * 50 + 0.1
    x = length * (directions[y] + 0.1 * torch.randn(60, 4, generator=g))
    torch.manual_seed(0)
    entry = plugins.load().heads.get("cosine", "head.type")
    head = entry.factory(4, 2, validate_options(entry, {"scale": 10}, "head", "r.yaml"))
    history = train_head(
        head, Features(x[:40], y[:40], []), Features(x[40:], y[40:], []), TrainConfig(epochs=15, lr=0.05),
        seed=0, on_epoch=lambda e: None,
    )  # fmt: skip
    assert history[-1].test_accuracy == 1.0
    assert history[-1].train_loss < history[0].train_loss


def test_options_are_validated_with_their_key() -> None:
    entry = plugins.load().heads.get("cosine", "head.type")
    with pytest.raises(TlxError, match=r"head.scale: Input should be greater than 0"):
        validate_options(entry, {"scale": 0}, "head", "r.yaml")
    with pytest.raises(TlxError, match=r"unknown key head.scales; did you mean head.scale"):
        validate_options(entry, {"scales": 3}, "head", "r.yaml")
    with pytest.raises(TlxError, match=r"head.scale: Input should be a finite number"):
        validate_options(entry, {"scale": float("inf")}, "head", "r.yaml")  # every logit would be nan


def _resolved(overrides: tuple[str, ...], train: dict | None = None) -> tuple[Recipe, list[str]]:
    """The recipe a run trains with (the head's defaults applied), and its summary lines."""
    data = {"dataset": {"root": "."}, "backbone": {"name": "resnet18"}, "head": {"type": "cosine"}}
    if train is not None:
        data["train"] = train
    recipe = make_recipe(data, overrides, source="r.yaml")
    parts = resolve(recipe, "r.yaml")
    trained = with_head_defaults(recipe, parts)
    lines: list[str] = []
    console = QuietConsole()
    console.echo = lines.append  # type: ignore[method-assign]
    console.training(trained, parts.head_options, False, parts.head_train)
    return trained, lines


def test_the_cosine_head_trains_at_its_own_lr_unless_the_recipe_sets_one() -> None:
    recipe, lines = _resolved(())
    assert recipe.train.lr == 0.1 and recipe.train.epochs == 20  # the head's default; the rest tlx's
    assert "lr=0.1 (cosine's default)" in lines[1]
    for overrides, train in (
        ((), {"lr": 0.001}),
        (("train.lr=0.02",), None),
        (("train.lr=0.02",), {"lr": 0.3}),
    ):
        recipe, lines = _resolved(overrides, train)
        assert recipe.train.lr == (0.02 if overrides else 0.001)  # an explicit value wins, --set first
        assert "default" not in lines[1]


def test_a_sweep_over_head_types_trains_each_at_its_own_default(tmp_path) -> None:
    from tlx.sweeps import plan

    path = tmp_path / "sweep.yaml"
    path.write_text("dataset: {root: .}\nbackbone: {name: resnet18}\nsweep: {head.type: [linear, cosine]}\n")
    found = {c.recipe.head.type: c.recipe.train.lr for c in plan(path, None, ())}
    assert found == {"linear": 0.001, "cosine": 0.1}
