"""``tlx eval``: score a trained run on the test split of a dataset with the same classes."""

from __future__ import annotations

from tlx.artifacts import TrainedRun
from tlx.errors import TlxError
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
    test = run.extract(splits.test)
    return Scores.of(run.classes, test.y, predict(run.head, test)), test
