"""tlx compare on run folders that are not as their runs wrote them: each read through one validated model."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import yaml

from tlx.run import run

from .conftest import assert_user_error, recipe_for


@pytest.fixture
def sweep(tmp_path: Path, tiny_dataset: Path, counting_backbone) -> Path:
    """A folder of three runs: ``a``, and ``b`` and ``c`` (copies of ``a`` with another learning rate)."""
    folder = tmp_path / "sweep"
    run(recipe_for(tmp_path, tiny_dataset, "train.epochs=1", "extract.runtime=torch"), "r", folder / "a")
    for name, lr in (("b", 0.5), ("c", 0.25)):
        shutil.copytree(folder / "a", folder / name)
        recipe = yaml.safe_load((folder / name / "recipe.yaml").read_text())
        recipe["train"]["lr"] = lr
        (folder / name / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


def edit_metrics(folder: Path, **values: object) -> None:
    """Set keys of ``folder``'s metrics.json; a value of ``None`` removes the key."""
    metrics = json.loads((folder / "metrics.json").read_text())
    for key, value in values.items():
        if value is None:
            metrics.pop(key)
        else:
            metrics[key] = value
    (folder / "metrics.json").write_text(json.dumps(metrics))


def assert_left_out(result, folder: Path, *words: str) -> None:
    """Exit code 2; the other runs in the table; one warning naming ``folder``'s file and ``words``."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    shown = result.stdout.splitlines()[1:]
    assert [line.split()[0] for line in shown] == [
        str(folder.parent / name) for name in "abc" if name != folder.name
    ]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("tlx: warning:")]
    assert len(warnings) == 1 and str(folder) in warnings[0], result.stderr
    for word in words:
        assert word in warnings[0], warnings[0]
    assert result.stderr.strip().splitlines()[-1] == (
        "tlx: error: 1 of 3 runs are damaged (listed above); restore their files, or compare the others only"
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("NaN", "finite number"),
        ("1e309", "finite number"),  # infinity, as Python's json reads it
        ("true", "valid number"),
        ("1.5", "less than or equal to 1"),
        ('"0.9"', "valid number"),
    ],
)
def test_an_accuracy_no_run_writes_is_named_not_shown(sweep: Path, text: str, problem: str, invoke) -> None:
    metrics = sweep / "b" / "metrics.json"
    edited = metrics.read_text().replace('"test_accuracy": ', f'"test_accuracy": {text}, "was": ', 1)
    metrics.write_text(edited)
    result = invoke("compare", sweep)
    assert_left_out(result, sweep / "b", "metrics.json: test_accuracy: ", problem, "restore the file")
    assert "nan%" not in result.stdout and "inf%" not in result.stdout


DAMAGE = {
    "selection a string": (dict(selection="high"), "selection: Input should be a valid dictionary"),
    "selection mean a string": (
        dict(selection={"mean": "x", "std": 0, "scores": [1], "selected_by": "", "seconds": 1}),
        "selection.mean: Input should be a valid number",
    ),
    "no seconds": (dict(seconds=None), "missing required key seconds"),
    "seconds a string": (dict(seconds="12"), "seconds: Input should be a valid dictionary"),
    "total seconds negative": (
        dict(seconds={"extract": 0, "train": 0, "total": -1}),
        "seconds.total: Input should be greater than or equal to 0",
    ),
    "no test accuracy": (dict(test_accuracy=None), "missing required key test_accuracy"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_run_is_left_out_and_the_others_are_shown(sweep: Path, case: str, invoke) -> None:
    values, words = DAMAGE[case]
    edit_metrics(sweep / "b", **values)
    assert_left_out(invoke("compare", sweep), sweep / "b", f"{sweep / 'b' / 'metrics.json'}: {words}")


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda f: (f / "metrics.json").write_text("[1, 2]"), "metrics.json: holds a list, not a mapping"),
        (lambda f: (f / "metrics.json").write_text("{not json"), "metrics.json: cannot read it (JSONDecode"),
        (lambda f: (f / "metrics.json").write_text("[" * 99_999), "metrics.json: cannot read it (Recursion"),
        (lambda f: (f / "recipe.yaml").unlink(), "recipe.yaml: recipe file not found"),
        (lambda f: (f / "recipe.yaml").write_text("- a list"), "recipe.yaml: a recipe is a mapping"),
    ],
)
def test_an_unreadable_run_file_leaves_the_run_out(sweep: Path, damage, words: str, invoke) -> None:
    damage(sweep / "b")
    assert_left_out(invoke("compare", sweep), sweep / "b", words)


def test_json_lists_the_readable_runs_and_warns_of_the_damaged(sweep: Path, invoke) -> None:
    edit_metrics(sweep / "c", test_accuracy=float("nan"))
    result = invoke("compare", sweep, "--json")
    assert result.exit_code == 2
    assert [(r["run"], r["train.lr"]) for r in json.loads(result.stdout)] == [
        (str(sweep / "a"), 0.001),
        (str(sweep / "b"), 0.5),
    ]
    assert f"{sweep / 'c' / 'metrics.json'}: test_accuracy" in result.stderr


def test_a_recipe_alias_bomb_is_refused_by_the_bounded_reader(sweep: Path, invoke) -> None:
    """Each level multiplies the values by ten: the fourth passes the reader's 10,000, read as a few bytes."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 5)]
    (sweep / "b" / "recipe.yaml").write_text("\n".join(lines) + "\n")
    assert_left_out(invoke("compare", sweep), sweep / "b", "recipe.yaml: line 4: more than 10000 values")


def test_a_sweep_folder_that_cannot_be_listed_is_a_one_line_error(
    tmp_path: Path, invoke, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As another user's folder would be; simulated, since the tests may run as root."""

    def denied(path: Path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(Path, "iterdir", denied)
    result = invoke("compare", tmp_path)
    assert_user_error(result, f"{tmp_path}: cannot list it", "Permission denied", "permissions")
