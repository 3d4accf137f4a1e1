"""The driver's side of the ray engine: the Ray connection, the dataset of image paths, the results."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlx import BackboneSpec, TlxError, describe
from tlx_ray import RayOptions

if TYPE_CHECKING:
    import ray.data

    from tlx import Batch, Job

#: blocks of the dataset of paths, at most: a block is what a failed actor's work is retried as
MAX_BLOCKS = 1000
#: seconds a cluster's address has to accept a connection
CONNECT_TIMEOUT_S = 10
#: the Ray Client's port when a ``ray://`` address gives none
CLIENT_PORT = 10001


class RayEngine:
    """Runs the backbone (and for predictions the head) in a pool of Ray actors."""

    def __init__(self, options: RayOptions, spec: BackboneSpec) -> None:
        self.options = options
        self.spec = spec

    def batches(self, job: Job) -> Iterator[Batch]:
        from tlx_ray.actors import Extractor

        paths = [path for path, _ in job.files.samples]
        mapped = self._map(paths, Extractor, {"spec": self.spec, "batch_size": self._batch_size()})
        return self._stream(mapped, job.runner)

    def predict(self, run: Path, paths: list[Path], top_k: int, output: Path) -> list[tuple[str, str]]:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from tlx_ray.actors import Predictor

        kwargs = {"run": str(run), "spec": self.spec, "top_k": top_k}
        mapped = self._map(paths, Predictor, kwargs)
        with _errors():
            mapped.write_parquet(str(output))
        table = pq.read_table(output, columns=["path", "skipped"])
        table = table.filter(pc.is_valid(table["skipped"]))
        return list(zip(table["path"].to_pylist(), table["skipped"].to_pylist()))

    def _map(self, paths: list[Path], actor: type, kwargs: dict[str, Any]) -> ray.data.Dataset:
        """The dataset of ``(position, path)`` rows through a pool of ``actor``."""
        import ray.data

        connect(self.options)
        rows = [{"position": n, "path": str(path)} for n, path in enumerate(paths)]
        size = self._batch_size()
        blocks = max(1, min(MAX_BLOCKS, -(-len(rows) // size)))
        return ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            actor,
            fn_constructor_kwargs=kwargs,
            batch_size=size,
            batch_format="numpy",
            compute=self._pool(),
            num_cpus=self.options.num_cpus,
            num_gpus=self.options.num_gpus or None,
        )

    def _batch_size(self) -> int:
        """Images per actor call: ``batch_size``, else the recipe's ``extract.batch_size``, else tlx's
        default for the actors' device."""
        return self.options.batch_size or self.spec.batch_size("cuda" if self.options.num_gpus else "cpu")

    def _pool(self) -> ray.data.ActorPoolStrategy:
        """A fixed pool of ``actors``, else one from ``min_actors`` to what the cluster holds."""
        import ray

        options = self.options
        if options.actors is not None:
            return ray.data.ActorPoolStrategy(size=options.actors)
        largest = options.max_actors
        if largest is None:
            resources = ray.cluster_resources()
            largest = int((resources.get("CPU", 1) - 1) // options.num_cpus)  # one CPU for Ray's own tasks
            if options.num_gpus:
                largest = min(largest, int(resources.get("GPU", 0) // options.num_gpus))
        return ray.data.ActorPoolStrategy(
            min_size=options.min_actors, max_size=max(options.min_actors, largest)
        )

    def _stream(self, mapped: ray.data.Dataset, runner: Any) -> Iterator[Batch]:
        """The actors' results as they come; a position is yielded once even when Ray retried its batch.
        At the end, ``runner.runtime`` names what the actors ran (``onnxruntime+torch`` if both)."""
        import numpy as np

        seen: set[int] = set()
        runtimes: set[str] = set()
        with _errors():
            for batch in mapped.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                runtimes.update(batch["runtime"].tolist())
                positions = batch["position"].tolist()
                reasons = batch["failure"].tolist()
                new = [k for k, n in enumerate(positions) if n not in seen]
                seen.update(positions)
                ok = [k for k in new if not reasons[k]]
                out = np.ascontiguousarray(batch["features"][ok], dtype=np.float32) if ok else None
                yield out, [positions[k] for k in ok], [(positions[k], reasons[k]) for k in new if reasons[k]]
        if runtimes:
            runner.runtime = "+".join(sorted(runtimes))


def connect(options: RayOptions) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``), else start a local Ray for this process."""
    import ray

    if ray.is_initialized():
        return
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    address = options.address or os.environ.get("RAY_ADDRESS")
    key = "extract.engine.address" if options.address else "$RAY_ADDRESS"
    if address:
        _answers(address, key)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=_cores(), include_dashboard=False, **quiet)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise TlxError(
            f"{key}: cannot start or join {where} ({describe(exc)}); "
            "check the address (ray status on the head node)"
        ) from None
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # execution plans and timings on every run


def _answers(address: str, key: str) -> None:
    """Refuse a cluster ``address`` (``[ray://]host:port``) where nothing accepts a connection within
    :data:`CONNECT_TIMEOUT_S`: Ray itself retries such an address for many minutes. ``auto`` and
    other forms are left to Ray."""
    client = address.startswith("ray://")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if client and not port.isdigit():  # ray://host: the Ray Client's own port
        host, port = address.removeprefix("ray://"), str(CLIENT_PORT)
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise TlxError(
            f"{key}: no Ray cluster answers at {address} ({describe(exc)}); "
            "check the address and that the cluster is up (ray status on the head node)"
        ) from None


def _cores() -> int:
    """The CPU cores this process may run on: a local Ray gets them all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """An error raised on a worker as the one-line :class:`TlxError` it carries, else naming Ray."""
    try:
        yield
    except Exception as exc:
        if type(exc) is TlxError:  # the driver's own; Ray's wrappers of a worker's are subclasses
            raise
        raise TlxError(_tlx_error(exc) or f"engine ray: the job failed ({describe(exc)})") from None


def _tlx_error(exc: BaseException) -> str | None:
    """The message of the :class:`TlxError` a worker raised, from ``exc``'s causes as Ray wraps them, or
    from its text (an actor that failed to start carries its error as a traceback only)."""
    seen = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, TlxError) and current.args:
            return str(current.args[0]).splitlines()[0]
        todo += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    found = re.findall(r"tlx\.errors\.TlxError: (.+)", str(exc))
    return found[-1].strip() if found else None
