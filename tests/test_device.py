"""The recipe's ``device``: auto finds what is there; a device that is not there is a one-line error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tlx.extraction import device
from tlx.extraction.device import batch_size, resolve

from .conftest import assert_user_error, write_recipe


def test_auto_is_the_cpu_on_a_machine_without_accelerators() -> None:
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has an accelerator")
    assert resolve("auto") == "cpu"
    assert batch_size(None, "cpu") == 4 and batch_size(None, "cuda") == 64
    assert batch_size(16, "cuda") == 16


def test_the_cpu_is_known_without_torch_where_no_accelerator_driver_is() -> None:
    """``cpu``, and ``auto`` without accelerator device nodes, import no torch; ``auto`` agrees with
    what torch finds."""
    code = (
        "import sys; from tlx.extraction.device import no_accelerator, resolve; "
        "print(resolve('cpu'), resolve('auto') if no_accelerator() else '-', 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    if not device.no_accelerator():
        assert out.split() == ["cpu", "-", "False"]
        pytest.skip("this machine has an accelerator driver")
    assert out.split() == ["cpu", "cpu", "False"]
    assert not torch.cuda.is_available() and not torch.backends.mps.is_available()


def test_auto_asks_torch_where_an_accelerator_driver_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = tmp_path / "nvidiactl"
    node.touch()
    monkeypatch.setattr(device, "ACCELERATOR_NODES", (str(node),))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve("auto") == "cuda"
    node.unlink()
    assert resolve("auto") == ("cpu" if sys.platform == "linux" else "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_stops_before_extraction(
    tiny_dataset: Path, tmp_path: Path, invoke, counting_backbone
) -> None:
    text = f"dataset: {{root: {tiny_dataset}}}\nbackbone: {{name: counting}}\ndevice: cuda\n"
    recipe = write_recipe(tmp_path / "r.yaml", text)
    result = invoke("run", recipe, "--out", tmp_path / "out")
    assert_user_error(result, "device: cuda", "not available", "device=cpu")
    assert counting_backbone.seen == 0


def test_a_device_that_is_no_device_is_a_recipe_error(tiny_dataset: Path, tmp_path: Path, invoke) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", f"dataset: {{root: {tiny_dataset}}}\nbackbone: {{name: x}}\n")
    result = invoke("run", recipe, "--set", "device=gpu")
    assert_user_error(result, "device", "gpu")
