"""Backbones: a frozen network that maps a normalized image batch to pooled features.

A recipe's backbone is built once per weights file (:func:`build_backbone`), then recalled from the
cache; :func:`runner_for` gives what extraction runs, :func:`feature_store` where its features are kept.
Recalling needs no torch: it is imported where a model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlx.errors import TlxError
from tlx.recipe import BackboneConfig, Recipe
from tlx.registry import Entry

if TYPE_CHECKING:
    from torch import nn

    from tlx.cache import BackboneInfo, FeatureStore
    from tlx.components import Components
    from tlx.runtimes import Runner


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
    """Build the backbone named in the recipe (extraction freezes it: :func:`tlx.runtimes.frozen`)."""
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


def flip_averaged(backbone: Backbone) -> Backbone:
    """The same backbone, its features averaged over each image and its horizontal mirror."""
    from tlx.flip import FlipAveraged

    return replace(backbone, module=FlipAveraged(backbone.module))


def build_backbone(recipe: Recipe, parts: Components, root: Path) -> tuple[Backbone, BackboneInfo]:
    """Build the backbone and hash its weights; the digest is remembered per weights file.

    A later run whose features are all cached then neither builds nor hashes the model; a changed
    weights file (size, mtime, ctime or inode) is a new key, so the model is built again.
    """
    import torch

    from tlx import cache

    torch.manual_seed(recipe.seed)  # a randomly initialised backbone depends on the seed
    backbone = create_backbone(parts.backbone, recipe.backbone)
    info = cache.BackboneInfo.of(backbone)
    cache.remember_backbone(root, parts.backbone, recipe.backbone, parts.backbone_version, info)
    return backbone, info


def recalled_or_built(
    recipe: Recipe, parts: Components, root: Path
) -> tuple[BackboneInfo, tuple[Backbone, BackboneInfo] | None]:
    """The backbone's info as remembered from an earlier build of the same weights file; else build it
    (:func:`build_backbone`) and return the build too."""
    from tlx import cache

    info = cache.recall_backbone(root, parts.backbone, recipe.backbone, parts.backbone_version)
    if info is not None:
        return info, None
    built = build_backbone(recipe, parts, root)
    return built[1], built


def runner_for(
    recipe: Recipe,
    parts: Components,
    root: Path,
    info: BackboneInfo,
    device: str,
    built: tuple[Backbone, BackboneInfo] | None = None,
) -> Runner:
    """The recipe's runtime for its frozen backbone (flip-averaged if asked); ``built`` if built already."""
    from tlx.device import batch_size
    from tlx.runtimes import prepare

    def build() -> nn.Module:
        backbone, _ = built or build_backbone(recipe, parts, root)
        return (flip_averaged(backbone) if recipe.extract.flip else backbone).module

    batch = batch_size(recipe.extract.batch_size, device)
    return prepare(recipe.extract.runtime, device, root, info, build, recipe.extract.flip, batch)


def feature_store(recipe: Recipe, parts: Components, root: Path, info: BackboneInfo) -> FeatureStore:
    """The cache namespace of the recipe's features: every recipe key that can change a feature (new
    keys count by default), the weights and the pixel libraries; not the runtime (:mod:`tlx.runtimes`)
    nor the engine (:mod:`tlx.engines`): they compute the same features."""
    from tlx.cache import FeatureStore, namespace_identity

    backbone = {
        "plugin": [parts.backbone.plugin, parts.backbone_version],
        **recipe.backbone.model_dump(mode="json", exclude={"weights"}),
    }
    pixels = recipe.extract.model_dump(
        mode="json", exclude={"batch_size", "workers", "threads", "on_bad_image", "runtime", "engine"}
    )
    return FeatureStore(root, namespace_identity(backbone, info, pixels))
