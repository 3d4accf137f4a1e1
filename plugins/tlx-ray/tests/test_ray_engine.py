"""The ray engine on one local Ray (3 logical CPUs: two actors and one CPU left for Ray's own tasks)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import psutil  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from conftest import NODE_CACHE, RECORD  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tlx_ray import RayOptions, ray_engine  # noqa: E402

from tlx import TlxError  # noqa: E402
from tlx.cli import cli  # noqa: E402
from tlx.components import resolve  # noqa: E402
from tlx.data import Split  # noqa: E402
from tlx.extraction.engines import Job  # noqa: E402
from tlx.extraction.features import extract  # noqa: E402
from tlx.extraction.frozen import FrozenBackbone  # noqa: E402
from tlx.extraction.pipeline import ImageFiles  # noqa: E402
from tlx.extraction.preprocess import eval_transform  # noqa: E402
from tlx.extraction.store import FeatureStore, image_key  # noqa: E402
from tlx.recipe import make_recipe  # noqa: E402

HYMENOPTERA = Path(__file__).resolve().parents[4] / "shared" / "data" / "hymenoptera_data"
#: the object store: far smaller than the features that stream through it
STORE_BYTES = 80 * 2**20


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=3, object_store_memory=STORE_BYTES, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tlx(*args: object) -> object:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def small_set(root: Path) -> Path:
    """Ants and bees: three training and two test images per class, and a corrupt training image."""
    for split, count in (("train", 3), ("val", 2)):
        for label in ("ants", "bees"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for source in sorted((HYMENOPTERA / split / label).iterdir())[:count]:
                shutil.copy(source, folder / source.name)
    (root / "train" / "ants" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def coloured(root: Path, n: int, size: int = 24) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(root / f"{i}.png")
        Image.new("RGB", (size + i % 5, size), (i % 256, (7 * i) % 256, 100)).save(paths[-1])
    return paths


def recipe_file(tmp_path: Path, data: Path, backbone: str, **extract: object) -> Path:
    path = tmp_path / "r.yaml"
    spec = {"dataset": {"root": str(data)}, "backbone": {"name": backbone}, "train": {"epochs": 3}}
    path.write_text(json.dumps({**spec, "extract": extract}))
    return path


def features_of(cache: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every cached feature and decoding failure of the one namespace in ``cache``, by image key."""
    (folder,) = (cache / "features").iterdir()
    keys: list[str] = []
    for chunk in folder.glob("*.safetensors"):
        with safe_open(str(chunk), framework="pt") as f:
            meta = f.metadata()
        keys += json.loads(meta["keys"]) + list(json.loads(meta.get("failed", "{}")))
    store = FeatureStore(cache, json.loads((folder / "identity.json").read_text()))
    return store.get(keys)


def engine(backbone: str, **options: object):
    """A ray engine for the test backbone ``backbone``, the driver's runner of it in torch, and its
    frozen backbone (its cache folder the driver's)."""
    spec = {"dataset": {"root": "."}, "backbone": {"name": backbone}, "extract": {"runtime": "torch"}}
    recipe = make_recipe(spec, source="test")
    frozen = FrozenBackbone.of(recipe, resolve(recipe, "test"), Path(os.environ["TLX_CACHE_DIR"]))
    return ray_engine(RayOptions(**options), frozen.spec()), frozen.runner("cpu"), frozen


def test_ray_features_equal_local_features_and_make_a_local_run_warm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = small_set(tmp_path / "data")
    recipe = recipe_file(tmp_path, data, "tf_efficientnet_lite0.pypi")
    tlx(
        "run",
        recipe,
        "--cache-dir",
        tmp_path / "ray",
        "--out",
        tmp_path / "a",
        "--set",
        "extract.engine.kind=ray",
    )
    # the actors ran ONNX Runtime (extract.runtime: auto on CPU actors), as the local run does
    tlx("run", recipe, "--cache-dir", tmp_path / "local", "--out", tmp_path / "b")
    ray_features, ray_failed = features_of(tmp_path / "ray")
    local_features, local_failed = features_of(tmp_path / "local")
    assert ray_features.keys() == local_features.keys() and len(ray_features) == 10
    for key, row in local_features.items():
        torch.testing.assert_close(ray_features[key], row, atol=1e-6, rtol=0)
    assert ray_failed == local_failed and list(ray_failed) == [
        image_key(data / "train" / "ants" / "broken.jpg")
    ]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert a["skipped"] == b["skipped"] and a["test_accuracy"] == b["test_accuracy"]
    assert a["features"]["runtime"] == b["features"]["runtime"] == "onnxruntime"
    # the actors exported the backbone into their node's cache folder and probed it against torch
    records = [json.loads(r.read_text()) for r in (NODE_CACHE / "onnx").glob("*.json")]
    assert any(r.get("weights_sha256") == a["backbone"]["sha256"] and "difference" in r for r in records)

    def refuse(*args: object) -> None:
        raise AssertionError("a warm run builds no backbone")

    monkeypatch.setattr("tlx.extraction.backbone.build_backbone", refuse)
    tlx("run", recipe, "--cache-dir", tmp_path / "ray", "--out", tmp_path / "c")
    warm = json.loads((tmp_path / "c" / "metrics.json").read_text())
    # fully warm: the broken image's decoding failure comes from the cache too
    assert warm["features"]["computed"] == 0 and len(warm["skipped"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flip"])
def test_ray_features_equal_a_fresh_eager_model(tmp_path: Path, flip: bool) -> None:
    """The engine's path in the differential check of every path (tests/test_paths.py): the actors'
    features of real images, flip averaging off and on, are the eager-torch reference's."""
    from tests.test_paths import assert_reference, by_path, frozen, reference

    data = tmp_path / "data"
    for split in ("train", "val"):
        for label in ("ants", "bees"):
            (data / split / label).mkdir(parents=True)
            for source in sorted((HYMENOPTERA / split / label).glob("*.jpg"))[:2]:
                shutil.copy(source, data / split / label / source.name)
    recipe = recipe_file(tmp_path, data, "tf_efficientnet_lite0.pypi", flip=flip)
    cache = tmp_path / "cache"
    tlx("run", recipe, "--cache-dir", cache, "--out", tmp_path / "run", "--set", "extract.engine.kind=ray")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["features"]["runtime"] == "onnxruntime" and metrics["features"]["computed"] == 8
    door = frozen(data, cache, "tf_efficientnet_lite0.pypi", flip)
    splits = [
        Split(split, [(p, 0) for p in sorted((data / split).rglob("*.jpg"))]) for split in ("train", "val")
    ]
    assert door.cached(splits), "read back from what the actors computed"
    expected = reference({}, data, "tf_efficientnet_lite0.pypi", flip)
    assert_reference(by_path(splits, door.features(splits)), expected, f"ray engine, flip {flip}")


def test_a_killed_actor_is_replaced_and_every_image_is_cached_once(tmp_path: Path) -> None:
    paths = coloured(tmp_path / "images", 24)
    split = Split("s", [(p, 0) for p in paths])
    eng, runner, frozen = engine("slow", actors=1, batch_size=2)
    store = frozen.store
    assert store is not None
    killed: list[int] = []

    def kill_the_first_actor() -> None:
        while not any(RECORD.iterdir()):
            time.sleep(0.05)
        pid = int(next(RECORD.iterdir()).name)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_the_first_actor, daemon=True)
    killer.start()
    (features,) = extract([split], lambda: (runner, eng), frozen.extract, store=store)
    killer.join(timeout=5)
    assert killed and {int(f.name) for f in RECORD.iterdir()} - set(killed)  # another actor finished
    keys: Counter[str] = Counter()
    for chunk in store.folder.glob("*.safetensors"):
        with safe_open(str(chunk), framework="pt") as f:
            keys.update(json.loads(f.metadata()["keys"]))
    assert keys == Counter(image_key(p) for p in paths)  # every image, each exactly once
    (local,) = extract([split], lambda: (runner, None), frozen.extract)
    torch.testing.assert_close(features.x, local.x, atol=1e-6, rtol=0)


def test_features_far_larger_than_the_object_store_stream_through_a_flat_driver(tmp_path: Path) -> None:
    paths = coloured(tmp_path / "images", 400, size=16)
    eng, runner, _ = engine("wide", batch_size=4)
    job = Job(ImageFiles([(p, 0) for p in paths], eval_transform(runner.info.data_config)), runner, 4, 0, 1)
    me = psutil.Process()
    before, peak, total, seen = me.memory_info().rss, 0, 0, 0
    for out, indices, failures in eng.batches(job):
        assert not failures
        total += out.nbytes
        seen += len(indices)
        peak = max(peak, me.memory_info().rss - before)
        del out
    assert seen == 400 and total > 3 * STORE_BYTES  # 300 MiB of features through an 80 MiB store
    assert peak < total / 3, f"driver memory grew by {peak / 2**20:.0f} MiB for {total / 2**20:.0f} MiB"


def test_a_worker_with_other_weights_is_a_clear_error_and_nothing_is_cached(tmp_path: Path) -> None:
    paths = coloured(tmp_path / "images", 6)
    eng, runner, frozen = engine("slow", actors=1)
    eng.spec = dataclasses.replace(eng.spec, sha256="0" * 64)
    store = FeatureStore(tmp_path / "cache", {"test": 1})
    with pytest.raises(TlxError, match=r"node .* loaded other weights for slow than the driver") as caught:
        extract([Split("s", [(p, 0) for p in paths])], lambda: (runner, eng), frozen.extract, store=store)
    assert "\n" not in str(caught.value)
    assert not store.folder.exists() or not any(store.folder.glob("*.safetensors"))


def test_an_image_a_worker_cannot_read_is_an_error_not_a_bad_image(tmp_path: Path) -> None:
    paths = coloured(tmp_path / "images", 4)
    eng, runner, _ = engine("slow", actors=1)
    gone = tmp_path / "elsewhere" / "gone.png"
    job = Job(
        ImageFiles([(p, 0) for p in [*paths, gone]], eval_transform(runner.info.data_config)), runner, 4, 0, 1
    )
    with pytest.raises(TlxError, match=r"node .* cannot read .*gone.png .*every node must see the images"):
        list(eng.batches(job))


def test_predict_on_ray_writes_the_parquet_that_predict_json_prints(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for split in ("train", "val"):
        for k, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
            folder = data / split / f"c{k}"
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (20 + i, 20), tuple(c + 5 * i for c in colour)).save(folder / f"{i}.png")
    os.environ["TLX_RAY_TEST_SLEEP"] = "0"
    try:
        tlx("run", recipe_file(tmp_path, data, "slow", workers=0), "--out", tmp_path / "run")
        (data / "val" / "broken.png").write_bytes(b"not a png")
        printed = tlx("predict", tmp_path / "run", data / "val", "--top-k", "2", "--json")
        written = tlx(
            "predict",
            tmp_path / "run",
            data / "val",
            "--top-k",
            "2",
            "--engine",
            "ray",
            "--output",
            tmp_path / "out",
        )
    finally:
        del os.environ["TLX_RAY_TEST_SLEEP"]
    expected = json.loads(printed.stdout)
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert next(r["skipped"] for r in rows if r["path"].endswith("broken.png"))
    assert "skipped" in written.stderr and "broken.png" in written.stderr
    got = sorted((r for r in rows if r["skipped"] is None), key=lambda r: r["path"])
    assert [r["path"] for r in got] == sorted(e["path"] for e in expected) and len(got) == 8
    for row, want in zip(got, sorted(expected, key=lambda e: e["path"])):
        assert row["label"] == want["label"] and [t["label"] for t in row["top_k"]] == [
            t["label"] for t in want["top_k"]
        ]
        assert row["probability"] == pytest.approx(want["probability"], abs=1e-6)
        assert row["known"] == want["known"]
        assert row["ood_score"] == pytest.approx(want["ood_score"], abs=1e-6)
    # the actors ran the run's runtime (auto: ONNX Runtime), as tlx predict does: their export is probed
    sha256 = json.loads((tmp_path / "run" / "metrics.json").read_text())["backbone"]["sha256"]
    records = [json.loads(r.read_text()) for r in (NODE_CACHE / "onnx").glob("*.json")]
    assert any(r.get("weights_sha256") == sha256 and "difference" in r for r in records)
