"""Experiment trackers: the ``track`` recipe section, the built-in ``tensorboard``, a failing tracker."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import assert_user_error, recipe_for
from tlx import plugins
from tlx.report import QuietConsole
from tlx.run import run


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the event files under ``folder``, as (step, value) pairs."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_one_point_per_epoch_of_the_reference_training(
    tmp_path: Path, hymenoptera: Path, counting_backbone, invoke
) -> None:
    out = tmp_path / "out"
    recipe_for(tmp_path, hymenoptera)  # the reference recipe's head and training, on the counting backbone
    result = invoke(
        "run", tmp_path / "r.yaml", "--out", out, "--set", "train.epochs=20",
        "--set", "track=[{kind: tensorboard}]",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    history = json.loads((out / "metrics.json").read_text())["history"]
    series = scalars(out / "tb")
    assert [step for step, _ in series["test/accuracy"]] == list(range(1, 21))
    assert [v for _, v in series["test/accuracy"]] == pytest.approx([h["test_accuracy"] for h in history])
    assert [v for _, v in series["train/loss"]] == pytest.approx([h["train_loss"] for h in history])
    assert "val/loss" not in series  # no validation split
    metrics = json.loads((out / "metrics.json").read_text())
    assert series["test_accuracy"][-1][1] == pytest.approx(metrics["test_accuracy"])
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert events.PluginTagToContent("hparams")  # the resolved recipe as hyperparameters
    figures = sorted(out.glob("*.png"))
    assert {"curves.png", "confusion.png", "errors.png"} <= {f.name for f in figures}
    assert sorted(events.Tags()["images"]) == sorted(f"figures/{f.stem}" for f in figures)
    for figure in figures:  # each figure whole, as the PNG the run wrote
        (image,) = events.Images(f"figures/{figure.stem}")
        with Image.open(figure) as png, Image.open(io.BytesIO(image.encoded_image_string)) as logged:
            assert (logged.width, logged.height) == png.size
            assert np.array_equal(np.asarray(logged.convert("RGB")), np.asarray(png.convert("RGB")))


def test_tensorboard_logs_the_validation_loss_when_there_is_a_validation_split(
    tmp_path: Path, tiny_dataset: Path, counting_backbone
) -> None:
    recipe = recipe_for(
        tmp_path, tiny_dataset, "train.epochs=3", "train.val_fraction=0.5", "track=[{kind: tensorboard}]"
    )
    run(recipe, "r.yaml", tmp_path / "out")
    series = scalars(tmp_path / "out" / "tb")
    assert [step for step, _ in series["val/loss"]] == [1, 2, 3]
    assert len(series["test/accuracy"]) == 3


class Recorder:
    """A tracker that records its calls; ``broken`` names a method that raises."""

    def __init__(self, calls: list[tuple[str, Any]], broken: str = "") -> None:
        self.calls = calls
        self.broken = broken

    def _record(self, name: str, *args: Any) -> None:
        if name == self.broken:
            raise OSError(f"the store is unreachable ({name})")
        self.calls.append((name, *args))

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        self._record("start", params, tags)

    def epoch(self, step: int, metrics: dict[str, float]) -> None:
        self._record("epoch", step, metrics)

    def finish(self, metrics: dict[str, float], run_dir: Path) -> None:
        self._record("finish", metrics, run_dir)

    def fail(self) -> None:
        self._record("fail")


def register_recorder(calls: list[tuple[str, Any]], broken: str = "") -> None:
    register = plugins.load().trackers.registrar("test-plugin")
    register("recorder", lambda options, run_dir: Recorder(calls, broken))


def test_a_tracker_gets_the_flattened_recipe_each_epoch_and_the_final_metrics(
    tmp_path: Path, tiny_dataset: Path, counting_backbone
) -> None:
    calls: list[tuple[str, Any]] = []
    register_recorder(calls)
    out = tmp_path / "out"
    metrics = run(recipe_for(tmp_path, tiny_dataset, "train.epochs=4", "track=[{kind: recorder}]"), "r", out)
    assert [c[0] for c in calls] == ["start", "epoch", "epoch", "epoch", "epoch", "finish"]
    _, params, tags = calls[0]
    assert params["train.epochs"] == 4 and params["dataset.root"] == str(tiny_dataset.resolve())
    assert params["backbone.name"] == "counting" and "track" not in str(list(params))
    assert tags["backbone"] == "counting" and tags["weights_sha256"] == metrics["backbone"]["sha256"]
    assert tags["backbone_plugin"] == "test-plugin" and tags["head_plugin"] == "tlx.heads"
    assert [c[1] for c in calls[1:5]] == [1, 2, 3, 4]
    assert calls[4][2]["test/accuracy"] == metrics["history"][-1]["test_accuracy"]
    assert calls[5][1]["test_accuracy"] == metrics["test_accuracy"] and calls[5][2] == out


def test_a_run_that_fails_marks_its_tracker_run_failed(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tlx import artifacts

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts, "write_run", full_disk)
    calls: list[tuple[str, Any]] = []
    register_recorder(calls)
    with pytest.raises(Exception, match="cannot write the run folder"):
        run(
            recipe_for(tmp_path, tiny_dataset, "train.epochs=2", "track=[{kind: recorder}]"),
            "r",
            tmp_path / "o",
        )
    assert [c[0] for c in calls] == ["start", "epoch", "epoch", "fail"]


@pytest.mark.parametrize("broken", ["start", "epoch", "finish"])
def test_a_failing_tracker_warns_once_and_the_run_completes(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, broken: str
) -> None:
    calls: list[tuple[str, Any]] = []
    register_recorder(calls, broken)
    console = QuietConsole()
    out = tmp_path / "out"
    recipe = recipe_for(
        tmp_path, tiny_dataset, "train.epochs=5", "track=[{kind: recorder}, {kind: tensorboard}]"
    )
    metrics = run(recipe, "r", out, console=console)
    assert [w for w in console.warnings if w.startswith("tracker")] == [
        f"tracker 'recorder' failed and is left out of this run: OSError: the store is unreachable ({broken})"
    ]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert len(scalars(out / "tb")["test/accuracy"]) == 5  # the other tracker went on


def test_a_tracker_from_a_missing_package_names_the_package(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, invoke, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TLX_DISABLE_PLUGIN_AUTOLOAD", "1")  # as if tlx-mlflow were not installed
    plugins.load.cache_clear()
    register = plugins.load().backbones.registrar("test-plugin")
    register("counting", lambda name, pretrained, weights: None)
    recipe_for(tmp_path, tiny_dataset)
    out = tmp_path / "out"
    result = invoke("run", tmp_path / "r.yaml", "--out", out, "--set", "track=[{kind: mlflow}]")
    assert_user_error(result, "--set track", "'mlflow'", "pip install -e plugins/tlx-mlflow")
    assert not out.exists()


@pytest.mark.parametrize(
    ("track", "words"),
    [
        ("[{kind: tensorboard, flush: 3}]", ["--set track", "unknown key track.0.flush"]),
        ("[{}]", ["--set track", "missing required key track.0.kind"]),
        ("[{kind: tensorbord}]", ["--set track", "unknown tracker 'tensorbord'", "did you mean tensorboard"]),
    ],
)
def test_bad_track_entries_are_one_line_errors(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, invoke, track: str, words: list[str]
) -> None:
    recipe_for(tmp_path, tiny_dataset)
    result = invoke("run", tmp_path / "r.yaml", "--out", tmp_path / "out", "--set", f"track={track}")
    assert_user_error(result, *words)


def test_tlx_list_shows_the_trackers(invoke) -> None:
    result = invoke("list", "--json")
    assert result.exit_code == 0, result.output
    assert "tensorboard" in [t["name"] for t in json.loads(result.stdout)["trackers"]]


def test_loading_the_plugins_imports_no_tracker_library() -> None:
    code = "import sys, tlx.plugins; tlx.plugins.load(); print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'mlflow', 'tensorboardX') or m == 'torch.utils.tensorboard'))"  # noqa: E501
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_sweep_logs_one_tracker_run_per_combination_grouped_by_the_sweep(
    tmp_path: Path, tiny_dataset: Path, counting_backbone
) -> None:
    from tlx.sweeps import sweep

    calls: list[tuple[str, Any]] = []
    register_recorder(calls)
    recipe_for(tmp_path, tiny_dataset)
    grid = {"train.lr": [0.01, 0.1]}
    overrides = ["train.epochs=2", "track=[{kind: recorder}]"]
    # one process: the recorder keeps its calls in this process's memory (--jobs forks)
    done = sweep(tmp_path / "r.yaml", grid, overrides, out=tmp_path / "sw", jobs=1)
    starts = [c for c in calls if c[0] == "start"]
    assert sorted(c[1]["train.lr"] for c in starts) == [0.01, 0.1]
    assert {c[2]["sweep"] for c in starts} == {"sw"} == {done.folder.name}
    assert sorted(c[2] for c in calls if c[0] == "finish") == sorted(
        tmp_path / "sw" / r["run"] for r in done.rows
    )


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # the writer thread's
@pytest.mark.parametrize("how", ["proc", "chmod"])
def test_tensorboard_that_cannot_write_its_files_is_one_warning_no_traceback(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, invoke, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    if how == "proc":  # a folder where even root creates no file
        if not Path("/proc/self/fdinfo").is_dir():
            pytest.skip("no /proc")
        events = Path("/proc/self/fdinfo")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        events = tmp_path / "read-only"
        events.mkdir(mode=0o555)
    # the run folder itself must be new or empty, so the event folder is moved (an absolute path wins)
    monkeypatch.setattr("tlx.default_plugins.tensorboard.FOLDER", str(events))
    recipe_for(tmp_path, tiny_dataset)
    result = invoke("run", tmp_path / "r.yaml", "--out", out, "--set", "track=[{kind: tensorboard}]")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "Exception in thread" not in result.output
    warnings = [line for line in result.stderr.splitlines() if "tracker 'tensorboard' failed" in line]
    assert len(warnings) == 1, result.stderr
    assert (out / "metrics.json").is_file()
