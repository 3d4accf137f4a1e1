"""``tlx audit``: what is wrong with a recipe's data, found from the features a run would use.

The recipe's dataset, backbone and head: features come from the cache (a warm audit runs no backbone);
label quality from held-out probabilities of the recipe's head on the same folds as sweep selection
(:func:`tlx.train.out_of_fold`); duplicates, leakage and outliers from the features
(:mod:`tlx.findings`). The audit folder holds:

- ``label_issues.csv``  every training image, most suspect first: path, given and suggested label,
  label quality (the held-out probability of the given label), flagged
- ``duplicates.csv``    one row per pair: both paths and splits, ``exact`` or ``near``, similarity
- ``outliers.csv``      every image, farthest from the training images first, with its score, flagged
- ``clean.csv``, ``test.csv`` manifests (``path,label``) of the training split without flagged label
  issues and without training copies of test images, and of the test split; ``clean.yaml`` the recipe
  with them as its dataset
- ``audit.json``        counts, thresholds, features computed and cached, seconds
- ``index.html``        a gallery of each kind of finding, thumbnails embedded
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlx.errors import TlxError
from tlx.files import sha256_of, to_json, write_atomic

if TYPE_CHECKING:
    from tlx.data import Splits
    from tlx.findings import Pair
    from tlx.recipe import Recipe
    from tlx.report import Console

#: the worst findings of each kind the printed summary names
SHOWN = 3


@dataclass(frozen=True)
class Audit:
    """A finished audit: its folder and what ``audit.json`` holds."""

    folder: Path
    summary: dict[str, Any]


@dataclass(frozen=True)
class Found:
    """The rows of ``label_issues.csv``, ``duplicates.csv`` and ``outliers.csv``, in their order."""

    labels: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    outliers: list[dict[str, Any]]


@dataclass(frozen=True)
class Image:
    """One audited image."""

    path: Path
    split: str
    label: str


def audit(
    recipe: Recipe,
    source: str,
    out: Path | None,
    cache_dir: Path | None,
    console: Console,
    near_threshold: float | None = None,
) -> Audit:
    """Audit ``recipe``'s data and write the audit folder ``out`` (default: a new one under ``audits/``).

    ``near_threshold``: the cosine similarity of features from which two images are near-duplicates
    (default :data:`tlx.findings.NEAR_THRESHOLD`).
    """
    from tlx.findings import NEAR_THRESHOLD

    started = time.perf_counter()
    threshold = NEAR_THRESHOLD if near_threshold is None else near_threshold
    if not 0 < threshold <= 1:
        raise TlxError(f"--near-threshold: {threshold} is not a cosine similarity in (0, 1]; try 0.9")
    with _folder(out, Path(source)) as folder:
        summary, found = _audit(recipe, source, folder, cache_dir, console, started, threshold)
    _print(console, folder, summary, found)
    return Audit(folder, summary)


def _audit(
    recipe: Recipe,
    source: str,
    folder: Path,
    cache_dir: Path | None,
    console: Console,
    started: float,
    threshold: float,
) -> tuple[dict[str, Any], Found]:
    """Find, write every file, and give ``audit.json``'s content and the rows of the findings."""
    import numpy as np
    import torch

    from tlx import findings
    from tlx.components import resolve, with_head_defaults
    from tlx.extraction import store
    from tlx.extraction.frozen import FrozenBackbone
    from tlx.train import SELECTION_FOLDS, out_of_fold

    parts = resolve(recipe, source)
    recipe = with_head_defaults(recipe, parts)
    splits = parts.dataset.factory(parts.dataset_options)
    _check(splits)
    console.data(splits, recipe.dataset.kind)
    if recipe.strategy != "features":
        console.warning("strategy: finetune; the audit uses the frozen backbone's features and the head")
    frozen = FrozenBackbone.of(recipe, parts, store.cache_dir(cache_dir))
    console.backbone(recipe, parts.backbone.plugin, frozen.info, splits)
    train, test = frozen.features([splits.train, splits.test])
    assert frozen.store is not None
    console.features((splits.train.name, splits.test.name), (train, test), frozen.store.folder)
    images = _images(splits, train.skipped, test.skipped)

    n_classes = len(splits.classes)
    held = out_of_fold(
        lambda: parts.head.factory(frozen.info.feature_dim, n_classes, parts.head_options),
        train,
        recipe.train,
        n_classes=n_classes,
        seed=recipe.seed,
        folds=SELECTION_FOLDS,
        groups=splits.train.decoded_groups(train.skipped),
    )
    given = train.y.numpy()
    labels = findings.label_issues(held.probabilities.numpy(), given)
    x = torch.cat([train.x, test.x]).numpy()
    paths = [i.path for i in images]
    pairs = findings.same_pixels(findings.duplicates(x, [sha256_of(p) for p in paths], threshold), paths)
    n_train = len(given)
    train_scores = findings.outlier_scores(train.x.numpy(), train.x.numpy(), same=True)
    test_scores = findings.outlier_scores(train.x.numpy(), test.x.numpy(), same=False)
    scores = np.concatenate([train_scores, test_scores])
    fence = findings.outlier_fence(train_scores)

    leaked = {p.a for p in pairs if p.a < n_train <= p.b}  # the training side of a cross-split pair
    keep = [i for i in range(n_train) if not labels.flagged[i] and i not in leaked]
    found = Found(
        _label_rows(images, splits.classes, labels),
        [_pair_row(images, p) for p in pairs],
        [
            {**_image_row(images[i]), "score": round(float(scores[i]), 6), "flagged": bool(scores[i] > fence)}
            for i in np.argsort(-scores, kind="stable")
        ],
    )
    _write_csv(folder / "label_issues.csv", found.labels)
    _write_csv(folder / "duplicates.csv", found.pairs)
    _write_csv(folder / "outliers.csv", found.outliers)
    root = _common_root([i.path for i in images])
    _write_csv(folder / "clean.csv", [_manifest_row(images[i], root) for i in keep])
    _write_csv(folder / "test.csv", [_manifest_row(i, root) for i in images[n_train:]])
    _write_clean_recipe(folder, recipe, root)
    cross = [p for p in pairs if p.a < n_train <= p.b]
    summary = {
        "recipe": source,
        "images": {"train": n_train, "test": len(images) - n_train, "classes": splits.classes},
        "label_issues": {
            "flagged": int(labels.flagged.sum()),
            "method": "confident learning (self-confidence, per-class thresholds) on out-of-fold "
            f"probabilities of the {recipe.head.type} head",
            "folds": held.k,
            "thresholds": dict(zip(splits.classes, map(float, labels.thresholds.round(6)))),
        },
        "duplicates": {
            "exact": sum(p.kind == "exact" for p in pairs),
            "near": sum(p.kind == "near" for p in pairs),
            "leakage": len(cross),
            "threshold": threshold,
        },
        "outliers": {"flagged": sum(r["flagged"] for r in found.outliers), "fence": round(fence, 6)},
        "clean": {"train": len(keep), "removed": n_train - len(keep)},
        "features": {
            "computed": train.computed + test.computed,
            "cached": train.cached + test.cached,
            "skipped": len(train.skipped) + len(test.skipped),
        },
        "seconds": round(time.perf_counter() - started, 3),
    }
    from tlx.gallery import gallery

    _write(folder / "index.html", gallery(summary, found.labels, found.pairs, found.outliers))
    _write(folder / "audit.json", to_json(summary))
    return summary, found


def _check(splits: Splits) -> None:
    """An audit compares classes on held-out folds: two classes, two training images of each."""
    if len(splits.classes) < 2:
        raise TlxError(
            f"dataset: {splits.source} has one class ({splits.classes[0]}); an audit compares classes: "
            "add another class"
        )
    counts = splits.train.class_counts(len(splits.classes))
    fewest = min(range(len(counts)), key=counts.__getitem__)
    if counts[fewest] < 2:
        raise TlxError(
            f"dataset: class {splits.classes[fewest]!r} has {counts[fewest]} training image(s); the "
            "audit's cross-validation needs at least 2 of every class: add images"
        )


def _images(splits: Splits, *skipped: list[tuple[Path, str]]) -> list[Image]:
    """The decodable images of the training split, then of the test split, in feature order."""
    left_out = {path for kept in skipped for path, _ in kept}
    return [
        Image(path, split.name, splits.classes[label])
        for split in (splits.train, splits.test)
        for path, label in split.samples
        if path not in left_out
    ]


def _label_rows(images: list[Image], classes: list[str], labels: Any) -> list[dict[str, Any]]:
    import numpy as np

    order = np.argsort(labels.quality, kind="stable")
    return [
        {
            "path": str(images[i].path),
            "given_label": images[i].label,
            "suggested_label": classes[labels.suggested[i]],
            "label_quality": round(float(labels.quality[i]), 6),
            "flagged": bool(labels.flagged[i]),
        }
        for i in order
    ]


def _image_row(image: Image) -> dict[str, Any]:
    return {"path": str(image.path), "split": image.split, "label": image.label}


def _pair_row(images: list[Image], pair: Pair) -> dict[str, Any]:
    a, b = images[pair.a], images[pair.b]
    return {
        "path_a": str(a.path),
        "split_a": a.split,
        "path_b": str(b.path),
        "split_b": b.split,
        "kind": pair.kind,
        "similarity": pair.similarity,
    }


def _common_root(paths: list[Path]) -> Path:
    """The deepest folder holding every path (the manifests' dataset root)."""
    import os

    return Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))


def _manifest_row(image: Image, root: Path) -> dict[str, str]:
    return {"path": str(image.path.resolve().relative_to(root)), "label": image.label}


def _write_clean_recipe(folder: Path, recipe: Recipe, root: Path) -> None:
    """``clean.yaml``: the audited recipe with the clean manifests as its dataset."""
    import yaml

    data = recipe.model_dump(mode="json", exclude_unset=True, exclude={"set_keys"})
    data["dataset"] = {
        "kind": "csv",
        "manifest": str((folder / "clean.csv").resolve()),
        "test_manifest": str((folder / "test.csv").resolve()),
        "root": str(root),
    }
    header = "# the audited recipe, trained on the audit's clean manifests\n"
    _write(folder / "clean.yaml", header + yaml.safe_dump(data, sort_keys=False))


#: the columns of each CSV file the audit writes
COLUMNS = {
    "label_issues.csv": ["path", "given_label", "suggested_label", "label_quality", "flagged"],
    "duplicates.csv": ["path_a", "split_a", "path_b", "split_b", "kind", "similarity"],
    "outliers.csv": ["path", "split", "label", "score", "flagged"],
    "clean.csv": ["path", "label"],
    "test.csv": ["path", "label"],
}


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS[path.name], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write(path, buffer.getvalue())


def _write(path: Path, text: str) -> None:
    try:
        write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise TlxError(f"--out: cannot write {path} ({exc.strerror or exc}); free space there") from None


@contextlib.contextmanager
def _folder(out: Path | None, recipe_path: Path) -> Iterator[Path]:
    """The audit folder: ``out`` (new or empty), else a new one under ``audits/``; emptied and removed
    again if the audit fails, so nothing half-written is left."""
    from tlx.artifacts import new_run_folder, writable_folder

    if out is None:
        folder, created = new_run_folder(recipe_path, Path("audits")), True
    else:
        folder, created = out, not out.exists()
        writable_folder(out)
        if any(out.iterdir()):
            raise TlxError(f"--out: {out} is not empty; an audit writes into a new or empty folder")
    try:
        yield folder
    except BaseException:
        for path in folder.iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _print(console: Console, folder: Path, summary: dict[str, Any], found: Found) -> None:
    """Counts and the worst few findings of each kind, then where the folder is."""
    labels, dups, outliers = summary["label_issues"], summary["duplicates"], summary["outliers"]
    console.echo(
        f"label issues {labels['flagged']} of {summary['images']['train']} training images "
        f"({labels['folds']}-fold held-out probabilities)"
    )
    for row in [r for r in found.labels if r["flagged"]][:SHOWN]:
        console.echo(
            f"  {row['path']}: given {row['given_label']}, looks like {row['suggested_label']} "
            f"(label quality {row['label_quality']:.3f})"
        )
    console.echo(
        f"duplicates   {dups['exact']} exact, {dups['near']} near pair(s) (cosine ≥ {dups['threshold']}); "
        f"leakage: {dups['leakage']} pair(s) across the splits"
    )
    leaks = sorted(found.pairs, key=lambda r: r["split_a"] == r["split_b"])  # leakage first, stable
    for row in leaks[:SHOWN]:
        leak = ", leakage" if row["split_a"] != row["split_b"] else ""
        console.echo(
            f"  {row['kind']}{leak} {row['similarity']:.3f}: {row['path_a']} ({row['split_a']}) ~ "
            f"{row['path_b']} ({row['split_b']})"
        )
    console.echo(f"outliers     {outliers['flagged']} image(s) far from every training image")
    for row in [r for r in found.outliers if r["flagged"]][:SHOWN]:
        console.echo(f"  {row['path']} ({row['split']}, {row['label']}): score {row['score']:.3f}")
    clean = summary["clean"]
    console.echo(
        f"clean        {clean['train']} training images kept ({clean['removed']} removed): "
        f"tlx run {folder / 'clean.yaml'}"
    )
    features = summary["features"]
    console.echo(
        f"audit in {summary['seconds']:.1f} s ({features['computed']} features computed, "
        f"{features['cached']} cached): {folder / 'index.html'}"
    )
