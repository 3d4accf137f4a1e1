"""Named registries of backbones, heads, datasets, trackers and engines, filled by plugins."""

from __future__ import annotations

import difflib
import fnmatch
import glob
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ValidationError

from tlx.errors import TlxError
from tlx.recipe import TrainConfig

if TYPE_CHECKING:
    from torch import nn

    from tlx.data import Splits


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


class BackboneFactory(Protocol):
    """Builds a frozen feature extractor; ``weights`` is a local state dict file to load, if given."""

    def __call__(self, name: str, *, pretrained: bool, weights: Path | None) -> Backbone: ...


class WeightFiles(Protocol):
    """The files a backbone's weights would be loaded from, or None when that is not known."""

    def __call__(self, name: str, *, pretrained: bool, weights: Path | None) -> list[Path] | None: ...


class Search(Protocol):
    """A family's names matching an fnmatch ``pattern``; with ``pretrained``, its pretrained tagged names."""

    def __call__(self, pattern: str, *, pretrained: bool) -> Iterable[str]: ...


class HeadFactory(Protocol):
    """Builds a head mapping ``(N, in_features)`` features to ``(N, num_classes)`` logits."""

    def __call__(self, in_features: int, num_classes: int, options: Any) -> nn.Module: ...


class DatasetFactory(Protocol):
    """Lists the labelled images of a dataset, from its validated options."""

    def __call__(self, options: Any) -> Splits: ...


class Tracker(Protocol):
    """One experiment tracker following one run; tlx calls ``start``, ``epoch`` per epoch, then ``finish``
    (or ``fail`` when the run stops with an error).

    Metric names are ``train/loss``, ``test/loss``, ``test/accuracy``, ``val/loss``, ``val/accuracy``;
    ``params`` is the resolved recipe flattened to dotted keys. An exception from any method is warned
    about once and the tracker is dropped: the run goes on.
    """

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None: ...

    def epoch(self, step: int, metrics: dict[str, float]) -> None: ...

    def finish(self, metrics: dict[str, float], run_dir: Path) -> None: ...

    def fail(self) -> None: ...


class TrackerFactory(Protocol):
    """Makes a tracker for the run folder ``run_dir`` from its validated options; it does no I/O yet,
    and raises :class:`tlx.TlxError` when a package it needs is missing."""

    def __call__(self, options: Any, run_dir: Path) -> Tracker: ...


#: the ``register`` keywords that apply to each kind of component
KEYWORDS = {
    "backbone": {"description", "matches", "catalog", "search", "weight_files", "offline", "formerly"},
    "head": {"description", "options", "train"},
    "dataset": {"description", "options"},
    "tracker": {"description", "options"},
    "engine": {"description", "options"},
}


@dataclass(frozen=True)
class Entry:
    """One registered component.

    ``matches`` makes the entry a *family* that claims every name it accepts (timm's models);
    ``catalog`` lists a family's names for ``tlx list`` and for suggestions; ``search(pattern, *,
    pretrained)`` finds a family's names for ``tlx list backbones`` (default: ``catalog`` filtered),
    pretrained tags (``resnet18.tv_in1k``) when asked. ``offline(name)`` says whether a name's
    pretrained weights are on this machine now, where ``weight_files`` cannot answer it cheaply.
    ``formerly`` (backbones) is the entry's previous name, by which older run folders still load.
    ``options`` is a pydantic model validating the component's recipe keys. ``train`` (heads only) are
    the head's own defaults for ``train`` keys (``{"lr": 0.1}``), taken where the recipe sets none.
    ``weight_files(name, *, pretrained, weights)`` (backbones only) lists the files that decide the
    weights the factory would load, or returns None when they are not known (random initialisation):
    with it, a run whose features are all cached need not build the backbone.
    """

    name: str
    factory: Callable[..., Any]
    plugin: str
    description: str = ""
    options: type[BaseModel] | None = None
    matches: Callable[[str], bool] | None = None
    catalog: Callable[[], Iterable[str]] | None = None
    search: Search | None = None
    weight_files: WeightFiles | None = None
    offline: Callable[[str], bool] | None = None
    train: Mapping[str, Any] | None = None
    #: the name a plugin registered this backbone under before (run folders may record it)
    formerly: str | None = None

    def names(self, pattern: str, *, pretrained: bool) -> list[str]:
        """This entry's backbone names matching ``pattern`` (fnmatch wildcards)."""
        if self.matches is None:
            return [self.name] if fnmatch.fnmatch(self.name, pattern) else []
        if self.search is not None:
            return list(self.search(pattern, pretrained=pretrained))
        return fnmatch.filter(self.catalog(), pattern) if self.catalog else []

    def weights_offline(self, name: str) -> bool | None:
        """Whether ``name``'s pretrained weights are on this machine now; None when the entry cannot tell.

        The entry's ``offline`` callable decides; without one, they are when ``weight_files`` names
        files and every one exists (a hub cache entry, a plugin package's file).
        """
        if self.offline is not None:
            return self.offline(name)
        if self.weight_files is None:
            return None
        try:
            files = self.weight_files(name, pretrained=True, weights=None)
        except TlxError:  # e.g. the package that carries the weights is not installed
            return False
        return bool(files) and all(Path(f).is_file() for f in files)


def check_train_defaults(name: str, train: Mapping[str, Any]) -> None:
    """A head's ``train`` defaults must be valid ``train`` keys and values, or registering it fails."""
    unknown = sorted(set(train) - set(TrainConfig.model_fields))
    if unknown:
        raise TypeError(
            f"register({name!r}): train={{{unknown[0]!r}: ...}} is not a train key; "
            f"they are {', '.join(TrainConfig.model_fields)}"
        )
    try:
        TrainConfig.model_validate(train)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise TypeError(
            f"register({name!r}): train: {'.'.join(map(str, first['loc']))}: {first['msg']}"
        ) from None


@dataclass(frozen=True)
class Found:
    """A backbone name found by :meth:`Registry.search`; ``offline`` only when pretrained tags were asked."""

    name: str
    plugin: str
    offline: bool | None = None


def _natural(name: str) -> list[Any]:
    """Sort key putting ``resnet18`` before ``resnet101``, as ``timm.list_models`` does."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


@dataclass
class Registry:
    """Components of one kind (``backbone``, ``head``, ``dataset``, ``tracker`` or ``engine``) by name."""

    kind: str
    entries: dict[str, Entry] = field(default_factory=dict)
    conflicts: dict[str, list[str]] = field(default_factory=dict)
    #: names of plugins that failed to load, for hints when a name is unknown
    broken_plugins: list[str] = field(default_factory=list)
    #: names a plugin registered that a family has too, and were dropped: name -> (plugin, family's plugin)
    shadowing: dict[str, tuple[str, str]] = field(default_factory=dict)

    def registrar(self, plugin: str) -> Callable[..., None]:
        """The ``register`` callable handed to one plugin's hook."""

        def register(name: str, factory: Callable[..., Any], **keywords: Any) -> None:
            stray = sorted(set(keywords) - KEYWORDS[self.kind])
            if stray:
                raise TypeError(
                    f"register({name!r}): {', '.join(stray)} does not apply to a {self.kind}; "
                    f"a {self.kind} takes {', '.join(sorted(KEYWORDS[self.kind]))}"
                )
            if "train" in keywords:
                check_train_defaults(name, keywords["train"])
            entry = Entry(name, factory, plugin, **keywords)
            if name in self.entries:
                self.conflicts.setdefault(name, [self.entries[name].plugin]).append(plugin)
                return
            self.entries[name] = entry

        return register

    def conflict_errors(self, plugin: str) -> list[str]:
        """Messages for the names ``plugin`` tried to register that another plugin already had."""
        return [
            f"{self.kind} {name!r} is already registered by plugin {plugins[0]!r}"
            for name, plugins in self.conflicts.items()
            if plugin in plugins[1:]
        ]

    def drop_shadowing(self) -> None:
        """Drop every named entry whose name a family also has (a timm architecture, or one with its
        pretrained tag): one name must not mean two models, depending on which plugins are installed."""
        families = [e for e in self.entries.values() if e.matches is not None]
        for name, entry in list(self.entries.items()):
            if entry.matches is not None:
                continue
            exact = glob.escape(name)
            for family in families:
                # tagged names hold a dot; a name without one can only be an architecture
                if name in family.names(exact, pretrained="." in name):
                    del self.entries[name]
                    self.shadowing[name] = (entry.plugin, family.plugin)
                    break

    def shadowing_errors(self, plugin: str) -> list[str]:
        """Messages for the names of ``plugin`` that :meth:`drop_shadowing` dropped."""
        return [
            f"{self.kind} {name!r} is also a model of plugin {family!r} and is not registered; register "
            "it under another name (timm's architecture with a tag of its own, e.g. ARCH.mytag)"
            for name, (owner, family) in self.shadowing.items()
            if owner == plugin
        ]

    def formerly(self, name: str) -> Entry | None:
        """The entry that was registered as ``name`` before (``register(..., formerly=name)``)."""
        return next((e for e in self.entries.values() if e.formerly == name), None)

    def get(self, name: str, key: str) -> Entry:
        """The entry for ``name``; ``key`` is the recipe key that named it, for the error."""
        if name in self.conflicts:
            a, b = self.conflicts[name][:2]
            raise TlxError(
                f"{key}: {self.kind} {name!r} is registered by two plugins, {a!r} and {b!r}; "
                "uninstall one of them"
            )
        if name in self.entries and self.entries[name].matches is None:
            return self.entries[name]
        for entry in self.entries.values():
            if entry.matches is not None and entry.matches(name):
                return entry
        close = difflib.get_close_matches(name, self.known_names(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        if self.broken_plugins:
            hint += f" (plugins that failed to load: {', '.join(self.broken_plugins)})"
        raise TlxError(f"{key}: unknown {self.kind} {name!r}{hint}; `tlx list` shows what is registered")

    def search(self, pattern: str | Sequence[str] = "*", *, pretrained: bool = False) -> list[Found]:
        """Names matching ``pattern`` (or any of several), each with the plugin :meth:`get` resolves it
        to, naturally sorted.

        With ``pretrained``, families give their pretrained tags and each name says whether its weights
        are on this machine now (:meth:`Entry.weights_offline`).
        """
        found: dict[str, Entry] = {}
        named_first = sorted(self.entries.values(), key=lambda e: e.matches is not None)  # as get() resolves
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        for entry in named_first:
            for one in patterns or ["*"]:
                for name in entry.names(one or "*", pretrained=pretrained):
                    found.setdefault(name, entry)
        return [
            Found(name, entry.plugin, entry.weights_offline(name) if pretrained else None)
            for name, entry in sorted(found.items(), key=lambda item: _natural(item[0]))
        ]

    def known_names(self) -> list[str]:
        """Every name the registry can resolve, families expanded."""
        names: list[str] = []
        for entry in self.entries.values():
            names.extend(entry.catalog() if entry.catalog else [entry.name])
        return names
