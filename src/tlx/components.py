"""A recipe resolved into its registered components: registry lookups and each component's options."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from tlx import notices, plugins
from tlx.errors import TlxError
from tlx.recipe import Recipe, TrainConfig, validate
from tlx.registry import Entry, Registry

#: component kinds that separately installed packages provide, for the error when one is missing
PACKAGES = {"tracker": {"mlflow": "tlx-mlflow"}, "engine": {"ray": "tlx-ray"}}


class NoOptions(BaseModel):
    """The options of a component that takes none: any key is unknown."""

    model_config = ConfigDict(extra="forbid")


def validate_options(
    entry: Entry,
    values: dict[str, Any],
    section: str,
    source: str,
    set_keys: Collection[str] = (),
    registry: Registry | None = None,
) -> Any:
    """Validate a component's own recipe keys with the model its plugin registered.

    ``set_keys`` (:attr:`Recipe.set_keys`): an error in a key given with ``--set`` names that ``--set``.
    ``registry``: an unknown key names the other components of that kind that take it.
    """
    elsewhere = _takers(registry, entry, section) if registry is not None else None
    model = entry.options or NoOptions
    return validate(model, values, source=source, prefix=section, set_keys=set_keys, elsewhere=elsewhere)


def _takers(registry: Registry, entry: Entry, section: str) -> Callable[[str], str]:
    """A hint for an option ``entry`` lacks: the other entries of ``registry`` whose options have it."""

    def hint(key: str) -> str:
        takers = [
            e.name
            for e in registry.entries.values()
            if e is not entry and e.options is not None and key in e.options.model_fields
        ]
        if not takers:
            return ""
        verb = "does" if len(takers) == 1 else "do"
        return f"; {registry.kind} {entry.name!r} takes no {key}, {', '.join(takers)} {verb}"

    return hint


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
    #: the ``extract.engine`` and its validated options, when resolved (``tlx run``)
    engine: tuple[Entry, Any] | None = None
    #: the head's own ``train`` defaults (``register(..., train=...)``) for the keys the recipe leaves
    #: unset: :func:`with_head_defaults` applies them
    head_train: dict[str, Any] = field(default_factory=dict)


def resolve(recipe: Recipe, source: str, *, engine: bool = False) -> Components:
    """Look up every component ``recipe`` names and validate its options; ``source`` names the recipe.

    ``engine``: the extraction engine too (training runs; eval and predict extract on this machine).
    """
    registry = plugins.load()

    def key(name: str) -> str:  # a name given with --set is blamed on it
        return f"--set {name}" if name in recipe.set_keys else name

    dataset = registry.datasets.get(recipe.dataset.kind, key("dataset.kind"))
    backbone = registry.backbones.get(recipe.backbone.name, key("backbone.name"))
    renamed = registry.backbones.formerly(recipe.backbone.name)
    if renamed is not None and renamed is not backbone:
        notices.warn(
            f"{key('backbone.name')}: {recipe.backbone.name} is plugin {backbone.plugin}'s model; plugin "
            f"{renamed.plugin}'s backbone of that name is {renamed.name} now"
        )
    head = registry.heads.get(recipe.head.type, key("head.type"))
    trackers = tuple(_tracker(registry.trackers, recipe, i, source) for i in range(len(recipe.track)))
    version = next((p.version for p in registry.plugins if p.name == backbone.plugin), "?")
    unset = {k: v for k, v in (head.train or {}).items() if k not in recipe.train.model_fields_set}
    return Components(
        dataset,
        validate_options(
            dataset, recipe.dataset.options, "dataset", source, recipe.set_keys, registry.datasets
        ),
        backbone,
        version,
        head,
        validate_options(head, recipe.head.options, "head", source, recipe.set_keys, registry.heads),
        trackers,
        resolve_engine(recipe, source) if engine else None,
        unset,
    )


def with_head_defaults(recipe: Recipe, parts: Components) -> Recipe:
    """``recipe`` with the head's own ``train`` defaults where it sets no value
    (:attr:`Components.head_train`); a value the recipe or ``--set`` gives always wins."""
    if not parts.head_train:
        return recipe
    given = recipe.train.model_dump(exclude_unset=True)
    where = f"head.type {recipe.head.type}'s train defaults"
    train = validate(TrainConfig, {**parts.head_train, **given}, source=where, prefix="train")
    return recipe.model_copy(update={"train": train})


def _tracker(registry: Registry, recipe: Recipe, index: int, source: str) -> tuple[Entry, Any]:
    """The ``index``-th ``track`` entry's tracker and options; a kind whose package is missing says which."""
    section = f"track.{index}"
    given = [k for k in ("track", section, f"{section}.kind") if k in recipe.set_keys]
    key = f"--set {given[0]}" if given else f"{section}.kind"
    entry = _installed(registry, recipe.track[index].kind, key)
    return entry, validate_options(entry, recipe.track[index].options, section, source, recipe.set_keys)


def resolve_engine(recipe: Recipe, source: str, kind: str | None = None) -> tuple[Entry, Any]:
    """The engine ``kind`` (default: the one ``extract.engine`` names) with its validated options: the
    recipe's when it names that kind, else the engine's defaults."""
    given = [k for k in ("extract", "extract.engine", "extract.engine.kind") if k in recipe.set_keys]
    key = "--engine" if kind else f"--set {given[0]}" if given else "extract.engine.kind"
    configured = recipe.extract.engine
    entry = _installed(plugins.load().engines, kind or configured.kind, key)
    options = configured.options if entry.name == configured.kind else {}
    return entry, validate_options(entry, options, "extract.engine", source, recipe.set_keys)


def _installed(registry: Registry, kind: str, key: str) -> Entry:
    """The entry for ``kind``; a kind whose plugin package is not installed names the package."""
    package = PACKAGES.get(registry.kind, {}).get(kind)
    if package and kind not in registry.entries and kind not in registry.conflicts:
        raise TlxError(
            f"{key}: {registry.kind} {kind!r} comes from the plugin package {package}, which is not "
            f"installed; install it from tlx's repository: pip install -e plugins/{package}"
        )
    return registry.get(kind, key)
