"""The one front door from a recipe to features: :class:`FrozenBackbone`.

Every caller that needs features goes through it: ``tlx run`` and ``tlx sweep``, a trained run read
back (predict, eval, serve, the Python API) and the engines' workers on other machines. The steps
between a recipe and its features therefore exist once:

1. recall the backbone's info (weights digest, feature size, data config) from the cache folder, or
   build the backbone through its plugin and remember it (:func:`tlx.extraction.backbone.build_backbone`);
2. open its feature store: features cached by image (:mod:`tlx.extraction.store`);
3. only when some image is not cached: the torch module as the head sees it (flip-averaged, or a
   fine-tuned backbone's weights loaded) and the runner of ``extract.runtime`` on the device, torch or
   its cached ONNX export, a fresh export probed against torch on the first batch
   (:mod:`tlx.extraction.runtimes`);
4. those images through it, on this machine or an engine's workers (:mod:`tlx.extraction.engines`),
   and what was computed kept in the store.

Torch makes the module frozen right before every forward pass and an export is made from a copy
(:func:`tlx.extraction.runtimes.frozen`), so nothing that wraps or exports the module changes its
features. ``tests/test_paths.py`` holds every path against a fresh eager-torch model on real images.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlx.errors import TlxError
from tlx.recipe import BackboneConfig, ExtractConfig, Recipe
from tlx.registry import Entry

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from tlx.components import Components
    from tlx.data import Split
    from tlx.extraction.engines import Engine
    from tlx.extraction.runtimes import Runner
    from tlx.extraction.store import BackboneInfo, FeatureStore
    from tlx.registry import Backbone
    from tlx.tensors import Features


@dataclass
class FrozenBackbone:
    """A recipe's frozen backbone: its info, its feature store, its runner, and the features of images.

    Nothing is built that is not needed: a backbone seen before (same weights files) is recalled, a
    run whose features are all cached builds no model, and a cached export runs without the torch one.
    """

    entry: Entry
    #: the version of the plugin providing the backbone (part of every cache key)
    plugin_version: str
    config: BackboneConfig
    extract: ExtractConfig
    #: a randomly initialised backbone depends on it
    seed: int
    #: the cache folder: remembered backbones, features, exports
    root: Path
    #: the recipe's ``device``: where the backbone runs on this machine
    device: str = "auto"
    #: loads a fine-tuned backbone's weights (a run folder's) into the built module: its features are
    #: then computed in torch, never cached
    tuned: Callable[[nn.Module], None] | None = None
    #: what ran the backbone in the last :meth:`features` call; None when everything came from the cache
    runtime: str | None = field(default=None, init=False)
    _built: tuple[Backbone, BackboneInfo] | None = field(default=None, init=False, repr=False)

    @classmethod
    def of(
        cls,
        recipe: Recipe,
        parts: Components,
        root: Path,
        tuned: Callable[[nn.Module], None] | None = None,
    ) -> FrozenBackbone:
        """The backbone ``recipe`` names, resolved to ``parts``, with the cache folder ``root``."""
        return cls(
            parts.backbone,
            parts.backbone_version,
            recipe.backbone,
            recipe.extract,
            recipe.seed,
            root,
            recipe.device,
            tuned,
        )

    @functools.cached_property
    def recalled(self) -> BackboneInfo | None:
        """The info remembered from an earlier build of the same weights files, if any."""
        from tlx.extraction.store import recall_backbone

        return recall_backbone(self.root, self.entry, self.config, self.plugin_version)

    @functools.cached_property
    def info(self) -> BackboneInfo:
        """The backbone's info: recalled, else from building it."""
        return self.recalled or self.built()[1]

    def built(self) -> tuple[Backbone, BackboneInfo]:
        """The backbone as its plugin builds it (once), and its info."""
        from tlx.extraction.backbone import build_backbone

        if self._built is None:
            self._built = build_backbone(self.entry, self.plugin_version, self.config, self.seed, self.root)
        return self._built

    @functools.cached_property
    def module(self) -> nn.Module:
        """The torch module whose features the head sees: flip-averaged as ``extract.flip`` asks, or with
        the fine-tuned weights loaded."""
        from tlx.extraction.flip import FlipAveraged

        module = self.built()[0].module
        if self.tuned is not None:
            self.tuned(module)
            return module
        return FlipAveraged(module) if self.extract.flip else module

    @functools.cached_property
    def store(self) -> FeatureStore | None:
        """Where the features are cached; None for a fine-tuned backbone (its run folder's own weights).

        Its namespace holds every recipe key that can change a feature (new keys count by default), the
        weights and the pixel libraries; not the runtime nor the engine: they compute the same features.
        """
        from tlx.extraction.store import FeatureStore, namespace_identity

        if self.tuned is not None:
            return None
        backbone = {
            "plugin": [self.entry.plugin, self.plugin_version],
            **self.config.model_dump(mode="json", exclude={"weights"}),
        }
        pixels = self.extract.model_dump(
            mode="json", exclude={"batch_size", "workers", "threads", "on_bad_image", "runtime", "engine"}
        )
        return FeatureStore(self.root, namespace_identity(backbone, self.info, pixels))

    def cached(self, splits: Sequence[Split]) -> bool:
        """Whether the features of every image of ``splits`` are cached; builds nothing to find out."""
        from tlx.extraction.features import all_cached

        if self.tuned is not None or (self.recalled is None and self._built is None):
            return False
        assert self.store is not None
        return all_cached(splits, self.store)

    def runner(self, device: str, batch: int | None = None) -> Runner:
        """What runs the backbone on ``device`` (``cpu``, ``cuda:0``…), for batches of ``batch`` images
        (default: ``extract.batch_size``, else the device's): ``extract.runtime``, or torch for a
        fine-tuned backbone."""
        from tlx.extraction.device import batch_size
        from tlx.extraction.runtimes import Runner, prepare

        if self.tuned is not None:
            return Runner.in_torch(self.module, self.info, device)
        batch = batch or batch_size(self.extract.batch_size, device)
        runtime = self.extract.runtime
        return prepare(runtime, device, self.root, self.info, lambda: self.module, self.extract.flip, batch)

    def decoded(self, paths: Sequence[Path]) -> tuple[np.ndarray | None, list[int], list[tuple[int, str]]]:
        """``paths`` decoded and preprocessed as this backbone takes them: the images stacked (None when
        none decodes), their positions in ``paths``, and ``(position, reason)`` of those that do not."""
        from tlx.extraction.pipeline import ImageFiles, collate
        from tlx.extraction.preprocess import eval_transform

        files = ImageFiles([(path, 0) for path in paths], eval_transform(self.info.data_config))
        return collate([files[i] for i in range(len(files))])

    def features(
        self,
        splits: Sequence[Split],
        *,
        engine: tuple[Entry, Any] | None = None,
        on_runner: Callable[[str, str], None] | None = None,
    ) -> list[Features]:
        """The features of every image of ``splits``: from the store, the rest through the backbone.

        ``engine``: the recipe's resolved ``extract.engine`` (``tlx run``); None, or ``local``, runs the
        backbone on this machine. ``on_runner(device, runtime)`` is told where it runs, once some image
        needs it. :attr:`runtime` then names what ran it.
        """
        from tlx.extraction.features import extract

        started: list[Runner] = []

        def start() -> tuple[Runner, Engine | None]:
            from tlx.extraction.device import resolve
            from tlx.extraction.runtimes import Runner

            if _elsewhere(engine):  # its workers build the backbone
                assert engine is not None
                started.append(Runner(None, self.extract.runtime, self.info))
                return started[0], engine[0].factory(engine[1], self.spec())
            device = resolve(self.device)
            started.append(self.runner(device))
            if on_runner is not None:
                on_runner(device, started[0].runtime)
            return started[0], None

        features = extract(splits, start, self.extract, store=self.store)
        self.runtime = started[0].runtime if started else None  # an engine names what its workers ran
        return features

    def ready(self, splits: Sequence[Split], *, engine: tuple[Entry, Any] | None = None) -> None:
        """Do now what :meth:`features` of ``splits`` with ONNX Runtime on this machine would do first:
        build, hash and export the backbone, and probe a fresh export on the first images. Those
        features then recall both and build nothing. Other runtimes build their model when they
        extract, an ``engine`` elsewhere on its workers: nothing to do ahead for them."""
        from tlx.extraction.device import batch_size, resolve
        from tlx.extraction.pipeline import ImageFiles, first_batch
        from tlx.extraction.preprocess import eval_transform
        from tlx.extraction.runtimes import choose

        device = resolve(self.device)
        if _elsewhere(engine) or choose(self.extract.runtime, device) != "onnxruntime" or self.cached(splits):
            return
        runner = self.runner(device)
        if runner.pending is not None:
            images = [(path, label) for split in splits for path, label in split.samples]
            files = ImageFiles(images, eval_transform(self.info.data_config))
            runner.check(first_batch(files, batch_size(self.extract.batch_size, device)))

    def spec(self) -> BackboneSpec:
        """How a worker on another machine gets this backbone (:meth:`BackboneSpec.frozen`)."""

        versions = environment(self.entry.plugin, self.plugin_version)
        return BackboneSpec(self.config, self.seed, self.extract, self.info.sha256, versions)


def _elsewhere(engine: tuple[Entry, Any] | None) -> bool:
    """Whether the resolved ``extract.engine`` runs the backbone on other machines, not this one."""
    return engine is not None and engine[0].name != "local"


@dataclass(frozen=True)
class BackboneSpec:
    """How a worker elsewhere gets the driver's frozen backbone, and what it must find to match it."""

    config: BackboneConfig
    #: a randomly initialised backbone depends on it
    seed: int
    #: the driver's extraction settings: flip, ``extract.runtime`` (what runs the backbone on the
    #: worker's device), the batch size
    extract: ExtractConfig
    #: :func:`tlx.extraction.weights.state_digest` of the weights the driver loaded
    sha256: str
    #: :func:`environment` on the driver
    versions: dict[str, str]

    def frozen(self, node: str) -> FrozenBackbone:
        """The backbone on this ``node`` (:class:`~tlx.extraction.frozen.FrozenBackbone`, its cache
        folder the node's own); a :class:`TlxError` naming the node when its versions or weights differ
        from the driver's."""
        from tlx.extraction.store import cache_dir

        entry, version = self.check(node)
        frozen = FrozenBackbone(entry, version, self.config, self.extract, self.seed, cache_dir())
        if frozen.info.sha256 != self.sha256:
            raise TlxError(
                f"backbone.weights: node {node} loaded other weights for {self.config.name} than the driver "
                f"(sha256 {frozen.info.sha256[:16]}…, the driver's {self.sha256[:16]}…); make the same "
                "weights reachable on every node"
            )
        return frozen

    def check(self, node: str) -> tuple[Entry, str]:
        """The backbone's registry entry and plugin version on this ``node``; a :class:`TlxError` naming
        the node when tlx, that plugin or the pixel libraries are not the driver's versions."""
        from tlx import plugins

        loaded = plugins.load()
        entry = loaded.backbones.get(self.config.name, "backbone.name")
        version = next((p.version for p in loaded.plugins if p.name == entry.plugin), "?")
        here = environment(entry.plugin, version)
        differ = [
            f"{name} {here.get(name, 'absent')} (driver {self.versions.get(name, 'absent')})"
            for name in sorted(here.keys() | self.versions.keys())
            if here.get(name) != self.versions.get(name)
        ]
        if differ:
            raise TlxError(
                f"engine: node {node} has {', '.join(differ)}; install the same tlx, plugins and "
                "libraries on every node"
            )
        return entry, version

    def batch_size(self, device: str) -> int:
        """Images per backbone call on ``device``: ``extract.batch_size``, else the device's default."""
        from tlx.extraction.device import batch_size

        return batch_size(self.extract.batch_size, device)


def environment(plugin: str, version: str) -> dict[str, str]:
    """The versions that decide a feature on this machine: tlx, the backbone's plugin and its
    ``version``, the pixel libraries."""
    from tlx.extraction.store import PIXEL_PACKAGES
    from tlx.version import __version__, versions

    return {"tlx": __version__, f"plugin {plugin}": version, **versions(PIXEL_PACKAGES)}
