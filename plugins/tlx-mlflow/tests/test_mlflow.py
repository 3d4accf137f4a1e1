"""The mlflow tracker: a run logged to a real SQLite store, read back with mlflow; a store it cannot write."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tlx_mlflow import MlflowOptions
from torch import nn

import tlx
from tlx import plugins
from tlx.cli import cli

CONFIG = {"input_size": (3, 16, 16), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
          "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # fmt: skip


class MeanColour(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Plugins loaded anew with a tiny backbone, a private cache, no tracking URI from the environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TLX_CACHE_DIR", str(tmp_path / "cache"))
    plugins.load.cache_clear()
    register = plugins.load().backbones.registrar("test")
    register("mean-colour", lambda name, pretrained, weights: tlx.Backbone(MeanColour(), 3, CONFIG, "mean"))
    yield
    plugins.load.cache_clear()


def recipe(tmp_path: Path, **track: object) -> Path:
    """A recipe on two classes of small coloured images, tracked by mlflow with ``track`` options."""
    for split, count in (("train", 6), ("val", 3)):
        for k in range(2):
            folder = tmp_path / "data" / split / f"c{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (20 + i, 20), (100 * k + 7 * i, 50, 200 - 90 * k)).save(folder / f"{i}.png")
    path = tmp_path / "r.yaml"
    spec = {
        "dataset": {"root": str(tmp_path / "data")},
        "backbone": {"name": "mean-colour"},
        "extract": {"workers": 0},
        "train": {"epochs": 20},
        "track": [{"kind": "mlflow", **track}],
    }
    path.write_text(json.dumps(spec))
    return path


def test_the_run_is_in_the_sqlite_store_with_its_parameters_and_20_steps(tmp_path: Path) -> None:
    run = tlx.fit(recipe(tmp_path), out=tmp_path / "runs" / "first")
    assert not [w for w in run.warnings if w.startswith("tracker")]
    assert not mlflow.is_tracking_uri_set()  # logging the model left MLflow's global URI as it was
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.search_runs(experiment_names=["tlx"])
    finally:
        mlflow.set_tracking_uri(None)
    assert len(found) == 1
    row = found.iloc[0]
    assert row["status"] == "FINISHED" and row["tags.mlflow.runName"] == "first"
    assert row["params.train.epochs"] == "20" and row["params.backbone.name"] == "mean-colour"
    assert row["tags.backbone"] == "mean-colour"
    assert row["tags.weights_sha256"] == run.metrics["backbone"]["sha256"]
    assert row["metrics.test_accuracy"] == pytest.approx(run.metrics["test_accuracy"])
    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(row["run_id"], "test/accuracy")
    assert [m.step for m in history] == list(range(1, 21))
    assert [m.value for m in history] == pytest.approx([h["test_accuracy"] for h in run.metrics["history"]])
    artifacts = {a.path for a in client.list_artifacts(row["run_id"])}
    assert {"metrics.json", "recipe.yaml", "head.safetensors"} <= artifacts
    assert (run.folder / ".tlx-run.lock").is_file() and not [a for a in artifacts if a.startswith(".")]
    assert (tmp_path / "runs" / "mlartifacts").is_dir()  # next to the store, not in the working folder
    assert not (Path.cwd() / "mlruns").exists()


def test_each_figure_is_an_image_of_the_run(tmp_path: Path) -> None:
    run = tlx.fit(recipe(tmp_path), {"train.epochs": 2}, out=tmp_path / "runs" / "a")
    (run.folder / "curves.png").unlink()  # the run's folder, not its copy in the store, is checked below
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("tlx").experiment_id])
    images = [a.path for a in client.list_artifacts(found.info.run_id, "images")]
    logged = {Path(p).name.split("+")[0] for p in images if p.endswith(".png")}
    assert logged == {"curves"} | {p.stem for p in run.folder.glob("*.png")}  # reliability.png too
    assert {"confusion", "errors"} <= logged
    for name in ("confusion", "errors"):  # each as the run drew it
        (path,) = [p for p in images if Path(p).name.startswith(f"{name}+") and p.endswith(".png")]
        with Image.open(client.download_artifacts(found.info.run_id, path, str(tmp_path))) as image:
            assert image.size == Image.open(run.folder / f"{name}.png").size


def test_mlflow_tracking_uri_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "store" / "elsewhere.db"
    elsewhere.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
    tlx.fit(recipe(tmp_path), {"train.epochs": 2}, out=tmp_path / "runs" / "a")
    assert elsewhere.is_file() and not (tmp_path / "runs" / "mlflow.db").exists()
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{elsewhere}"  # as the user set it


def test_an_unwritable_store_warns_once_and_the_run_exits_0(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    path = recipe(tmp_path, tracking_uri=f"sqlite:///{blocker / 'mlflow.db'}")
    out = tmp_path / "runs" / "a"
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(out), "--set", "train.epochs=3"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "tracker 'mlflow' failed" in line]
    assert len(warnings) == 1, result.stderr
    assert f"cannot log to the MLflow store sqlite:///{blocker}" in warnings[0]
    assert (out / "metrics.json").is_file() and (out / "head.safetensors").is_file()


def run_tracked(tmp_path: Path, uri: str) -> tuple[Path, list[str]]:
    """``tlx run`` (exit 0) tracked to ``uri``: the run folder and the mlflow warnings."""
    out = tmp_path / "runs" / "a"
    path = recipe(tmp_path, tracking_uri=uri)
    result = CliRunner().invoke(cli, ["run", str(path), "--out", str(out), "--set", "train.epochs=3"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert (out / "metrics.json").is_file() and (out / "head.safetensors").is_file()
    return out, [line for line in result.stderr.splitlines() if "tracker 'mlflow' failed" in line]


def closed_port() -> int:
    """A local port where nothing listens: bound, then let go."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)  # MLflow alone retries for about four minutes
def test_a_server_that_refuses_is_one_warning_naming_it_and_the_run_exits_0(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    _, warnings = run_tracked(tmp_path, uri)
    assert len(warnings) == 1 and f"cannot log to the MLflow store {uri} (" in warnings[0]


class Unavailable(BaseHTTPRequestHandler):
    """Answers every request 503 (which MLflow retries), counting them."""

    requests = 0

    def do_GET(self) -> None:
        type(self).requests += 1
        self.send_response(503)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("retries", "requests"), [(None, 3), ("0", 1)])
def test_http_retries_are_bounded_unless_the_environment_sets_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, retries: str | None, requests: int
) -> None:
    if retries is not None:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", retries)
    Unavailable.requests = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _, warnings = run_tracked(tmp_path, f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert len(warnings) == 1
    assert Unavailable.requests == requests  # the first request and its retries; then the tracker is dropped
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == retries  # as the user left it


@pytest.mark.timeout(60)  # MLflow alone retries an unopenable SQLite file for about 100 s
def test_a_sqlite_store_that_cannot_be_opened_is_one_warning_at_once(tmp_path: Path) -> None:
    taken = tmp_path / "taken.db"
    taken.mkdir()  # a folder where the database file would go
    _, warnings = run_tracked(tmp_path, f"sqlite:///{taken}")
    assert len(warnings) == 1 and f"store sqlite:///{taken} (unable to open database file)" in warnings[0]


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_sqlite_store_in_a_read_only_folder_is_one_warning_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    _, warnings = run_tracked(tmp_path, f"sqlite:///{folder / 'mlflow.db'}")
    assert len(warnings) == 1 and f"store sqlite:///{folder / 'mlflow.db'} (" in warnings[0]


def test_options_are_validated() -> None:
    with pytest.raises(tlx.TlxError, match=r"unknown key track.0.experimnt; did you mean track.0.experiment"):
        tlx.validate_options(plugins.load().trackers.get("mlflow", "track.0.kind"), {"experimnt": "x"},
                             "track.0", "r.yaml")  # fmt: skip
    assert MlflowOptions().experiment == "tlx"


#: real photos (ants and bees), which the model and ``tlx predict`` classify
PHOTOS = sorted(Path("/work/shared/data/hymenoptera_data/val").glob("*/*.jpg"))[::15]


def test_the_registered_model_predicts_what_tlx_predict_does(tmp_path: Path) -> None:
    run = tlx.fit(recipe(tmp_path, registered_model="ants"), {"train.epochs": 3}, out=tmp_path / "runs" / "a")
    assert not [w for w in run.warnings if w.startswith("tracker")]
    result = CliRunner().invoke(
        cli, ["predict", str(run.folder), *map(str, PHOTOS), "--json", "--top-k", "2"]
    )
    assert result.exit_code == 0, result.output
    expected = json.loads(result.stdout)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    try:
        (found,) = mlflow.search_runs(experiment_names=["tlx"], output_format="list")
        model = mlflow.pyfunc.load_model("models:/ants/1")  # the registry's first version
        assert model.metadata.model_id == found.data.tags["model_uri"].removeprefix("models:/")
        by_path = model.predict(pd.DataFrame({"path": [str(p) for p in PHOTOS]}))
        by_bytes = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in PHOTOS]}))
        with pytest.raises(tlx.TlxError, match="model input row 0: give one of 'path' and 'image'"):
            model.predict(pd.DataFrame({"path": [None], "image": [None]}))
        with pytest.raises(tlx.TlxError, match=r"^model input row 1: its 'image' bytes are not an image"):
            model.predict(pd.DataFrame({"image": [PHOTOS[0].read_bytes(), b"hello"]}))
        requirements = Path(mlflow.pyfunc.get_model_dependencies(found.data.tags["model_uri"])).read_text()
    finally:
        mlflow.set_tracking_uri(None)
    assert len(expected) == len(PHOTOS) > 3
    for frame in (by_path, by_bytes):
        assert list(frame.columns) == ["c0", "c1", "label", "known", "ood_score"]
        for (_, row), answer in zip(frame.iterrows(), expected, strict=True):
            assert {c: row[c] for c in ("c0", "c1")} == pytest.approx(
                {t["label"]: t["probability"] for t in answer["top_k"]}, abs=1e-6
            )
            assert (row["label"], row["known"]) == (answer["label"], answer["known"])
            assert row["ood_score"] == pytest.approx(answer["ood_score"], abs=1e-6)
    assert f"tlx-vision=={tlx.__version__}" in requirements.splitlines()
