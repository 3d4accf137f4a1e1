"""Feature extraction: each image through the frozen backbone once, streamed, and kept in the cache.

Decoding, preprocessing and ONNX Runtime need no torch, so neither does this module until it hands
the features over as tensors: a run whose backbone runs in ONNX Runtime starts its extraction
workers before torch is imported, and imports it while they work (:func:`on_cpu`).
"""

from __future__ import annotations

import importlib
import multiprocessing
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from tlx.data import Split, load_image
from tlx.errors import TlxError, describe
from tlx.recipe import ExtractConfig, cpu_cores

if TYPE_CHECKING:
    import torch

    from tlx.cache import FeatureStore
    from tlx.engines import Engine
    from tlx.runtimes import Forward, Runner, TorchForward

#: one batch of the pipeline: features (n, D) or None, the positions they belong to, and failures
Batch = tuple[Any, list[int], list[tuple[int, str]]]


@dataclass
class Features:
    """Pooled features of the images of one split that could be decoded."""

    x: torch.Tensor  # (n, feature_dim) float32
    y: torch.Tensor  # (n,) int64
    skipped: list[tuple[Path, str]]
    #: how many of the split's images the cache answered: features, or a decoding failure it remembers
    cached: int = 0

    @property
    def computed(self) -> int:
        """How many of the split's images went through the backbone (decoded or not) in this extraction."""
        return len(self.y) + len(self.skipped) - self.cached


class ImageFiles:
    """Decodes (:func:`tlx.data.load_image`) and preprocesses one image per item; a file that cannot
    be decoded yields its reason. A map-style dataset, as torch's ``DataLoader`` takes it."""

    def __init__(
        self, samples: list[tuple[Path | Image.Image, int]], transform: Callable[[Image.Image], np.ndarray]
    ):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray | None, int, str]:
        path = self.samples[index][0]
        try:
            return self.transform(load_image(path)), index, ""
        except Exception as exc:  # PIL raises many types for damaged or foreign files
            return None, index, describe(exc)


def collate(
    batch: list[tuple[np.ndarray | None, int, str]],
) -> tuple[np.ndarray | None, list[int], list[tuple[int, str]]]:
    """Items of :class:`ImageFiles` as ``(images or None, their indices, (index, reason) failures)``."""
    images = [item[0] for item in batch if item[0] is not None]
    indices = [item[1] for item in batch if item[0] is not None]
    failures = [(item[1], item[2]) for item in batch if item[0] is None]
    return (np.stack(images) if images else None), indices, failures


def collate_tensors(
    batch: list[tuple[np.ndarray | None, int, str]],
) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    """:func:`collate` with the images as a tensor: a ``DataLoader``'s ``collate_fn`` (it pins them)."""
    import torch

    images, indices, failures = collate(batch)
    return (None if images is None else torch.from_numpy(images)), indices, failures


def extract(
    splits: Sequence[Split],
    runner: Runner | None,
    settings: ExtractConfig,
    *,
    store: FeatureStore | None = None,
    engine: Engine | None = None,
) -> list[Features]:
    """Features of every image of ``splits``: from ``store`` where cached, else through ``runner``.

    All splits share one pipeline, so only a few batches of images are decoded at a time. On a CPU
    each of ``settings.workers`` processes decodes, resizes and runs the backbone on one thread, and
    only features reach this process; with 0 or 1 workers this process does it all on
    ``settings.threads`` threads. On an accelerator the workers decode and this process runs the
    backbone. ``engine`` (default: this machine) may run it elsewhere (:mod:`tlx.engines`). New
    features are written to ``store`` chunk by chunk as they come.
    ``runner`` (:func:`tlx.runtimes.prepare`) may be None when :func:`all_cached` is true. An image
    that cannot be decoded is left out and listed (``settings.on_bad_image: skip``) or stops the run.
    An image listed several times (same key) goes through the backbone once; every listing gets its
    features.
    """
    paths = [path for split in splits for path, _ in split.samples]
    keys = [_key(path) for path in paths]
    cached, failed = store.get([k for k in keys if k]) if store else ({}, {})
    # the first listing of each image not in the cache; a later listing of it takes its result
    first: dict[str, int] = {}
    todo = []
    for n, key in enumerate(keys):
        if key is None or (key not in cached and key not in failed and first.setdefault(key, n) == n):
            todo.append(n)
    reasons = {n: failed[key] for n, key in enumerate(keys) if key in failed}
    computed: dict[int, np.ndarray] = {}
    if todo:
        if runner is None:  # changed, or their chunk removed, since the caller checked all_cached
            raise TlxError(
                f"cache: the features of {len(todo)} images (first: {paths[todo[0]]}) changed or were "
                "removed from the cache while this run read it; run the command again to recompute them"
            )
        new, new_failures = _run_backbone(
            runner, [paths[n] for n in todo], [keys[n] for n in todo], settings, store, engine
        )
        computed = {todo[j]: row for j, row in new.items()}
        reasons.update({todo[j]: reason for j, reason in new_failures.items()})
        for n, key in enumerate(keys):
            source = first.get(key) if key else None
            if source is not None and source != n:
                if source in computed:
                    computed[n] = computed[source]
                else:
                    reasons[n] = reasons[source]
    enforce_bad_image_policy([(paths[n], reasons[n]) for n in sorted(reasons)], settings.on_bad_image)
    import torch

    results = []
    n = 0
    for split in splits:
        rows, labels, skipped, n_cached = [], [], [], 0
        for path, label in split.samples:
            if n in reasons:
                skipped.append((path, reasons[n]))
                n_cached += keys[n] in failed
            else:
                rows.append(computed[n] if n in computed else cached[keys[n]])
                labels.append(label)
                n_cached += n not in computed
            n += 1
        if not rows:
            first = skipped[0][1]
            raise TlxError(f"dataset: no image of split {split.name!r} could be decoded (first: {first})")
        x = torch.from_numpy(np.stack(rows))
        results.append(Features(x, torch.tensor(labels, dtype=torch.long), skipped, n_cached))
    return results


def enforce_bad_image_policy(failures: Iterable[tuple[Path, str]], on_bad_image: str) -> None:
    """``extract.on_bad_image: error`` stops at the first image that could not be decoded."""
    for path, reason in failures:
        if on_bad_image == "error":
            raise TlxError(
                f"extract.on_bad_image: cannot decode {path} ({reason}); remove or replace the file, "
                "or set extract.on_bad_image=skip"
            )


def all_cached(splits: Sequence[Split], store: FeatureStore) -> bool:
    """True when ``store`` holds the features (or the decoding failure) of every image of ``splits``."""
    keys = [_key(path) for split in splits for path, _ in split.samples]
    return None not in keys and not store.missing(keys)


def _key(path: Path | Image.Image) -> str | None:
    from tlx.cache import image_key

    if not isinstance(path, Path):  # an image in memory (the Python API): never cached
        return None
    try:
        return image_key(path)
    except OSError:  # gone since the scan: decoding reports it
        return None


def _run_backbone(
    runner: Runner,
    paths: list[Path],
    keys: list[str | None],
    settings: ExtractConfig,
    store: FeatureStore | None,
    engine: Engine | None,
) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Features of ``paths`` by position, and decoding failures; chunks go to ``store`` as they fill."""
    from tlx import engines, notices
    from tlx.cache import CHUNK_IMAGES
    from tlx.device import batch_size
    from tlx.preprocess import eval_transform

    files = ImageFiles([(p, 0) for p in paths], eval_transform(runner.info.data_config))
    size = batch_size(settings.batch_size, runner.device)
    job = engines.Job(files, runner, size, settings.processes, settings.threads or cpu_cores())
    features: dict[int, np.ndarray] = {}
    failures: dict[int, str] = {}
    pending: list[int] = []
    pending_failed: dict[str, str] = {}

    def flush() -> None:
        if store is not None and (pending or pending_failed):
            rows = np.stack([features[j] for j in pending]) if pending else np.empty((0, 0), np.float32)
            store.put([keys[j] for j in pending], rows, dict(pending_failed))
        pending.clear()
        pending_failed.clear()

    with notices.bar(total=len(paths), unit="img", desc="features", leave=False, dynamic_ncols=True) as bar:
        for out, indices, batch_failures in (engine or engines.local(settings)).batches(job):
            for j, reason in batch_failures:
                failures[j] = reason
                if keys[j]:
                    pending_failed[keys[j]] = reason
            if indices:
                _check_output(out, runner, [paths[j] for j in indices])
                for j, row in zip(indices, out.astype(np.float32, copy=False)):
                    features[j] = row
                    if keys[j]:
                        pending.append(j)
            bar.update(len(indices) + len(batch_failures))
            if len(pending) + len(pending_failed) >= CHUNK_IMAGES:
                flush()
    flush()
    return features, failures


def first_batch(files: ImageFiles, size: int) -> np.ndarray | None:
    """The first ``size`` images of ``files`` that decode, as a batch (None when none does)."""
    decoded = []
    for i in range(len(files)):
        item = files[i]
        if item[0] is not None:
            decoded.append(item)
            if len(decoded) == size:
                break
    return collate(decoded)[0]


def on_cpu(
    forward: Forward, files: ImageFiles, batch_size: int, workers: int, threads: int
) -> Iterator[Batch]:
    """``(features, indices, failures)`` per batch, in any order: each of ``workers`` processes decodes
    and runs ``forward`` on one thread for the batches it takes (see :class:`FeatureBatches`); with
    one worker or none, this process does it all on ``threads`` threads.

    The workers are forked, with the backbone already loaded, before anything here waits on them.
    When torch is not imported yet (ONNX Runtime, whose workers never need it), it is imported then,
    in a thread: the caller turns the features into tensors and trains a torch head on them, and
    the import would otherwise delay the workers' start by seconds.
    """
    batches = FeatureBatches(files, forward, batch_size)
    workers = min(workers, len(batches))
    if workers <= 1:  # a single worker would only add a process
        return (batches.run(k, threads) for k in range(len(batches)))
    # forked, the workers inherit the loaded model and the file list (elsewhere they are spawned and
    # get them pickled); each runs one thread, as more can deadlock in a child forked after this
    # process's OpenMP threads started
    context = multiprocessing.get_context("fork" if can_fork() else "spawn")
    pool = ProcessPoolExecutor(workers, context, _start_worker, (batches,))
    futures = {pool.submit(_worker_batch, k) for k in range(len(batches))}  # every worker starts now
    if "torch" not in sys.modules:
        importer = threading.Thread(target=importlib.import_module, args=("torch",), name="import torch")
        importer.daemon = True
        importer.start()
    return _as_done(pool, futures)


def can_fork() -> bool:
    """Whether worker processes can be forked from this one (Linux: fork is safe with torch's libraries)."""
    return sys.platform.startswith("linux")


def _as_done(pool: ProcessPoolExecutor, futures: set[Any]) -> Iterator[Batch]:
    """The results of ``futures`` as they come; the pool is shut down when done or abandoned."""
    try:
        while futures:
            done, futures = wait(futures, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    except BrokenProcessPool:
        raise TlxError(
            "extract.workers: an extraction worker died (out of memory?); set extract.workers or "
            "extract.batch_size lower"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


#: the batches a forked extraction worker runs (set by :func:`_start_worker`)
_worker_batches: FeatureBatches | None = None


def _start_worker(batches: FeatureBatches) -> None:
    """A worker's start: its batches; Ctrl-C left to the main process, which stops the pool."""
    global _worker_batches
    _worker_batches = batches
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if "torch" in sys.modules:  # a torch backbone: one thread here, whatever the parent had set
        sys.modules["torch"].set_num_threads(1)


def _worker_batch(k: int) -> Batch:
    assert _worker_batches is not None
    return _worker_batches.run(k, threads=1)


def on_device(forward: TorchForward, files: ImageFiles, batch_size: int, workers: int) -> Iterator[Batch]:
    """``(features, indices, failures)`` per batch, in any order: ``workers`` processes decode, and
    ``forward`` runs in this process on its device (batches come through pinned memory on CUDA)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        files,
        batch_size=batch_size,
        num_workers=min(workers, -(-len(files) // batch_size)),
        collate_fn=collate_tensors,
        pin_memory=forward.device.startswith("cuda"),
        in_order=False,
    )
    for images, indices, failures in loader:
        yield (forward(images, threads=None) if images is not None else None), indices, failures


def to_backbone(images: Any, device: str) -> torch.Tensor:
    """A decoded batch (array or tensor) on ``device``, channels-last (what convolution kernels are
    fastest with)."""
    import torch

    images = torch.as_tensor(images)
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


class FeatureBatches:
    """Batch ``k`` of ``files`` decoded and through the backbone, in the process that asks.

    On a CPU each extraction worker runs the whole pipeline (decode, resize, backbone) for its
    batches on its own core: the cores never wait for one another, as the threads of one backbone
    call do at every layer, and a worker decodes between its own backbone calls, never preempting
    another's (figures in bench/RESULTS.md). Only features cross between processes.
    """

    def __init__(self, files: ImageFiles, forward: Forward, batch_size: int):
        self.files = files
        self.forward = forward
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch_size)

    def run(self, k: int, threads: int) -> Batch:
        """``(features or None, indices, failures)`` of batch ``k``, the backbone on ``threads`` threads."""
        stop = min(len(self.files), (k + 1) * self.batch_size)
        images, indices, failures = collate([self.files[i] for i in range(k * self.batch_size, stop)])
        return (self.forward(images, threads) if images is not None else None), indices, failures


@contextmanager
def threads_set(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (more than the free cores only adds contention)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_output(out: Any, runner: Runner, paths: list[Path]) -> None:
    """Refuse a batch's output that is not (n, feature_dim) finite features: it would train silently wrong."""
    n, feature_dim = len(paths), runner.info.feature_dim
    if not isinstance(out, np.ndarray) or out.shape != (n, feature_dim):
        shape = tuple(out.shape) if isinstance(out, np.ndarray) else type(out).__name__
        raise TlxError(
            f"backbone.name: the backbone returned {shape} for a batch of {n} images, "
            f"not pooled features of shape ({n}, {feature_dim})"
        )
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        bad = [path for path, ok in zip(paths, finite.tolist()) if not ok]
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise TlxError(
            f"backbone.name: the backbone ({runner.info.weights}) returned NaN or infinite features for "
            f"{bad[0]}{more}; its weights may be damaged: check backbone.weights or use another backbone"
        )
