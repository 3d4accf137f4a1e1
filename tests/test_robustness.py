"""Bad input of every kind: one clear line, exit code 2, no traceback, nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tlx import plugins
from tlx.recipe import BUNDLED
from tlx.registry import Backbone

from .conftest import CONFIG, REPO, TLX, assert_user_error, make_imagefolder, write_recipe

COUNTING = """
dataset: {{root: {root}}}
backbone: {{name: counting}}
extract: {{workers: 0}}
train: {{epochs: 2}}
"""


@pytest.fixture
def run_counting(tmp_path: Path, invoke, counting_backbone):
    """``tlx run`` in-process on a dataset root with the counting test backbone."""

    def call(root: Path, *overrides: str):
        recipe = write_recipe(tmp_path / "counting.yaml", COUNTING.format(root=root))
        sets = [arg for item in overrides for arg in ("--set", item)]
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        result = invoke("run", recipe, *sets, "--out", out)
        result.out = out
        return result

    return call


def metrics_of(result) -> dict:
    return json.loads((result.out / "metrics.json").read_text())


# --- recipes -------------------------------------------------------------------------------------

VALID = "dataset: {root: x}\nbackbone: {name: resnet18}\n"
RECIPE_CASES = {
    "not yaml": ("dataset: {root: [x\n", ["not valid YAML", "line"]),
    "empty": ("", ["recipe is empty"]),
    "list": ("- dataset\n- backbone\n", ["not a list"]),
    "python tag": ("backbone: !!python/object:os.system {}\n", ["unsupported YAML tag", "python/object"]),
    "other unsafe tag": ("seed: !!python/name:os.system\n", ["unsupported YAML tag"]),
    "unknown key": (VALID + "train: {epoch: 3}\n", ["train.epoch", "train.epochs"]),
    "wrong type": (VALID + "train: {epochs: many}\n", ["train.epochs", "'many'"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_bad_recipe_documents(case: str, tmp_path: Path, invoke) -> None:
    text, words = RECIPE_CASES[case]
    path = write_recipe(tmp_path / "bad.yaml", text)
    assert_user_error(invoke("run", path), str(path), *words)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("train.epochs=0", ["--set train.epochs", "greater than 0"]),
        ("train.epochs=-3", ["--set train.epochs", "greater than 0"]),
        ("train.lr=0", ["--set train.lr", "greater than 0"]),
        ("train.lr=-0.1", ["--set train.lr", "greater than 0"]),
        ("train.batch_size=0", ["--set train.batch_size", "greater than 0"]),
        ("extract.batch_size=-1", ["--set extract.batch_size", "greater than 0"]),
        ("train.epochs", ["expected KEY=VALUE"]),
        ("train.nonsense=1", ["unknown key train.nonsense"]),
        ("backbone.name=resnet81", ["--set backbone.name: unknown backbone 'resnet81'", "resnet18"]),
        ("head.type=linaer", ["--set head.type: unknown head 'linaer'", "linear"]),
        ("dataset.kind=imagefolders", ["--set dataset.kind: unknown dataset 'imagefolders'", "imagefolder"]),
        ("extract.on_bad_image=ignore", ["extract.on_bad_image", "'skip' or 'error'"]),
    ],
)
def test_bad_values_and_names(override: str, words: list[str], tiny_dataset: Path, invoke) -> None:
    result = invoke(
        "run", BUNDLED / "hymenoptera.yaml", "--set", f"dataset.root={tiny_dataset}", "--set", override
    )
    assert_user_error(result, *words)


# --- data ----------------------------------------------------------------------------------------


def test_missing_root(run_counting, tmp_path: Path) -> None:
    result = run_counting(tmp_path / "nowhere")
    assert_user_error(result, "dataset.root", "does not exist", "--set dataset.root")
    assert not result.out.exists(), "a run that stopped before writing anything leaves no folder"


def test_missing_split_folder(run_counting, tiny_dataset: Path) -> None:
    assert_user_error(
        run_counting(tiny_dataset, "dataset.test=test"), "no split folder 'test'", "found: train, val"
    )


def test_split_without_images(run_counting, tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "d", classes=2)
    for image in (root / "val").rglob("*.jpg"):
        image.unlink()
    assert_user_error(run_counting(root), "holds no images", str(root / "val"))


def test_only_one_class(run_counting, tmp_path: Path) -> None:
    assert_user_error(run_counting(make_imagefolder(tmp_path / "d", classes=1)), "at least two")


def test_class_in_test_but_not_in_train(run_counting, tiny_dataset: Path) -> None:
    make_imagefolder(tiny_dataset / "extra", classes=3)
    (tiny_dataset / "extra" / "val" / "class2").rename(tiny_dataset / "val" / "class2")
    assert_user_error(run_counting(tiny_dataset), "class2", "lacks")


def test_class_in_train_but_not_in_test_is_a_warning(run_counting, tiny_dataset: Path) -> None:
    make_imagefolder(tiny_dataset / "extra", classes=3)
    (tiny_dataset / "extra" / "train" / "class2").rename(tiny_dataset / "train" / "class2")
    result = run_counting(tiny_dataset)
    assert result.exit_code == 0, result.output
    assert "class 'class2' has no images in split 'val'" in result.stderr
    assert metrics_of(result)["classes"] == ["class0", "class1", "class2"]


def bomb_png(path: Path, width: int = 20_000, height: int = 20_000) -> None:
    """A tiny PNG whose header claims more pixels than Pillow's decompression-bomb limit."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def messy_dataset(tiny_dataset: Path, tmp_path: Path) -> Path:
    """The tiny dataset plus every kind of odd file a real folder holds."""
    ants = tiny_dataset / "train" / "class0"
    (ants / "notes.jpg").write_text("not an image at all")
    full = (ants / "0.jpg").read_bytes()
    (ants / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (ants / "empty.jpg").write_bytes(b"")
    bomb_png(ants / "bomb.png")
    outside = tmp_path / "outside.jpg"
    Image.new("RGB", (40, 40), "red").save(outside)
    (ants / "escape.jpg").symlink_to(outside)
    bees = tiny_dataset / "train" / "class1"
    Image.new("P", (40, 40)).save(bees / "placeholder.gif")
    Image.new("RGBA", (40, 40), (0, 0, 255, 128)).save(bees / "alpha.png")
    Image.new("L", (40, 40), 90).save(bees / "gray.jpg")
    Image.new("CMYK", (40, 40), (0, 50, 100, 0)).save(bees / "cmyk.jpg")
    Image.new("RGB", (40, 40), "yellow").save(bees / "with space ñandú 蜂.jpg")
    return tiny_dataset


def test_odd_files_are_skipped_and_listed_odd_formats_work(run_counting, messy_dataset: Path) -> None:
    result = run_counting(messy_dataset)
    assert result.exit_code == 0, result.output
    metrics = metrics_of(result)
    reasons = {Path(s["path"]).name: s["reason"] for s in metrics["skipped"]}
    assert set(reasons) == {"notes.jpg", "truncated.jpg", "empty.jpg", "bomb.png", "escape.jpg"}
    assert "DecompressionBomb" in reasons["bomb.png"]
    assert "outside the dataset root" in reasons["escape.jpg"]
    for name in reasons:
        assert f"skipped {messy_dataset}" in result.stdout and name in result.stdout
    # 12 generated + GIF, RGBA PNG, grayscale, CMYK and the non-ASCII name
    assert metrics["n_train"] == 12 + 5
    images = metrics["features"]["computed"]
    assert metrics["features"]["cached"] == 0 and images >= metrics["n_train"] + metrics["n_test"] + 4
    again = metrics_of(run_counting(messy_dataset))  # the failures are remembered too: nothing computed
    assert again["features"]["computed"] == 0 and again["features"]["cached"] == images
    assert again["skipped"] == metrics["skipped"]


def test_bad_image_policy_error_names_the_file(run_counting, messy_dataset: Path) -> None:
    line = assert_user_error(
        run_counting(messy_dataset, "extract.on_bad_image=error"), "cannot decode", "class0"
    )
    assert "extract.on_bad_image=skip" in line


# --- weights -------------------------------------------------------------------------------------


def weights_run(invoke, root: Path, weights: Path):
    return invoke(
        "run",
        BUNDLED / "hymenoptera.yaml",
        "--set",
        f"dataset.root={root}",
        "--set",
        f"backbone.weights={weights}",
    )


def test_weights_file_missing(invoke, tiny_dataset: Path, tmp_path: Path) -> None:
    assert_user_error(weights_run(invoke, tiny_dataset, tmp_path / "w.pth"), "backbone.weights", "not found")


def test_weights_of_another_architecture(invoke, tiny_dataset: Path, tmp_path: Path) -> None:
    import timm
    import torch

    path = tmp_path / "mobilenet.pth"
    torch.save(timm.create_model("mobilenetv3_small_050").state_dict(), path)
    assert_user_error(weights_run(invoke, tiny_dataset, path), "does not fit resnet18", "'conv1.weight'")


def test_weights_pickle_with_code_is_refused(invoke, tiny_dataset: Path, tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(Payload()))
    assert_user_error(weights_run(invoke, tiny_dataset, path), "refused to load", ".safetensors")
    assert not marker.exists()


def test_weights_truncated(invoke, tiny_dataset: Path, tmp_path: Path, resnet18_file: Path) -> None:
    path = tmp_path / "cut.pth"
    path.write_bytes(resnet18_file.read_bytes()[:5000])
    assert_user_error(weights_run(invoke, tiny_dataset, path), "truncated or not a weights file")


# --- plugins -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returned", "words"),
    [
        (lambda: "a string", ["returned str", "not a tlx Backbone"]),
        (lambda: Backbone("not a module", 3, CONFIG, "x"), ["not a tlx Backbone"]),  # type: ignore[arg-type]
        (lambda: Backbone(__import__("torch").nn.Identity(), 0, CONFIG, "x"), ["no positive feature_dim"]),
    ],
)
def test_backbone_provider_returning_nonsense(
    returned, words, invoke, tiny_dataset: Path, tmp_path: Path
) -> None:
    plugins.load().backbones.registrar("sloppy-plugin")(
        "sloppy", lambda name, pretrained, weights: returned()
    )
    recipe = write_recipe(
        tmp_path / "r.yaml", f"dataset: {{root: {tiny_dataset}}}\nbackbone: {{name: sloppy}}\n"
    )
    assert_user_error(invoke("run", recipe), "sloppy-plugin", *words)


def test_backbone_with_wrong_feature_shape(invoke, tiny_dataset: Path, tmp_path: Path) -> None:
    import torch

    liar = Backbone(torch.nn.Flatten(), 3, CONFIG, "x")  # claims 3 features, returns 3*32*32
    plugins.load().backbones.registrar("liar-plugin")("liar", lambda name, pretrained, weights: liar)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"dataset: {{root: {tiny_dataset}}}\nbackbone: {{name: liar}}\nextract: {{workers: 0}}\n",
    )
    assert_user_error(invoke("run", recipe), "returned (", "not pooled features of shape")


# --- environment ---------------------------------------------------------------------------------


def test_unwritable_output_folder_is_found_before_work(
    run_counting, tiny_dataset: Path, tmp_path: Path, invoke
):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    recipe = write_recipe(tmp_path / "r.yaml", COUNTING.format(root=tiny_dataset))
    result = invoke("run", recipe, "--out", blocker / "out")
    assert_user_error(result, "--out", "cannot write", "choose another folder")
    assert "features" not in result.stdout


@pytest.mark.parametrize("delay", [0.0, 2.0])
def test_ctrl_c_during_extraction_exits_130(delay: float, hymenoptera: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group (the extraction workers too), as a terminal sends it."""
    command = [*TLX, "run", "hymenoptera-lite0", "--set", f"dataset.root={hymenoptera}"]
    command += ["--set", "extract.workers=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TLX_CACHE_DIR": str(tmp_path / "cache")}
    first = subprocess.run([*command, "--out", tmp_path / "first"], cwd=REPO, capture_output=True, env=env)
    assert first.returncode == 0, first.stderr
    shutil.rmtree(tmp_path / "cache" / "features")  # the backbone is known: the workers start at once
    process = subprocess.Popen(
        [*command, "--out", tmp_path / "o"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("device"):  # the last line before extraction
            break
    time.sleep(delay)  # at the start of extraction, and in the middle of it
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "tlx: interrupted" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "o" / "metrics.json").exists()
    # the cache the interrupted run shared is consistent: the next run completes
    rerun = subprocess.run(
        [*command, "--out", tmp_path / "o2"], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((tmp_path / "o2" / "metrics.json").read_text())["n_train"] == 245
