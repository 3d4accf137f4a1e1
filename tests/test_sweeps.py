"""tlx sweep, its leaderboard and selection score, tlx compare, and tlx.sweep."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

import tlx
from tests.conftest import TLX, assert_user_error, make_imagefolder, write_recipe
from tests.test_artifacts import COLOURS
from tlx import artifacts, sweeps
from tlx.default_plugins.heads import LogRegOptions
from tlx.runfiles import Metrics
from tlx.sweeps import leaderboard
from tlx.train import with_choices

HEADS = {"head.type": ["linear", "mlp"]}  # logreg on separable colours takes seconds


def sweep_recipe(tmp_path: Path, root: Path, extra: str = "") -> Path:
    """The counting backbone on ``root``, two quick epochs."""
    return write_recipe(
        tmp_path / "sweep.yaml",
        f"""
        dataset: {{root: {root}}}
        backbone: {{name: counting}}
        extract: {{workers: 0, runtime: torch}}  # torch runs the module that counts
        train: {{epochs: 2}}
        {extra}
        """,
    )


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Three classes, six training and three test images each."""
    return make_imagefolder(tmp_path / "data", classes=3)


def test_sweep_runs_each_combination_extracting_features_once(
    tmp_path: Path, dataset: Path, counting_backbone, capsys: pytest.CaptureFixture
) -> None:
    capsys.readouterr()
    done = tlx.sweep(sweep_recipe(tmp_path, dataset), HEADS, out=tmp_path / "sw")
    assert capsys.readouterr() == ("", "")  # quiet by default
    assert counting_backbone.seen == 27  # every image once, for both heads
    assert sorted(r["run"] for r in done.rows) == ["linear", "mlp"]
    for row in done.rows:
        metrics = json.loads((done.folder / row["run"] / "metrics.json").read_text())
        assert "sweep" not in yaml.safe_load((done.folder / row["run"] / "recipe.yaml").read_text())
        assert metrics["selection"]["selected_by"] == "5-fold cross-validation on the training split"
        assert len(metrics["selection"]["scores"]) == 5
        assert row["selection"] == metrics["selection"]["mean"]
        assert row["test_accuracy"] == metrics["test_accuracy"]
    with (done.folder / "leaderboard.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["run"] for r in table] == [r["run"] for r in done.rows]
    assert [float(r["selection"]) for r in table] == sorted(
        (float(r["selection"]) for r in table), reverse=True
    )
    assert table[0]["winner"] == "True" and table[1]["winner"] == "False"
    markdown = (done.folder / "leaderboard.md").read_text()
    assert markdown.count("\n| ") == 4 and "★" in markdown  # header, rule, two rows
    assert (done.folder / "leaderboard.png").stat().st_size > 1000
    assert (
        (done.folder / "best").resolve() == (done.folder / table[0]["run"]).resolve() == done.best.resolve()
    )


def test_permuted_test_labels_change_no_selection_score_nor_the_winner(
    tmp_path: Path, dataset: Path, counting_backbone
) -> None:
    permuted = shutil.copytree(dataset, tmp_path / "permuted")
    for k in range(3):  # one test image of each class now carries the next class's label
        (permuted / "val" / f"class{k}" / "0.jpg").rename(
            permuted / "val" / f"class{(k + 1) % 3}" / "moved.jpg"
        )
    grid = {"head.type": ["linear", "logreg", "mlp"]}
    runs = [
        tlx.sweep(sweep_recipe(tmp_path, root), grid, out=tmp_path / f"sw-{root.name}")
        for root in (dataset, permuted)
    ]
    scores = [{r["run"]: (r["selection"], r["selection_std"]) for r in sweep.rows} for sweep in runs]
    assert scores[0] == scores[1]
    assert runs[0].rows[0]["run"] == runs[1].rows[0]["run"]
    tests = [{r["run"]: r["test_accuracy"] for r in sweep.rows} for sweep in runs]
    assert tests[0] != tests[1]  # the permutation did change what the test split says


def test_sweep_resumes_keeping_finished_runs(tmp_path: Path, dataset: Path, counting_backbone) -> None:
    recipe, out = sweep_recipe(tmp_path, dataset), tmp_path / "sw"
    tlx.sweep(recipe, HEADS, out=out)
    kept = (out / "linear" / "metrics.json").stat().st_mtime_ns
    (out / "mlp" / "metrics.json").unlink()  # as if the sweep stopped while running mlp
    again = tlx.sweep(recipe, HEADS, out=out)
    assert (out / "linear" / "metrics.json").stat().st_mtime_ns == kept
    assert (out / "mlp" / "metrics.json").is_file()
    assert len(again.rows) == 2


def test_resume_refuses_a_folder_run_with_another_recipe(
    tmp_path: Path, dataset: Path, counting_backbone, invoke
) -> None:
    recipe, out = sweep_recipe(tmp_path, dataset), tmp_path / "sw"
    tlx.sweep(recipe, HEADS, out=out)
    result = invoke(
        "sweep", recipe, "--grid", "head.type=linear,mlp", "--set", "train.epochs=3", "--out", out
    )
    assert_user_error(result, str(out / "linear"), "train.epochs: 2 there, 3 now", "new --out")


def test_sweep_command_prints_progress_and_the_leaderboard(
    tmp_path: Path, dataset: Path, counting_backbone, invoke
) -> None:
    recipe = sweep_recipe(tmp_path, dataset, "sweep: {head.type: [linear, mlp]}")
    result = invoke("sweep", recipe, "--out", tmp_path / "sw")
    assert result.exit_code == 0, result.output
    assert "[1/2] head.type=linear: selection" in result.output
    assert "[2/2] head.type=mlp: selection" in result.output
    assert "| rank | head.type | selection (mean ± std) |" in result.output
    assert "winner " in result.output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--grid", "trian.epochs=1,2"], ["--grid trian.epochs", "unknown key trian", "did you mean train?"]),
        (["--grid", "train.epoch=1,2"], ["unknown key train.epoch", "did you mean train.epochs?"]),
        (["--grid", "head.type="], ["--grid head.type", "an empty list"]),
        (["--grid", "head.type=linear,nope"], ["sweep combination head.type=nope", "unknown head 'nope'"]),
        (["--grid", "train.epochs=1,0"], ["sweep combination train.epochs=0", "train.epochs"]),
        (["--grid", "head.type=linear,mlp", "--grid", "head.hiden=[8]"], ["head.hiden", "head.type=linear"]),
        (
            ["--grid", "train.epochs=1,2,3", "--grid", "head.type=linear,mlp", "--max-combinations", "5"],
            ["6 combinations", "3 train.epochs × 2 head.type", "--max-combinations 6"],
        ),
        (["--grid", "strategy=finetune"], ["strategy=finetune", "strategy: features"]),
        (["--set", "train.epochs=3"], ["nothing to sweep", "--grid"]),
        (["--grid", "head.type"], ["--grid 'head.type'", "KEY=V1,V2"]),
        (["--grid", "head.type=linear,linear"], ["--grid head.type", "linear is given twice"]),
        (["--grid", "head.type=mlp", "--grid", "head.type=mlp"], ["--grid head.type", "mlp is given twice"]),
        (["--grid", "head.tpye=linear,mlp"], ["unknown key head.tpye", "did you mean head.type?"]),
    ],
)
def test_bad_grids_fail_before_any_run_in_one_line(
    tmp_path: Path, dataset: Path, counting_backbone, invoke, args: list[str], words: list[str]
) -> None:
    result = invoke("sweep", sweep_recipe(tmp_path, dataset), *args, "--out", tmp_path / "sw")
    assert_user_error(result, *words)
    assert counting_backbone.seen == 0
    assert not (tmp_path / "sw").exists()


def test_bad_sweep_sections_and_run_of_a_sweep_recipe(tmp_path: Path, dataset: Path, invoke) -> None:
    recipe = sweep_recipe(tmp_path, dataset, "sweep: {head.type: linear}")
    assert_user_error(invoke("sweep", recipe), f"{recipe}: sweep.head.type", "expected a list")
    recipe = sweep_recipe(tmp_path, dataset, "sweep: [head.type]")
    assert_user_error(invoke("sweep", recipe), f"{recipe}: sweep", "mapping")
    recipe = sweep_recipe(tmp_path, dataset, "sweep: {head.type: [linear, mlp, linear]}")
    assert_user_error(invoke("sweep", recipe), f"{recipe}: sweep.head.type", "linear is given twice")
    recipe = sweep_recipe(tmp_path, dataset, "sweep: {head.type: [linear, mlp]}")
    assert_user_error(invoke("run", recipe), f"{recipe}: sweep", "tlx sweep")


def test_ties_go_to_the_smaller_feature_dimension() -> None:
    def result(mean: float, dim: int) -> Metrics:
        seconds = {"extract": 0.0, "train": 0.0, "total": 0.0}
        selection = {"mean": mean, "std": 0.0, "scores": [mean], "selected_by": "5-fold", "seconds": 0.0}
        return Metrics.model_validate(
            {
                "selection": selection,
                "test_accuracy": 0.5,
                "feature_dim": dim,
                "seconds": seconds,
                "n_train": 3,
            }
        )

    combos = [SimpleNamespace(name=n, values={"backbone.name": n}) for n in ("big", "small", "best")]
    rows = leaderboard(
        combos, {"big": result(0.9, 2048), "small": result(0.9, 512), "best": result(0.95, 4096)}
    )
    assert [r["run"] for r in rows] == ["best", "small", "big"]
    assert [r["winner"] for r in rows] == [True, False, False]


def test_selection_folds_keep_the_heads_own_choice() -> None:
    fixed = with_choices(LogRegOptions(), {"l2": 0.1, "selected_by": "5-fold cross-validation"})
    assert fixed.l2 == [0.1]
    assert with_choices(LogRegOptions(), {}).l2 == LogRegOptions().l2


def test_selection_uses_the_validation_split_when_set(
    tmp_path: Path, dataset: Path, counting_backbone
) -> None:
    recipe = sweep_recipe(tmp_path, dataset)
    done = tlx.sweep(recipe, HEADS, ["train.val_fraction=0.34"], out=tmp_path / "sw")
    for row in done.rows:
        assert row["selected_by"] == "validation split (train.val_fraction 0.34)"
        assert row["selection_std"] == 0


def test_compare_shows_the_keys_that_differ(tmp_path: Path, dataset: Path, counting_backbone, invoke) -> None:
    out = tmp_path / "sw"
    tlx.sweep(sweep_recipe(tmp_path, dataset), {"head.type": ["linear", "mlp"], "train.lr": [0.01]}, out=out)
    tlx.sweep(sweep_recipe(tmp_path, dataset), {"head.type": ["linear"], "train.lr": [0.1]}, out=out / "more")
    result = invoke("compare", out, out / "more", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["head.type"], r["train.lr"]) for r in rows] == [
        ("linear", 0.01),
        ("mlp", 0.01),
        ("linear", 0.1),
    ]
    assert {k for k in rows[0] if "." in k} == {"head.type", "train.lr"}  # mlp's options are no difference
    assert all(isinstance(r["selection"], float) and isinstance(r["test_accuracy"], float) for r in rows)
    text = invoke("compare", out, out / "linear-0.01")
    assert text.exit_code == 0 and len(text.output.splitlines()) == 3  # header and two runs, once each
    markdown = invoke("compare", out / "linear-0.01", out / "mlp-0.01", "--markdown").output.splitlines()
    assert markdown[0].startswith("| run | head.type | test accuracy |") and len(markdown) == 4


def test_compare_refuses_a_folder_without_runs(tmp_path: Path, invoke) -> None:
    assert_user_error(invoke("compare", tmp_path), str(tmp_path), "not a tlx run or sweep folder")


def _without_timings(value: Any) -> Any:
    """``value`` less every duration (``seconds``, ``*_s``), which differ from run to run."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds" and not k.endswith("_s")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_parallel_sweep_gives_the_sequential_results(
    tmp_path: Path, dataset: Path, counting_backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, run = tmp_path / "pids.txt", sweeps._run

    def logged(combination, *args):  # forked children inherit it: each appends its own line
        with log.open("a") as f:
            f.write(f"{os.getpid()} {combination.name}\n")
        return run(combination, *args)

    monkeypatch.setattr(sweeps, "_run", logged)
    recipe, grid = sweep_recipe(tmp_path, dataset), {"head.type": ["linear", "mlp"], "train.lr": [0.01, 0.1]}
    one = tlx.sweep(recipe, grid, out=tmp_path / "one", cache_dir=tmp_path / "cache1", jobs=1)
    assert {line.split()[0] for line in log.read_text().splitlines()} == {str(os.getpid())}
    log.unlink()
    two = tlx.sweep(recipe, grid, out=tmp_path / "two", cache_dir=tmp_path / "cache2", jobs=2)
    lines = [line.split() for line in log.read_text().splitlines()]
    here = [name for pid, name in lines if pid == str(os.getpid())]
    assert len(lines) == 4 and here == [lines[0][1]]  # the first extracts, here; the rest in children
    assert counting_backbone.seen == 2 * 27  # once per sweep (each its own cache)
    assert _without_timings(one.rows) == _without_timings(two.rows)
    for row in one.rows:
        runs = [sweep.folder / row["run"] for sweep in (one, two)]
        metrics = [_without_timings(json.loads((run / "metrics.json").read_text())) for run in runs]
        assert [m.pop("features").pop("cache_dir") for m in metrics] == [
            str(tmp_path / c) for c in ("cache1", "cache2")
        ]
        assert metrics[0] == metrics[1]
        assert (runs[0] / "predictions.csv").read_text() == (runs[1] / "predictions.csv").read_text()


def test_an_error_in_a_parallel_combination_is_one_line(
    tmp_path: Path, dataset: Path, counting_backbone, invoke
) -> None:
    recipe = sweep_recipe(tmp_path, dataset)
    args = ["--grid", "train.val_fraction=0.34,0.99", "--jobs", "2", "--out", tmp_path / "sw"]
    result = invoke("sweep", recipe, *args)  # 0.99 fails in a child: its features are cached by then
    assert_user_error(result, "train.val_fraction: 0.99 leaves class")
    assert (tmp_path / "sw" / "0.34" / "metrics.json").is_file()


def test_a_key_given_twice_to_grid_tries_the_values_of_both(
    tmp_path: Path, dataset: Path, counting_backbone, invoke
) -> None:
    args = ["--grid", "head.type=linear", "--grid", "head.type=mlp", "--out", tmp_path / "sw"]
    result = invoke("sweep", sweep_recipe(tmp_path, dataset), *args)
    assert result.exit_code == 0, result.output
    assert "[1/2] head.type=linear: selection" in result.output
    assert "[2/2] head.type=mlp: selection" in result.output


def test_resume_runs_again_the_runs_made_on_other_data(
    tmp_path: Path, dataset: Path, counting_backbone, invoke
) -> None:
    recipe, out = sweep_recipe(tmp_path, dataset), tmp_path / "sw"
    assert {row["train_images"] for row in tlx.sweep(recipe, HEADS, out=out).rows} == {18}
    make_imagefolder(dataset, classes=3, per_class=(10, 3))  # 30 training images now, 18 before
    result = invoke("sweep", recipe, "--grid", "head.type=linear,mlp", "--out", out)
    assert result.exit_code == 0, result.output
    for n, name in enumerate(["linear", "mlp"], 1):
        assert (
            f"[{n}/2] head.type={name}: running it again: the dataset has changed since {out / name} ran "
            "(18 training and 9 test images then, 30 and 9 now)\n" in result.output
        )
        assert json.loads((out / name / "metrics.json").read_text())["n_train"] == 30
    assert "| train images |" in result.output and "| 30 |" in result.output
    assert "| 18 |" not in (out / "leaderboard.md").read_text()


def test_resume_runs_again_the_runs_whose_files_are_damaged(
    tmp_path: Path, dataset: Path, counting_backbone, invoke
) -> None:
    recipe, out = sweep_recipe(tmp_path, dataset), tmp_path / "sw"
    grid = {"head.type": ["linear", "mlp"], "train.lr": [0.01, 0.1]}
    tlx.sweep(recipe, grid, out=out)
    metrics = json.loads((out / "linear-0.01" / "metrics.json").read_text())
    damage = {
        "linear-0.01": json.dumps(metrics | {"selection": None}),
        "linear-0.1": json.dumps({k: v for k, v in metrics.items() if k != "seconds"}),
        "mlp-0.01": json.dumps(metrics | {"test_accuracy": "0.9"}),
        "mlp-0.1": "{not json",
    }
    for name, text in damage.items():
        (out / name / "metrics.json").write_text(text)
    bomb = "".join(f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 10)}]\n" for n in range(1, 6))
    (out / "mlp-0.1" / "recipe.yaml").write_text("l0: &l0 [x]\n" + bomb)  # 10**5 values, expanded
    result = invoke(
        "sweep", recipe, "--grid", "head.type=linear,mlp", "--grid", "train.lr=0.01,0.1", "--out", out
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "running it again" in line]
    assert len(lines) == 4, result.output
    for line, words in zip(
        lines,
        [
            "linear-0.01/metrics.json: selection: missing",
            "linear-0.1/metrics.json: missing required key seconds",
            "mlp-0.01/metrics.json: test_accuracy: Input should be a valid number",
            "mlp-0.1/recipe.yaml: line 5: more than 10000 values",
        ],
    ):
        assert words in line
    for name in damage:
        assert json.loads((out / name / "metrics.json").read_text())["selection"]["mean"] > 0


def test_resume_refuses_a_folder_that_an_earlier_sweep_still_holds(
    tmp_path: Path, dataset: Path, counting_backbone, invoke
) -> None:
    """As after ``kill -9`` of a parallel sweep: its forked processes still hold the folder and a run."""
    recipe, out = sweep_recipe(tmp_path, dataset), tmp_path / "sw"
    with artifacts.run_folder(out, recipe), artifacts.run_folder(out / "mlp", recipe):
        result = invoke("sweep", recipe, "--grid", "head.type=linear,mlp", "--out", out)
        assert_user_error(
            result, f"a previous sweep is still finishing in {out} (process {os.getpid()})", "wait for it"
        )
        assert counting_backbone.seen == 0


def _group(pgid: int) -> list[int]:
    """The processes of process group ``pgid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sweeps.can_fork(), reason="a parallel sweep forks (Linux)")
def test_ctrl_c_stops_a_parallel_sweep_and_its_children(tmp_path: Path, dataset: Path, fake_plugin) -> None:
    """Ctrl-C to the process group (as a terminal sends it) or to the sweep alone, while children train."""
    env = {**os.environ, **fake_plugin("tlx-colours", COLOURS.format(delay=0)), "HF_HUB_OFFLINE": "1"}
    recipe = write_recipe(
        tmp_path / "colours.yaml", f"dataset: {{root: {dataset}}}\nbackbone: {{name: colours}}\n"
    )
    grid = ["--grid", "train.epochs=1,3000", "--grid", "head.type=linear,mlp", "--jobs", "3"]
    for attempt, to_group in enumerate([True, False, True]):
        out = tmp_path / f"sw{attempt}"
        process = subprocess.Popen(
            [*TLX, "sweep", recipe, *grid, "--out", out, "--set", "extract.workers=0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            slow = [out / "3000-linear", out / "3000-mlp"]
            while not all((run / artifacts.LOCK_FILE).exists() for run in slow):  # both train, in children
                assert process.poll() is None, process.communicate()
                time.sleep(0.05)
            if to_group:
                os.killpg(process.pid, signal.SIGINT)
            else:
                process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=60)
            assert process.returncode == 130, stderr
            assert stderr.strip().splitlines()[-1] == "tlx: interrupted", stderr
            assert "Traceback" not in stderr and "Process" not in stderr and stderr.count("tlx: ") == 1
            assert _group(process.pid) == []
            assert not any((run / "metrics.json").exists() for run in slow)
        finally:
            for pid in _group(process.pid):
                os.kill(pid, signal.SIGKILL)
