"""The local extraction pipeline: images decoded, preprocessed and through the backbone in batches, on
this machine's cores (:func:`on_cpu`) or its accelerator (:func:`on_device`).

Decoding, preprocessing and ONNX Runtime need no torch, so neither does this module: a run whose
backbone runs in ONNX Runtime starts its extraction workers before torch is imported, and imports it
while they work (:func:`on_cpu`).
"""

from __future__ import annotations

import importlib
import multiprocessing
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from tlx.data import load_image
from tlx.errors import TlxError, describe

if TYPE_CHECKING:
    import torch

    from tlx.extraction.runtimes import Forward, TorchForward

#: one batch of the pipeline: features (n, D) or None, the positions they belong to, and failures
Batch = tuple[Any, list[int], list[tuple[int, str]]]


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
