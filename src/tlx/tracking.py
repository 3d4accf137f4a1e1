"""Experiment trackers following a run: a console that forwards its callbacks to the run's trackers too.

The trackers get what the terminal gets, from the same callbacks: the run starts when the backbone is
known (the resolved recipe as parameters; as tags the backbone, its weights digest and the plugins
providing backbone and head), each epoch's metrics with its step, and at the end the final metrics and
the run folder, its figures (``*.png``) included. A tracker that fails
(an unreachable server, an unwritable store) is warned about once and dropped; the run goes on.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlx.errors import TlxError, describe
from tlx.recipe import dotted
from tlx.report import Console

if TYPE_CHECKING:
    from torch import nn

    from tlx.components import Components
    from tlx.data import Splits
    from tlx.extraction.store import BackboneInfo
    from tlx.recipe import Recipe
    from tlx.registry import Backbone, Tracker
    from tlx.scores import Scores
    from tlx.tensors import Features
    from tlx.train import Epoch

#: per-epoch metric names, from the fields of :class:`tlx.train.Epoch`
EPOCH_METRICS = {
    "train_loss": "train/loss",
    "test_loss": "test/loss",
    "test_accuracy": "test/accuracy",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
}


def flatten(data: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """Nested recipe data as dotted keys; lists as JSON text and None as ``null``: trackers take scalars."""
    return {
        key: value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
        for key, value in dotted(data).items()
    }


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers a finished run is compared by: test accuracy, macro F1, the run's seconds."""
    f1 = [float(row["f1"]) for row in metrics["per_class"]]
    return {
        "test_accuracy": float(metrics["test_accuracy"]),
        "macro_f1": sum(f1) / len(f1),
        "seconds": float(metrics["seconds"]["total"]),
    }


class TrackingConsole(Console):
    """Forwards every callback to ``console``, and the run's progress to ``trackers`` (name, tracker)."""

    def __init__(
        self,
        console: Console,
        trackers: list[tuple[str, Tracker]],
        params: dict[str, Any],
        tags: dict[str, str],
    ) -> None:
        self.console = console
        self.trackers = trackers
        self.params = params
        self.tags = tags
        self.started: list[tuple[str, Tracker]] = []

    def _each(self, trackers: list[tuple[str, Tracker]], call: str, *args: Any) -> None:
        """Call ``call`` on each tracker; one that raises is warned about and dropped for the run."""
        for name, tracker in list(trackers):
            try:
                getattr(tracker, call)(*args)
            except Exception as exc:
                self.warning(f"tracker {name!r} failed and is left out of this run: {describe(exc)}")
                self.trackers.remove((name, tracker))
                if (name, tracker) in self.started:
                    self.started.remove((name, tracker))

    def echo(self, text: str) -> None:
        self.console.echo(text)

    def warning(self, text: str) -> None:
        self.console.warning(text)

    def data(self, splits: Splits, kind: str) -> None:
        self.console.data(splits, kind)

    def backbone(self, recipe: Recipe, plugin: str, info: BackboneInfo, splits: Splits) -> None:
        self.console.backbone(recipe, plugin, info, splits)
        tags = {
            **self.tags,
            "backbone": recipe.backbone.name,
            "backbone_plugin": plugin,
            "weights_sha256": info.sha256,
        }
        self.started = list(self.trackers)
        self._each(self.trackers, "start", flatten(self.params), tags)

    def device(self, device: str, configured: str, runtime: str | None = None) -> None:
        self.console.device(device, configured, runtime)

    def features(self, names: tuple[str, str], features: tuple[Features, Features], folder: Path) -> None:
        self.console.features(names, features, folder)

    def finetune(self, backbone: Backbone, head: nn.Module, recipe: Recipe) -> None:
        self.console.finetune(backbone, head, recipe)

    def training(self, recipe: Recipe, options: Any, closed_form: bool, from_head: Collection[str]) -> None:
        self.console.training(recipe, options, closed_form, from_head)

    def fitted(self, head: str, rows: int, seconds: float) -> None:
        self.console.fitted(head, rows, seconds)

    def epoch(self, record: Epoch) -> None:
        self.console.epoch(record)
        values = {EPOCH_METRICS[k]: v for k, v in record.as_dict().items() if k in EPOCH_METRICS}
        self._each(self.started, "epoch", record.epoch, values)

    def done(self, metrics: dict[str, Any], scores: Scores, out: Path) -> None:
        self.console.done(metrics, scores, out)
        self._each(self.started, "finish", final_metrics(metrics), out)
        self.started = []

    def fail(self) -> None:
        """The run stopped with an error: the trackers that started mark their run failed."""
        self._each(self.started, "fail")
        self.started = []


@contextlib.contextmanager
def tracked(
    console: Console, recipe: Recipe, parts: Components, run_dir: Path, tags: dict[str, str]
) -> Iterator[Console]:
    """``console``, forwarding to the recipe's trackers too while the run lives (``tags`` added to the
    run's own); ``console`` itself when the recipe tracks nothing. A tracker whose package is missing
    stops the run here, before any work.
    """
    if not parts.trackers:
        yield console
        return
    from tlx.artifacts import resolved_recipe

    trackers = []
    for entry, options in parts.trackers:
        try:
            trackers.append((entry.name, entry.factory(options, run_dir)))
        except TlxError:  # a package the tracker needs is missing: the user fixes that first
            raise
        except Exception as exc:
            console.warning(f"tracker {entry.name!r} failed and is left out of this run: {describe(exc)}")
    params = resolved_recipe(recipe, parts.dataset_options, parts.head_options)
    params.pop("track", None)
    fan = TrackingConsole(console, trackers, params, {**tags, "head_plugin": parts.head.plugin})
    try:
        yield fan
    except BaseException:
        fan.fail()
        raise
