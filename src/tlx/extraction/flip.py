"""Flip averaging (``extract.flip``): features of each image and of its mirror image, averaged."""

from __future__ import annotations

import torch
from torch import nn


class FlipAveraged(nn.Module):
    """Features of each image and of its mirror image, averaged: ``(f(x) + f(flip(x))) / 2``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = self.module(torch.cat([x, x.flip(-1)]))  # one pass: (2N, D)
        return both.unflatten(0, (2, -1)).mean(dim=0)
