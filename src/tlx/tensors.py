"""Arrays shared by extraction and training: a split's features, and torch's thread and device settings.

Low in the layers so that training, tracking and plugins use them without importing the extraction
pipeline. Torch is imported where it is used: listing and decoding images needs none.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


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


def to_backbone(images: Any, device: str) -> torch.Tensor:
    """A decoded batch (array or tensor) on ``device``, channels-last (what convolution kernels are
    fastest with)."""
    import torch

    images = torch.as_tensor(images)
    return images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
