"""A run, in the order data flows: recipe → dataset → backbone → features → head → metrics."""

from __future__ import annotations

import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from tlx import __version__
from tlx.errors import TlxError
from tlx.recipe import Recipe, validate
from tlx.registry import Entry


def default_out_dir(recipe_path: Path) -> Path:
    """A new folder ``runs/<timestamp>-<recipe name>``."""
    base = Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{recipe_path.stem}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def prepare_out_dir(out: Path) -> None:
    """Create ``out`` before any heavy work; refuse to overwrite an earlier run."""
    if (out / "metrics.json").exists():
        raise TlxError(f"--out: {out} already holds a run (metrics.json); choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".tlx-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise TlxError(
            f"--out: cannot write to {out} ({exc.strerror or exc}); choose another folder"
        ) from None


def options(entry: Entry, values: dict[str, Any], section: str, source: str) -> Any:
    """Validate a component's own recipe keys with the model its plugin registered."""
    from pydantic import BaseModel, ConfigDict

    class NoOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")

    return validate(entry.options or NoOptions, values, source=source, prefix=section)


def run(recipe: Recipe, source: str, out: Path) -> dict[str, Any]:
    """Run ``recipe`` and write the run folder ``out`` (see :mod:`tlx.artifacts`); returns the metrics."""
    import torch

    from tlx import artifacts, plugins, report
    from tlx.backbone import create_backbone, flip_averaged
    from tlx.features import extract
    from tlx.scores import Scores
    from tlx.train import fit_head, predict
    from tlx.weights import state_digest

    started = time.perf_counter()
    registry = plugins.load()
    dataset_entry = registry.datasets.get(recipe.dataset.kind, "dataset.kind")
    dataset_options = options(dataset_entry, recipe.dataset.options, "dataset", source)
    backbone_entry = registry.backbones.get(recipe.backbone.name, "backbone.name")
    head_entry = registry.heads.get(recipe.head.type, "head.type")
    head_options = options(head_entry, recipe.head.options, "head", source)
    prepare_out_dir(out)

    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    backbone = create_backbone(backbone_entry, recipe.backbone)
    digest = state_digest(backbone.module)
    if not recipe.backbone.pretrained:
        click.echo("warning: the backbone has random weights (backbone.pretrained: false)", err=True)
    if recipe.extract.flip:
        backbone = flip_averaged(backbone)
    splits = dataset_entry.factory(dataset_options)
    report.print_data_summary(splits, recipe.dataset.kind)
    report.print_backbone_summary(recipe.backbone.name, backbone_entry.plugin, backbone, digest, splits)

    t0 = time.perf_counter()
    batch, workers = recipe.extract.batch_size, recipe.extract.workers
    train = extract(backbone, splits.train, batch_size=batch, workers=workers)
    test = extract(backbone, splits.test, batch_size=batch, workers=workers)
    extract_s = time.perf_counter() - t0
    report.print_features((splits.train.name, splits.test.name), (train, test))

    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    head = head_entry.factory(backbone.feature_dim, len(splits.classes), head_options)
    fit = fit_head(
        head,
        train,
        test,
        recipe.train,
        n_classes=len(splits.classes),
        seed=recipe.seed,
        on_epoch=report.print_epoch,
    )
    train_s = time.perf_counter() - t0
    scores = Scores.of(splits.classes, test.y, predict(head, test))

    backbone_info = {
        "name": recipe.backbone.name,
        "plugin": backbone_entry.plugin,
        "weights": backbone.weights,
        "sha256": digest,
    }
    metrics = {
        "test_accuracy": scores.accuracy,
        "per_class": scores.per_class(),
        "confusion": scores.confusion,
        "history": fit.history,
        "chosen": fit.chosen,
        "classes": splits.classes,
        "n_train": len(train.y),
        "n_fit": fit.n_fit,
        "n_val": fit.n_val,
        "n_test": len(test.y),
        "feature_dim": backbone.feature_dim,
        "backbone": backbone_info,
        "head": recipe.head.type,
        "seed": recipe.seed,
        "skipped": [{"path": str(p), "reason": r} for s in (splits.train, splits.test) for p, r in s.skipped]
        + [{"path": str(p), "reason": r} for f in (train, test) for p, r in f.skipped],
        "seconds": {
            "extract": round(extract_s, 3),
            "train": round(train_s, 3),
            "total": round(time.perf_counter() - started, 3),
        },
        "tlx_version": __version__,
    }
    artifacts.write_run(
        out,
        resolved=artifacts.resolved_recipe(recipe, dataset_options, head_options),
        provenance=artifacts.provenance(backbone_info),
        metrics=metrics,
        head=head,
        scores=scores,
        chosen=fit.chosen,
    )
    report.print_run_summary(metrics, scores, out)
    return metrics
