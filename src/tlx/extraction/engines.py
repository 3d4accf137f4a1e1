"""Engines: where the frozen backbone runs over the images whose features are not cached yet.

The built-in ``local`` engine runs it on this machine (:func:`tlx.extraction.pipeline.on_cpu`,
:func:`tlx.extraction.pipeline.on_device`); plugins add others (``tlx-ray`` spreads it over a Ray cluster).
Every engine yields what the local pipeline yields, ``(features or None, positions, (position,
reason) failures)`` per batch, in any order, and the driver alone writes the feature cache: workers
need no shared cache folder, and a job killed midway resumes from the chunks already written.

A worker on another machine gets the backbone through the same front door as the driver
(:meth:`BackboneSpec.frozen`: a :class:`~tlx.extraction.frozen.FrozenBackbone` built by its own
plugins, never from weights sent to it) and refuses to run when its weights or pixel libraries differ
from the driver's. It runs the backbone with the recipe's ``extract.runtime`` as the driver would on
that worker's device (ONNX Runtime on a CPU, the export kept in the node's own cache folder and probed
against its torch module), and the engine sets the job's ``runner.runtime`` to what the workers ran.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tlx.errors import TlxError
from tlx.extraction.pipeline import Batch

if TYPE_CHECKING:
    from tlx.extraction.pipeline import ImageFiles
    from tlx.extraction.runtimes import Runner
    from tlx.recipe import ExtractConfig


@dataclass(frozen=True)
class Job:
    """One extraction: the images with the driver's preprocessing, and the driver's backbone."""

    files: ImageFiles
    #: the backbone ready to run on this machine (:mod:`tlx.extraction.runtimes`); only the local
    #: engine runs it.
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
        (:meth:`tlx.extraction.runtimes.Runner.check`)."""
        from tlx.extraction.pipeline import first_batch, on_cpu, on_device

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
