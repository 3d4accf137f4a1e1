"""A run, in the order data flows: recipe → dataset → backbone → features → head → metrics."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlx.components import Components, resolve, with_head_defaults
from tlx.data import check_out_dir, check_overlap
from tlx.errors import TlxError
from tlx.plots import Painter
from tlx.recipe import Recipe
from tlx.report import Console
from tlx.tracking import tracked
from tlx.version import __version__

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tlx.artifacts import Predictions
    from tlx.calibration import Calibration
    from tlx.data import Splits
    from tlx.extraction.frozen import FrozenBackbone
    from tlx.extraction.store import BackboneInfo
    from tlx.registry import Backbone
    from tlx.scores import Scores
    from tlx.train import Fit


@dataclass
class Outcome:
    """What either strategy produced: the trained head, its fit, its test predictions and scores, and
    what it cost."""

    head: nn.Module
    fit: Fit
    predictions: Predictions
    scores: Scores
    n_train: int
    n_test: int
    #: images that could not be decoded, with the reason
    skipped: list[tuple[Path, str]]
    #: features read from the cache, and computed by the backbone
    cached: int
    computed: int
    extract_s: float
    train_s: float
    #: the trained backbone (fine-tuning only): saved with the run
    tuned: nn.Module | None = None
    #: the selection score on the training split (:func:`tlx.train.selection_score`), when asked for
    selection: dict[str, Any] | None = None
    #: what ran the frozen backbone (:mod:`tlx.extraction.runtimes`); None when no feature was computed
    runtime: str | None = None
    #: the fitted calibration and what it measured on the test split (``metrics.json``); None when
    #: it could not be fitted (a warning says why)
    calibration: Calibration | None = None
    calibrated: dict[str, Any] | None = None
    #: seconds to hold training images out (when no selection needed them) and fit the calibration
    calibrate_s: float = 0.0


def run(
    recipe: Recipe,
    source: str,
    out: Path,
    cache_dir: Path | None = None,
    painter: Painter | None = None,
    console: Console | None = None,
    select: bool = False,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``recipe`` and write the run folder ``out`` (see :mod:`tlx.artifacts`); returns the metrics.

    Steps: resolve the components, list the dataset, recall the backbone (building it only when some
    feature is not cached, or to fine-tune it), train the head, score it on the test split, write the
    run folder. ``painter`` draws the figures (start it early to hide its start-up); ``console`` shows
    progress (default: the terminal). ``select`` adds the selection score on the training split
    (``strategy: features`` only), by which ``tlx sweep`` ranks runs. ``tags`` go to the recipe's
    trackers with the run's own (``tlx sweep`` groups its runs by one).
    """
    if painter is None:
        with Painter() as own:
            return run(recipe, source, out, cache_dir, own, console, select, tags)
    started = time.perf_counter()
    parts = resolve(recipe, source, engine=True)
    recipe = with_head_defaults(recipe, parts)
    with tracked(console or Console(), recipe, parts, out, tags or {}) as tracking:
        return _run(recipe, source, parts, out, cache_dir, painter, tracking, select, started)


def _run(
    recipe: Recipe,
    source: str,
    parts: Components,
    out: Path,
    cache_dir: Path | None,
    painter: Painter,
    console: Console,
    select: bool,
    started: float,
) -> dict[str, Any]:
    """:func:`run` once the components are resolved and the trackers follow ``console``."""
    from tlx import artifacts
    from tlx.extraction import store
    from tlx.extraction.device import resolve as resolve_device
    from tlx.extraction.frozen import FrozenBackbone

    random.seed(recipe.seed)
    splits = parts.dataset.factory(parts.dataset_options)
    check_out_dir(splits, out)
    artifacts.prepare_out_dir(out)
    console.data(splits, recipe.dataset.kind)
    for warning in check_overlap(splits):
        console.warning(warning)
    root = store.cache_dir(cache_dir)
    frozen = FrozenBackbone.of(recipe, parts, root)
    info = frozen.info  # recalled, or the backbone built
    console.backbone(recipe, parts.backbone.plugin, info, splits)
    if recipe.strategy == "features":
        outcome = train_on_features(recipe, parts, splits, frozen, console, select)
    else:
        backbone, _ = frozen.built()
        device = resolve_device(recipe.device)
        console.device(device, recipe.device)
        outcome = finetune_end_to_end(recipe, parts, splits, backbone, info, device, console)
    metrics = metrics_of(recipe, parts, splits, info, outcome, root, time.perf_counter() - started)
    try:
        artifacts.write_run(
            out,
            resolved=artifacts.resolved_recipe(recipe, parts.dataset_options, parts.head_options),
            provenance=artifacts.provenance(metrics["backbone"], source),
            metrics=metrics,
            head=outcome.head,
            scores=outcome.scores,
            predictions=outcome.predictions,
            chosen=outcome.fit.chosen,
            painter=painter,
            tuned_backbone=outcome.tuned,
            calibration=outcome.calibration,
        )
    except OSError as exc:
        raise TlxError(
            f"--out: cannot write the run folder {out} ({exc.strerror or exc}); free space there"
        ) from None
    console.done(metrics, outcome.scores, out)
    return metrics


def train_on_features(
    recipe: Recipe,
    parts: Components,
    splits: Splits,
    frozen: FrozenBackbone,
    console: Console,
    select: bool = False,
) -> Outcome:
    """Features of every image (from the cache, else through the frozen backbone), then the head on them.

    ``select``: then also the head's selection score on the training features (no extra backbone work).
    Torch is imported while the extraction workers run (:func:`tlx.extraction.pipeline.on_cpu`), or
    first when every feature is cached: its import is then start-up, not extraction, in
    ``seconds.extract``.
    """
    images = [splits.train, splits.test]
    if frozen.cached(images):  # torch's import is start-up, not extraction
        import torch

    def on_runner(device: str, runtime: str) -> None:
        console.device(device, recipe.device, runtime)

    t0 = time.perf_counter()
    train, test = frozen.features(images, engine=parts.engine, on_runner=on_runner)
    extract_s = time.perf_counter() - t0

    import torch

    from tlx.artifacts import Predictions
    from tlx.scores import Scores
    from tlx.tensors import threads_set
    from tlx.train import ClosedFormHead, fit_head, held_out, selection_score, with_choices

    info = frozen.info
    assert frozen.store is not None  # a recipe's backbone is not a run folder's fine-tuned one
    console.features((splits.train.name, splits.test.name), (train, test), frozen.store.folder)
    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    head = parts.head.factory(info.feature_dim, len(splits.classes), parts.head_options)
    closed_form = isinstance(head, ClosedFormHead)
    console.training(recipe, parts.head_options, closed_form, parts.head_train)
    groups = splits.train.decoded_groups(train.skipped)  # one per row of the training features
    fit = fit_head(
        head,
        train,
        test,
        recipe.train,
        n_classes=len(splits.classes),
        seed=recipe.seed,
        on_epoch=console.epoch,
        groups=groups,
    )
    train_s = time.perf_counter() - t0
    if closed_form:
        console.fitted(recipe.head.type, len(fit.history), train_s)
    fixed = with_choices(parts.head_options, fit.chosen)  # the head's choices, kept in every fold
    n_classes = len(splits.classes)
    try:
        held = held_out(
            head,
            lambda: parts.head.factory(info.feature_dim, n_classes, fixed),
            train,
            recipe.train,
            n_classes=n_classes,
            seed=recipe.seed,
            groups=groups,
        )
    except TlxError as exc:
        if select:
            raise
        console.warning(f"calibration: not fitted ({exc}); answers are not calibrated, nor 'unknown'")
        held = None
    selection = selection_score(held) if select and held is not None else None
    skipped = {path for path, _ in test.skipped}
    with torch.inference_mode(), threads_set(1):  # one thread, as the head trained: the same bits anywhere
        logits = head.eval()(test.x)
    calibration, calibrated, calibrate_s = None, None, 0.0
    if held is not None:
        t0 = time.perf_counter()
        calibration, calibrated = calibrate(
            (held.logits, held.y), held.how, train.x, (test.x, test.y, logits), recipe.calibration.accept
        )
        calibrate_s = time.perf_counter() - t0 + (0.0 if select else held.seconds)
        logits = logits / calibration.temperature  # the argmax is unchanged; predictions.csv calibrated
    predictions = Predictions.of([p for p, _ in splits.test.samples if p not in skipped], test.y, logits)
    return Outcome(
        head,
        fit,
        predictions,
        Scores.of(splits.classes, test.y, predictions.predicted),
        n_train=len(train.y),
        n_test=len(test.y),
        skipped=train.skipped + test.skipped,
        cached=train.cached + test.cached,
        computed=train.computed + test.computed,
        extract_s=extract_s,
        train_s=train_s,
        selection=selection,
        runtime=frozen.runtime,
        calibration=calibration,
        calibrated=calibrated,
        calibrate_s=calibrate_s,
    )


def calibrate(
    held: tuple[torch.Tensor, torch.Tensor],
    how: str,
    train_x: torch.Tensor,
    test: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    accept: float,
) -> tuple[Calibration, dict[str, Any]]:
    """The calibration fitted on ``held`` (logits of held-out training images and their labels, held
    out as ``how`` says) and the features ``train_x`` of the training images; and what it measures on
    the ``test`` split (its features, labels and logits): the temperature, expected calibration error
    and NLL before and after, the "unknown" threshold and the share of test images it accepts, the
    reliability bins."""
    from tlx import calibration as cal

    fitted = cal.Calibration.fit(held[0].numpy(), held[1].numpy(), train_x.numpy(), accept)
    test_x, y, raw = (t.numpy() for t in test)
    before, after = cal.softmax(raw), fitted.probabilities(raw)
    known = fitted.ood_scores(test_x) <= fitted.threshold
    measured = {
        "calibration": {
            "temperature": round(fitted.temperature, 6),
            "ece": cal.ece(after, y),
            "ece_uncalibrated": cal.ece(before, y),
            "nll": cal.nll(raw, y, fitted.temperature),
            "nll_uncalibrated": cal.nll(raw, y),
            "held_out": how,
            "reliability": cal.reliability(after, y),
            "reliability_uncalibrated": cal.reliability(before, y),
        },
        "ood": {
            "method": f"mean cosine distance to the {cal.NEIGHBOURS} nearest training features",
            "threshold": fitted.threshold,
            "accept": accept,
            "accepted_test_fraction": float(known.mean()) if len(known) else None,
        },
    }
    return fitted, measured


def finetune_end_to_end(
    recipe: Recipe,
    parts: Components,
    splits: Splits,
    backbone: Backbone,
    info: BackboneInfo,
    device: str,
    console: Console,
) -> Outcome:
    """The backbone (its ``finetune.unfreeze`` part) and the head trained together on the images."""
    import torch

    from tlx.artifacts import Predictions
    from tlx.finetune import finetune
    from tlx.scores import Scores
    from tlx.train import validation_split

    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    head = parts.head.factory(info.feature_dim, len(splits.classes), parts.head_options)
    console.training(recipe, parts.head_options, False, parts.head_train)
    tuned = finetune(
        backbone, head, splits, recipe, device=device, on_start=console.finetune, on_epoch=console.epoch
    )
    calibration, calibrated, calibrate_s, logits = None, None, 0.0, tuned.test_logits
    if tuned.held is not None and tuned.train_features is not None and tuned.test_features is not None:
        started = time.perf_counter()
        test = (tuned.test_features, tuned.test_y, tuned.test_logits)
        how, accept = validation_split(recipe.train.val_fraction), recipe.calibration.accept
        calibration, calibrated = calibrate(tuned.held, how, tuned.train_features, test, accept)
        calibrate_s = time.perf_counter() - started
        logits = logits / calibration.temperature  # the argmax is unchanged; predictions.csv calibrated
    else:
        console.warning(
            "calibration: not fitted (fine-tuning calibrates on a validation split: set train.val_fraction, "
            "e.g. 0.2); answers are not calibrated, nor 'unknown'"
        )
    predictions = Predictions.of(tuned.test_paths, tuned.test_y, logits)
    return Outcome(
        head,
        tuned.fit,
        predictions,
        Scores.of(splits.classes, tuned.test_y, predictions.predicted),
        n_train=tuned.fit.n_fit + tuned.fit.n_val,
        n_test=len(tuned.test_y),
        skipped=tuned.skipped,
        cached=0,
        computed=0,
        extract_s=0.0,
        train_s=time.perf_counter() - t0 - calibrate_s,
        tuned=backbone.module,
        calibration=calibration,
        calibrated=calibrated,
        calibrate_s=calibrate_s,
    )


def metrics_of(
    recipe: Recipe,
    parts: Components,
    splits: Splits,
    info: BackboneInfo,
    outcome: Outcome,
    root: Path,
    seconds: float,
) -> dict[str, Any]:
    """``metrics.json``: the scores, the training history and choices, the counts and listing of the data
    (:meth:`~tlx.data.Splits.listing`), where time went."""
    scores = outcome.scores
    selection = {"selection": outcome.selection} if outcome.selection is not None else {}
    return {
        "test_accuracy": scores.accuracy,
        "per_class": scores.per_class(),
        "confusion": scores.confusion,
        "history": outcome.fit.history,
        "chosen": outcome.fit.chosen,
        "classes": splits.classes,
        "class_counts": {s.name: s.class_counts(len(splits.classes)) for s in (splits.train, splits.test)},
        "data": splits.listing(),
        "strategy": recipe.strategy,
        "n_train": outcome.n_train,
        "n_fit": outcome.fit.n_fit,
        "n_val": outcome.fit.n_val,
        "n_test": outcome.n_test,
        "feature_dim": info.feature_dim,
        "backbone": {
            "name": recipe.backbone.name,
            "plugin": parts.backbone.plugin,
            "weights": info.weights,
            "sha256": info.sha256,
        },
        "head": recipe.head.type,
        "seed": recipe.seed,
        "skipped": [
            {"path": str(path), "reason": reason}
            for path, reason in (*splits.train.skipped, *splits.test.skipped, *outcome.skipped)
        ],
        "features": {
            "cached": outcome.cached,
            "computed": outcome.computed,
            "runtime": outcome.runtime,
            "cache_dir": str(root),
        },
        "seconds": {
            "extract": round(outcome.extract_s, 3),
            "train": round(outcome.train_s, 3),
            "calibrate": round(outcome.calibrate_s, 3),
            "total": round(seconds, 3),
        },
        "tlx_version": __version__,
        **selection,
        **(outcome.calibrated or {}),
    }
