"""Feature extraction: every image through the frozen backbone exactly once, streamed in batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tlx.backbone import Backbone
from tlx.data import Split
from tlx.errors import TlxError


@dataclass
class Features:
    """Pooled features of the images of one split that could be decoded."""

    x: torch.Tensor  # (n, feature_dim) float32
    y: torch.Tensor  # (n,) int64
    skipped: list[tuple[Path, str]]


class ImageFiles(Dataset):
    """Decodes and preprocesses one image per item; a file that cannot be decoded yields its reason."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable[[Image.Image], torch.Tensor]):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str]:
        path = self.samples[index][0]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB")), index, ""
        except Exception as exc:  # PIL raises many types for damaged or foreign files
            return None, index, f"{type(exc).__name__}: {exc}".splitlines()[0]


def _collate(
    batch: list[tuple[torch.Tensor | None, int, str]],
) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    images = [item[0] for item in batch if item[0] is not None]
    indices = [item[1] for item in batch if item[0] is not None]
    failures = [(item[1], item[2]) for item in batch if item[0] is None]
    return (torch.stack(images) if images else None), indices, failures


def preprocessing(backbone: Backbone) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform the backbone's data config asks for (timm's ``create_transform``)."""
    from timm.data import create_transform

    return create_transform(**backbone.data_config, is_training=False)


def extract(
    backbone: Backbone, split: Split, *, batch_size: int, workers: int, on_bad_image: str = "skip"
) -> Features:
    """Run ``backbone`` once over every image of ``split``; decoding runs in ``workers`` processes.

    An image that cannot be decoded is left out and listed (``on_bad_image="skip"``) or stops the run.
    """
    from tqdm import tqdm

    loader = DataLoader(
        ImageFiles(split.samples, preprocessing(backbone)),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
    )
    module = backbone.module
    chunks: list[torch.Tensor] = []
    kept: list[int] = []
    skipped: list[tuple[Path, str]] = []
    with (
        torch.inference_mode(),
        tqdm(total=len(split), unit="img", desc=f"features {split.name}", leave=False) as bar,
    ):
        for images, indices, failures in loader:
            skipped += [(split.samples[i][0], reason) for i, reason in failures]
            if skipped and on_bad_image == "error":
                path, reason = skipped[0]
                raise TlxError(
                    f"extract.on_bad_image: cannot decode {path} ({reason}); remove or replace the file, "
                    "or set extract.on_bad_image=skip"
                )
            if images is not None:
                out = module(images)
                _check_output(out, backbone, len(indices))
                chunks.append(out.float())
                kept += indices
            bar.update(len(indices) + len(failures))
    if not kept:
        raise TlxError(f"dataset: no image of split {split.name!r} could be decoded (first: {skipped[0][1]})")
    labels = torch.tensor([split.samples[i][1] for i in kept], dtype=torch.long)
    return Features(torch.cat(chunks), labels, skipped)


def _check_output(out: Any, backbone: Backbone, n: int) -> None:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n, backbone.feature_dim):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TlxError(
            f"backbone.name: the backbone returned {shape} for a batch of {n} images, "
            f"not pooled features of shape ({n}, {backbone.feature_dim})"
        )
