"""The workers' side of the ray engine: actors that get the backbone once and take batches of paths.

Nothing but paths and small specs reaches them: each gets the backbone through tlx's front door on
its own node (:meth:`tlx.BackboneSpec.frozen`: built by the node's plugins, checked against the
driver's), and runs it with the recipe's ``extract.runtime`` (ONNX Runtime on a CPU actor, the export
in the node's cache folder). Predictions go through the run's classifier (:func:`tlx.load`), as
``tlx predict`` makes them on one machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

import tlx
from tlx import BackboneSpec, TlxError, describe


def node() -> str:
    """This worker's node, as an error names it."""
    import ray

    return f"{ray.util.get_node_ip_address()} (id {ray.get_runtime_context().get_node_id()[:12]})"


class _Worker:
    """Torch set to the CPUs (and GPU) Ray gave this actor."""

    def __init__(self) -> None:
        import ray

        self.node = node()
        given = ray.get_runtime_context().get_assigned_resources()
        self.threads = max(1, int(given.get("CPU", 1)))
        torch.set_num_threads(self.threads)
        self.device = "cuda" if given.get("GPU") else "cpu"

    def readable(self, paths: list[str]) -> list[Path]:
        """``paths``, each of which this node can open: one it cannot is an error, never a bad image."""
        for path in paths:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise TlxError(
                    f"engine ray: node {self.node} cannot read {path} ({describe(exc)}); every node must "
                    "see the images at the same path"
                ) from None
        return [Path(path) for path in paths]


class Extractor(_Worker):
    """Features of a batch of ``(position, path)`` rows: ``position``, ``features``, ``failure`` and the
    ``runtime`` that computed them."""

    def __init__(self, spec: BackboneSpec, batch_size: int) -> None:
        super().__init__()
        self.frozen = spec.frozen(self.node)
        self.runner = self.frozen.runner(self.device, batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, indices, failures = self.frozen.decoded(self.readable(batch["path"].tolist()))
        features = np.zeros((len(batch["path"]), self.frozen.info.feature_dim), np.float32)
        if images is not None:
            features[indices] = self.runner.features(images, self.threads)
        reasons = np.full(len(features), "", dtype=object)
        for index, reason in failures:
            reasons[index] = reason
        runtime = np.full(len(features), self.runner.runtime, dtype=object)
        return {"position": batch["position"], "features": features, "failure": reasons, "runtime": runtime}


class Predictor(_Worker):
    """Predictions of a batch of ``(position, path)`` rows with a run folder every node can read:
    ``path``, ``label``, ``probability``, ``top_k``, ``known`` and ``ood_score`` (null for a run without
    calibration) and ``skipped`` (the reason, for an image skipped).
    The backbone runs in the run's ``extract.runtime`` on this actor's device and threads."""

    def __init__(self, run: str, spec: BackboneSpec, top_k: int) -> None:
        super().__init__()
        spec.check(self.node)
        settings = [f"device={self.device}", "extract.workers=0", f"extract.threads={self.threads}"]
        try:
            self.classifier = tlx.load(run, overrides=settings)
        except TlxError as exc:
            raise TlxError(f"engine ray: node {self.node}: {exc}") from None
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        paths = batch["path"].tolist()
        results, skipped = self.classifier.top_k(self.readable(paths), self.top_k)
        rows = {row["path"]: {**row, "skipped": None} for row in results}
        rows |= {path: {"path": path, "skipped": reason} for path, reason in skipped}
        return pa.Table.from_pylist([rows[path] for path in paths], schema=SCHEMA)


def _schema() -> Any:
    import pyarrow as pa

    ranked = pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float64())]))
    return pa.schema(
        [
            ("path", pa.string()),
            ("label", pa.string()),
            ("probability", pa.float64()),
            ("top_k", ranked),
            ("known", pa.bool_()),
            ("ood_score", pa.float64()),
            ("skipped", pa.string()),
        ]
    )


SCHEMA = _schema()
