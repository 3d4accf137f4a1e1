"""Engines in tlx itself: the built-in ``local``, the cache key that ignores the engine, recipe errors."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from tests.conftest import assert_user_error, recipe_for
from tlx import BackboneSpec, Batch, Job, plugins


class Elsewhere:
    """An engine whose worker builds the backbone from the driver's spec, as a worker elsewhere does."""

    def __init__(self, spec: BackboneSpec) -> None:
        self.spec = spec

    def batches(self, job: Job) -> Iterable[Batch]:
        from tlx.extraction.pipeline import on_cpu

        assert job.runner.forward is None, "the driver builds no backbone for an engine elsewhere"
        runner = self.spec.frozen("test node").runner("cpu")
        return on_cpu(runner.forward, job.files, job.batch_size, 0, 1)


class Nodes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nodes: int = 1


def test_the_engine_never_changes_the_feature_cache(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, invoke
) -> None:
    """Features from one engine make a run with another warm: the engine is not part of the cache key."""
    engines = []
    register = plugins.load().engines.registrar("test-plugin")
    register(
        "elsewhere", lambda options, spec: engines.append((options, spec)) or Elsewhere(spec), options=Nodes
    )
    recipe_for(tmp_path, tiny_dataset)
    first = invoke(
        "run",
        tmp_path / "r.yaml",
        "--out",
        tmp_path / "a",
        "--set",
        "extract.engine={kind: elsewhere, nodes: 3}",
        "--set",
        "extract.runtime=torch",  # the worker runs the module that counts
    )
    assert first.exit_code == 0, first.output
    [(options, spec)] = engines
    assert options.nodes == 3 and spec.config.name == "counting" and len(spec.sha256) == 64
    seen = counting_backbone.seen
    assert seen > 0
    warm = invoke("run", tmp_path / "r.yaml", "--out", tmp_path / "b")
    assert warm.exit_code == 0, warm.output
    assert counting_backbone.seen == seen  # every feature came from the cache
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["features"]["computed"] == 0
    bad = invoke("run", tmp_path / "r.yaml", "--set", "extract.engine={kind: elsewhere, node: 3}")
    assert_user_error(bad, "--set extract.engine", "unknown key extract.engine.node", "did you mean")


def test_an_engine_from_a_missing_package_names_the_package(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, invoke, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(plugins.DISABLE_ENV, "1")  # as if tlx-ray were not installed
    plugins.load.cache_clear()
    plugins.load().backbones.registrar("test-plugin")("counting", lambda name, pretrained, weights: None)
    recipe_for(tmp_path, tiny_dataset)
    out = tmp_path / "out"
    result = invoke("run", tmp_path / "r.yaml", "--out", out, "--set", "extract.engine.kind=ray")
    assert_user_error(result, "--set extract.engine.kind", "'ray'", "pip install -e plugins/tlx-ray")
    assert not out.exists()


def test_an_engine_does_not_apply_to_finetuning(tmp_path: Path, tiny_dataset: Path, invoke) -> None:
    recipe_for(tmp_path, tiny_dataset)
    result = invoke(
        "run", tmp_path / "r.yaml", "--set", "strategy=finetune", "--set", "extract.engine.kind=ray"
    )
    assert_user_error(result, "extract.engine", "strategy: finetune")
