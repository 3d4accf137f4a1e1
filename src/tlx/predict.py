"""``tlx predict`` and the Python API's classifier: class probabilities of images, with a trained run.

One code path for both (:func:`probabilities`), so that they give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from tlx.artifacts import HEAD_FILE, TrainedRun
from tlx.data import IMAGE_EXTENSIONS, Split
from tlx.errors import TlxError

#: an image file, a folder of them, or an image already in memory (the Python API)
Source = Path | Image.Image


def image_files(sources: Sequence[Source]) -> list[Source]:
    """Files and in-memory images as given; folders searched recursively for images, in sorted order."""
    files: list[Source] = []
    for source in sources:
        if isinstance(source, Image.Image):
            files.append(source)
        elif source.is_dir():
            found = sorted(
                p
                for p in source.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            )
            if not found:
                raise TlxError(f"{source}: folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files += found
        elif source.is_file():
            files.append(source)
        else:
            raise TlxError(f"{source}: no such file or folder")
    return files


@dataclass
class Answers:
    """What a run answers for the images that could be decoded: calibrated class probabilities (n,
    classes), and their features (for the "unknown" score)."""

    kept: list[Source]
    probabilities: torch.Tensor
    features: torch.Tensor

    def ood_scores(self, run: TrainedRun) -> list[float] | None:
        """Each image's "unknown" score (:mod:`tlx.calibration`); None for a run without calibration."""
        if run.calibration is None:
            return None
        return run.calibration.ood_scores(self.features.numpy()).tolist()


def answers(run: TrainedRun, sources: Sequence[Source]) -> tuple[Answers, list[tuple[Source, str]]]:
    """The answers for the images of ``sources`` that could be decoded, and the skipped."""
    kept, result, skipped, x = _probabilities(run, sources)
    return Answers(kept, result, x), skipped


def probabilities(
    run: TrainedRun, sources: Sequence[Source]
) -> tuple[list[Source], torch.Tensor, list[tuple[Source, str]]]:
    """The images that could be decoded, their class probabilities (n, classes), and the skipped."""
    kept, result, skipped, _ = _probabilities(run, sources)
    return kept, result, skipped


def _probabilities(
    run: TrainedRun, sources: Sequence[Source]
) -> tuple[list[Source], torch.Tensor, list[tuple[Source, str]], torch.Tensor]:
    """The images that could be decoded, their class probabilities (n, classes), the skipped, and the
    features of the decoded.

    Features come as in a run (:meth:`TrainedRun.extract`: the cache, else the recipe's runtime and
    ``device``); in-memory images are never cached. A NaN probability is an error, never a printed
    ``nan%``."""
    files = image_files(sources)
    features = run.extract(Split("predict", [(p, 0) for p in files]))
    kept, k = [], 0
    for source in files:  # features.skipped holds the skipped items themselves, in the same order
        if k < len(features.skipped) and features.skipped[k][0] is source:
            k += 1
        else:
            kept.append(source)
    return kept, classify(run, kept, features.x), features.skipped, features.x


def classify(run: TrainedRun, kept: Sequence[Source], x: torch.Tensor) -> torch.Tensor:
    """Class probabilities (n, classes) of the features ``x`` of the images ``kept``, calibrated by the
    run's temperature where it has one; NaN is an error."""
    temperature = run.calibration.temperature if run.calibration is not None else 1.0
    with torch.inference_mode():
        result = torch.softmax(run.head(x) / temperature, dim=1)
    finite = result.isfinite().all(dim=1)
    if not finite.all():
        first = kept[int(finite.logical_not().nonzero()[0])]
        raise TlxError(
            f"{run.folder / HEAD_FILE}: the classifier gives NaN for {first} (its features or the head are "
            "not finite); train a new run"
        )
    return result


def ranked(
    kept: Sequence[Source], result: torch.Tensor, classes: list[str], top_k: int
) -> list[dict[str, Any]]:
    """One result per image (``path``, ``label``, ``probability``, ``top_k``) from its probabilities."""
    top = result.topk(min(top_k, len(classes)), dim=1)
    results = []
    for path, values, indices in zip(kept, top.values.tolist(), top.indices.tolist()):
        labels = [{"label": classes[i], "probability": p} for i, p in zip(indices, values)]
        results.append({"path": str(path) if isinstance(path, Path) else None, **labels[0], "top_k": labels})
    return results


def predict(
    run: TrainedRun,
    paths: Sequence[Source],
    *,
    top_k: int,
    reject: bool = True,
    coverage: float | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[Source, str]]]:
    """One result per decodable image (``path``, ``label``, ``probability``, ``top_k``), and the skipped.

    With the run's calibration: ``known`` and ``ood_score`` (unless not ``reject``), and with
    ``coverage`` the ``prediction_set`` (:meth:`tlx.calibration.Calibration.sets`).
    """
    found, skipped = answers(run, paths)
    results = ranked(found.kept, found.probabilities, run.classes, top_k)
    if coverage is not None:
        sets = run.calibrated("--coverage").sets(found.probabilities.numpy(), coverage)
        for result, members in zip(results, sets):
            result["prediction_set"] = [run.classes[c] for c in members]
    calibration = run.calibration
    if reject and calibration is not None:
        for result, score in zip(results, found.ood_scores(run) or []):
            result["known"] = bool(score <= calibration.threshold)
            result["ood_score"] = score
    return results, skipped


def predict_to(
    run: TrainedRun, paths: tuple[Path, ...], *, top_k: int, engine: str, output: Path
) -> list[tuple[str, str]]:
    """Predictions of the images of ``paths`` written as Parquet under ``output`` by ``engine``, which
    runs backbone and head where the images are (``tlx predict --engine ray``); returns the skipped."""
    from tlx.artifacts import RECIPE_FILE
    from tlx.components import resolve_engine

    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise TlxError(f"--output {output}: exists and is not an empty folder; choose a new folder")
    entry, options = resolve_engine(run.recipe, str(run.folder / RECIPE_FILE), engine)
    spec = run.frozen.spec()
    files = [Path(p) for p in image_files(paths)]
    return entry.factory(options, spec).predict(run.folder, files, top_k, output)
