"""The built-in heads and their options: hidden sizes, dropout, activation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tlx import plugins, validate_options
from tlx.errors import TlxError


def build(kind: str, **values: object) -> nn.Module:
    entry = plugins.load().heads.get(kind, "head.type")
    return entry.factory(16, 3, validate_options(entry, values, "head", "r.yaml"))


def test_linear_head_maps_features_to_class_logits() -> None:
    head = build("linear")
    assert head(torch.zeros(5, 16)).shape == (5, 3)


def test_mlp_hidden_sizes_activation_and_dropout() -> None:
    head = build("mlp", hidden=[32, 8], activation="gelu", dropout=0.25)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 8), (8, 3)]
    assert sum(isinstance(m, nn.GELU) for m in head) == 2
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.25, 0.25]
    head.train()
    x = torch.randn(64, 16)
    assert not torch.equal(head(x), head(x))  # dropout is active while training
    head.eval()
    assert torch.equal(head(x), head(x))


@pytest.mark.parametrize(("name", "kind"), [("relu", nn.ReLU), ("silu", nn.SiLU), ("tanh", nn.Tanh)])
def test_mlp_activations(name: str, kind: type[nn.Module]) -> None:
    assert any(isinstance(m, kind) for m in build("mlp", hidden=[4], activation=name))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"activation": "swish"}, r"head.activation: Input should be 'relu', 'gelu', 'silu' or 'tanh'"),
        ({"hidden": [0]}, r"head.hidden.0: Input should be greater than 0"),
        ({"dropout": 1.0}, r"head.dropout: Input should be less than 1"),
    ],
)
def test_mlp_options_are_validated(values: dict, message: str) -> None:
    with pytest.raises(TlxError, match=message):
        build("mlp", **values)


def test_an_option_of_another_head_says_which_heads_take_it() -> None:
    from tlx.components import resolve
    from tlx.recipe import make_recipe

    data = {"dataset": {"root": "."}, "backbone": {"name": "resnet18"}, "head": {"type": "linear"}}
    recipe = make_recipe(data, ("head.hidden=[64]",), source="r.yaml")
    with pytest.raises(TlxError) as raised:
        resolve(recipe, "r.yaml")
    assert str(raised.value) == (
        "--set head.hidden: unknown key head.hidden; head 'linear' takes no hidden, mlp does"
    )
    recipe = make_recipe({**data, "head": {"type": "linear", "bogus": 1}}, source="r.yaml")
    with pytest.raises(TlxError, match=r"^r.yaml: unknown key head.bogus$"):  # no head takes it: no hint
        resolve(recipe, "r.yaml")
