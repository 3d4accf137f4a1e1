"""Backbone runtimes: ONNX Runtime where it is available and agrees with torch, torch otherwise."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tlx
from tlx.errors import TlxError
from tlx.extraction import runtimes
from tlx.recipe import BUNDLED

RECIPE = BUNDLED / "hymenoptera-lite0.yaml"
CPU, CUDA = "cpu", "cuda"


@pytest.fixture
def few_ants_and_bees(tmp_path: Path, hymenoptera: Path) -> Path:
    """A few real ants/bees photos (3 + 3 to train on, 2 + 2 to test)."""
    data = tmp_path / "few"
    for split, count in (("train", 3), ("val", 2)):
        for name in ("ants", "bees"):
            (data / split / name).mkdir(parents=True)
            for path in sorted((hymenoptera / split / name).glob("*.jpg"))[:count]:
                shutil.copy(path, data / split / name / path.name)
    return data


def fit(data: Path, cache: Path, *overrides: str) -> tlx.Run:
    """``tlx run`` of the Lite0 recipe on ``data`` with ``cache``, its run folder beside the cache."""
    out = cache.parent / "runs" / uuid.uuid4().hex
    return tlx.fit(RECIPE, [f"dataset.root={data}", "device=cpu", *overrides], out=out, cache_dir=cache)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often a run exports the backbone and builds its torch model."""
    from tlx.extraction import backbone

    calls = {"export": 0, "build": 0}
    export, create = runtimes.Exported.export, backbone.create_backbone

    def counting_export(self, *args, **kwargs):
        calls["export"] += 1
        return export(self, *args, **kwargs)

    def counting_create(*args, **kwargs):
        calls["build"] += 1
        return create(*args, **kwargs)

    monkeypatch.setattr(runtimes.Exported, "export", counting_export)
    monkeypatch.setattr(backbone, "create_backbone", counting_create)
    return calls


def test_auto_is_onnxruntime_on_a_cpu_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtimes.choose("auto", CPU) == "onnxruntime"
    assert runtimes.choose("auto", CUDA) == "torch"
    assert runtimes.choose("torch", CPU) == "torch"
    with pytest.raises(TlxError, match=r"onnxruntime runs the backbone on the CPU.*set device=cpu"):
        runtimes.choose("onnxruntime", CUDA)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a)
    )
    assert runtimes.choose("auto", CPU) == "torch"
    with pytest.raises(TlxError, match=r"onnxruntime is not installed; pip install 'tlx-vision\[onnx\]'"):
        runtimes.choose("onnxruntime", CPU)


def test_the_export_is_cached_and_a_known_backbone_is_not_built_again(
    tmp_path: Path, few_ants_and_bees: Path, counted: dict[str, int]
) -> None:
    cache = tmp_path / "cache"
    first = fit(few_ants_and_bees, cache)
    assert first.metrics["features"]["runtime"] == "onnxruntime"
    assert counted == {"export": 1, "build": 1}
    record = json.loads(next((cache / "onnx").glob("*.json")).read_text())
    assert record["difference"] <= runtimes.PARITY * record["scale"]

    shutil.rmtree(cache / "features")  # new images for a known backbone: the cold start
    second = fit(few_ants_and_bees, cache)
    assert counted == {"export": 1, "build": 1}, "neither exported nor built again"
    assert second.metrics["features"] == first.metrics["features"]
    assert second.metrics["test_accuracy"] == first.metrics["test_accuracy"]
    assert second.warnings == []
    from tlx.extraction.store import clear

    assert clear(cache).removed > 0 and not cache.exists(), "tlx cache clear removes the export too"


def test_a_damaged_export_is_deleted_and_exported_again(
    tmp_path: Path, few_ants_and_bees: Path, counted: dict[str, int]
) -> None:
    cache = tmp_path / "cache"
    first = fit(few_ants_and_bees, cache)
    model = next((cache / "onnx").glob("*.onnx"))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights: ONNX Runtime would load it
    model.write_bytes(bytes(data))
    shutil.rmtree(cache / "features")

    second = fit(few_ants_and_bees, cache)
    assert any("deleted damaged exported model" in w for w in second.warnings), second.warnings
    assert counted["export"] == 2
    assert second.metrics["features"]["runtime"] == "onnxruntime"
    assert second.metrics["test_accuracy"] == first.metrics["test_accuracy"]


def test_a_failing_export_falls_back_to_torch_and_is_remembered(
    tmp_path: Path, few_ants_and_bees: Path, monkeypatch: pytest.MonkeyPatch, counted: dict[str, int]
) -> None:
    cache = tmp_path / "cache"
    reference = fit(few_ants_and_bees, tmp_path / "torch-cache", "extract.runtime=torch")

    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::magic' to ONNX opset 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    first = fit(few_ants_and_bees, cache)
    assert first.metrics["features"]["runtime"] == "torch"
    assert [w for w in first.warnings if "runs in torch" in w] == [
        "extract.runtime: the backbone runs in torch: its ONNX export is not usable: the export failed "
        "(RuntimeError: Exporting the operator 'aten::magic' to ONNX opset 17 is not supported)"
    ]
    assert first.metrics["test_accuracy"] == reference.metrics["test_accuracy"]
    assert not list((cache / "onnx").glob("*.onnx")), "no half-written model is left"

    shutil.rmtree(cache / "features")
    second = fit(few_ants_and_bees, cache)
    assert counted["export"] == 1, "a failed export is not tried at every run"
    assert second.metrics["features"]["runtime"] == "torch"
    assert any("the export failed" in w for w in second.warnings)


def test_features_that_disagree_with_torch_are_never_kept(
    tmp_path: Path, few_ants_and_bees: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    reference = fit(few_ants_and_bees, tmp_path / "torch-cache", "extract.runtime=torch")
    call = runtimes.OnnxForward.__call__
    monkeypatch.setattr(
        runtimes.OnnxForward,
        "__call__",
        lambda self, images, threads=None: call(self, images, threads) * 1.01,
    )
    run = fit(few_ants_and_bees, cache)
    assert run.metrics["features"]["runtime"] == "torch"
    assert any("differ from torch's" in w for w in run.warnings), run.warnings
    assert run.metrics["history"] == reference.metrics["history"]


def test_onnxruntime_features_match_torch_on_ants_and_bees(tmp_path: Path, hymenoptera: Path) -> None:
    """Parity on every image of the real dataset, and the same test accuracy over five seeds."""
    from tlx.artifacts import load_run
    from tlx.data import scan_imagefolder
    from tlx.train import fit_head

    caches = {name: tmp_path / name for name in ("torch", "onnxruntime")}
    runs = {name: fit(hymenoptera, cache, f"extract.runtime={name}") for name, cache in caches.items()}
    assert {n: r.metrics["features"]["runtime"] for n, r in runs.items()} == {n: n for n in runs}
    splits = scan_imagefolder(hymenoptera, "train", "val")
    features = {}
    for name, run in runs.items():  # the features each runtime computed, read back from its cache
        trained = load_run(run.folder, cache_dir=caches[name])
        assert trained.frozen.cached([splits.train, splits.test])
        features[name] = trained.frozen.features([splits.train, splits.test])
    for ours, theirs in zip(features["onnxruntime"], features["torch"]):
        assert torch.equal(ours.y, theirs.y)
        assert (ours.x - theirs.x).abs().max() <= runtimes.PARITY * theirs.x.abs().max()
    for seed in range(5):  # the recipe's head and training, as a run does them
        accuracy = {}
        for name, (train, test) in features.items():
            torch.manual_seed(seed)
            head = torch.nn.Linear(train.x.shape[1], 2)
            result = fit_head(
                head, train, test, trained.recipe.train, n_classes=2, seed=seed, on_epoch=lambda _: None
            )
            accuracy[name] = round(result.history[-1]["test_accuracy"], 4)
        assert accuracy["onnxruntime"] == accuracy["torch"], (seed, accuracy)


def test_predict_gives_the_same_probabilities_in_either_runtime(
    tmp_path: Path, few_ants_and_bees: Path
) -> None:
    run = fit(few_ants_and_bees, tmp_path / "cache")
    images = [Image.open(p).convert("RGB") for p in sorted(few_ants_and_bees.rglob("*.jpg"))]
    onnx = tlx.load(run.folder, cache_dir=tmp_path / "cache").predict_proba(images)
    from tlx.api import Classifier
    from tlx.artifacts import load_run

    in_torch = Classifier(load_run(run.folder, ("extract.runtime=torch",), tmp_path / "cache"))
    assert np.abs(onnx - in_torch.predict_proba(images)).max() <= 1e-5


def test_a_known_backbone_runs_without_timm_or_its_torch_model(
    tmp_path: Path, few_ants_and_bees: Path
) -> None:
    """The cold start of a backbone seen before: no timm, no torchvision, no torch model built, and
    torch itself imported only once the extraction workers run (off the main thread)."""
    cache = tmp_path / "cache"
    run = fit(few_ants_and_bees, cache)
    shutil.rmtree(cache / "features")
    script = (
        "import multiprocessing, sys, threading\n"
        "first = []\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' and not first:\n"
        "            main = threading.current_thread() is threading.main_thread()\n"
        "            first.append(f'{main}/{len(multiprocessing.active_children())}')\n"
        "sys.meta_path.insert(0, Spy())\n"
        "import tlx\n"
        "from tlx.extraction import backbone\n"
        "backbone.create_backbone = None  # building the model would fail\n"
        f"run = tlx.fit({str(RECIPE)!r}, ['dataset.root={few_ants_and_bees}', 'device=cpu', "
        f"'extract.workers=2'], cache_dir={str(cache)!r})\n"
        "print(run.metrics['features']['computed'], run.metrics['test_accuracy'], first[0],"
        " sorted(m for m in ('timm', 'torchvision') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    computed, accuracy, first, imported = result.stdout.split(maxsplit=3)
    assert int(computed) == 10 and float(accuracy) == run.metrics["test_accuracy"]
    assert imported.strip() == "[]"
    assert first == "False/2", "torch is first imported by a thread while both workers extract"


def test_eval_of_a_cached_run_reads_features_from_the_cache(
    tmp_path: Path, few_ants_and_bees: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlx.artifacts import load_run
    from tlx.evaluate import evaluate
    from tlx.extraction import backbone

    run = fit(few_ants_and_bees, tmp_path / "cache")
    monkeypatch.setattr(backbone, "create_backbone", None)
    monkeypatch.setattr(runtimes, "prepare", None)
    scores, test = evaluate(load_run(run.folder, cache_dir=tmp_path / "cache"))
    assert scores.accuracy == run.metrics["test_accuracy"] and test.cached == len(test.y) == 4


def test_a_parallel_sweep_readies_its_next_backbone_while_extracting_the_first(
    tmp_path: Path, few_ants_and_bees: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A helper process builds, exports and probes Lite1 while the sweep extracts Lite0; the run of
    Lite1 then recalls both and builds nothing."""
    from tlx.extraction import backbone

    log, create = tmp_path / "builds.txt", backbone.create_backbone

    def logged(entry, config):  # forked processes inherit it: each appends its own line
        with log.open("a") as f:
            f.write(f"{os.getpid()} {config.name}\n")
        return create(entry, config)

    monkeypatch.setattr(backbone, "create_backbone", logged)
    grid = {"backbone.name": ["tf_efficientnet_lite0.pypi", "tf_efficientnet_lite1.pypi"]}
    overrides = [f"dataset.root={few_ants_and_bees}", "device=cpu"]
    cache = tmp_path / "cache"
    swept = tlx.sweep(RECIPE, grid, overrides, out=tmp_path / "sw", cache_dir=cache, jobs=2)

    builds = [line.split() for line in log.read_text().splitlines()]
    assert sorted(name for _, name in builds) == ["tf_efficientnet_lite0.pypi", "tf_efficientnet_lite1.pypi"]
    pid = {name: int(process) for process, name in builds}
    assert pid["tf_efficientnet_lite0.pypi"] == os.getpid() != pid["tf_efficientnet_lite1.pypi"]
    records = [json.loads(path.read_text()) for path in (cache / "onnx").glob("*.json")]
    assert len(records) == 2 and all("sha256" in record for record in records)  # exported, probed
    for row in swept.rows:
        metrics = json.loads((swept.folder / row["run"] / "metrics.json").read_text())
        assert metrics["features"]["runtime"] == "onnxruntime"
        assert metrics["features"]["computed"] == 10


def test_the_torch_reference_and_fallback_of_a_fresh_flip_export_are_eval_torch(
    tmp_path: Path, hymenoptera: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 54% case: flip averaging wraps the backbone in a new module (training mode), the exporter
    restored that mode on the whole tree, and the probe's torch reference, kept as the fallback,
    computed features with BatchNorm in training mode. Both must equal a fresh eager model's."""
    from tlx.extraction.backbone import create_backbone
    from tlx.extraction.flip import FlipAveraged
    from tlx.extraction.preprocess import eval_transform
    from tlx.extraction.store import BackboneInfo
    from tlx.recipe import BackboneConfig

    entry = tlx.plugins.load().backbones.get("tf_efficientnet_lite0.pypi", "backbone.name")
    config = BackboneConfig(name="tf_efficientnet_lite0.pypi")
    eager = create_backbone(entry, config)
    eager.module = FlipAveraged(eager.module)
    transform = eval_transform(eager.data_config)
    paths = sorted((hymenoptera / "val" / "ants").glob("*.jpg"))[:4]
    images = np.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        expected = eager.module.eval()(torch.from_numpy(images)).numpy()
    tolerance = runtimes.PARITY * np.abs(expected).max()
    info = BackboneInfo.of(eager)

    def fresh(root: Path) -> runtimes.Runner:
        built = FlipAveraged(create_backbone(entry, config).module)
        return runtimes.prepare("onnxruntime", CPU, root, info, lambda: built, True, 4)

    probed = fresh(tmp_path / "a")
    assert probed.pending is not None, "a fresh export"
    assert np.abs(probed.reference(images) - expected).max() <= tolerance, "the probe's reference"
    assert np.abs(probed.features(images) - expected).max() <= tolerance
    assert probed.runtime == "onnxruntime"

    monkeypatch.setattr(runtimes, "PARITY", -1.0)  # every probe fails: the run falls back to torch
    fallback = fresh(tmp_path / "b")
    assert np.abs(fallback.features(images) - expected).max() <= tolerance
    assert fallback.runtime == "torch"
