"""``tlx predict``: classify image files and folders with a trained run, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tlx.artifacts import HEAD_FILE, TrainedRun
from tlx.data import IMAGE_EXTENSIONS, Split
from tlx.device import resolve
from tlx.errors import TlxError
from tlx.features import extract


def image_files(paths: tuple[Path, ...]) -> list[Path]:
    """Files as given; folders searched recursively for images, in sorted order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            )
            if not found:
                raise TlxError(f"{path}: folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise TlxError(f"{path}: no such file or folder")
    return files


def predict(
    run: TrainedRun, paths: tuple[Path, ...], *, top_k: int
) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
    """One result per decodable image (``path``, ``label``, ``probability``, ``top_k``), and the skipped.

    Images go through the run's backbone with its recipe's ``extract`` settings and ``device``; a NaN
    probability is an error, never a printed ``nan%``."""
    files = image_files(paths)
    split = Split("predict", [(p, 0) for p in files])
    (features,) = extract([split], run.backbone, run.recipe.extract, device=resolve(run.recipe.device))
    skipped = {p for p, _ in features.skipped}
    kept = [p for p in files if p not in skipped]
    with torch.inference_mode():
        probabilities = torch.softmax(run.head(features.x), dim=1)
    finite = probabilities.isfinite().all(dim=1)
    if not finite.all():
        first = kept[int(finite.logical_not().nonzero()[0])]
        raise TlxError(
            f"{run.folder / HEAD_FILE}: the classifier gives NaN for {first} (its features or the head are "
            "not finite); train a new run"
        )
    top = probabilities.topk(min(top_k, len(run.classes)), dim=1)
    results = []
    for path, values, indices in zip(kept, top.values.tolist(), top.indices.tolist()):
        ranked = [{"label": run.classes[i], "probability": p} for i, p in zip(indices, values)]
        results.append({"path": str(path), **ranked[0], "top_k": ranked})
    return results, features.skipped
