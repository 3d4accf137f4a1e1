"""A run, in the order data flows: recipe → dataset → backbone → features → head → metrics."""

from __future__ import annotations

import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ConfigDict

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


class NoOptions(BaseModel):
    """The options of a component that takes none: any key is unknown."""

    model_config = ConfigDict(extra="forbid")


def options(entry: Entry, values: dict[str, Any], section: str, source: str) -> Any:
    """Validate a component's own recipe keys with the model its plugin registered."""
    return validate(entry.options or NoOptions, values, source=source, prefix=section)


def run(recipe: Recipe, source: str, out: Path) -> dict[str, Any]:
    """Run ``recipe`` and write ``out/metrics.json``; returns the metrics."""
    import torch

    from tlx import plugins, report
    from tlx.backbone import create_backbone
    from tlx.features import extract
    from tlx.finetune import finetune
    from tlx.train import train_head
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
    splits = dataset_entry.factory(dataset_options)
    report.print_data_summary(splits, recipe.dataset.kind)
    report.print_backbone_summary(recipe.backbone.name, backbone_entry.plugin, backbone, digest, splits)

    t0 = time.perf_counter()
    if recipe.strategy == "finetune":
        torch.manual_seed(recipe.seed)
        head = head_entry.factory(backbone.feature_dim, len(splits.classes), head_options)
        tuned = finetune(backbone, head, splits, recipe, on_epoch=report.print_epoch)
        history, n_train, n_test, decode_skipped = tuned.history, tuned.n_train, tuned.n_test, tuned.skipped
        extract_s, train_s = 0.0, time.perf_counter() - t0
    else:
        settings = recipe.extract.model_dump()
        train = extract(backbone, splits.train, **settings)
        test = extract(backbone, splits.test, **settings)
        extract_s = time.perf_counter() - t0
        report.print_features((splits.train.name, splits.test.name), (train, test))

        t0 = time.perf_counter()
        torch.manual_seed(recipe.seed)
        head = head_entry.factory(backbone.feature_dim, len(splits.classes), head_options)
        history = train_head(head, train, test, recipe.train, seed=recipe.seed, on_epoch=report.print_epoch)
        train_s = time.perf_counter() - t0
        n_train, n_test, decode_skipped = len(train.y), len(test.y), train.skipped + test.skipped

    metrics = {
        "test_accuracy": history[-1].test_accuracy,
        "history": [h.as_dict() for h in history],
        "classes": splits.classes,
        "class_counts": {s.name: s.class_counts(len(splits.classes)) for s in (splits.train, splits.test)},
        "strategy": recipe.strategy,
        "n_train": n_train,
        "n_test": n_test,
        "feature_dim": backbone.feature_dim,
        "backbone": {
            "name": recipe.backbone.name,
            "plugin": backbone_entry.plugin,
            "weights": backbone.weights,
            "sha256": digest,
        },
        "head": recipe.head.type,
        "seed": recipe.seed,
        "skipped": [
            {"path": str(path), "reason": reason}
            for path, reason in (*splits.train.skipped, *splits.test.skipped, *decode_skipped)
        ],
        "seconds": {
            "extract": round(extract_s, 3),
            "train": round(train_s, 3),
            "total": round(time.perf_counter() - started, 3),
        },
        "tlx_version": __version__,
    }
    report.write_json(out / "metrics.json", metrics)
    accuracy = metrics["test_accuracy"]
    click.echo(f"test accuracy {accuracy:.2%} after {len(history)} epochs; metrics in {out / 'metrics.json'}")
    return metrics
