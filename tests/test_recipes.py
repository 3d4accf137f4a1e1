"""Every shipped recipe that runs offline gives, cold, the accuracy the README states for it.

The figures are read from the README's results table, so a change that moves one fails here until the
README says the new figure (and why, in the same commit). Each run is ``tlx run`` as a user starts it,
with an empty cache: the backbone built, exported, probed and run over all of ants/bees. The best
recipe (flip averaging with ONNX Runtime: the path that once gave 54.25%) is also held to its figure in
every runtime, cold and warm.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tlx.recipe import bundled_recipes

from .conftest import HYMENOPTERA, REPO, run_tlx

#: a row of the README's results table: the bundled recipe's name, then its test accuracy for seed 0
ROW = re.compile(r"^\| `(?P<recipe>[\w.-]+)` \|[^|]*\|[^|]*\| (?P<accuracy>\d+\.\d\d)% ")


def stated() -> dict[str, str]:
    """The README's accuracy for each recipe that has one (the hub's ResNet-18 is not measured here)."""
    rows = (ROW.match(line) for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines())
    return {row["recipe"]: row["accuracy"] for row in rows if row}


def accuracy_of(recipe: str, tmp_path: Path, cache: Path, *overrides: str) -> tuple[str, dict]:
    """``tlx run RECIPE`` (a bundled name) on ants/bees with the cache folder ``cache``: the test accuracy as
    the README writes it, and the metrics."""
    out = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
    sets = [arg for item in ("dataset.root=" + str(HYMENOPTERA), *overrides) for arg in ("--set", item)]
    env = {"TLX_CACHE_DIR": str(cache)}
    result = run_tlx("run", recipe, *sets, "--out", out, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning" not in result.stderr, result.stderr  # no fallback, no probe that failed
    metrics = json.loads((out / "metrics.json").read_text())
    return f"{100 * metrics['test_accuracy']:.2f}", metrics


def test_the_readme_states_a_figure_for_every_offline_recipe() -> None:
    offline = {r.name for r in bundled_recipes()} - {"hymenoptera"}
    assert set(stated()) == offline


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(stated()))
def test_a_shipped_recipe_gives_its_readme_figure_cold(recipe: str, tmp_path: Path) -> None:
    accuracy, metrics = accuracy_of(recipe, tmp_path, tmp_path / "cache")
    assert accuracy == stated()[recipe], f"{recipe}: {accuracy}% cold, the README says {stated()[recipe]}%"
    if metrics["strategy"] == "features":  # cold: every image through the backbone
        images = metrics["n_train"] + metrics["n_test"] + len(metrics["skipped"])
        assert metrics["features"]["computed"] == images


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_the_best_recipe_gives_its_figure_in_every_runtime_cold_and_warm(
    runtime: str, tmp_path: Path
) -> None:
    """Runtime auto is the cold run above; here torch and ONNX Runtime by name, each cold then warm."""
    recipe = "hymenoptera-best"
    cache = tmp_path / "cache"
    cold, metrics = accuracy_of(recipe, tmp_path, cache, f"extract.runtime={runtime}")
    assert metrics["features"]["runtime"] == runtime
    warm, metrics = accuracy_of(recipe, tmp_path, cache, f"extract.runtime={runtime}")
    assert metrics["features"]["computed"] == 0
    assert cold == warm == stated()[recipe]


@pytest.mark.slow
def test_lite0_with_flip_gives_one_accuracy_in_torch_and_auto(tmp_path: Path) -> None:
    auto, metrics = accuracy_of("hymenoptera-lite0", tmp_path, tmp_path / "a", "extract.flip=true")
    assert metrics["features"]["runtime"] == "onnxruntime"
    in_torch, _ = accuracy_of(
        "hymenoptera-lite0", tmp_path, tmp_path / "b", "extract.flip=true", "extract.runtime=torch"
    )
    assert auto == in_torch
