"""Extraction: on a CPU, workers decode and run the backbone; elsewhere they decode for the device."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tlx.data import scan_imagefolder
from tlx.errors import TlxError
from tlx.extraction import pipeline as features
from tlx.extraction.features import extract
from tlx.extraction.pipeline import ImageFiles, on_cpu, on_device
from tlx.extraction.preprocess import eval_transform
from tlx.recipe import ExtractConfig
from tlx.registry import Backbone

from .conftest import CONFIG, in_torch, make_imagefolder, started


class MeanColour(nn.Module):
    """Mean colour per channel; notes in ``log`` the process each batch ran in."""

    def __init__(self, log: Path) -> None:
        super().__init__()
        self.log = log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.log.open("a") as log:
            log.write(f"{os.getpid()}\n")
        return x.mean(dim=(2, 3))


def test_workers_give_each_image_the_features_this_process_gives_it(tmp_path: Path) -> None:
    data = make_imagefolder(tmp_path / "data", classes=3, per_class=(5, 2))
    (data / "train" / "class1" / "broken.jpg").write_bytes(b"not a jpeg")
    scanned = scan_imagefolder(data, "train", "val")
    splits = [scanned.train, scanned.test]
    log = tmp_path / "pids.txt"
    backbone = Backbone(MeanColour(log), 3, CONFIG, "test colours")

    alone = extract(splits, started(in_torch(backbone)), ExtractConfig(batch_size=2, workers=0))
    assert set(log.read_text().split()) == {str(os.getpid())}
    log.unlink()
    pooled = extract(splits, started(in_torch(backbone)), ExtractConfig(batch_size=2, workers=2))
    ran_in = set(log.read_text().split())
    assert str(os.getpid()) not in ran_in and len(ran_in) > 1, "the backbone runs in the workers"

    for a, b in zip(alone, pooled):
        assert torch.equal(a.y, b.y)
        assert torch.allclose(a.x, b.x, atol=1e-6)
        assert [p.name for p, _ in a.skipped] == [p.name for p, _ in b.skipped]
    assert [p.name for p, _ in pooled[0].skipped] == ["broken.jpg"]
    assert len(pooled[0].x.unique(dim=0)) == 15, "every image has features of its own"


def test_workers_are_spawned_where_fork_is_not_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Elsewhere than on Linux the workers are spawned: the backbone and files reach them pickled."""
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=(4, 1))
    split = scan_imagefolder(data, "train", "val").train
    log = tmp_path / "pids.txt"
    backbone = Backbone(MeanColour(log), 3, CONFIG, "test colours")
    (alone,) = extract([split], started(in_torch(backbone)), ExtractConfig(batch_size=2, workers=0))
    log.unlink()
    monkeypatch.setattr(features, "can_fork", lambda: False)
    (spawned,) = extract([split], started(in_torch(backbone)), ExtractConfig(batch_size=2, workers=2))
    assert str(os.getpid()) not in set(log.read_text().split())
    assert torch.allclose(alone.x, spawned.x, atol=1e-6) and torch.equal(alone.y, spawned.y)


def test_a_worker_that_dies_is_a_clear_error(tmp_path: Path) -> None:
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=(4, 1))
    files = ImageFiles(scan_imagefolder(data, "train", "val").train.samples, eval_transform(CONFIG))

    def killed(images: np.ndarray, threads: int | None) -> np.ndarray:  # as the kernel's OOM killer would
        os._exit(9)

    with pytest.raises(TlxError, match=r"extract.workers: an extraction worker died .*set extract.workers"):
        list(on_cpu(killed, files, 2, 2, 1))


def test_the_workers_leave_ctrl_c_to_this_process(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the workers too: they go on (no traceback, no broken pool) and
    this process, which gets it as well, stops them."""
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=(6, 1))
    files = ImageFiles(scan_imagefolder(data, "train", "val").train.samples, eval_transform(CONFIG))

    def slow(images: np.ndarray, threads: int | None) -> np.ndarray:
        time.sleep(0.3)
        return images.mean(axis=(2, 3))

    batches = on_cpu(slow, files, 2, 2, 1)
    seen = len(next(batches)[1])
    for worker in multiprocessing.active_children():
        os.kill(worker.pid, signal.SIGINT)
    seen += sum(len(indices) for _, indices, _ in batches)
    assert seen == 12


def test_a_single_batch_is_extracted_in_this_process(tmp_path: Path) -> None:
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=(1, 1))
    splits = scan_imagefolder(data, "train", "val")
    log = tmp_path / "pids.txt"
    extract(
        [splits.train],
        started(in_torch(Backbone(MeanColour(log), 3, CONFIG, "test"))),
        ExtractConfig(workers=2),
    )
    assert log.read_text().split() == [str(os.getpid())]


def test_the_accelerator_pipeline_gives_the_same_features(tmp_path: Path) -> None:
    """Workers decode and this process runs the backbone, as on a GPU (here on the CPU: the logic,
    not CUDA, is what this checks; no GPU is assumed anywhere in the tests)."""
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=(5, 1))
    (data / "train" / "class0" / "broken.jpg").write_bytes(b"not a jpeg")
    samples = scan_imagefolder(data, "train", "val").train.samples
    log = tmp_path / "pids.txt"
    backbone = Backbone(MeanColour(log), 3, CONFIG, "test colours")
    files = ImageFiles(samples, eval_transform(backbone.data_config))
    by_index, failed = {}, []
    for out, indices, failures in on_device(in_torch(backbone).forward, files, 3, 2):
        by_index |= dict(zip(indices, out)) if out is not None else {}
        failed += failures
    assert set(log.read_text().split()) == {str(os.getpid())}, "the backbone runs in this process"
    (expected,) = extract(
        [scan_imagefolder(data, "train", "val").train], started(in_torch(backbone)), ExtractConfig(workers=0)
    )
    assert [samples[i][0].name for i, _ in failed] == ["broken.jpg"]
    computed = torch.from_numpy(np.stack([by_index[i] for i in sorted(by_index)]))
    assert torch.allclose(computed, expected.x, atol=1e-6)
