"""The workers' side of the ray engine: actors that build the model once and take batches of paths.

Nothing but paths and small specs reaches them: each builds the backbone through its own node's
tlx plugins and checks it against the driver's (:class:`tlx.engines.BackboneSpec`), then runs it with
the recipe's ``extract.runtime`` (ONNX Runtime on a CPU actor, the export in the node's cache folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlx.engines import BackboneSpec, check_environment
from tlx.errors import TlxError, describe
from tlx.features import ImageFiles, collate
from tlx.preprocess import eval_transform


def node() -> str:
    """This worker's node, as an error names it."""
    import ray

    return f"{ray.util.get_node_ip_address()} (id {ray.get_runtime_context().get_node_id()[:12]})"


class _Worker:
    """Torch set to the CPUs (and GPU) Ray gave this actor; images decoded as tlx decodes them."""

    def __init__(self) -> None:
        import ray

        self.node = node()
        given = ray.get_runtime_context().get_assigned_resources()
        self.threads = max(1, int(given.get("CPU", 1)))
        torch.set_num_threads(self.threads)
        self.device = "cuda" if given.get("GPU") else "cpu"

    def decoded(
        self, paths: list[str], transform: Any
    ) -> tuple[np.ndarray | None, list[int], list[tuple[int, str]]]:
        """The batch's images (the runner puts them on this actor's device), their indices, and
        (index, reason) decoding failures; a file this node cannot read at all is an error, never a
        bad image."""
        for path in paths:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise TlxError(
                    f"engine ray: node {self.node} cannot read {path} ({describe(exc)}); every node must "
                    "see the images at the same path"
                ) from None
        files = ImageFiles([(Path(p), 0) for p in paths], transform)
        return collate([files[i] for i in range(len(files))])


class Extractor(_Worker):
    """Features of a batch of ``(position, path)`` rows: ``position``, ``features``, ``failure`` and the
    ``runtime`` that computed them."""

    def __init__(self, spec: BackboneSpec, batch_size: int) -> None:
        super().__init__()
        self.runner = spec.runner(self.node, self.device, batch_size)
        self.transform = eval_transform(self.runner.info.data_config)
        self.feature_dim = self.runner.info.feature_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, indices, failures = self.decoded(batch["path"].tolist(), self.transform)
        features = np.zeros((len(batch["path"]), self.feature_dim), np.float32)
        if images is not None:
            features[indices] = self.runner.features(images, self.threads)
        reasons = np.full(len(features), "", dtype=object)
        for index, reason in failures:
            reasons[index] = reason
        runtime = np.full(len(features), self.runner.runtime, dtype=object)
        return {"position": batch["position"], "features": features, "failure": reasons, "runtime": runtime}


class Predictor(_Worker):
    """Predictions of a batch of ``(position, path)`` rows with a run folder every node can read:
    ``path``, ``label``, ``probability``, ``top_k`` and ``skipped`` (the reason, for an image skipped).
    The backbone runs in the run's ``extract.runtime``, as ``tlx predict`` runs it on one machine."""

    def __init__(self, run: str, versions: dict[str, str], top_k: int) -> None:
        from tlx.artifacts import load_run

        super().__init__()
        try:
            self.run = load_run(Path(run))
        except TlxError as exc:
            raise TlxError(f"engine ray: node {self.node}: {exc}") from None
        check_environment(versions, self.run.recipe.backbone, self.node)
        self.top_k = top_k
        self.transform = eval_transform(self.run.info.data_config)
        self.runner = self.run.runner(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        from tlx.predict import classify, ranked

        paths = batch["path"].tolist()
        images, indices, failures = self.decoded(paths, self.transform)
        rows: dict[int, dict[str, Any]] = {i: {"path": paths[i], "skipped": reason} for i, reason in failures}
        if images is not None:
            kept = [paths[i] for i in indices]
            x = torch.from_numpy(self.runner.features(images, self.threads))
            for i, result in zip(
                indices, ranked(kept, classify(self.run, kept, x), self.run.classes, self.top_k)
            ):
                rows[i] = {**result, "skipped": None}
        ordered = [rows[i] for i in range(len(paths))]
        return pa.Table.from_pylist(ordered, schema=SCHEMA)


def _schema() -> Any:
    import pyarrow as pa

    ranked = pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float64())]))
    return pa.schema(
        [
            ("path", pa.string()),
            ("label", pa.string()),
            ("probability", pa.float64()),
            ("top_k", ranked),
            ("skipped", pa.string()),
        ]
    )


SCHEMA = _schema()
