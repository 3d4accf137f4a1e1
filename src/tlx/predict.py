"""``tlx predict`` and the Python API's classifier: class probabilities of images, with a trained run.

One code path for both (:func:`probabilities`), so that they give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def probabilities(
    run: TrainedRun, sources: Sequence[Source]
) -> tuple[list[Source], torch.Tensor, list[tuple[Source, str]]]:
    """The images that could be decoded, their class probabilities (n, classes), and the skipped.

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
    return kept, classify(run, kept, features.x), features.skipped


def classify(run: TrainedRun, kept: Sequence[Source], x: torch.Tensor) -> torch.Tensor:
    """Class probabilities (n, classes) of the features ``x`` of the images ``kept``; NaN is an error."""
    with torch.inference_mode():
        result = torch.softmax(run.head(x), dim=1)
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
        results.append({"path": str(path), **labels[0], "top_k": labels})
    return results


def predict(
    run: TrainedRun, paths: Sequence[Source], *, top_k: int
) -> tuple[list[dict[str, Any]], list[tuple[Source, str]]]:
    """One result per decodable image (``path``, ``label``, ``probability``, ``top_k``), and the skipped."""
    kept, result, skipped = probabilities(run, paths)
    return ranked(kept, result, run.classes, top_k), skipped


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
