"""One Ray per test module, test backbones that Ray's workers can build, and a hard timeout per test.

The test backbones live in a plugin package installed into a folder on ``PYTHONPATH`` before Ray
starts, so that every worker finds them through tlx's plugins as the driver does.
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlx import plugins

#: a hard limit per Ray test (pytest-timeout's thread method ends a hung Ray call too)
TIMEOUT_S = 120

PLUGIN = '''
"""Test backbones for the ray engine: ``wide`` (large features), ``slow`` (records where it ran).

Both run Python in their forward pass, so their tests run them in torch (``extract.runtime: torch``).
"""
import os
import time

import torch
from torch import nn

import tlx

CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
          "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
REPEAT = 64


class Wide(nn.Module):
    def forward(self, x):
        return x.flatten(1).repeat(1, REPEAT)


class Slow(nn.Module):
    """Mean colour, after a pause; each call leaves a file named by its process id holding its node id."""

    def forward(self, x):
        import ray

        record = os.environ.get("TLX_RAY_TEST_RECORD")
        if record:
            with open(os.path.join(record, str(os.getpid())), "w") as f:
                f.write(ray.get_runtime_context().get_node_id())
        time.sleep(float(os.environ.get("TLX_RAY_TEST_SLEEP", "0.25")))
        return x.mean(dim=(2, 3))


@tlx.hookimpl
def register_backbones(register):
    dim = 3 * 32 * 32 * REPEAT
    register("wide", lambda name, pretrained, weights: tlx.Backbone(Wide(), dim, CONFIG, "wide"))
    register("slow", lambda name, pretrained, weights: tlx.Backbone(Slow(), 3, CONFIG, "slow"))
'''


def _install_test_plugin() -> Path:
    site = Path(tempfile.mkdtemp(prefix="tlx-ray-test-"))
    (site / "tlx_ray_test_backbones.py").write_text(textwrap.dedent(PLUGIN))
    dist = site / "tlx_ray_test_backbones-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tlx-ray-test-backbones\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[tlx]\ntlx-ray-test-backbones = tlx_ray_test_backbones\n")
    return site


SITE = _install_test_plugin()
RECORD = SITE / "record"
RECORD.mkdir()
#: the actors' own cache folder (their exported models), as a node's would be; tests give the driver theirs
NODE_CACHE = SITE / "node-cache"


@pytest.fixture(scope="module", autouse=True)
def _ray_environment() -> Iterator[None]:
    """For each Ray test module, before its Ray starts (Ray's workers inherit this environment): the
    test plugin importable here and in every worker, the actors' cache folder, offline, no usage
    statistics. Restored after the module: the other tests' subprocesses never see the test plugin."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TLX_RAY_TEST_RECORD", str(RECORD))
        patch.setenv("TLX_CACHE_DIR", str(NODE_CACHE))
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")])))
        patch.syspath_prepend(str(SITE))
        plugins.load.cache_clear()
        yield
    plugins.load.cache_clear()


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Plugins loaded anew (the test backbones among them), a private cache, no recorded calls."""
    monkeypatch.setenv("TLX_CACHE_DIR", str(tmp_path / "cache"))
    for file in RECORD.iterdir():
        file.unlink()
    plugins.load.cache_clear()
    yield
    plugins.load.cache_clear()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(item.fspath).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.timeout(TIMEOUT_S, method="thread"))
