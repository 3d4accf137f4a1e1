"""Recipe loading: YAML problems, schema validation messages, --set overrides, bundled recipes by name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import tlx
from tlx.errors import TlxError
from tlx.recipe import BUNDLED, apply_overrides, find_recipe, load_recipe

from .conftest import assert_user_error, run_tlx, write_recipe

VALID = """
dataset: {root: data}
backbone: {name: resnet18}
"""


def error_of(path: str | Path, *overrides: str) -> str:
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
    paths = sorted(BUNDLED.glob("*.yaml"))
    assert len(paths) == 4
    for path in paths:
        assert load_recipe(path).backbone.name


# --- a recipe argument is a file or a bundled recipe's name --------------------------------------


def test_a_bundled_recipe_is_found_by_name_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_recipe("hymenoptera-lite0").backbone.name == "tf_efficientnet_lite0.pypi"
    assert load_recipe("hymenoptera-best.yaml").backbone.name == "tf_efficientnet_lite2.pypi"
    assert find_recipe("hymenoptera") == BUNDLED / "hymenoptera.yaml"


def test_a_file_that_exists_wins_over_a_bundled_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_recipe(tmp_path / "hymenoptera-lite0", VALID)
    write_recipe(tmp_path / "hymenoptera-best.yaml", VALID)
    assert load_recipe("hymenoptera-lite0").backbone.name == "resnet18"
    assert load_recipe("hymenoptera-best.yaml").backbone.name == "resnet18"


def test_an_unknown_name_lists_the_bundled_recipes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert error_of("hymenoptera-lit0") == (
        "hymenoptera-lit0: no such recipe file, and no bundled recipe of that name (bundled: hymenoptera, "
        "hymenoptera-best, hymenoptera-finetune, hymenoptera-lite0); did you mean hymenoptera-lite0?"
    )
    assert "did you mean" not in error_of("flowers")


def test_a_missing_path_with_a_folder_is_a_missing_file_not_a_name(tmp_path: Path) -> None:
    path = tmp_path / "hymenoptera-lite0.yaml"
    assert error_of(path) == f"{path}: recipe file not found"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ["run", "hymenoptera-lite0", "--set", "train.epochs=0"],
            "train.epochs: Input should be greater than 0",
        ),
        (["audit", "hymenoptera-lite0", "--set", "train.epochs=0"], "train.epochs: Input should be greater"),
        (["sweep", "hymenoptera-lite0"], "hymenoptera-lite0: nothing to sweep"),
        (["run", "hymenoptera-lit0"], "did you mean hymenoptera-lite0?"),
        (["audit", "hymenoptera-lit0"], "did you mean hymenoptera-lite0?"),
        (["sweep", "hymenoptera-lit0"], "did you mean hymenoptera-lite0?"),
    ],
)
def test_every_command_takes_a_bundled_name(
    args: list[str], words: str, tmp_path: Path, monkeypatch, invoke
) -> None:
    """Each command reads the bundled recipe (its own check then fails, before any work) or names it."""
    monkeypatch.chdir(tmp_path)
    assert_user_error(invoke(*args), words)
    assert not any(tmp_path.iterdir())


def test_the_python_api_takes_a_bundled_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TlxError, match=r"train\.epochs: Input should be greater than 0"):
        tlx.fit("hymenoptera-lite0", {"train.epochs": 0})
    for call in (tlx.fit, tlx.audit, tlx.sweep):
        with pytest.raises(TlxError, match="did you mean hymenoptera-lite0"):
            call("hymenoptera-lit0")


def test_tlx_recipes_lists_name_description_and_path(tmp_path: Path) -> None:
    listed = run_tlx("recipes", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    names = ["hymenoptera", "hymenoptera-best", "hymenoptera-finetune", "hymenoptera-lite0"]
    assert [row["name"] for row in rows] == names
    text = run_tlx("recipes", cwd=tmp_path).stdout
    for row in rows:
        path = Path(row["path"])
        assert path == BUNDLED / f"{row['name']}.yaml"
        assert path.read_text(encoding="utf-8").startswith(f"# {row['description']}\n")
        assert re.search(rf"^{row['name']} +{re.escape(row['description'])}$", text, re.M)
    assert f"(in {BUNDLED};" in text


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
