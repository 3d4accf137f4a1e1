"""Engines: where the frozen backbone runs over the images whose features are not cached yet.

The built-in ``local`` engine runs it on this machine (:func:`tlx.features.on_cpu`,
:func:`tlx.features.on_device`); plugins add others (``tlx-ray`` spreads it over a Ray cluster).
Every engine yields what the local pipeline yields, ``(features or None, positions, (position,
reason) failures)`` per batch, in any order, and the driver alone writes the feature cache: workers
need no shared cache folder, and a job killed midway resumes from the chunks already written.

A worker on another machine builds the backbone itself from a :class:`BackboneSpec` (never from
weights sent to it) and refuses to run when its weights or pixel libraries differ from the driver's.
It runs the backbone with the recipe's ``extract.runtime`` as the driver would on that worker's device
(:func:`tlx.runtimes.prepare`: ONNX Runtime on a CPU, the export kept in the node's own cache folder
and probed against its torch module), and the engine sets the job's ``runner.runtime`` to what the
workers ran.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tlx.errors import TlxError

if TYPE_CHECKING:
    from tlx.backbone import Backbone
    from tlx.features import ImageFiles
    from tlx.recipe import BackboneConfig, ExtractConfig, Recipe
    from tlx.runtimes import Runner

#: one batch: features (n, D) or None, the positions they belong to, and (position, reason) failures
Batch = tuple[Any, list[int], list[tuple[int, str]]]


@dataclass(frozen=True)
class Job:
    """One extraction: the images with the driver's preprocessing, and the driver's backbone."""

    files: ImageFiles
    #: the backbone ready to run on this machine (:mod:`tlx.runtimes`); only the local engine runs it.
    #: Another sets its ``runtime`` to what its workers ran (else it stays the recipe's setting)
    runner: Runner
    batch_size: int
    #: decoding processes on this machine (``extract.workers``)
    workers: int
    #: threads of the backbone where it runs in this process (``extract.threads``)
    threads: int


class Engine(Protocol):
    """Runs the backbone over images: built by ``factory(options, spec)`` from ``register_engines``."""

    def batches(self, job: Job) -> Iterable[Batch]:
        """The job's batches as they finish, in any order; each position exactly once."""
        ...

    def predict(self, run: Path, paths: list[Path], top_k: int, output: Path) -> list[tuple[str, str]]:
        """Classify ``paths`` with the run folder ``run`` and write Parquet rows (``path``, ``label``,
        ``probability``, ``top_k``, ``skipped``) under ``output``; returns the skipped (path, reason)."""
        ...


class LocalEngine:
    """This machine: decoding processes and the backbone on its CPU cores, or on its accelerator."""

    def batches(self, job: Job) -> Iterable[Batch]:
        """The job's runner over its files; a fresh export is checked on the first batch first
        (:meth:`tlx.runtimes.Runner.check`)."""
        from tlx.features import first_batch, on_cpu, on_device

        runner = job.runner
        if runner.pending is not None:
            runner.check(first_batch(job.files, job.batch_size))
        if runner.device == "cpu":
            return on_cpu(runner.forward, job.files, job.batch_size, job.workers, job.threads)
        return on_device(runner.forward, job.files, job.batch_size, job.workers)

    def predict(self, run: Path, paths: list[Path], top_k: int, output: Path) -> list[tuple[str, str]]:
        raise TlxError(
            f"--output {output}: the local engine prints its predictions; Parquet output is written by a "
            "scale-out engine: --engine ray (pip install -e plugins/tlx-ray)"
        )


def local(settings: ExtractConfig) -> LocalEngine:
    """The engine of a command that extracts on this machine whatever the recipe's engine (eval, predict)."""
    if settings.engine.kind != "local":
        from tlx import notices

        notices.warn(
            f"extract.engine: {settings.engine.kind} is used by tlx run only; "
            "these images are extracted on this machine"
        )
    return LocalEngine()


@dataclass(frozen=True)
class BackboneSpec:
    """How a worker elsewhere builds the driver's backbone, and what it must find to match it."""

    config: BackboneConfig
    #: a randomly initialised backbone depends on it
    seed: int
    flip: bool
    #: :func:`tlx.weights.state_digest` of the weights the driver loaded
    sha256: str
    #: :func:`environment` on the driver
    versions: dict[str, str]
    #: ``extract.runtime``: what runs the backbone on the worker's device (:func:`tlx.runtimes.choose`)
    runtime: str = "torch"

    @classmethod
    def of(cls, recipe: Recipe, sha256: str) -> BackboneSpec:
        flip, runtime = recipe.extract.flip, recipe.extract.runtime
        return cls(recipe.backbone, recipe.seed, flip, sha256, environment(recipe.backbone), runtime)

    def build(self, node: str) -> Backbone:
        """The backbone built on this ``node`` through its plugins (flip-averaged when asked); a
        :class:`TlxError` naming the node when its versions or weights differ from the driver's."""
        import torch

        from tlx import plugins
        from tlx.backbone import create_backbone, flip_averaged
        from tlx.weights import state_digest

        check_environment(self.versions, self.config, node)
        torch.manual_seed(self.seed)
        backbone = create_backbone(
            plugins.load().backbones.get(self.config.name, "backbone.name"), self.config
        )
        digest = state_digest(backbone.module)
        if digest != self.sha256:
            raise TlxError(
                f"backbone.weights: node {node} loaded other weights for {self.config.name} than the driver "
                f"(sha256 {digest[:16]}…, the driver's {self.sha256[:16]}…); make the same weights "
                "reachable on every node"
            )
        return flip_averaged(backbone) if self.flip else backbone

    def runner(self, node: str, device: str, batch: int) -> Runner:
        """The backbone built on ``node`` (:meth:`build`) for ``extract.runtime`` on ``device``, for batches
        of ``batch`` images; its export, on a CPU, in the node's cache folder (a fresh one is probed by
        :meth:`tlx.runtimes.Runner.check` on the first batch)."""
        from tlx.cache import BackboneInfo, cache_dir
        from tlx.runtimes import prepare

        backbone = self.build(node)
        info = BackboneInfo.of(backbone, self.sha256)  # build() checked the digest
        return prepare(self.runtime, device, cache_dir(), info, lambda: backbone.module, self.flip, batch)


def environment(config: BackboneConfig) -> dict[str, str]:
    """The versions that decide a feature on this machine: tlx, the backbone's plugin, the pixel libraries."""
    from tlx import __version__, plugins
    from tlx.cache import PIXEL_PACKAGES, versions

    loaded = plugins.load()
    entry = loaded.backbones.get(config.name, "backbone.name")
    plugin = next((p.version for p in loaded.plugins if p.name == entry.plugin), "?")
    return {"tlx": __version__, f"plugin {entry.plugin}": plugin, **versions(PIXEL_PACKAGES)}


def check_environment(expected: dict[str, str], config: BackboneConfig, node: str) -> None:
    """Refuse to compute features on ``node`` when its versions differ from the driver's ``expected``."""
    here = environment(config)
    differ = [
        f"{name} {here.get(name, 'absent')} (driver {expected.get(name, 'absent')})"
        for name in sorted(here.keys() | expected.keys())
        if here.get(name) != expected.get(name)
    ]
    if differ:
        raise TlxError(
            f"engine: node {node} has {', '.join(differ)}; install the same tlx, plugins and "
            "libraries on every node"
        )
