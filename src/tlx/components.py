"""A recipe resolved into its registered components: registry lookups and each component's options."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from tlx import plugins
from tlx.recipe import Recipe, validate
from tlx.registry import Entry


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


def resolve(recipe: Recipe, source: str) -> Components:
    """Look up every component ``recipe`` names and validate its options; ``source`` names the recipe."""
    registry = plugins.load()

    def key(name: str) -> str:  # a name given with --set is blamed on it
        return f"--set {name}" if name in recipe.set_keys else name

    dataset = registry.datasets.get(recipe.dataset.kind, key("dataset.kind"))
    backbone = registry.backbones.get(recipe.backbone.name, key("backbone.name"))
    head = registry.heads.get(recipe.head.type, key("head.type"))
    version = next((p.version for p in registry.plugins if p.name == backbone.plugin), "?")
    return Components(
        dataset,
        validate_options(dataset, recipe.dataset.options, "dataset", source, recipe.set_keys),
        backbone,
        version,
        head,
        validate_options(head, recipe.head.options, "head", source, recipe.set_keys),
    )
