"""End to end: the summary, per-epoch lines, metrics.json, determinism, one pass per image."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import threading
from pathlib import Path

import pytest

from tlx.recipe import BUNDLED
from tlx.run import run

from .conftest import make_imagefolder, recipe_for, run_tlx

#: a row of the epoch table: epoch, train_loss, test_loss, test_accuracy, time (mm:ss)
EPOCH_LINE = re.compile(r"^ +\d{1,3} +\d+\.\d{4} +\d+\.\d{4} +\d{1,3}\.\d\d%  \d\d:\d\d$", re.M)
HEADER = "   epoch  train_loss  test_loss  test_accuracy   time"


def test_every_image_goes_through_the_backbone_once(
    tmp_path: Path, tiny_dataset: Path, counting_backbone
) -> None:
    metrics = run(
        recipe_for(tmp_path, tiny_dataset, "train.epochs=7", "extract.runtime=torch"),
        "r.yaml",
        tmp_path / "out",
    )
    assert counting_backbone.seen == 12 + 6
    assert len(metrics["history"]) == 7


def test_same_recipe_and_seed_give_same_numbers(
    tmp_path: Path, tiny_dataset: Path, counting_backbone
) -> None:
    def metrics(out: str, seed: int) -> dict:
        result = run(recipe_for(tmp_path, tiny_dataset, f"seed={seed}"), "r.yaml", tmp_path / out)
        result.pop("seconds")
        return result

    first = metrics("a", 0)
    again = metrics("b", 0)
    assert (first.pop("features")["cached"], again.pop("features")["cached"]) == (0, 18)
    assert again == first
    assert metrics("c", 1)["history"] != first["history"]  # features from the cache, another head


def test_existing_run_folder_is_not_overwritten(
    tmp_path: Path, tiny_dataset: Path, counting_backbone
) -> None:
    recipe = recipe_for(tmp_path, tiny_dataset, "train.epochs=1")
    run(recipe, "r.yaml", tmp_path / "out")
    before = (tmp_path / "out" / "metrics.json").read_text()
    with pytest.raises(Exception, match="already holds a run"):
        run(recipe, "r.yaml", tmp_path / "out")
    assert (tmp_path / "out" / "metrics.json").read_text() == before


def test_mlp_head_options_are_validated(tmp_path: Path, tiny_dataset: Path, counting_backbone) -> None:
    ok = run(recipe_for(tmp_path, tiny_dataset, "head.type=mlp", "head.hidden=[8]"), "r.yaml", tmp_path / "a")
    assert ok["head"] == "mlp"
    with pytest.raises(Exception, match=r"unknown key head.hiden; did you mean head.hidden"):
        run(recipe_for(tmp_path, tiny_dataset, "head.type=mlp", "head.hiden=[8]"), "r.yaml", tmp_path / "b")


def test_missing_split_names_the_key_and_the_folders(
    tmp_path: Path, tiny_dataset: Path, counting_backbone
) -> None:
    with pytest.raises(Exception, match=r"dataset.test: .* has no split folder 'test' \(found: train, val\)"):
        run(recipe_for(tmp_path, tiny_dataset, "dataset.test=test"), "r.yaml", tmp_path / "out")


def test_reference_lite0_recipe_on_ants_and_bees(tmp_path: Path, hymenoptera: Path) -> None:
    out = tmp_path / "out"
    result = run_tlx("run", "hymenoptera-lite0", "--set", f"dataset.root={hymenoptera}", "--out", out)
    assert result.returncode == 0, result.stderr
    assert re.search(r"train\s+245\s+124\s+121", result.stdout)
    assert re.search(r"val\s+153\s+70\s+83", result.stdout)
    assert "images    train 245×3×224×224  val 153×3×224×224" in result.stdout
    assert "features  train 245×1280  val 153×1280" in result.stdout
    assert (
        "head      linear\ntrain     epochs=20 lr=0.001 momentum=0.9 batch_size=4 optimizer=sgd"
        in result.stdout
    )
    assert result.stdout.count(HEADER) == 1  # the table's header, once, right before the first row
    assert f"{HEADER}\n       1  " in result.stdout
    assert len(EPOCH_LINE.findall(result.stdout)) == 20
    assert re.search(
        r"^total time \d\d:\d\d \(features \d+\.\d s, training \d+\.\d s\)$", result.stdout, re.M
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["ants", "bees"]
    assert (metrics["n_train"], metrics["n_test"], metrics["feature_dim"]) == (245, 153, 1280)
    assert metrics["backbone"]["name"] == "tf_efficientnet_lite0.pypi"
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 21))
    assert metrics["test_accuracy"] >= 0.93
    assert metrics["test_accuracy"] == metrics["history"][-1]["test_accuracy"]


def test_same_recipe_on_a_five_class_dataset(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "five", classes=5, per_class=(4, 2))
    result = run_tlx("run", "hymenoptera-lite0", "--set", f"dataset.root={root}", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["classes"] == [f"class{k}" for k in range(5)]
    assert (metrics["n_train"], metrics["n_test"]) == (20, 10)
    assert len(EPOCH_LINE.findall(result.stdout)) == 20


@pytest.fixture
def zip_server(tmp_path: Path):
    """Serve a zip of a small ImageFolder dataset on localhost, like the tutorial's download."""
    make_imagefolder(tmp_path / "src" / "hymenoptera_data", classes=2)
    shutil.make_archive(str(tmp_path / "serve" / "data"), "zip", tmp_path / "src")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=tmp_path / "serve")  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/data.zip"
    server.shutdown()


def test_missing_root_is_downloaded_from_url(tmp_path: Path, zip_server: str, counting_backbone) -> None:
    root = tmp_path / "downloads" / "hymenoptera_data"
    recipe = recipe_for(tmp_path, root, f"dataset.url={zip_server}", "train.epochs=1")
    assert run(recipe, "r.yaml", tmp_path / "out")["n_train"] == 12
    assert sorted(p.name for p in root.iterdir()) == ["train", "val"]


def test_download_failure_says_to_set_root(tmp_path: Path, resnet18_file: Path) -> None:
    result = run_tlx(
        "run", BUNDLED / "hymenoptera.yaml", "--set", f"dataset.root={tmp_path / 'absent'}",
        "--set", "dataset.url=http://127.0.0.1:9/data.zip", "--set", f"backbone.weights={resnet18_file}",
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert result.returncode == 2
    assert "cannot download http://127.0.0.1:9/data.zip" in result.stderr
    assert "--set dataset.root=PATH" in result.stderr and "Traceback" not in result.stderr
