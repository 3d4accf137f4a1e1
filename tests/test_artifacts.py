"""The run folder under bad conditions: concurrent runs, SIGTERM, damaged run files, failing writes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
import yaml

from tlx import artifacts
from tlx.errors import TlxError
from tlx.files import FILE_MODE
from tlx.predict import predict
from tlx.run import run

from .conftest import REPO, TLX, assert_user_error, make_imagefolder, recipe_for, write_recipe

#: a backbone plugin for ``tlx`` subprocesses: the mean colour of an image, after ``DELAY`` seconds
COLOURS = """
import time

import tlx
from torch import nn

from tlx.registry import Backbone

DELAY = {delay}
CONFIG = {{"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0,
          "crop_mode": "center", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}}


class Colours(nn.Module):
    def forward(self, x):
        time.sleep(DELAY)
        return x.mean(dim=(2, 3))


@tlx.hookimpl
def register_backbones(register):
    register("colours", lambda name, pretrained, weights: Backbone(Colours(), 3, CONFIG, "mean colour"))
"""


def colours_recipe(tmp_path: Path, root: Path) -> Path:
    recipe = "dataset: {{root: {root}}}\nbackbone: {{name: colours}}\nextract: {{workers: 0}}\n"
    return write_recipe(tmp_path / "colours.yaml", recipe.format(root=root) + "train: {epochs: 1}\n")


# --- 1. concurrent runs ----------------------------------------------------------------------------


def test_new_run_folders_made_in_the_same_second_differ(tmp_path: Path) -> None:
    first = artifacts.new_run_folder(Path("r.yaml"), tmp_path / "runs")
    second = artifacts.new_run_folder(Path("r.yaml"), tmp_path / "runs")
    assert first != second and first.is_dir() and second.is_dir()


def test_runs_started_together_without_out_finish_in_their_own_folders(
    tmp_path: Path, tiny_dataset: Path, fake_plugin
) -> None:
    env = fake_plugin("tlx-colours", COLOURS.format(delay=0))
    recipe = colours_recipe(tmp_path, tiny_dataset)
    processes = [
        subprocess.Popen(
            [*TLX, "run", recipe],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env, "HF_HUB_OFFLINE": "1", "TLX_CACHE_DIR": str(tmp_path / f"cache{i}")},
        )
        for i in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2
    for folder in folders:
        assert json.loads((folder / "metrics.json").read_text())["n_train"] == 12
        assert artifacts.lock_holder(folder) is None  # the mark stays, unlocked


def test_a_folder_held_by_a_live_run_refuses_a_second_run(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, invoke
) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml", f"dataset: {{root: {tiny_dataset}}}\nbackbone: {{name: counting}}\n"
    )
    out = tmp_path / "out"
    with artifacts.run_folder(out, recipe):
        result = invoke("run", recipe, "--out", out, "--set", "extract.workers=0")
        assert_user_error(result, f"--out: {out} is in use by another tlx run (process {os.getpid()})")
        assert "features" not in result.stdout
    assert not out.exists()  # the holder wrote nothing: its folder is gone, and the refused run left none

    result = invoke("run", recipe, "--out", out, "--set", "extract.workers=0")  # free again
    assert result.exit_code == 0, result.output
    assert artifacts.lock_holder(out) is None  # the mark stays, unlocked
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(FILE_MODE)}
    assert_user_error(invoke("run", recipe, "--out", out), "already holds a run (metrics.json)")


def test_a_run_never_writes_into_a_folder_of_other_files(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, invoke, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cd project && tlx run recipe.yaml --out .`` must not replace the recipe being read."""
    project = tmp_path / "project"
    project.mkdir()
    recipe = write_recipe(
        project / "recipe.yaml",
        f"# my notes\ndataset: {{root: {tiny_dataset}}}\nbackbone: {{name: counting}}\n",
    )
    (project / "history.csv").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in project.iterdir()}
    monkeypatch.chdir(project)
    result = invoke("run", "recipe.yaml", "--out", ".", "--set", "extract.workers=0")
    assert_user_error(result, "--out: . already holds files tlx did not write there (2, first: history.csv)")
    assert {p.name: p.read_bytes() for p in project.iterdir()} == before

    empty = tmp_path / "empty"
    empty.mkdir()
    assert invoke("run", recipe, "--out", empty, "--set", "extract.workers=0").exit_code == 0


def test_an_unfinished_run_folder_is_tlxs_to_write_again(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, invoke, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml", f"dataset: {{root: {tiny_dataset}}}\nbackbone: {{name: counting}}\n"
    )
    out = tmp_path / "out"

    def full_disk(*args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts, "write_predictions", full_disk)
    assert_user_error(invoke("run", recipe, "--out", out, "--set", "extract.workers=0"), "free space")
    assert (out / artifacts.LOCK_FILE).exists() and not (out / "metrics.json").exists()
    monkeypatch.undo()
    result = invoke("run", recipe, "--out", out, "--set", "extract.workers=0")
    assert result.exit_code == 0, result.output
    assert artifacts.lock_holder(out) is None  # the mark stays, unlocked


# --- 2. SIGTERM --------------------------------------------------------------------------------------


def test_sigterm_exits_143_and_leaves_no_empty_run_folder(
    tmp_path: Path, tiny_dataset: Path, fake_plugin
) -> None:
    env = fake_plugin("tlx-colours", COLOURS.format(delay=30))
    out = tmp_path / "out"
    process = subprocess.Popen(
        [*TLX, "run", colours_recipe(tmp_path, tiny_dataset), "--out", out],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env, "HF_HUB_OFFLINE": "1"},
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("images"):  # extraction starts now, in the slow backbone
            break
    assert out.is_dir()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "tlx: terminated" in stderr and "Traceback" not in stderr
    assert not out.exists()


# --- 3. predict on damaged run files -----------------------------------------------------------------


@pytest.fixture
def trained(tmp_path: Path, tiny_dataset: Path, counting_backbone) -> Path:
    out = tmp_path / "run"
    overrides = ("head.type=mlp", "head.hidden=[4]", "train.epochs=1", "extract.runtime=torch")  # it counts
    run(recipe_for(tmp_path, tiny_dataset, *overrides), "r", out)
    return out


def edit_recipe(folder: Path, section: str, **values: object) -> None:
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe[section] = values
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))


def nan_head(folder: Path) -> None:
    state = safetensors.torch.load_file(str(folder / "head.safetensors"))
    with safetensors.safe_open(str(folder / "head.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    safetensors.torch.save_file(
        {k: torch.full_like(v, float("nan")) for k, v in state.items()},
        str(folder / "head.safetensors"),
        metadata,
    )


def edit_head_metadata(folder: Path, **values: str) -> None:
    """Save ``folder``'s head again with some of its metadata replaced."""
    path = folder / "head.safetensors"
    state = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    safetensors.torch.save_file(state, str(path), {**metadata, **values})


def without_digests(folder: Path) -> None:
    """``folder`` as a run written before tlx recorded its files' digests."""
    provenance = json.loads((folder / "provenance.json").read_text())
    del provenance["files"]
    (folder / "provenance.json").write_text(json.dumps(provenance))


#: each damage: what it does, the file it damages, the error's words where no digest tells of it
DAMAGE = {
    "truncated head": (
        lambda f: (f / "head.safetensors").write_bytes((f / "head.safetensors").read_bytes()[:100]),
        "head.safetensors",
        ["head.safetensors: cannot read it", "restore the file"],
    ),
    "empty head": (
        lambda f: (f / "head.safetensors").write_bytes(b""),
        "head.safetensors",
        ["head.safetensors: cannot read it"],
    ),
    "provenance not json": (
        lambda f: (f / "provenance.json").write_text("{not json"),
        "provenance.json",
        ["provenance.json: cannot read it", "JSONDecodeError"],
    ),
    "provenance without keys": (
        lambda f: (f / "provenance.json").write_text('{"backbone": {}}'),
        "provenance.json",
        ["provenance.json: missing required key backbone.sha256", "restore the file"],
    ),
    "provenance digest not hex": (
        lambda f: (f / "provenance.json").write_text('{"backbone": {"sha256": "x"}}'),
        "provenance.json",
        ["provenance.json: backbone.sha256: String should match pattern"],
    ),
    "head type edited": (
        lambda f: edit_recipe(f, "head", type="linear"),
        "recipe.yaml",
        ["recipe.yaml: head.type is linear, but head.safetensors holds a mlp head", "head.type: mlp"],
    ),
    "head options edited": (
        lambda f: edit_recipe(f, "head", type="mlp", hidden=[6]),
        "recipe.yaml",
        ["head.safetensors: does not fit the mlp head", "[4, 3]", "[6, 3]"],
    ),
    "head weights nan": (
        nan_head,
        "head.safetensors",
        ["head.safetensors: the head's weights are not finite"],
    ),
    "class names not a list": (
        lambda f: edit_head_metadata(f, classes='"class0"'),
        "head.safetensors",
        ["head.safetensors: classes: Input should be a valid list"],
    ),
    "class names repeated": (
        lambda f: edit_head_metadata(f, classes='["class0", "class0"]'),
        "head.safetensors",
        ["head.safetensors: classes: Value error, class names must be distinct"],
    ),
}


@pytest.mark.parametrize("digests", [True, False], ids=["digests", "no digests"])
@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_run_files_are_one_line_errors(
    case: str, digests: bool, trained: Path, tiny_dataset: Path, invoke
) -> None:
    """A damaged file that ``provenance.json`` holds a digest of is refused as edited, whatever the damage."""
    damage, name, words = DAMAGE[case]
    if not digests:
        without_digests(trained)
    damage(trained)
    result = invoke("predict", trained, tiny_dataset / "val", "--json")
    if digests and name != "provenance.json":
        words = [f"{trained / name}: edited since the run wrote it (SHA-256 ", "restore the file"]
    assert_user_error(result, str(trained), *words)
    assert result.stdout == ""


EDITS = {
    "class names swapped in the head": (
        lambda f: edit_head_metadata(f, classes='["class1", "class0"]'),
        "head.safetensors",
    ),
    "extract.flip flipped in the recipe": (lambda f: edit_recipe(f, "extract", flip=True), "recipe.yaml"),
}


@pytest.mark.parametrize("case", EDITS)
@pytest.mark.parametrize("command", ["predict", "eval"])
def test_a_run_file_edited_after_the_run_is_refused(
    case: str, command: str, trained: Path, tiny_dataset: Path, invoke
) -> None:
    """Edits that load without complaint and change every prediction."""
    edit, name = EDITS[case]
    edit(trained)
    result = invoke(command, trained, *([tiny_dataset / "val"] if command == "predict" else []))
    assert_user_error(result, f"{trained / name}: edited since the run wrote it", "or train a new run")


def test_provenance_records_the_digest_of_each_file_a_run_loads(trained: Path) -> None:
    files = json.loads((trained / "provenance.json").read_text())["files"]
    assert files == {
        name: hashlib.sha256((trained / name).read_bytes()).hexdigest()
        for name in ("recipe.yaml", "head.safetensors", "calibration.safetensors")
    }


def test_a_run_without_digests_loads_with_a_one_line_note(trained: Path, tiny_dataset: Path, invoke) -> None:
    before = invoke("predict", trained, tiny_dataset / "val", "--json")
    without_digests(trained)
    result = invoke("predict", trained, tiny_dataset / "val", "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout == before.stdout
    assert result.stderr.splitlines() == [
        f"tlx: warning: {trained / 'provenance.json'}: records no digests of the run's files (an older tlx "
        "wrote it), so an edited run file goes unnoticed; train a new run to have them checked"
    ]


def test_unreadable_run_file_is_a_one_line_error(
    trained: Path, tiny_dataset: Path, invoke, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a run folder of another user would be; simulated, since the tests may run as root."""

    def denied(path: str, framework: str) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(safetensors, "safe_open", denied)
    result = invoke("predict", trained, tiny_dataset / "val")
    assert_user_error(result, "head.safetensors: cannot read it", "Permission denied")


def test_a_nan_prediction_is_an_error_naming_the_head_file(trained: Path, tiny_dataset: Path) -> None:
    loaded = artifacts.load_run(trained)
    loaded.head = torch.nn.Sequential(loaded.head, torch.nn.Threshold(1e9, float("nan")))  # logits → NaN
    with pytest.raises(TlxError, match=r"head.safetensors: the classifier gives NaN for .*0\.jpg"):
        predict(loaded, (tiny_dataset / "val",), top_k=1)


def test_a_failed_write_leaves_no_truncated_run_file(
    tmp_path: Path, tiny_dataset: Path, counting_backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    out = tmp_path / "out"
    with pytest.raises(TlxError, match="No space left on device"):
        run(recipe_for(tmp_path, tiny_dataset, "train.epochs=1"), "r", out)
    assert sorted(p.name for p in out.iterdir()) == ["recipe.yaml"]


# --- 4. export -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_under_a_file_is_a_one_line_error(fmt: str, trained: Path, tmp_path: Path, invoke) -> None:
    (tmp_path / "somefile.txt").write_text("")
    result = invoke("export", trained, "--format", fmt, "--output", tmp_path / "somefile.txt" / "model")
    assert_user_error(result, f"--output: {tmp_path / 'somefile.txt'} cannot be a folder", "in the way")


def test_export_replaces_no_file_without_force_and_no_run_file_ever(
    trained: Path, tiny_dataset: Path, tmp_path: Path, invoke
) -> None:
    metrics = (trained / "metrics.json").read_bytes()
    for force in ((), ("--force",)):
        result = invoke(
            "export", trained, "--format", "torchscript", "--output", trained / "metrics.json", *force
        )
        assert_user_error(result, f"--output: {trained / 'metrics.json'} is a file of the run folder")
    assert (trained / "metrics.json").read_bytes() == metrics

    image = next((tiny_dataset / "train").rglob("*.jpg"))
    pixels = image.read_bytes()
    result = invoke("export", trained, "--format", "torchscript", "--output", image)
    assert_user_error(result, f"--output: {image} exists; pass --force to replace it")
    assert image.read_bytes() == pixels

    assert invoke("export", trained, "--format", "torchscript").exit_code == 0
    again = invoke("export", trained, "--format", "torchscript")
    assert_user_error(again, f"--output: {trained / 'model.pt'} exists; pass --force")
    result = invoke("export", trained, "--format", "torchscript", "--force")  # an earlier export: replaced
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("fmt", "error"),
    [
        ("torchscript", OSError(errno.ENOSPC, "No space left on device")),
        ("torchscript", PermissionError(errno.EACCES, "Permission denied")),
        ("onnx", OSError(errno.ENOSPC, "No space left on device")),
    ],
)
def test_failed_export_write_is_a_one_line_error_and_leaves_no_model(
    fmt: str, error: OSError, trained: Path, tmp_path: Path, invoke, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk or a read-only folder (simulated: the tests may run as root)."""
    write_bytes = Path.write_bytes

    def failing(path: Path, data: bytes) -> int:
        write_bytes(path, data[:10])  # a truncated model
        raise error

    monkeypatch.setattr(Path, "write_bytes", failing)
    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", lambda program, path: failing(Path(path), b"x" * 99))
    folder = tmp_path / "exported"
    result = invoke("export", trained, "--format", fmt, "--output", folder / "model")
    assert_user_error(result, f"--output: cannot write {folder / 'model'}", error.strerror)
    assert list(folder.iterdir()) == []


# --- 5. eval ---------------------------------------------------------------------------------------------


def test_eval_refuses_overrides_that_cannot_change_it(trained: Path, invoke) -> None:
    result = invoke("eval", trained, "--set", "train.epochs=5")
    assert_user_error(result, "--set train.epochs", "only dataset.*, extract.* and device")
    assert "train.epochs" not in invoke("eval", "--help").output
    result = invoke("eval", trained, "--set", "extract.batch_size=2", "--set", "device=cpu", "--json")
    assert result.exit_code == 0, result.output


def test_eval_on_the_runs_own_training_images_warns_how_many(
    trained: Path, tiny_dataset: Path, tmp_path: Path, invoke
) -> None:
    result = invoke("eval", trained, "--set", "dataset.test=train")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"tlx: warning: 12 of the 12 images evaluated are training images of {trained} (the same files or "
        "the same bytes); the accuracy overstates how it does on new images"
    ]
    assert "on 12 images" in result.stdout
    other = make_imagefolder(tmp_path / "other", classes=2, per_class=(6, 4), size=50)  # other pixels
    assert "warning" not in invoke("eval", trained, "--set", f"dataset.root={other}").stderr
    copied = (tiny_dataset / "train" / "class0" / "5.jpg").read_bytes()
    (other / "val" / "class0" / "0.jpg").write_bytes(copied)
    assert (
        "1 of the 8 images evaluated are training images"
        in invoke("eval", trained, "--set", f"dataset.root={other}").stderr
    )
