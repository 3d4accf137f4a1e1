"""The features of images: from the feature store where cached, the rest through the backbone.

:func:`extract` is what :class:`~tlx.extraction.frozen.FrozenBackbone` runs: it looks every image up
in the store, asks for a runner (and an engine) only when some image is not cached, runs those images
through it (:mod:`tlx.extraction.engines`), checks what comes back, and writes it to the store chunk
by chunk as it comes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from tlx.data import Split
from tlx.errors import TlxError
from tlx.extraction.pipeline import ImageFiles
from tlx.recipe import ExtractConfig, cpu_cores
from tlx.tensors import Features

if TYPE_CHECKING:
    from tlx.extraction.engines import Engine
    from tlx.extraction.runtimes import Runner
    from tlx.extraction.store import FeatureStore

#: what computes the features not cached, made only when some are not: the runner, and the engine
#: that runs it (None: this machine)
Start = Callable[[], "tuple[Runner, Engine | None]"]


def extract(
    splits: Sequence[Split], start: Start, settings: ExtractConfig, *, store: FeatureStore | None = None
) -> list[Features]:
    """Features of every image of ``splits``: from ``store`` where cached, else through the runner that
    ``start()`` gives (called only then; :class:`tlx.extraction.frozen.FrozenBackbone` is the caller).

    All splits share one pipeline, so only a few batches of images are decoded at a time. On a CPU
    each of ``settings.workers`` processes decodes, resizes and runs the backbone on one thread, and
    only features reach this process; with 0 or 1 workers this process does it all on
    ``settings.threads`` threads. On an accelerator the workers decode and this process runs the
    backbone. The engine ``start()`` gives (default: this machine) may run it elsewhere
    (:mod:`tlx.extraction.engines`). New features are written to ``store`` chunk by chunk as they come.
    An image that cannot be decoded is left out and listed (``settings.on_bad_image: skip``) or stops the run.
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
        runner, engine = start()
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
    from tlx.extraction.store import image_key

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
    from tlx import notices
    from tlx.extraction import engines
    from tlx.extraction.device import batch_size
    from tlx.extraction.preprocess import eval_transform
    from tlx.extraction.store import CHUNK_IMAGES

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
