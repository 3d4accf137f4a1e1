"""The feature cache: hits run no backbone, changed images are recomputed alone, crashes lose nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from tlx import cache, plugins
from tlx.backbone import Backbone
from tlx.recipe import load_recipe
from tlx.run import run

from .conftest import make_imagefolder, write_recipe

CONFIG = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
          "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # fmt: skip


class Colours(nn.Module):
    """Mean colour per channel times a weight; counts the images it sees and can crash on purpose."""

    def __init__(self, scale: float, crash_after: int | None = None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.seen = 0
        self.crash_after = crash_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.crash_after is not None and self.seen >= self.crash_after:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-extraction
        self.seen += x.shape[0]
        return x.mean(dim=(2, 3)) * self.scale


class Factory:
    """A backbone plugin whose weights are one number in a file; counts how often it builds."""

    def __init__(self, weights: Path) -> None:
        self.weights = weights
        self.built = 0
        self.crash_after: int | None = None
        self.module: Colours | None = None

    def __call__(self, name: str, *, pretrained: bool, weights: Path | None) -> Backbone:
        self.built += 1
        self.module = Colours(float(self.weights.read_text()), self.crash_after)
        return Backbone(self.module, 3, CONFIG, f"file {self.weights}")

    @property
    def seen(self) -> int:
        return self.module.seen if self.module else 0


@pytest.fixture
def colours(tmp_path: Path) -> Factory:
    weights = tmp_path / "colours.txt"
    weights.write_text("1.0")
    factory = Factory(weights)
    register = plugins.load().backbones.registrar("test-plugin")
    register("colours", factory, weight_files=lambda name, pretrained, weights: [factory.weights])
    return factory


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "data", classes=2)  # 12 train + 6 test images


def tlx_run(tmp_path: Path, data: Path, out: str, *overrides: str, cache_dir: Path | None = None) -> dict:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"""
        dataset: {{root: {data}}}
        backbone: {{name: colours}}
        extract: {{workers: 0, batch_size: 2}}
        train: {{epochs: 3}}
        """,
    )
    return run(load_recipe(recipe, overrides), "r.yaml", tmp_path / out, cache_dir)


def test_second_run_builds_no_backbone_and_gives_the_same_numbers(
    tmp_path: Path, data: Path, colours: Factory
) -> None:
    first = tlx_run(tmp_path, data, "a")
    assert (colours.built, colours.seen, first["features"]["computed"]) == (1, 18, 18)
    second = tlx_run(tmp_path, data, "b")
    assert colours.built == 1, "a warm run must not even build the backbone"
    assert second["features"] == {**first["features"], "cached": 18, "computed": 0}
    assert second["history"] == first["history"]
    assert second["backbone"] == first["backbone"]


def test_another_head_seed_or_epochs_reuse_the_features(tmp_path: Path, data: Path, colours: Factory) -> None:
    tlx_run(tmp_path, data, "a")
    for n, overrides in enumerate([("seed=3",), ("train.epochs=5",), ("head.type=mlp", "head.hidden=[4]")]):
        metrics = tlx_run(tmp_path, data, f"b{n}", *overrides)
        assert metrics["features"]["cached"] == 18
    assert colours.built == 1


def test_changed_or_added_image_alone_is_recomputed(tmp_path: Path, data: Path, colours: Factory) -> None:
    tlx_run(tmp_path, data, "a")
    changed = data / "train" / "class0" / "0.jpg"
    Image.new("RGB", (48, 48), (0, 0, 255)).save(changed)
    os.utime(changed, ns=(1, 1))  # a new mtime, whatever the clock's resolution
    Image.new("RGB", (40, 40), (9, 9, 9)).save(data / "val" / "class1" / "new.jpg")
    metrics = tlx_run(tmp_path, data, "b")
    assert colours.built == 2 and colours.seen == 2
    assert metrics["features"] == {**metrics["features"], "cached": 17, "computed": 2}
    assert metrics["n_test"] == 7


def test_changed_weights_file_is_a_new_backbone(tmp_path: Path, data: Path, colours: Factory) -> None:
    a = tlx_run(tmp_path, data, "a")
    colours.weights.write_text("2.0")
    b = tlx_run(tmp_path, data, "b")
    assert (colours.built, colours.seen, b["features"]["computed"]) == (2, 18, 18)
    assert b["backbone"]["sha256"] != a["backbone"]["sha256"]
    colours.weights.write_text("1.0")  # back to the first weights: a new file state, same digest
    c = tlx_run(tmp_path, data, "c")
    assert (colours.built, c["features"]["cached"]) == (3, 18)
    assert c["backbone"]["sha256"] == a["backbone"]["sha256"]


def test_interrupted_extraction_keeps_finished_chunks(
    tmp_path: Path, data: Path, colours: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache, "CHUNK_IMAGES", 4)  # a chunk every two batches of two
    colours.crash_after = 10  # five batches: two chunks written, the fifth batch's images pending
    with pytest.raises(KeyboardInterrupt):
        tlx_run(tmp_path, data, "a")
    namespaces, _ = cache.summary(cache.cache_dir())
    assert [(n.entries, n.chunks) for n in namespaces] == [(8, 2)]
    assert not list(namespaces[0].folder.glob(".*.tmp")), "no temporary file is left behind"

    colours.crash_after = None
    resumed = tlx_run(tmp_path, data, "b")
    assert colours.seen == 18 - 8 and resumed["features"]["cached"] == 8
    fresh = tlx_run(tmp_path, data, "c", cache_dir=tmp_path / "fresh-cache")
    assert fresh["features"]["computed"] == 18 and fresh["history"] == resumed["history"]


def test_crash_while_writing_a_chunk_leaves_no_partial_file(
    tmp_path: Path, data: Path, colours: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def save_half_then_die(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        Path(path).write_bytes(Path(path).read_bytes()[:50])
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        tlx_run(tmp_path, data, "a")
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    features = cache.cache_dir() / "features"
    assert not [p for p in features.rglob("*") if p.suffix in {".safetensors", ".tmp"}]
    assert tlx_run(tmp_path, data, "b")["features"]["computed"] == 18


def test_two_stores_sharing_a_folder_both_read_everything(tmp_path: Path) -> None:
    info = cache.BackboneInfo("0" * 64, 2, CONFIG, "test")
    identity = cache.namespace_identity({"name": "x"}, info, {})
    a, b = cache.FeatureStore(tmp_path, identity), cache.FeatureStore(tmp_path, identity)
    a.put(["k1", "k2"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]), {})
    b.put(["k2", "k3"], torch.tensor([[3.0, 4.0], [5.0, 6.0]]), {"k4": "broken file"})
    found, failed = cache.FeatureStore(tmp_path, identity).get(["k1", "k2", "k3", "k4", "k5"])
    assert {k: v.tolist() for k, v in found.items()} == {"k1": [1, 2], "k2": [3, 4], "k3": [5, 6]}
    assert failed == {"k4": "broken file"}
    other = cache.namespace_identity({"name": "y"}, info, {})
    assert cache.FeatureStore(tmp_path, other).missing(["k1"]) == ["k1"]


def test_unwritable_cache_warns_and_the_run_goes_on(
    tmp_path: Path, data: Path, colours: Factory, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    metrics = run(
        load_recipe(
            write_recipe(tmp_path / "r.yaml", f"dataset: {{root: {data}}}\nbackbone: {{name: colours}}\n")
        ),
        "r.yaml",
        tmp_path / "out",
        cache_dir=blocker / "cache",
    )
    assert metrics["features"]["computed"] == 18
    assert "tlx: warning: cache:" in capsys.readouterr().err


def test_cache_info_and_clear(tmp_path: Path, data: Path, colours: Factory, invoke) -> None:
    tlx_run(tmp_path, data, "a")
    info = invoke("cache", "info")
    assert info.exit_code == 0, info.output
    assert f"cache {cache.cache_dir()}:" in info.output and "18 entries" in info.output
    assert "colours" in info.output

    other = tmp_path / "other"
    (other / "keep.txt").parent.mkdir()
    (other / "keep.txt").write_text("not tlx's")
    assert invoke("cache", "clear", "--cache-dir", other).exit_code == 0
    assert (other / "keep.txt").exists(), "clear removes only what tlx stored"

    cleared = invoke("cache", "clear")
    assert cleared.exit_code == 0 and "cleared" in cleared.output
    assert "0 entries" in invoke("cache", "info").output
    assert tlx_run(tmp_path, data, "b")["features"]["computed"] == 18


def test_full_disk_while_writing_warns_and_leaves_no_partial_chunk(
    tmp_path: Path,
    data: Path,
    colours: Factory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    import errno

    import safetensors.torch

    real_save = safetensors.torch.save_file

    def disk_full(tensors, path, metadata=None):
        if not str(path).startswith(str(cache.cache_dir())):
            return real_save(tensors, path, metadata=metadata)  # the run folder is on another disk
        Path(path).write_bytes(b"\0" * 10)  # what a filling disk leaves behind
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    metrics = tlx_run(tmp_path, data, "a")
    assert metrics["features"]["computed"] == 18 and len(metrics["history"]) == 3
    assert "No space left on device" in capsys.readouterr().err
    features = cache.cache_dir() / "features"
    assert not [p for p in features.rglob("*") if p.suffix in {".safetensors", ".tmp"}]
