"""A recipe resolved into its registered components: registry lookups and each component's options."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from tlx import plugins
from tlx.errors import TlxError
from tlx.recipe import Recipe, validate
from tlx.registry import Entry, Registry

#: tracker kinds that separately installed packages provide, for the error when one is missing
TRACKER_PACKAGES = {"mlflow": "tlx-mlflow"}


class NoOptions(BaseModel):
    """The options of a component that takes none: any key is unknown."""

    model_config = ConfigDict(extra="forbid")


def validate_options(
    entry: Entry, values: dict[str, Any], section: str, source: str, set_keys: Collection[str] = ()
) -> Any:
    """Validate a component's own recipe keys with the model its plugin registered.

    ``set_keys`` (:attr:`Recipe.set_keys`): an error in a key given with ``--set`` names that ``--set``.
    """
    return validate(entry.options or NoOptions, values, source=source, prefix=section, set_keys=set_keys)


@dataclass(frozen=True)
class Components:
    """The dataset, backbone and head a recipe names, with their validated options."""

    dataset: Entry
    dataset_options: Any
    backbone: Entry
    #: the version of the plugin providing the backbone (part of the feature cache key)
    backbone_version: str
    head: Entry
    head_options: Any
    #: the recipe's ``track`` entries: each tracker with its validated options
    trackers: tuple[tuple[Entry, Any], ...] = ()


def resolve(recipe: Recipe, source: str) -> Components:
    """Look up every component ``recipe`` names and validate its options; ``source`` names the recipe."""
    registry = plugins.load()

    def key(name: str) -> str:  # a name given with --set is blamed on it
        return f"--set {name}" if name in recipe.set_keys else name

    dataset = registry.datasets.get(recipe.dataset.kind, key("dataset.kind"))
    backbone = registry.backbones.get(recipe.backbone.name, key("backbone.name"))
    head = registry.heads.get(recipe.head.type, key("head.type"))
    trackers = tuple(_tracker(registry.trackers, recipe, i, source) for i in range(len(recipe.track)))
    version = next((p.version for p in registry.plugins if p.name == backbone.plugin), "?")
    return Components(
        dataset,
        validate_options(dataset, recipe.dataset.options, "dataset", source, recipe.set_keys),
        backbone,
        version,
        head,
        validate_options(head, recipe.head.options, "head", source, recipe.set_keys),
        trackers,
    )


def _tracker(registry: Registry, recipe: Recipe, index: int, source: str) -> tuple[Entry, Any]:
    """The ``index``-th ``track`` entry's tracker and options; a kind whose package is missing says which."""
    section = f"track.{index}"
    given = [k for k in ("track", section, f"{section}.kind") if k in recipe.set_keys]
    key = f"--set {given[0]}" if given else f"{section}.kind"
    kind = recipe.track[index].kind
    package = TRACKER_PACKAGES.get(kind)
    if package and kind not in registry.entries and kind not in registry.conflicts:
        raise TlxError(
            f"{key}: tracker {kind!r} comes from the plugin package {package}, which is not installed; "
            f"install it from tlx's repository: pip install -e plugins/{package}"
        )
    entry = registry.get(kind, key)
    return entry, validate_options(entry, recipe.track[index].options, section, source, recipe.set_keys)
