"""Backbones: a frozen network that maps a normalized image batch to pooled features."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from tlx.errors import TlxError
from tlx.recipe import BackboneConfig
from tlx.registry import Entry


@dataclass
class Backbone:
    """What a backbone factory returns.

    ``module`` maps (N, 3, H, W) normalized images to (N, ``feature_dim``) features;
    ``data_config`` is a timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode)
    that decides the preprocessing; ``weights`` says in words where the weights came from.
    """

    module: nn.Module
    feature_dim: int
    data_config: dict[str, Any]
    weights: str


def create_backbone(entry: Entry, config: BackboneConfig) -> Backbone:
    """Build the backbone named in the recipe, frozen and in eval mode."""
    if config.weights is not None and not config.pretrained:
        raise TlxError("backbone.weights is set but backbone.pretrained is false; drop one of the two")
    backbone = entry.factory(config.name, pretrained=config.pretrained, weights=config.weights)
    plugin = f"plugin {entry.plugin!r}"
    if not isinstance(backbone, Backbone) or not isinstance(backbone.module, nn.Module):
        raise TlxError(
            f"backbone.name: {plugin} returned {type(backbone).__name__} for {config.name!r}, "
            "not a tlx Backbone wrapping a torch.nn.Module"
        )
    if not isinstance(backbone.feature_dim, int) or backbone.feature_dim <= 0:
        raise TlxError(
            f"backbone.name: {plugin} gave {config.name!r} no positive feature_dim "
            f"(got {backbone.feature_dim!r})"
        )
    backbone.module.eval().requires_grad_(False)
    return backbone


class FlipAveraged(nn.Module):
    """Features of each image and of its mirror image, averaged: ``(f(x) + f(flip(x))) / 2``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = self.module(torch.cat([x, x.flip(-1)]))  # one pass: (2N, D)
        return both.unflatten(0, (2, -1)).mean(dim=0)


def flip_averaged(backbone: Backbone) -> Backbone:
    """The same backbone, its features averaged over each image and its horizontal mirror."""
    return replace(backbone, module=FlipAveraged(backbone.module))
