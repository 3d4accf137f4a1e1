"""Backbone runtimes: what computes the frozen backbone's features during extraction.

``torch`` runs the backbone's module (channels-last). ``onnxruntime`` runs the backbone exported to
ONNX with ONNX Runtime's CPU provider, several times faster for depthwise networks such as
EfficientNet-Lite (bench/RESULTS.md). ``auto`` picks ONNX Runtime on the CPU when it is installed,
torch elsewhere. Fine-tuning always trains in torch.

The exported model is a cache entry (``onnx/<key>.onnx`` and its record ``onnx/<key>.json``), keyed
by the weights' SHA-256, flip averaging, the input and batch size and the versions that shape or run
it, so
the export is paid once per backbone: a later run with a known backbone neither builds the torch
model nor exports again. The record holds the file's SHA-256 (a damaged file is deleted and
rebuilt) and the verdict of the parity probe: on the first batch of real images after an export,
the ONNX features must agree with torch's within :data:`PARITY` of the largest feature value, or the
run falls back to torch with one warning line (as it does when the export or its session fails).
A failed export is remembered, so later runs go to torch without trying again.

The model is exported for batches of one size (the extraction's): every shape in it is then static,
so ONNX Runtime folds the shape arithmetic of TF-style "same" padding, which a dynamic batch keeps
at run time (about 25% slower for EfficientNet-Lite: bench/RESULTS.md). :class:`OnnxForward` pads
or splits other batches.

The runtime does not key the feature cache: features agree across runtimes to about 1e-6 of their
scale, as torch's own do across batch sizes and thread counts, which never keyed it either.

A forward pass takes a batch (an array, or a tensor on its device) and the threads to run on
(None: as this process is set), and returns the features as a NumPy array. ONNX Runtime's runs
without torch, so its extraction workers never import it (:func:`tlx.extraction.pipeline.on_cpu`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy

from tlx import notices
from tlx.errors import TlxError, describe
from tlx.files import sha256_of, write_atomic, write_json
from tlx.recipe import cpu_cores
from tlx.tensors import threads_set, to_backbone

if TYPE_CHECKING:
    from torch import nn

    from tlx.extraction.store import BackboneInfo

#: the ONNX opset the backbone is exported with
OPSET = 17
#: the parity probe's tolerance: max |onnx - torch| ≤ PARITY × max |torch| on the first batch
PARITY = 1e-4
#: bumped whenever the export or its record changes meaning
EXPORT_FORMAT = 1

#: a batch and the threads to run it on (None: as this process is set) → features (n, D)
Forward = Callable[[Any, "int | None"], numpy.ndarray]


def choose(setting: str, device: str) -> str:
    """The runtime for ``extract.runtime`` on ``device``: ``auto`` is ONNX Runtime on a CPU if installed."""
    installed = importlib.util.find_spec("onnxruntime") is not None
    if setting == "onnxruntime":
        if not installed:
            raise TlxError(
                "extract.runtime: onnxruntime is not installed; pip install 'tlx-vision[onnx]', "
                "or set extract.runtime=auto"
            )
        if device != "cpu":
            raise TlxError(
                f"extract.runtime: onnxruntime runs the backbone on the CPU, the recipe's device is "
                f"{device}; set device=cpu or extract.runtime=auto"
            )
        return "onnxruntime"
    if setting == "auto" and installed and device == "cpu":
        return "onnxruntime"
    return "torch"


def frozen(module: nn.Module) -> nn.Module:
    """``module`` as a frozen backbone runs: eval mode (BatchNorm's running statistics, no dropout) and
    no gradients, whatever wrapped it (a new ``nn.Module`` starts in training mode) or exported it (the
    exporter restores a module's mode recursively, from its outermost module)."""
    return module.eval().requires_grad_(False)


class TorchForward:
    """The backbone's module on ``device`` (``cpu``, ``cuda:0``...): a batch in, its features out.

    The module is made :func:`frozen` right before every forward pass, so nothing done to it between
    two batches changes the features.
    """

    def __init__(self, module: nn.Module, device: str):
        import torch

        self.module = module.to(device=device, memory_format=torch.channels_last)
        self.device = device

    def __call__(self, images: Any, threads: int | None = None) -> numpy.ndarray:
        import torch

        with contextlib.ExitStack() as stack:
            if threads is not None:
                stack.enter_context(threads_set(threads))
            with torch.inference_mode():
                out = frozen(self.module)(to_backbone(images, self.device))
        return out.float().cpu().numpy() if isinstance(out, torch.Tensor) else out


class OnnxForward:
    """The exported backbone in ONNX Runtime (CPU), for batches of ``batch`` images: a smaller batch is
    padded with zeros, a larger one split. The session is built on first use in each process (a
    forked extraction worker builds its own) and for each thread count (None: every core)."""

    def __init__(self, path: Path, batch: int):
        self.path = path
        self.batch = batch
        self._session: Any = None
        self._built_for: tuple[int, int] = (0, 0)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "batch": self.batch, "_session": None, "_built_for": (0, 0)}

    def session(self, threads: int | None = None) -> Any:
        threads = threads or cpu_cores()
        if self._session is None or self._built_for != (os.getpid(), threads):
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3  # errors only: its notes on the graph are not the user's business
            self._session = onnxruntime.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
            self._built_for = (os.getpid(), threads)
        return self._session

    def __call__(self, images: Any, threads: int | None = None) -> numpy.ndarray:
        session, images = self.session(threads), numpy.asarray(images, dtype=numpy.float32)
        n, outputs = len(images), []
        for start in range(0, n, self.batch):
            part = images[start : start + self.batch]
            if len(part) < self.batch:
                part = numpy.concatenate(
                    [part, numpy.zeros((self.batch - len(part), *part.shape[1:]), part.dtype)]
                )
            outputs.append(session.run(None, {"image": numpy.ascontiguousarray(part)})[0])
        return (outputs[0] if len(outputs) == 1 else numpy.concatenate(outputs))[:n]

    def release(self) -> None:
        """Drop this process's session (before extraction workers fork: a child cannot use it)."""
        self._session = None


@dataclass
class Runner:
    """A frozen backbone ready to run: its forward pass, the runtime behind it and what extraction needs.

    ``pending`` is set right after an export: the first batch is checked against ``reference`` (the
    torch module) by :meth:`check` before any feature of the runtime is kept.
    """

    #: None where an engine's workers run the backbone (:mod:`tlx.extraction.engines`)
    forward: Forward | None
    runtime: str
    info: BackboneInfo
    pending: Exported | None = None
    reference: TorchForward | None = field(default=None, repr=False)

    @classmethod
    def in_torch(cls, module: nn.Module, info: BackboneInfo, device: str) -> Runner:
        """``module`` run by torch on ``device``."""
        return cls(TorchForward(module, device), "torch", info)

    @property
    def device(self) -> str:
        return self.forward.device if isinstance(self.forward, TorchForward) else "cpu"

    def features(self, images: Any, threads: int | None = None) -> numpy.ndarray:
        """``images`` through the backbone, in this process; a fresh export is checked on them first."""
        if self.pending is not None:
            self.check(images)
        if self.forward is None:
            raise TlxError("extract.engine: this backbone runs in the engine's workers, not here")
        return self.forward(images, threads)

    def check(self, images: Any) -> None:
        """Run the parity probe of a fresh export on ``images``; on failure, become the torch runner.

        With no image to probe on (none decodes), this run uses torch and the export stays unverified.
        """
        if self.pending is None or self.reference is None:
            return
        exported, reference = self.pending, self.reference
        self.pending = self.reference = None
        if images is None:
            self.forward, self.runtime = reference, "torch"
            return
        try:
            ours, theirs = self.forward(images, None), reference(images, None)
        except Exception as exc:  # ONNX Runtime raises its own types for sessions it cannot build or run
            problem = f"ONNX Runtime cannot run it ({describe(exc)})"
        else:
            scale = float(numpy.abs(theirs).max())
            same_shape = ours.shape == theirs.shape
            difference = float(numpy.abs(ours - theirs).max()) if same_shape else float("inf")
            problem = None
            if not difference <= PARITY * scale:
                problem = (
                    f"its features differ from torch's by {difference:.3g} on the first batch "
                    f"(largest feature {scale:.3g}, tolerance {PARITY:g} of it)"
                )
        finally:
            if isinstance(self.forward, OnnxForward):
                self.forward.release()
        if problem is None:
            exported.verify(difference, scale)
        else:
            exported.fail(problem)
            self.forward, self.runtime = reference, "torch"


class Exported:
    """One backbone's exported model in the cache folder, and its record."""

    def __init__(self, root: Path, identity: dict[str, Any]):
        from tlx.extraction.store import digest

        key = digest(identity)[:32]
        self.root = root
        self.identity = identity
        self.path = root / "onnx" / f"{key}.onnx"
        self.record = root / "onnx" / f"{key}.json"

    def recalled(self) -> tuple[Path | None, str | None]:
        """The verified model file, or why it cannot be used (a failure remembered), or (None, None).

        A file whose SHA-256 differs from the record's is deleted, with a warning, so it is rebuilt.
        """
        import json

        try:
            record = json.loads(self.record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None, None
        if not isinstance(record, dict):
            return None, None
        if isinstance(record.get("failed"), str):
            return None, record["failed"]
        if _file_digest(self.path) == record.get("sha256"):
            return self.path, None
        for path in (self.path, self.record):
            with contextlib.suppress(OSError):
                path.unlink()
        notices.warn(f"cache: deleted damaged exported model {self.path}; it is exported again")
        return None, None

    def export(self, module: nn.Module, input_size: tuple[int, int, int], batch: int) -> None:
        """Write ``module`` as ONNX (``batch`` images in, their features out), atomically.

        A frozen copy is exported: the exporter sets the mode of what it is given, so ``module`` itself,
        the torch reference of the parity probe and the fallback, is never touched by it.
        """
        import copy

        import torch

        from tlx.extraction.store import tag

        example = torch.zeros(batch, *input_size)
        tag(self.root)

        def write(tmp: Path) -> None:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
                torch.onnx.export(
                    frozen(copy.deepcopy(module)),
                    (example,),
                    str(tmp),
                    input_names=["image"],
                    output_names=["features"],
                    opset_version=OPSET,
                    dynamo=False,
                )

        write_atomic(self.path, write)

    def verify(self, difference: float, scale: float) -> None:
        """Record the file as checked: later runs use it without the torch model."""
        self._write(
            {"sha256": _file_digest(self.path), "difference": difference, "scale": scale, **self.identity}
        )

    def fail(self, reason: str) -> None:
        """Record (and warn once) that this backbone runs in torch: ``reason`` says why."""
        with contextlib.suppress(OSError):
            self.path.unlink()
        self._write({"failed": reason, **self.identity})
        warn_fallback(reason)

    def _write(self, record: dict[str, Any]) -> None:
        try:
            write_json(self.record, record)
        except OSError as exc:
            notices.warn(f"cache: cannot write {self.record} ({exc.strerror or exc}); the export is redone")


def warn_fallback(reason: str) -> None:
    notices.warn(f"extract.runtime: the backbone runs in torch: its ONNX export is not usable: {reason}")


def _file_digest(path: Path) -> str | None:
    try:
        return sha256_of(path)
    except OSError:
        return None


def export_identity(info: BackboneInfo, flip: bool, batch: int) -> dict[str, Any]:
    """What shapes an exported model and its verdict: weights, flip, input, and the versions involved."""
    from tlx.version import versions

    return {
        "format": EXPORT_FORMAT,
        "weights_sha256": info.sha256,
        "flip": flip,
        "input_size": list(info.data_config["input_size"]),
        "batch": batch,
        "opset": OPSET,
        "versions": versions(("torch", "onnx", "onnxruntime")),
    }


def prepare(
    setting: str,
    device: str,
    root: Path,
    info: BackboneInfo,
    build: Callable[[], nn.Module],
    flip: bool,
    batch: int,
) -> Runner:
    """The runner for ``extract.runtime`` (``setting``) on ``device``, for batches of ``batch`` images.

    ``build()`` builds the backbone's torch module (flip-averaged when ``flip``): a cached, verified
    export runs without it.
    """
    runtime = choose(setting, device)
    if runtime == "torch":
        return Runner.in_torch(build(), info, device)
    exported = Exported(root, export_identity(info, flip, batch))
    path, failure = exported.recalled()
    if path is not None:
        return Runner(OnnxForward(path, batch), runtime, info)
    module = build()
    if failure is not None:
        warn_fallback(failure)
        return Runner.in_torch(module, info, device)
    try:
        exported.export(module, tuple(info.data_config["input_size"]), batch)
    except OSError as exc:  # an unwritable cache folder: nothing to remember
        warn_fallback(f"cannot write {exported.path} ({exc.strerror or exc})")
        return Runner.in_torch(module, info, device)
    except Exception as exc:  # the exporter raises many types for modules it cannot trace
        exported.fail(f"the export failed ({describe(exc)})")
        return Runner.in_torch(module, info, device)
    forward = OnnxForward(exported.path, batch)
    return Runner(forward, runtime, info, exported, TorchForward(module, device))
