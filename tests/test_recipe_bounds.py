"""Bad recipe input gives a quick one-line error naming its source: bounds, ``~``, --set blame, seed."""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from tlx.default_plugins.datasets import FolderOptions, ImageFolderOptions, ManifestOptions
from tlx.errors import TlxError
from tlx.recipe import MAX_BYTES, MAX_DEPTH, MAX_SEED, MAX_VALUES, load_recipe

from .conftest import TLX, assert_user_error, write_recipe

VALID = "dataset: {root: data}\nbackbone: {name: resnet18}\n"

#: "billion laughs": nine levels of nine aliases each, 9**9 strings once expanded, in under 400 bytes
LAUGHS = "[" + ",".join(
    [f"&a0 [{','.join(['lol'] * 9)}]"] + [f"&a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
) + "]"  # fmt: skip


def error_of(path: Path, *overrides: str, within_s: float = 10.0) -> str:
    """The one-line error of loading ``path`` with ``overrides``, which must come within ``within_s``."""
    started = time.perf_counter()
    with pytest.raises(TlxError) as info:
        load_recipe(path, overrides)
    assert time.perf_counter() - started < within_s
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message[:1000]
    return message


@pytest.fixture
def valid(tmp_path: Path) -> Path:
    return write_recipe(tmp_path / "r.yaml", VALID)


def test_alias_bomb_in_a_file_is_refused(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", f"{VALID}head: {{type: mlp, hidden: {LAUGHS}}}\n")
    assert len(LAUGHS) < 400
    message = error_of(path)
    assert str(path) in message and f"more than {MAX_VALUES} values" in message and "alias" in message


def test_alias_bomb_in_a_set_names_the_set(valid: Path) -> None:
    message = error_of(valid, f"head.hidden={LAUGHS}")
    assert message.startswith("--set head.hidden: ") and f"more than {MAX_VALUES} values" in message


def test_alias_inside_its_own_anchor_is_refused(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", f"{VALID}head: &h {{type: mlp, more: [*h]}}\n")
    assert "alias *h is inside its own anchor" in error_of(path)


def test_aliases_that_stay_small_still_work(tmp_path: Path) -> None:
    text = f"{VALID}head: {{type: mlp, hidden: [&w 64, *w]}}\ntrain: {{epochs: &e 3, step_size: *e}}\n"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", text))
    assert recipe.head.options["hidden"] == [64, 64] and recipe.train.step_size == 3


def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path: Path, valid: Path) -> None:
    deep = "[" * 50_000 + "]" * 50_000
    path = write_recipe(tmp_path / "deep.yaml", f"{VALID}head: {{hidden: {deep}}}\n")
    assert f"nested more than {MAX_DEPTH} levels deep" in error_of(path)
    assert error_of(valid, f"head.hidden={deep}").startswith("--set head.hidden: nested more than")


def test_a_key_of_very_many_parts_is_refused(valid: Path) -> None:
    message = error_of(valid, ".".join(["head"] * 100_000) + "=1")
    assert f"more than {MAX_DEPTH} parts" in message


def test_a_file_larger_than_the_bound_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(VALID + "head: {hidden: [" + "1," * (MAX_BYTES // 2) + "]}\n")
    message = error_of(path, within_s=2.0)
    assert str(path) in message and f"larger than {MAX_BYTES} bytes" in message


def test_a_long_list_is_refused_once_past_the_bound(tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", VALID + "head: {hidden: [" + "1," * (MAX_VALUES + 10) + "]}\n")
    assert f"more than {MAX_VALUES} values" in error_of(path)


def test_a_huge_set_value_is_refused(valid: Path) -> None:
    message = error_of(valid, "seed=" + "9" * (MAX_BYTES + 1), within_s=2.0)
    assert message.startswith("--set seed: ") and f"longer than {MAX_BYTES} characters" in message


@pytest.mark.parametrize("where", ["file", "set"])
def test_long_values_are_cut_in_errors(tmp_path: Path, where: str) -> None:
    value = "x" * 100_000
    path = write_recipe(tmp_path / "r.yaml", VALID + (f"seed: {value}\n" if where == "file" else ""))
    message = error_of(path, *([f"seed={value}"] if where == "set" else []))
    assert "seed" in message and "more characters)" in message


def test_long_keys_are_cut_in_errors(valid: Path) -> None:
    message = error_of(valid, f"train.{'k' * 100_000}=1")
    assert message.startswith("--set train.kkk") and "unknown key" in message


def test_the_run_command_refuses_an_alias_bomb_at_once(tmp_path: Path, valid: Path) -> None:
    """In a subprocess: unbounded, quoting the value in an error would expand it to 9**9 strings."""
    command = [*TLX, "run", str(valid), "--set", f"seed={LAUGHS}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("tlx: error: --set seed: more than")


# ~ in paths


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    return folder


def test_backbone_weights_expand_the_home_folder(home: Path, valid: Path) -> None:
    assert load_recipe(valid, ("backbone.weights=~/w.pth",)).backbone.weights == home / "w.pth"


@pytest.mark.parametrize(
    ("model", "values", "field"),
    [
        (ImageFolderOptions, {"root": "~/data"}, "root"),
        (FolderOptions, {"root": "~/data"}, "root"),
        (ManifestOptions, {"manifest": "~/data", "test_manifest": "~/data"}, "manifest"),
        (ManifestOptions, {"manifest": "x.csv", "test_manifest": "~/data"}, "test_manifest"),
    ],
)
def test_dataset_paths_expand_the_home_folder(
    home: Path, model: type[BaseModel], values: dict, field: str
) -> None:
    assert getattr(model.model_validate(values), field) == home / "data"


def test_an_unknown_user_home_is_a_recipe_error(valid: Path) -> None:
    message = error_of(valid, "backbone.weights=~no-such-user-tlx/w.pth")
    assert message.startswith("--set backbone.weights") and "~no-such-user-tlx" in message


def test_a_run_finds_its_data_under_the_home_folder(
    home: Path, tiny_dataset: Path, tmp_path: Path, invoke, counting_backbone
) -> None:
    tiny_dataset.rename(home / "tiny")
    text = "dataset: {root: ~/tiny}\nbackbone: {name: counting}\nextract: {workers: 0}\ntrain: {epochs: 2}\n"
    result = invoke("run", write_recipe(tmp_path / "r.yaml", text), "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert counting_backbone.seen > 0


# a --set is blamed for its own errors


@pytest.mark.parametrize("value", ["oops", "[64,", "[0]"])
def test_a_bad_plugin_option_from_set_names_the_set(tmp_path: Path, invoke, value: str) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml", "dataset: {root: data}\nbackbone: {name: resnet18}\nhead: {type: mlp}\n"
    )
    result = invoke("run", recipe, "--set", f"head.hidden={value}", "--out", tmp_path / "out")
    line = assert_user_error(result, "--set head.hidden")
    assert str(recipe) not in line
    assert not (tmp_path / "out").exists()


def test_a_bad_dataset_option_from_set_names_the_set(tmp_path: Path, invoke) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml", "dataset: {kind: folder, root: d}\nbackbone: {name: resnet18}\n"
    )
    result = invoke("run", recipe, "--set", "dataset.test_fraction=2")
    assert_user_error(result, "--set dataset.test_fraction", "less than 1")


def test_a_plugin_option_from_the_file_still_names_the_file(tmp_path: Path, invoke) -> None:
    text = "dataset: {root: data}\nbackbone: {name: resnet18}\nhead: {type: mlp, hidden: oops}\n"
    recipe = write_recipe(tmp_path / "r.yaml", text)
    assert_user_error(invoke("run", recipe, "--set", "seed=1"), str(recipe), "head.hidden")


@pytest.mark.parametrize(
    ("override", "blamed"),
    [
        ("train={epoch: 5}", "--set train: unknown key train.epoch"),
        ("train.warmup_epochs=30", "--set train.warmup_epochs: train: warmup_epochs (30)"),
        ("finetune.augment=false", "--set finetune.augment: finetune: applies to strategy: finetune"),
    ],
)
def test_errors_under_or_above_a_set_key_name_the_set(valid: Path, override: str, blamed: str) -> None:
    assert error_of(valid, override).startswith(blamed)


# seed


@pytest.mark.parametrize("seed", [str(2**64), str(MAX_SEED + 1), "-1"])
def test_a_seed_out_of_range_is_a_recipe_error(tmp_path: Path, invoke, seed: str) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", "dataset: {root: data}\nbackbone: {name: resnet18}\n")
    result = invoke("run", recipe, "--set", f"seed={seed}")
    assert_user_error(result, "--set seed", seed)


@pytest.mark.parametrize("seed", [0, MAX_SEED])
def test_every_seed_allowed_seeds_random_and_torch(valid: Path, seed: int) -> None:
    recipe = load_recipe(valid, (f"seed={seed}",))
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    assert torch.Generator().manual_seed(recipe.seed).initial_seed() == seed


# numbers


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=.inf", "train.lr"),
        ("train.weight_decay=.inf", "train.weight_decay"),
        ("finetune.backbone_lr=inf", "finetune.backbone_lr"),
        ("head={type: logreg, l2: [0.1, .inf]}", "head.l2.1"),
    ],
)
def test_a_number_that_is_not_finite_is_a_recipe_error(
    tmp_path: Path, valid: Path, invoke, override: str, key: str
) -> None:
    strategy = "finetune" if key.startswith("finetune") else "features"
    result = invoke("run", valid, "--set", override, "--set", f"strategy={strategy}", "--out", tmp_path / "o")
    assert_user_error(result, f"--set {override.split('=')[0]}: {key}: Input should be a finite number")
    assert not (tmp_path / "o").exists()
