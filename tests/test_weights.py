"""Weights: pretrained through timm or a local file, never silently random; unsafe files refused."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import timm
import torch

from tlx.errors import TlxError
from tlx.extraction.weights import load_into, read_state_dict, state_digest

from .conftest import run_tlx


def resnet18():
    return timm.create_model("resnet18", pretrained=False, num_classes=0)


def test_torchvision_state_dict_loads_into_timm_resnet18(resnet18_file: Path) -> None:
    model = resnet18()
    state = read_state_dict(resnet18_file)
    load_into(model, state, source="f", arch="resnet18", drop_prefixes=("fc.",))
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_safetensors_and_wrapped_checkpoints(tmp_path: Path, resnet18_file: Path) -> None:
    from safetensors.torch import save_file

    state = torch.load(resnet18_file, weights_only=True)
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    for name in ("w.safetensors", "wrapped.pth"):
        loaded = read_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys()


def test_shape_mismatch_names_the_key(resnet18_file: Path) -> None:
    state = read_state_dict(resnet18_file)
    state["layer2.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(TlxError, match=r"key 'layer2.0.conv1.weight' has shape \(1, 1, 1, 1\) in the file"):
        load_into(resnet18(), state, source="f.pth", arch="resnet18", drop_prefixes=("fc.",))


def test_file_of_another_architecture_names_first_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "effnet.pth"
    torch.save(timm.create_model("efficientnet_b0").state_dict(), path)
    with pytest.raises(TlxError, match=r"does not fit resnet18: key 'conv1.weight' is missing"):
        load_into(resnet18(), read_state_dict(path), source=str(path), arch="resnet18")


def test_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"conv1.weight": Evil()}))
    with pytest.raises(TlxError, match="refused to load"):
        read_state_dict(path)
    assert not marker.exists()


def test_truncated_and_missing_files(tmp_path: Path, resnet18_file: Path) -> None:
    cut = tmp_path / "cut.pth"
    cut.write_bytes(resnet18_file.read_bytes()[:100_000])
    with pytest.raises(TlxError, match="truncated or not a weights file"):
        read_state_dict(cut)
    with pytest.raises(TlxError, match=r"backbone.weights: weights file .*nope.pth not found"):
        read_state_dict(tmp_path / "nope.pth")


def test_digest_changes_with_the_weights() -> None:
    torch.manual_seed(0)
    a = resnet18()
    torch.manual_seed(1)
    b = resnet18()
    assert state_digest(a) == state_digest(a) != state_digest(b)


@pytest.mark.parametrize(
    "env",
    [
        {"HF_HUB_OFFLINE": "1"},
        # not declared offline: a short probe of an unreachable hub must answer at once
        {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"},
    ],
)
def test_offline_reference_recipe_stops_with_one_line(
    tmp_path: Path, env: dict[str, str], hymenoptera: Path
) -> None:
    env = {**env, "HF_HUB_CACHE": str(tmp_path / "hub"), "TORCH_HOME": str(tmp_path / "torch")}
    root = f"dataset.root={hymenoptera}"
    result = run_tlx("run", "hymenoptera", "--set", root, "--out", tmp_path / "out", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "resnet18.tv_in1k" in lines[0] and "--set backbone.weights=FILE" in lines[0]
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_reference_recipe_runs_with_a_local_weights_file(
    tmp_path: Path, tiny_dataset: Path, resnet18_file: Path
) -> None:
    out = tmp_path / "out"
    result = run_tlx(
        "run", "hymenoptera", "--set", f"dataset.root={tiny_dataset}",
        "--set", f"backbone.weights={resnet18_file}", "--set", "train.epochs=3", "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["feature_dim"] == 512 and metrics["backbone"]["name"] == "resnet18.tv_in1k"
    assert metrics["backbone"]["weights"] == f"file {resnet18_file}"
    assert "train 12×512" in result.stdout


def test_random_weights_only_when_asked_and_said(tmp_path: Path, tiny_dataset: Path) -> None:
    result = run_tlx(
        "run", "hymenoptera", "--set", f"dataset.root={tiny_dataset}",
        "--set", "backbone.pretrained=false", "--set", "train.epochs=1", "--out", tmp_path / "out",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stderr
    assert "random initialisation" in result.stdout
