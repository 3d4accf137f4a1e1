"""Right on every path: the features of real images equal a fresh eager-torch model's, whatever got them.

For the backbones of the shipped recipes (EfficientNet-Lite0 and Lite2), with flip averaging on and
off, a fixed subset of ants/bees (with the dataset's GIF placeholder) goes through every runtime
(torch; ONNX Runtime from a fresh export, from a cached one; auto; the torch fallback of a failed
probe), every cache state (cold, warm, a damaged chunk recomputed), every worker setup (in this
process, forked, spawned) and every caller (run, sweep, predict, eval, serve, ``tlx.load``). Each
must give the reference's features within :data:`TOLERANCE` of the largest one, and each caller's
probabilities must be its head on the reference features.

The reference is built here, outside tlx's extraction: the plugin's network, ``eval()``, timm's own
transform, the mirror image averaged by hand. A new path to the features is added to this module.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tlx
from tlx import plugins
from tlx.cli import cli
from tlx.components import resolve
from tlx.data import Split, load_image, scan_imagefolder
from tlx.extraction import pipeline, runtimes
from tlx.extraction.backbone import create_backbone
from tlx.extraction.frozen import FrozenBackbone
from tlx.recipe import BUNDLED, BackboneConfig, make_recipe

from .conftest import HYMENOPTERA
from .test_serve import multipart

#: largest allowed difference from the reference, as a fraction of the reference's largest feature
TOLERANCE = 1e-4
#: the backbones of the shipped recipes, flip averaging off and on
BACKBONES = [
    pytest.param(name, flip, id=f"{name[len('tf_efficientnet_') : -len('.pypi')]}{'-flip' if flip else ''}")
    for name in ("tf_efficientnet_lite0.pypi", "tf_efficientnet_lite2.pypi")
    for flip in (False, True)
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two photos per class and split, and the dataset's GIF placeholder among the training ants."""
    root = tmp_path_factory.mktemp("paths") / "data"
    for split in ("train", "val"):
        for name in ("ants", "bees"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for path in sorted((HYMENOPTERA / split / name).glob("*.jpg"))[:2]:
                shutil.copy(path, folder / path.name)
    shutil.copy(HYMENOPTERA / "train" / "ants" / "imageNotFound.gif", root / "train" / "ants")
    return root


References = dict[tuple[str, bool], dict[str, np.ndarray]]


@pytest.fixture(scope="module")
def references(data: Path) -> References:
    """Filled on first use: each backbone's eager-torch features of every image of ``data``, by path."""
    return {}


def reference(references: References, data: Path, name: str, flip: bool) -> dict[str, np.ndarray]:
    if (name, flip) in references:
        return references[(name, flip)]
    from timm.data import create_transform

    entry = plugins.load().backbones.get(name, "backbone.name")
    torch.manual_seed(0)
    backbone = create_backbone(entry, BackboneConfig(name=name))
    model = backbone.module.eval()
    transform = create_transform(**backbone.data_config, is_training=False)
    paths = sorted(p for p in data.rglob("*") if p.is_file())
    x = torch.stack([transform(load_image(p)) for p in paths])
    with torch.inference_mode():
        features = model(x) if not flip else (model(x) + model(x.flip(-1))) / 2
    references[(name, flip)] = {str(p.resolve()): row for p, row in zip(paths, features.numpy())}
    return references[(name, flip)]


def assert_reference(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], path: str) -> None:
    """``got`` holds features for images of ``expected``, each within tolerance; ``path`` names the path."""
    assert got, f"{path}: no features"
    scale = max(float(np.abs(row).max()) for row in expected.values())
    worst = max(float(np.abs(row - expected[key]).max()) for key, row in got.items())
    assert worst <= TOLERANCE * scale, f"{path}: features differ by {worst:.3g} (largest {scale:.3g})"


def by_path(splits: list[Split], features: list[Any]) -> dict[str, np.ndarray]:
    """The rows of each split's :class:`~tlx.tensors.Features` by resolved image path (an image in
    memory by its place: ``#0``, ``#1``...)."""
    found = {}
    for split, f in zip(splits, features):
        skipped = {id(path) for path, _ in f.skipped}
        kept = [path for path, _ in split.samples if id(path) not in skipped]
        for n, (path, row) in enumerate(zip(kept, f.x.numpy())):
            found[str(path.resolve()) if isinstance(path, Path) else f"#{n}"] = row
    return found


def frozen(data: Path, root: Path, name: str, flip: bool, **extract: Any) -> FrozenBackbone:
    """The front door for ``name`` on ``data`` with the cache folder ``root`` and these settings."""
    settings = {"flip": flip, "workers": 0, **extract}
    recipe = make_recipe(
        {"dataset": {"root": str(data)}, "backbone": {"name": name}, "extract": settings, "device": "cpu"},
        source="test",
    )
    return FrozenBackbone.of(recipe, resolve(recipe, "test"), root)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "flip"), BACKBONES)
def test_every_runtime_and_cache_state(
    name: str, flip: bool, data: Path, references: References, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = reference(references, data, name, flip)
    scanned = scan_imagefolder(data, "train", "val")
    splits = [scanned.train, scanned.test]

    def check(door: FrozenBackbone, path: str, runtime: str | None) -> None:
        assert_reference(by_path(splits, door.features(splits)), expected, path)
        assert door.runtime == runtime, f"{path}: ran {door.runtime}"

    check(frozen(data, tmp_path / "a", name, flip, runtime="torch"), "torch, cold", "torch")
    onnx = tmp_path / "b"
    check(frozen(data, onnx, name, flip, runtime="onnxruntime"), "onnxruntime, fresh export", "onnxruntime")
    assert len(list((onnx / "onnx").glob("*.onnx"))) == 1
    shutil.rmtree(onnx / "features")
    check(frozen(data, onnx, name, flip, runtime="onnxruntime"), "onnxruntime, cached export", "onnxruntime")
    shutil.rmtree(onnx / "features")
    check(frozen(data, onnx, name, flip, runtime="auto"), "auto on a CPU", "onnxruntime")
    check(frozen(data, onnx, name, flip), "warm", None)
    chunk = next((onnx / "features").glob("*/*.safetensors"))
    chunk.write_bytes(chunk.read_bytes()[:-64])  # damaged: its images are computed again
    check(frozen(data, onnx, name, flip), "a damaged chunk recomputed", "onnxruntime")
    monkeypatch.setattr(runtimes, "PARITY", -1.0)  # the probe of a fresh export fails: torch takes over
    fallback = frozen(data, tmp_path / "c", name, flip, runtime="onnxruntime")
    check(fallback, "the fallback to torch after a failed probe", "torch")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "flip"), BACKBONES)
@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_every_worker_setup(
    name: str,
    flip: bool,
    runtime: str,
    data: Path,
    references: References,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = reference(references, data, name, flip)
    scanned = scan_imagefolder(data, "train", "val")
    splits = [scanned.train, scanned.test]
    setups = {"in this process": (0, True), "forked workers": (2, True), "spawned workers": (2, False)}
    for setup, (workers, fork) in setups.items():
        monkeypatch.setattr(pipeline, "can_fork", lambda fork=fork: fork)
        door = frozen(data, tmp_path / "cache", name, flip, runtime=runtime, workers=workers)
        assert_reference(by_path(splits, door.features(splits)), expected, f"{runtime}, {setup}")
        assert door.runtime == runtime
        shutil.rmtree(tmp_path / "cache" / "features")


@pytest.fixture
def spied(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, np.ndarray]]:
    """What every call of the front door gave, by image path (in-memory images by their order)."""
    calls: list[dict[str, np.ndarray]] = []
    features = FrozenBackbone.features

    def spy(self: FrozenBackbone, splits: list[Split], **kwargs: Any) -> Any:
        result = features(self, splits, **kwargs)
        calls.append(by_path(splits, result))
        return result

    monkeypatch.setattr(FrozenBackbone, "features", spy)
    return calls


def probabilities(run: Path, expected: dict[str, np.ndarray]) -> Callable[[list[str]], np.ndarray]:
    """The run's head on the reference features of ``paths``, at its calibrated temperature: what every
    caller must answer."""
    from tlx.artifacts import load_run

    trained = load_run(run)
    assert trained.calibration is not None

    def of(paths: list[str]) -> np.ndarray:
        x = torch.from_numpy(np.stack([expected[str(Path(p).resolve())] for p in paths]))
        with torch.inference_mode():
            return trained.calibration.probabilities(trained.head(x).numpy())

    return of


def cli_json(*args: Any) -> Any:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def serve_predict(run: Path, files: list[Path]) -> list[dict[str, Any]]:
    """``POST /predict`` of ``files`` to ``tlx serve``'s app, in this process (no socket)."""
    from tlx.serve import create_app

    app = create_app(tlx.load(run), max_upload_bytes=2**24)
    body, content_type = multipart([(p.name, p.read_bytes()) for p in files])
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "query_string": b"top_k=2",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
        ],
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    anyio.run(app, scope, receive, send)
    assert sent[0]["status"] == 200
    return json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))[
        "predictions"
    ]


@pytest.fixture
def fresh_features(tmp_path: Path) -> Iterator[Callable[[], None]]:
    """Empties the feature cache (keeping the backbone and its export): the next caller computes."""

    def clear() -> None:
        shutil.rmtree(tmp_path / "cache" / "features", ignore_errors=True)

    yield clear


@pytest.mark.slow
@pytest.mark.parametrize(("name", "flip"), BACKBONES)
def test_every_caller(
    name: str,
    flip: bool,
    data: Path,
    references: References,
    tmp_path: Path,
    spied: list[dict[str, np.ndarray]],
    fresh_features: Callable[[], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """run, sweep, predict, eval, serve and ``tlx.load().predict_proba``, each computing its features."""
    expected = reference(references, data, name, flip)
    cache = tmp_path / "cache"
    monkeypatch.setenv("TLX_CACHE_DIR", str(cache))
    overrides = [
        f"dataset.root={data}",
        f"backbone.name={name}",
        f"extract.flip={str(flip).lower()}",
        "train.epochs=2",
        "device=cpu",
    ]
    recipe = BUNDLED / "hymenoptera-lite0.yaml"
    run = tlx.fit(recipe, overrides, out=tmp_path / "run").folder
    assert_reference(spied[-1], expected, "tlx run")
    head_of = probabilities(run, expected)
    rows = [line.split(",") for line in (run / "predictions.csv").read_text().splitlines()[1:]]
    got = np.array([[float(v) for v in row[3:]] for row in rows])
    np.testing.assert_allclose(got, head_of([row[0] for row in rows]), atol=1e-4, err_msg="tlx run")

    fresh_features()
    tlx.sweep(recipe, {"train.epochs": [1, 2]}, overrides, out=tmp_path / "sweep", jobs=1)
    assert_reference(spied[-1], expected, "tlx sweep")

    images = sorted(str(p) for p in (data / "val").rglob("*.jpg"))
    fresh_features()
    predicted = cli_json("predict", run, *images, "--json", "--top-k", "2")
    assert_reference(spied[-1], expected, "tlx predict")
    truth = head_of([p["path"] for p in predicted])
    for item, p in zip(predicted, truth):
        assert {t["label"]: t["probability"] for t in item["top_k"]} == pytest.approx(
            dict(zip(("ants", "bees"), p.tolist())), abs=1e-4
        )

    fresh_features()
    evaluated = cli_json("eval", run, "--json")
    assert_reference(spied[-1], expected, "tlx eval")
    truth = [Path(p).parent.name for p in images]
    right = [("ants", "bees")[k] == t for k, t in zip(head_of(images).argmax(1), truth)]
    assert (evaluated["n_test"], evaluated["test_accuracy"]) == (4, sum(right) / 4)

    fresh_features()
    served = serve_predict(run, [Path(p) for p in images])
    for item, p in zip(served, head_of(images)):  # in-memory images: never cached, computed each time
        assert {t["label"]: t["probability"] for t in item["top_k"]} == pytest.approx(
            dict(zip(("ants", "bees"), p.tolist())), abs=1e-4
        )
    assert list(spied[-1]) == [f"#{n}" for n in range(len(images))]
    in_order = dict(zip((str(Path(p).resolve()) for p in images), spied[-1].values()))
    assert_reference(in_order, expected, "tlx serve")

    fresh_features()
    np.testing.assert_allclose(
        tlx.load(run).predict_proba(images), head_of(images), atol=1e-4, err_msg="tlx.load().predict_proba"
    )
    assert_reference(spied[-1], expected, "tlx.load().predict_proba")
