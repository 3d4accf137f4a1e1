"""The recipe's ``device``: auto finds what is there; a device that is not there is a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tlx.device import batch_size, resolve

from .conftest import assert_user_error, write_recipe


def test_auto_is_the_cpu_on_a_machine_without_accelerators() -> None:
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has an accelerator")
    assert resolve("auto") == torch.device("cpu")
    assert batch_size(None, torch.device("cpu")) == 4 and batch_size(None, torch.device("cuda")) == 64
    assert batch_size(16, torch.device("cuda")) == 16


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
