"""Shared fixtures: the ants/bees data, small generated datasets, fake installed plugins, CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image
from torch import nn

from tlx import plugins
from tlx.cli import cli
from tlx.extraction.runtimes import Runner
from tlx.recipe import Recipe, load_recipe
from tlx.registry import Backbone

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera_data"
TLX = [sys.executable, "-m", "tlx"]


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Each test loads plugins anew and has its own feature cache, so no test leaks into another."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TLX_CACHE_DIR", str(tmp_path / "tlx-cache"))
    plugins.load.cache_clear()
    yield
    plugins.load.cache_clear()


@pytest.fixture
def hymenoptera() -> Path:
    if not HYMENOPTERA.is_dir():
        pytest.fail(f"the shared ants/bees dataset is missing at {HYMENOPTERA}")
    return HYMENOPTERA


def make_imagefolder(root: Path, classes: int, per_class: tuple[int, int] = (6, 3), size: int = 48) -> Path:
    """Write ``root/{train,val}/class{k}/`` with small images whose colour depends on the class."""
    for split, count in zip(("train", "val"), per_class):
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                shade = (40 * k + 3 * i) % 256
                Image.new("RGB", (size + i, size), (shade, 255 - shade, (17 * k) % 256)).save(
                    folder / f"{i}.jpg"
                )
    return root


#: ``dataset.group`` for :func:`make_grouped_folder`'s file names: the object before ``_<photo>.png``
GROUPED = r"^(.+)_\d+\.png$"


def make_grouped_folder(root: Path, objects: dict[str, int], photos: int = 3, prefix: str = "") -> Path:
    """``root/<class>/<prefix><class><g>_<j>.png``: ``objects[class]`` objects of ``photos`` photos each
    (shades of one colour per object), grouped by :data:`GROUPED`."""
    for k, (name, count) in enumerate(objects.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for g in range(count):
            for j in range(photos):
                colour = (60 * k + 9 * g, 10 * j, 200 - 7 * g)
                Image.new("RGB", (24, 24), colour).save(folder / f"{prefix}{name}{g}_{j}.png")
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """Two classes, six training and three test images each."""
    return make_imagefolder(tmp_path / "tiny", classes=2)


@pytest.fixture
def invoke() -> Callable[..., Result]:
    """Run the CLI in-process; returns click's result (exit code, output, stderr)."""
    runner = CliRunner()

    def call(*args: str) -> Result:
        return runner.invoke(cli, [str(a) for a in args])

    return call


def run_tlx(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run ``tlx`` in a subprocess, as a user would (real exit code, real stderr)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [*TLX, *map(str, args)], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600
    )


@pytest.fixture
def fake_plugin(tmp_path: Path) -> Callable[[str, str], dict[str, str]]:
    """Install a plugin package into a folder on PYTHONPATH: a module plus a dist-info with its entry point.

    Returns the environment under which a ``tlx`` subprocess sees it.
    """
    site = tmp_path / "site"

    def install(name: str, code: str) -> dict[str, str]:
        module = name.replace("-", "_")
        site.mkdir(exist_ok=True)
        (site / f"{module}.py").write_text(textwrap.dedent(code))
        dist = site / f"{module}-1.2.3.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
        (dist / "entry_points.txt").write_text(f"[tlx]\n{name} = {module}\n")
        return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}

    return install


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="session")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision-format ResNet-18 state dict (random init), as a user would save one."""
    import torch
    import torchvision

    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
          "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # fmt: skip


class CountingBackbone(nn.Module):
    """Mean colour per channel, plus a counter of the images it has seen."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return x.mean(dim=(2, 3))


@pytest.fixture
def counting_backbone() -> CountingBackbone:
    module = CountingBackbone()
    register = plugins.load().backbones.registrar("test-plugin")
    register("counting", lambda name, pretrained, weights: Backbone(module, 3, CONFIG, "test colours"))
    return module


def in_torch(backbone: Backbone) -> Runner:
    """``backbone`` as extraction runs it in torch on the CPU."""
    from tlx.extraction.store import BackboneInfo

    return Runner.in_torch(backbone.module, BackboneInfo.of(backbone), "cpu")


def started(runner: Runner, engine: Any = None) -> Callable[[], tuple[Runner, Any]]:
    """What :func:`tlx.extraction.features.extract` calls for a runner when some image is not cached."""
    return lambda: (runner, engine)


def recipe_for(tmp_path: Path, root: Path, *overrides: str) -> Recipe:
    """A recipe for the counting backbone on ``root``, decoding in this process."""
    path = write_recipe(
        tmp_path / "r.yaml",
        f"""
        dataset: {{root: {root}}}
        backbone: {{name: counting}}
        extract: {{workers: 0}}
        """,
    )
    return load_recipe(path, overrides)


def assert_user_error(result, *words: str) -> str:
    """Exit code 2, no traceback, and a last stderr line ``tlx: error: ...`` holding ``words``."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("tlx: error: ")
    for word in words:
        assert word in line, line
    return line
