"""A run, in the order data flows: recipe → dataset → backbone → features → head → metrics."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import BaseModel, ConfigDict

from tlx import __version__
from tlx.errors import TlxError
from tlx.plots import Painter
from tlx.recipe import Recipe, validate
from tlx.registry import Entry

if TYPE_CHECKING:
    from tlx.backbone import Backbone
    from tlx.cache import BackboneInfo


class NoOptions(BaseModel):
    """The options of a component that takes none: any key is unknown."""

    model_config = ConfigDict(extra="forbid")


def options(entry: Entry, values: dict[str, Any], section: str, source: str) -> Any:
    """Validate a component's own recipe keys with the model its plugin registered."""
    return validate(entry.options or NoOptions, values, source=source, prefix=section)


def run(
    recipe: Recipe, source: str, out: Path, cache_dir: Path | None = None, painter: Painter | None = None
) -> dict[str, Any]:
    """Run ``recipe`` and write the run folder ``out`` (see :mod:`tlx.artifacts`); returns the metrics.

    Features come from the cache under ``cache_dir`` (default :func:`tlx.cache.cache_dir`) where they
    are there; when all are, the backbone is not even built. ``painter`` draws the figures (default:
    one started now; start it earlier to hide its start-up).
    """
    if painter is None:
        with Painter() as own:
            return run(recipe, source, out, cache_dir, own)
    import torch

    from tlx import artifacts, cache, plugins, report
    from tlx.backbone import flip_averaged
    from tlx.device import resolve
    from tlx.features import all_cached, extract
    from tlx.scores import Scores
    from tlx.train import Fit, fit_head, predict

    started = time.perf_counter()
    registry = plugins.load()
    dataset_entry = registry.datasets.get(recipe.dataset.kind, "dataset.kind")
    dataset_options = options(dataset_entry, recipe.dataset.options, "dataset", source)
    backbone_entry = registry.backbones.get(recipe.backbone.name, "backbone.name")
    head_entry = registry.heads.get(recipe.head.type, "head.type")
    head_options = options(head_entry, recipe.head.options, "head", source)
    artifacts.prepare_out_dir(out)

    random.seed(recipe.seed)
    root = cache.cache_dir(cache_dir)
    version = next((p.version for p in registry.plugins if p.name == backbone_entry.plugin), "?")
    # a backbone seen before (same weights files) is built only if some feature is not cached;
    # fine-tuning trains it, so it is always built
    features_only = recipe.strategy == "features"
    info = cache.recall_backbone(root, backbone_entry, recipe.backbone, version) if features_only else None
    backbone = None
    if info is None:
        backbone, info = build_backbone(recipe, backbone_entry, root, version)
    splits = dataset_entry.factory(dataset_options)
    report.print_data_summary(splits, recipe.dataset.kind)
    store = cache.FeatureStore(root, feature_identity(recipe, backbone_entry.plugin, version, info))
    if backbone is None and not all_cached([splits.train, splits.test], store):
        backbone, info = build_backbone(recipe, backbone_entry, root, version)
        store = cache.FeatureStore(root, feature_identity(recipe, backbone_entry.plugin, version, info))
    if not recipe.backbone.pretrained:
        click.echo("warning: the backbone has random weights (backbone.pretrained: false)", err=True)
    report.print_backbone_summary(recipe.backbone.name, backbone_entry.plugin, info, splits)

    # the device matters only where the backbone runs (a warm run does not look for a GPU)
    device = resolve(recipe.device) if backbone is not None else None
    if device is not None:
        click.echo(f"device    {device} (recipe: device: {recipe.device})")
    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    head = head_entry.factory(info.feature_dim, len(splits.classes), head_options)
    if not features_only:
        from tlx.finetune import finetune

        tuned = finetune(backbone, head, splits, recipe, device=device, on_epoch=report.print_epoch)
        fit = Fit([h.as_dict() for h in tuned.history], tuned.n_train, 0)
        scores = Scores.of(splits.classes, tuned.test_y, tuned.test_predicted)
        n_train, n_test, decode_skipped = tuned.n_train, len(tuned.test_y), tuned.skipped
        extract_s, train_s, n_cached = 0.0, time.perf_counter() - t0, 0
    else:
        if backbone is not None and recipe.extract.flip:
            backbone = flip_averaged(backbone)
        train, test = extract(
            [splits.train, splits.test], backbone, recipe.extract, device=device, store=store
        )
        extract_s = time.perf_counter() - t0
        report.print_features((splits.train.name, splits.test.name), (train, test), root)

        t0 = time.perf_counter()
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
        n_train, n_test, decode_skipped = len(train.y), len(test.y), train.skipped + test.skipped
        n_cached = train.cached + test.cached

    backbone_info = {
        "name": recipe.backbone.name,
        "plugin": backbone_entry.plugin,
        "weights": info.weights,
        "sha256": info.sha256,
    }
    metrics = {
        "test_accuracy": scores.accuracy,
        "per_class": scores.per_class(),
        "confusion": scores.confusion,
        "history": fit.history,
        "chosen": fit.chosen,
        "classes": splits.classes,
        "class_counts": {s.name: s.class_counts(len(splits.classes)) for s in (splits.train, splits.test)},
        "strategy": recipe.strategy,
        "n_train": n_train,
        "n_fit": fit.n_fit,
        "n_val": fit.n_val,
        "n_test": n_test,
        "feature_dim": info.feature_dim,
        "backbone": backbone_info,
        "head": recipe.head.type,
        "seed": recipe.seed,
        "skipped": [
            {"path": str(path), "reason": reason}
            for path, reason in (*splits.train.skipped, *splits.test.skipped, *decode_skipped)
        ],
        "features": {
            "cached": n_cached,
            "computed": len(splits.train) + len(splits.test) - n_cached if features_only else 0,
            "cache_dir": str(root),
        },
        "seconds": {
            "extract": round(extract_s, 3),
            "train": round(train_s, 3),
            "total": round(time.perf_counter() - started, 3),
        },
        "tlx_version": __version__,
    }
    try:
        artifacts.write_run(
            out,
            resolved=artifacts.resolved_recipe(recipe, dataset_options, head_options),
            provenance=artifacts.provenance(backbone_info),
            metrics=metrics,
            head=head,
            scores=scores,
            chosen=fit.chosen,
            painter=painter,
            tuned_backbone=None if features_only else backbone.module,
        )
    except OSError as exc:
        raise TlxError(
            f"--out: cannot write the run folder {out} ({exc.strerror or exc}); free space there"
        ) from None
    report.print_run_summary(metrics, scores, out)
    return metrics


def build_backbone(
    recipe: Recipe, entry: Entry, root: Path, plugin_version: str
) -> tuple[Backbone, BackboneInfo]:
    """Build the backbone and hash its weights; the digest is remembered per weights file.

    A later run whose features are all cached then neither builds nor hashes the model; a changed
    weights file (size, mtime, ctime or inode) is a new key, so the model is built again.
    """
    import torch

    from tlx import cache
    from tlx.backbone import create_backbone

    torch.manual_seed(recipe.seed)  # a randomly initialised backbone depends on the seed
    backbone = create_backbone(entry, recipe.backbone)
    info = cache.BackboneInfo.of(backbone)
    cache.remember_backbone(root, entry, recipe.backbone, plugin_version, info)
    return backbone, info


def feature_identity(recipe: Recipe, plugin: str, version: str, info: BackboneInfo) -> dict[str, Any]:
    """The cache namespace: every recipe key that can change a feature (new keys count by default)."""
    from tlx.cache import namespace_identity

    backbone = {"plugin": [plugin, version], **recipe.backbone.model_dump(mode="json", exclude={"weights"})}
    pixels = recipe.extract.model_dump(
        mode="json", exclude={"batch_size", "workers", "threads", "on_bad_image"}
    )
    return namespace_identity(backbone, info, pixels)
