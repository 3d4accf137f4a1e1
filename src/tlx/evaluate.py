"""``tlx eval``: score a trained run on the test split of a dataset with the same classes."""

from __future__ import annotations

from pathlib import Path

from tlx import notices
from tlx.artifacts import RECIPE_FILE, TrainedRun
from tlx.components import resolve
from tlx.data import Split, shared_images
from tlx.errors import TlxError
from tlx.recipe import load_recipe
from tlx.scores import Scores
from tlx.tensors import Features
from tlx.train import predict

#: the recipe sections an evaluation uses: which images, how they become features, where the backbone runs
EVAL_KEYS = ("dataset", "extract", "device")


def check_overrides(overrides: tuple[str, ...]) -> None:
    """Refuse a ``--set`` that cannot change an evaluation (the head is trained already)."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.split(".")[0] not in EVAL_KEYS:
            raise TlxError(
                f"--set {key}: eval uses only dataset.*, extract.* and device keys, the run's head is "
                f"trained already; drop it, or train a new run with tlx run --set {key}=..."
            )


def evaluate(run: TrainedRun) -> tuple[Scores, Features]:
    """The test split of the run's (possibly overridden) dataset through the run's backbone (features
    from the cache where there), and the head's scores on it."""
    splits = run.parts.dataset.factory(run.parts.dataset_options)
    if splits.classes != run.classes:
        raise TlxError(
            f"dataset.root: {splits.source} has classes {', '.join(splits.classes)}, the run was trained on "
            f"{', '.join(run.classes)}; evaluate on a dataset with the same class folders"
        )
    if any(key.split(".")[0] == "dataset" for key in run.recipe.set_keys):
        trained_on = training_images(run.folder)
        seen = shared_images(trained_on, splits.test) if trained_on is not None else 0
        if seen:
            notices.warn(
                f"{seen} of the {len(splits.test)} images evaluated are training images of {run.folder} "
                "(the same files or the same bytes); the accuracy overstates how it does on new images"
            )
    test = run.extract(splits.test)
    return Scores.of(run.classes, test.y, predict(run.head, test)), test


def coverage_of(run: TrainedRun, test: Features, coverage: float) -> dict[str, float]:
    """The prediction sets' ``coverage`` on ``test``: the share of images whose set holds their true
    class, and the mean set size (:meth:`tlx.calibration.Calibration.sets`)."""
    import torch

    calibration = run.calibrated("--coverage")
    with torch.inference_mode():
        probabilities = calibration.probabilities(run.head(test.x).numpy())
    sets = calibration.sets(probabilities, coverage)
    covered = sum(int(y) in members for y, members in zip(test.y.tolist(), sets))
    n = max(len(sets), 1)
    return {"coverage": coverage, "empirical": covered / n, "mean_set_size": sum(map(len, sets)) / n}


def training_images(folder: Path) -> Split | None:
    """The training split of run ``folder``, as its recipe lists it now; None where its dataset is gone.

    A dataset whose ``root`` is missing is not listed: listing it might download it again.
    """
    path = folder / RECIPE_FILE
    parts = resolve(load_recipe(path), str(path))
    root = getattr(parts.dataset_options, "root", None)
    if isinstance(root, Path) and not root.exists():
        return None
    try:
        return parts.dataset.factory(parts.dataset_options).train
    except TlxError:
        return None
