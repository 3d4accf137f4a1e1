"""Start-up: a run whose features are cached imports only what it uses; figures come from a helper."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tlx.plots import Painter
from tlx.recipe import BUNDLED
from tlx.scores import Scores

from .conftest import run_tlx

HEAVY = ("timm", "torchvision", "matplotlib", "torch._dynamo")


def imported(stderr: str) -> set[str]:
    """Module names from ``PYTHONPROFILEIMPORTTIME`` lines (``import time: self | cumulative | name``)."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)}


def hub_cache(root: Path) -> Path:
    """A Hugging Face hub cache holding timm's ``resnet18.tv_in1k`` weights (random values)."""
    import timm
    import torch
    from safetensors.torch import save_file

    repo = root / "models--timm--resnet18.tv_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    torch.manual_seed(0)
    save_file(timm.create_model("resnet18").state_dict(), str(snapshot / "model.safetensors"))
    return root


@pytest.mark.parametrize("weights", ["file", "hub cache"])
def test_a_warm_run_imports_no_model_library_no_plotting_and_no_compiler(
    weights: str, tiny_dataset: Path, resnet18_file: Path, tmp_path: Path
) -> None:
    args = ["run", BUNDLED / "hymenoptera.yaml", "--set", f"dataset.root={tiny_dataset}",
            "--set", "extract.workers=0", "--set", "train.epochs=2"]  # fmt: skip
    env = {"TLX_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPROFILEIMPORTTIME": "1"}
    if weights == "file":
        args += ["--set", f"backbone.weights={resnet18_file}"]
    else:
        env["HF_HUB_CACHE"] = str(hub_cache(tmp_path / "hub"))
    cold = run_tlx(*args, "--out", tmp_path / "cold", env=env)
    assert cold.returncode == 0, cold.stderr[-2000:]
    assert {"timm", "torchvision"} <= heavy(imported(cold.stderr))  # building the backbone needs them
    assert ("(local cache)" in cold.stdout) == (weights == "hub cache")

    warm = run_tlx(*args, "--out", tmp_path / "warm", env=env)
    assert warm.returncode == 0, warm.stderr[-2000:]
    assert "torch" in imported(warm.stderr)
    assert heavy(imported(warm.stderr)) == set()
    assert "(18 from the cache" in warm.stdout  # every feature cached: the backbone was not built
    assert (tmp_path / "warm" / "curves.png").stat().st_size > 0  # drawn by the helper process
    assert (tmp_path / "warm" / "confusion.png").stat().st_size > 0


def test_registering_the_installed_plugins_imports_no_torch() -> None:
    """Plugins import torch when they build a model, not when registered: a run whose backbone is
    known starts extracting before torch is loaded. The check that no plugin name is a timm model's
    reads timm's names from a record the first process with a fresh cache folder writes."""
    code = "import sys; from tlx import plugins; print(len(plugins.load().plugins), 'torch' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    count, torch_loaded = out.split()
    assert int(count) >= 4 and torch_loaded == "False"


def test_painter_draws_every_figure(tmp_path: Path) -> None:
    import torch

    scores = Scores.of(["ants", "bees"], torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    history = [
        {"epoch": 1, "train_loss": 0.7, "test_accuracy": 0.5},
        {"epoch": 2, "train_loss": 0.5, "test_accuracy": 2 / 3},
    ]
    with Painter() as painter:
        painter.draw(tmp_path, history, {}, scores, [])
    for name in ("curves.png", "confusion.png", "errors.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_painter_reports_a_folder_it_cannot_write_as_an_os_error(tmp_path: Path) -> None:
    import torch

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    scores = Scores.of(["a", "b"], torch.tensor([0, 1]), torch.tensor([0, 1]))
    with Painter() as painter, pytest.raises(OSError) as caught:
        painter.draw(blocker, [{"epoch": 1, "train_loss": 0.1, "test_accuracy": 1.0}], {}, scores, [])
    assert str(blocker) in str(caught.value.filename)


def test_painter_stopped_unused_leaves_no_process() -> None:
    with Painter() as painter:
        proc = painter._proc
    assert proc.poll() is not None


def test_decoding_workers_run_at_the_lowest_priority() -> None:
    code = "import os; from tlx.finetune import yield_to_backbone; yield_to_backbone(0); print(os.nice(0))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "19"


def test_logreg_fits_on_one_thread_without_importing_the_compiler() -> None:
    code = """
import sys, torch
from tlx.tensors import Features
from tlx.default_plugins.heads import LogRegOptions
from tlx.logreg import LogisticRegression
seen = []
class Spy(LogisticRegression):
    def _solve(self, *args):
        seen.append(torch.get_num_threads())
        return super()._solve(*args)
torch.manual_seed(0)
x, y = torch.randn(40, 6), torch.arange(40) % 2
head = Spy(6, 2, **LogRegOptions(l2=[0.1, 1.0], cv=2).model_dump())
head.fit(Features(x, y, []), None, class_weight=None, seed=0)
print(sorted(set(seen)), "torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[1]", "False"]
