"""Extraction in worker processes: each decodes, resizes and runs the backbone for its batches."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tlx.backbone import Backbone
from tlx.data import scan_imagefolder
from tlx.features import extract

from .conftest import CONFIG, make_imagefolder


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

    alone = extract(splits, backbone, batch_size=2, workers=0)
    assert set(log.read_text().split()) == {str(os.getpid())}
    log.unlink()
    pooled = extract(splits, backbone, batch_size=2, workers=2)
    ran_in = set(log.read_text().split())
    assert str(os.getpid()) not in ran_in and len(ran_in) > 1, "the backbone runs in the workers"

    for a, b in zip(alone, pooled):
        assert torch.equal(a.y, b.y)
        assert torch.allclose(a.x, b.x, atol=1e-6)
        assert [p.name for p, _ in a.skipped] == [p.name for p, _ in b.skipped]
    assert [p.name for p, _ in pooled[0].skipped] == ["broken.jpg"]
    assert len(pooled[0].x.unique(dim=0)) == 15, "every image has features of its own"


def test_a_single_batch_is_extracted_in_this_process(tmp_path: Path) -> None:
    data = make_imagefolder(tmp_path / "data", classes=2, per_class=(1, 1))
    splits = scan_imagefolder(data, "train", "val")
    log = tmp_path / "pids.txt"
    extract([splits.train], Backbone(MeanColour(log), 3, CONFIG, "test"), batch_size=4, workers=2)
    assert log.read_text().split() == [str(os.getpid())]
