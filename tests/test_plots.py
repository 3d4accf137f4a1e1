"""Error analysis in every run folder: ``predictions.csv`` and the ``errors.png`` gallery of mistakes."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tlx.artifacts import Predictions
from tlx.plots import THUMBNAIL, error_gallery
from tlx.run import run

from .conftest import make_imagefolder, recipe_for
from .test_finetune import finetune_run, tiny_net  # noqa: F401 (the fixture finetune_run needs)

PNG = b"\x89PNG\r\n\x1a\n"


def digests(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def check_predictions(out: Path, root: Path) -> list[dict[str, str]]:
    """``predictions.csv`` holds one row per test image and agrees with ``metrics.json``; returns the rows."""
    metrics = json.loads((out / "metrics.json").read_text())
    classes = metrics["classes"]
    with (out / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "true_label", "predicted_label", *(f"p_{c}" for c in classes)]
    assert sorted(Path(r["path"]) for r in rows) == sorted((root / "val").rglob("*.jpg"))
    confusion = [[0] * len(classes) for _ in classes]
    for row in rows:
        assert Path(row["path"]).parent.name == row["true_label"]
        probabilities = [float(row[f"p_{c}"]) for c in classes]
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
        assert row["predicted_label"] == classes[probabilities.index(max(probabilities))]
        confusion[classes.index(row["true_label"])][classes.index(row["predicted_label"])] += 1
    assert confusion == metrics["confusion"]
    right = sum(r["true_label"] == r["predicted_label"] for r in rows)
    assert right / len(rows) == metrics["test_accuracy"]
    assert (out / "errors.png").read_bytes()[:8] == PNG
    return rows


@pytest.mark.parametrize("head", ["linear", "logreg"])
def test_features_run_writes_predictions_that_agree_with_its_metrics(
    tmp_path: Path, counting_backbone, head: str
) -> None:
    root = make_imagefolder(tmp_path / "data", classes=3)
    before = digests(root)
    run(recipe_for(tmp_path, root, f"head.type={head}", "train.epochs=2"), "r", tmp_path / "out")
    check_predictions(tmp_path / "out", root)
    assert digests(root) == before  # the run reads the dataset and writes only into its own folder


@pytest.mark.usefixtures("tiny_net")
def test_finetune_run_writes_the_kept_epochs_predictions(tmp_path: Path, tiny_dataset: Path) -> None:
    metrics = finetune_run(
        tmp_path, tiny_dataset, "out", "train.epochs=6", "train.val_fraction=0.34", "train.patience=1"
    )
    assert metrics["chosen"]["epochs"] < len(metrics["history"])  # early stopping kept an earlier epoch
    rows = check_predictions(tmp_path / "out", tiny_dataset)
    assert len(rows) == metrics["n_test"] == 6


def test_predictions_skip_images_that_cannot_be_decoded(tmp_path: Path, counting_backbone) -> None:
    root = make_imagefolder(tmp_path / "data", classes=2)
    (root / "val" / "class0" / "1.jpg").write_bytes(b"not an image")
    run(recipe_for(tmp_path, root, "extract.on_bad_image=skip"), "r", tmp_path / "out")
    with (tmp_path / "out" / "predictions.csv").open(newline="") as f:
        paths = [Path(r["path"]) for r in csv.DictReader(f)]
    assert len(paths) == 5 and root / "val" / "class0" / "1.jpg" not in paths
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n_test"] == 5


def test_mistakes_are_the_most_confident_first_and_at_most_sixteen() -> None:
    n = 20
    truth = torch.zeros(n, dtype=torch.long)
    # image k is wrong (class 1) with probability 0.5 + k/50, except every fifth, which is right
    p1 = torch.tensor([0.1 if k % 5 == 0 else 0.5 + k / 50 for k in range(n)])
    predictions = Predictions([Path(f"{k}.jpg") for k in range(n)], truth, torch.stack([1 - p1, p1], dim=1))
    mistakes = predictions.mistakes(["a", "b"])
    expected = sorted((k for k in range(n) if k % 5), reverse=True)
    assert [m["path"] for m in mistakes] == [f"{k}.jpg" for k in expected]
    first = {"path": "19.jpg", "true": "a", "predicted": "b", "probability": pytest.approx(0.88)}
    assert mistakes[0] == first
    assert len(predictions.mistakes(["a", "b"], limit=3)) == 3
    # equally confident mistakes keep the test split's order
    tied = Predictions([Path("x"), Path("y")], torch.tensor([0, 0]), torch.tensor([[0.3, 0.7], [0.3, 0.7]]))
    assert [m["path"] for m in tied.mistakes(["a", "b"])] == ["x", "y"]


def test_gallery_shows_each_mistake_in_order_and_survives_a_lost_image(tmp_path: Path) -> None:
    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    for n, colour in enumerate(colours):
        Image.new("RGB", (400, 300), colour).save(tmp_path / f"{n}.png")
    names = [f"{n}.png" for n in range(len(colours))] + ["gone.png"]  # the last one is not there
    mistakes = [dict(path=str(tmp_path / name), true="a", predicted="b", probability=0.9) for name in names]
    error_gallery(mistakes, tmp_path / "errors.png", "4 of 9 test images misclassified")
    with Image.open(tmp_path / "errors.png") as image:
        gallery = image.convert("RGB")
    assert gallery.width == 4 * (THUMBNAIL + 12) + 12  # one row of four cells
    middle = 45 + 42 + (THUMBNAIL * 3 // 4) // 2  # title, caption, then half the 4:3 thumbnail
    for n, colour in enumerate(colours):
        assert gallery.getpixel((12 + n * (THUMBNAIL + 12) + THUMBNAIL // 2, middle)) == colour


def test_gallery_without_mistakes_says_so(tmp_path: Path) -> None:
    error_gallery([], tmp_path / "errors.png", "0 of 9 test images misclassified")
    with Image.open(tmp_path / "errors.png") as image:
        assert image.format == "PNG" and image.width > image.height  # one line of text, no grid
        assert image.convert("L").getextrema()[0] < 128  # the text is drawn


def test_figures_drawn_in_process_leave_pyplot_and_the_backend_alone(tmp_path: Path) -> None:
    """A sweep's forked processes draw in-process: the caller's matplotlib (a notebook's) is untouched."""
    script = f"""
import sys, torch
from pathlib import Path
from tlx.plots import Painter
from tlx.scores import Scores
out = Path({str(tmp_path)!r})
scores = Scores.of(["a", "b"], torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
history = [{{"epoch": e, "train_loss": 1 / e, "test_accuracy": 0.5 + e / 10}} for e in (1, 2)]
with Painter(inline=True) as painter:
    painter.draw(out, history, {{}}, scores, [])
print("matplotlib.pyplot" in sys.modules, sys.modules["matplotlib"].rcParams._get_backend_or_none())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "None"]  # no pyplot, no backend chosen
    for name in ("curves.png", "confusion.png", "errors.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)
