"""Building a recipe's backbone through its plugin, checked, and remembered by its weights files.

A backbone is built once per weights file (:func:`build_backbone`): its info (weights digest, feature
size, data config) is remembered in the cache folder, so a later run recalls it without building
(:class:`tlx.extraction.frozen.FrozenBackbone`). Torch is imported where a model is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tlx.errors import TlxError
from tlx.recipe import BackboneConfig
from tlx.registry import Backbone, Entry

if TYPE_CHECKING:
    from pathlib import Path

    from tlx.extraction.store import BackboneInfo


def create_backbone(entry: Entry, config: BackboneConfig) -> Backbone:
    """Build the backbone named in the recipe; what its plugin returned is checked."""
    from torch import nn

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
    return backbone


def build_backbone(
    entry: Entry, plugin_version: str, config: BackboneConfig, seed: int, root: Path
) -> tuple[Backbone, BackboneInfo]:
    """Build the backbone and hash its weights; the digest is remembered per weights file.

    A later run whose features are all cached then neither builds nor hashes the model; a changed
    weights file (size, mtime, ctime or inode) is a new key, so the model is built again.
    """
    import torch

    from tlx.extraction import store

    torch.manual_seed(seed)  # a randomly initialised backbone depends on the seed
    backbone = create_backbone(entry, config)
    info = store.BackboneInfo.of(backbone)
    store.remember_backbone(root, entry, config, plugin_version, info)
    return backbone, info
