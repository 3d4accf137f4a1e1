"""What a run shows on the terminal: the data summary, the backbone, one line per epoch, the scores.

:class:`Console` is the callbacks a run reports through; the steps themselves print nothing.
:class:`QuietConsole` prints nothing and keeps the warnings (the Python API's ``tlx.fit``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import BaseModel

if TYPE_CHECKING:
    from torch import nn

    from tlx.data import Splits
    from tlx.extraction.store import BackboneInfo
    from tlx.recipe import Recipe
    from tlx.registry import Backbone
    from tlx.scores import Scores
    from tlx.tensors import Features
    from tlx.train import Epoch


#: the epoch table's columns (fastai's, with the split named as in metrics.json), the validation split's
#: only where ``train.val_fraction`` holds one out
COLUMNS = ("epoch", "train_loss", "test_loss", "test_accuracy")
VAL_COLUMNS = ("val_loss", "val_accuracy")


class Console:
    """The terminal's view of a run: ``run()`` and the training loops call these, in this order.

    Every line goes through :meth:`echo`, every warning through :meth:`warning`.
    """

    #: whether the epoch table's header is out (printed before the first epoch)
    _header = False

    def echo(self, text: str) -> None:
        click.echo(text)

    def data(self, splits: Splits, kind: str) -> None:
        """Images per split and class, in a small table."""
        self.echo(f"dataset   {kind}: {splits.source}")
        names = ["split", "images", *splits.classes]
        widths = [max(len(n), 6) for n in names]
        self.echo("  " + "  ".join(n.rjust(w) for n, w in zip(names, widths)))
        for split in (splits.train, splits.test):
            row = [split.name, str(len(split)), *map(str, split.class_counts(len(splits.classes)))]
            self.echo("  " + "  ".join(v.rjust(w) for v, w in zip(row, widths)))
        self.echo(f"  {describe_balance(splits)}")
        for split in (splits.train, splits.test):
            for path, reason in split.skipped:
                self.echo(f"  skipped {path}: {reason}")
        for name, count in zip(splits.classes, splits.test.class_counts(len(splits.classes))):
            if count == 0:
                self.warning(
                    f"class {name!r} has no images in split {splits.test.name!r}; "
                    "its test accuracy cannot be measured"
                )

    def backbone(self, recipe: Recipe, plugin: str, info: BackboneInfo, splits: Splits) -> None:
        """Where the weights came from, the preprocessing, and the image tensor shapes."""
        if not recipe.backbone.pretrained:
            self.warning("the backbone has random weights (backbone.pretrained: false)")
        cfg = info.data_config
        _, height, width = cfg["input_size"]
        self.echo(f"backbone  {recipe.backbone.name} [plugin {plugin}]: {info.weights}")
        self.echo(f"  weights sha256 {info.sha256[:16]}; preprocessing {describe_preprocessing(cfg)}")
        shapes = "  ".join(f"{s.name} {len(s)}×3×{height}×{width}" for s in (splits.train, splits.test))
        self.echo(f"images    {shapes}")

    def features(self, names: tuple[str, str], features: tuple[Features, Features], folder: Path) -> None:
        """Feature shapes per split, how many came from the cache (``folder``), the images left out."""
        shapes = "  ".join(f"{name} {f.x.shape[0]}×{f.x.shape[1]}" for name, f in zip(names, features))
        cached = sum(f.cached for f in features)
        self.echo(f"features  {shapes}  ({cached} from the cache in {folder})")
        for f in features:
            for path, reason in f.skipped:
                self.echo(f"  skipped {path}: {reason}")

    def training(self, recipe: Recipe, options: Any, closed_form: bool, from_head: Collection[str]) -> None:
        """The head and its options, then the train settings it trains with; ``from_head`` are the keys
        that take the head's own defaults (the recipe leaves them unset). A closed-form head fits in one
        call: the optimizer's keys do not apply to it and are not shown."""
        shown = options.model_dump(mode="json") if isinstance(options, BaseModel) else {}
        self.echo(f"head      {recipe.head.type}" + "".join(f" {k}={v}" for k, v in shown.items()))
        train = recipe.train.model_dump(mode="json")
        keys = CLOSED_FORM_KEYS if closed_form else [k for k in train if _applies(k, train)]
        how = "closed form, no epochs: " if closed_form else ""
        values = [
            f"{k}={train[k]}" + (f" ({recipe.head.type}'s default)" if k in from_head else "") for k in keys
        ]
        self.echo(f"train     {how}{' '.join(values)}")

    def epoch(self, record: Epoch) -> None:
        """One row of the epoch table; its header before the first."""
        values = record.as_dict()
        columns = COLUMNS + (VAL_COLUMNS if "val_loss" in values else ())
        widths = [max(len(c), 8) for c in columns]
        if not self._header:
            self._header = True
            self.echo("  ".join(c.rjust(w) for c, w in zip(columns, widths)) + "   time")
        cells = [str(record.epoch), *(_cell(c, values.get(c)) for c in columns[1:])]
        self.echo("  ".join(v.rjust(w) for v, w in zip(cells, widths)) + f"  {clock(record.seconds)}")

    def fitted(self, head: str, rows: int, seconds: float) -> None:
        """A closed-form head's fit, in place of the epoch table: how many candidates it tried, how long."""
        self.echo(f"fitted    {head} in {clock(seconds)}: {rows} candidates tried on the training split")

    def finetune(self, backbone: Backbone, head: nn.Module, recipe: Recipe) -> None:
        """What fine-tuning trains, at which learning rates, with which augmentation."""
        options, train = recipe.finetune, recipe.train
        module = backbone.module
        trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in module.parameters())
        head_n = sum(p.numel() for p in head.parameters())
        which = "all" if options.unfreeze == "all" else ", ".join(options.unfreeze)
        _, height, _ = backbone.data_config["input_size"]
        augment = f"random resized crop {height} and flip" if options.augment else "none"
        self.echo(
            f"finetune  unfreeze {which}: {trained:,} of {total:,} backbone parameters at lr "
            f"{options.backbone_lr:g}, head {head_n:,} at lr {train.lr:g}; {train.optimizer}, "
            f"schedule {train.schedule}; augmentation {augment}"
        )

    def done(self, metrics: dict[str, Any], scores: Scores, out: Path) -> None:
        """The end of a run: the per-class table, final accuracy, the weakest class, where the files are."""
        print_scores(scores, self.echo)
        chosen = ", ".join(f"{k}={v}" for k, v in metrics["chosen"].items())
        weakest = scores.weakest()
        self.echo(
            f"test accuracy {metrics['test_accuracy']:.2%} on {metrics['n_test']} images"
            + (f" ({chosen})" if chosen else "")
            + f"; weakest class {weakest['class']} (F1 {weakest['f1']:.2%}, recall {weakest['recall']:.2%})"
        )
        self.echo(
            f"run folder {out}: metrics.json, predictions.csv, errors.png, curves.png, confusion.png, ..."
        )
        seconds = metrics["seconds"]
        self.echo(
            f"total time {clock(seconds['total'])} (features {seconds['extract']:.1f} s, "
            f"training {seconds['train']:.1f} s)"
        )

    def warning(self, text: str) -> None:
        click.echo(f"warning: {text}", err=True)

    def device(self, device: str, configured: str, runtime: str | None = None) -> None:
        """Where the backbone runs, and what runs it (:mod:`tlx.extraction.runtimes`) when features are
        computed."""
        runs = f"; runtime {runtime}" if runtime else ""
        self.echo(f"device    {device} (recipe: device: {configured}){runs}")


class QuietConsole(Console):
    """A console that prints nothing: its lines are dropped, its warnings kept in :attr:`warnings`."""

    def __init__(self, warnings: list[str] | None = None) -> None:
        self.warnings: list[str] = [] if warnings is None else warnings

    def echo(self, text: str) -> None:
        pass

    def warning(self, text: str) -> None:
        self.warnings.append(text)


#: the train keys a closed-form head uses: the rest configure the optimizer of trained heads
CLOSED_FORM_KEYS = ("val_fraction", "class_weight")


def _applies(key: str, train: dict[str, Any]) -> bool:
    """Whether train ``key`` changes anything given the others (unset options and unused ones do not)."""
    if key in ("step_size", "gamma"):
        return train["schedule"] == "step"
    return key not in ("patience", "class_weight") or train[key] is not None


def _cell(column: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2%}" if column.endswith("accuracy") else f"{value:.4f}"


def clock(seconds: float) -> str:
    """``mm:ss`` as fastai shows an epoch's time (``h:mm:ss`` past an hour)."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def describe_balance(splits: Splits) -> str:
    """Class balance: largest to smallest training class, and what always guessing the largest scores."""
    counts = splits.train.class_counts(len(splits.classes))
    largest = max(range(len(counts)), key=counts.__getitem__)
    ratio = f"{counts[largest] / min(counts):.2f}" if min(counts) else "inf"
    test_counts = splits.test.class_counts(len(splits.classes))
    baseline = test_counts[largest] / max(1, len(splits.test))
    return (
        f"balance: largest/smallest training class {ratio}x; always answering "
        f"{splits.classes[largest]!r} scores {baseline:.2%} on {splits.test.name}"
    )


def describe_preprocessing(cfg: dict[str, Any]) -> str:
    _, height, _ = cfg["input_size"]
    resize = int(height / cfg.get("crop_pct", 1.0))
    mean = ", ".join(f"{m:.3f}" for m in cfg["mean"])
    std = ", ".join(f"{s:.3f}" for s in cfg["std"])
    return (
        f"resize {resize} {cfg.get('interpolation', 'bilinear')}, {cfg.get('crop_mode', 'center')} crop "
        f"{height}, mean ({mean}), std ({std})"
    )


def print_scores(scores: Scores, echo: Callable[[str], None] = click.echo) -> None:
    """The per-class table: precision, recall, F1, support."""
    width = max(8, *(len(c) for c in scores.classes))
    echo(f"  {'class':<{width}}  precision  recall     f1  support")
    for row in scores.per_class():
        echo(
            f"  {row['class']:<{width}}  {row['precision']:9.2%}  {row['recall']:6.2%}  {row['f1']:5.2%}"
            f"  {row['support']:7d}"
        )
