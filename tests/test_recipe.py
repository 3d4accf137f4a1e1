"""Recipe loading: YAML problems, schema validation messages and --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlx.errors import TlxError
from tlx.recipe import apply_overrides, load_recipe

from .conftest import REPO, write_recipe

VALID = """
dataset: {root: data}
backbone: {name: resnet18}
"""


def error_of(path: Path, *overrides: str) -> str:
    with pytest.raises(TlxError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_follow_the_reference(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", VALID))
    assert (recipe.train.epochs, recipe.train.lr, recipe.train.momentum) == (20, 0.001, 0.9)
    assert recipe.head.type == "linear" and recipe.dataset.kind == "imagefolder"
    assert recipe.backbone.pretrained is True and recipe.seed == 0


def test_shipped_recipes_validate() -> None:
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        assert load_recipe(path).backbone.name


def test_misspelled_key_names_path_and_closest_key(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", VALID + "train: {epoch: 5}\n")
    message = error_of(path)
    assert str(path) in message
    assert "unknown key train.epoch" in message and "did you mean train.epochs" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = error_of(write_recipe(tmp_path / "r.yaml", VALID + "backbon: {}\n"))
    assert "unknown key backbon" in message and "did you mean backbone" in message


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    message = error_of(write_recipe(tmp_path / "r.yaml", VALID + "train: {lr: fast}\n"))
    assert "train.lr" in message and "'fast'" in message


@pytest.mark.parametrize("key", ["epochs", "lr", "batch_size"])
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_numbers_are_refused(tmp_path: Path, key: str, value: int) -> None:
    message = error_of(write_recipe(tmp_path / "r.yaml", VALID), f"train.{key}={value}")
    assert f"--set train.{key}" in message and "greater than 0" in message


def test_missing_required_key(tmp_path: Path) -> None:
    message = error_of(write_recipe(tmp_path / "r.yaml", "dataset: {root: x}\nbackbone: {}\n"))
    assert "missing required key backbone.name" in message


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "recipe is empty"),
        ("- a\n- b\n", "not a list"),
        ("dataset: [unclosed\n", "not valid YAML"),
        ("backbone: !!python/object/apply:os.system ['echo hi']\n", "unsupported YAML tag"),
    ],
)
def test_documents_that_are_not_recipes(tmp_path: Path, text: str, words: str) -> None:
    message = error_of(write_recipe(tmp_path / "r.yaml", text))
    assert words in message and "r.yaml" in message


def test_missing_recipe_file(tmp_path: Path) -> None:
    assert "recipe file not found" in error_of(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_values_and_create_sections() -> None:
    data: dict = {"train": {"epochs": 20}}
    keys = apply_overrides(
        data, ("train.epochs=5", "dataset.root=/data/x", "backbone.pretrained=false", "train.lr=0.01")
    )
    assert data["train"] == {"epochs": 5, "lr": 0.01}
    assert data["dataset"] == {"root": "/data/x"} and data["backbone"] == {"pretrained": False}
    assert keys == {"train.epochs", "dataset.root", "backbone.pretrained", "train.lr"}


def test_override_values_keep_equals_signs() -> None:
    data: dict = {}
    apply_overrides(data, ("dataset.root=/data/a=b",))
    assert data == {"dataset": {"root": "/data/a=b"}}


@pytest.mark.parametrize("item", ["train.epochs", "=5", "train..epochs=5"])
def test_malformed_override(item: str) -> None:
    with pytest.raises(TlxError, match="expected KEY=VALUE"):
        apply_overrides({}, (item,))


def test_override_into_a_value_is_refused() -> None:
    with pytest.raises(TlxError, match="seed is a value, not a section"):
        apply_overrides({"seed": 0}, ("seed.x=1",))


def test_override_of_unknown_key_is_reported_as_from_set(tmp_path: Path) -> None:
    message = error_of(write_recipe(tmp_path / "r.yaml", VALID), "train.epohcs=3")
    assert "--set train.epohcs" in message and "did you mean train.epochs" in message


def test_exponent_notation_is_a_number(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", VALID + "train: {lr: 1e-3}\n"), ("seed=1",))
    assert recipe.train.lr == pytest.approx(0.001)


def test_override_wins_over_file(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", VALID), ("train.epochs=3", "seed=7"))
    assert recipe.train.epochs == 3 and recipe.seed == 7
