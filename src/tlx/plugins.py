"""Loading plugins: tlx's built-ins plus every entry point in the group ``tlx``.

A plugin that fails to import or to register is recorded with its error and reported, never fatal
to commands that do not need it. ``TLX_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry points (built-ins
stay), for debugging a broken installation.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from tlx import hookspecs
from tlx.errors import describe
from tlx.registry import Registry
from tlx.version import __version__

GROUP = "tlx"
HOOKS = tuple(name for name in dir(hookspecs) if name.startswith("register_"))
DISABLE_ENV = "TLX_DISABLE_PLUGIN_AUTOLOAD"
DEFAULT_PLUGINS = {
    "tlx.timm": "tlx.default_plugins.timm_backbones",
    "tlx.heads": "tlx.default_plugins.heads",
    "tlx.datasets": "tlx.default_plugins.datasets",
    "tlx.tensorboard": "tlx.default_plugins.tensorboard",
    "tlx.local": "tlx.default_plugins.local_engine",
}


@dataclass
class PluginInfo:
    """One installed plugin, as ``tlx list`` shows it."""

    name: str
    version: str
    error: str | None = None
    builtin: bool = False


@dataclass
class Plugins:
    """Everything the plugins registered."""

    backbones: Registry
    heads: Registry
    datasets: Registry
    trackers: Registry
    engines: Registry
    plugins: list[PluginInfo]

    def registries(self) -> tuple[Registry, ...]:
        return (self.backbones, self.heads, self.datasets, self.trackers, self.engines)


@functools.cache
def load() -> Plugins:
    """Import and register all plugins once per process."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    infos: dict[str, PluginInfo] = {}
    for name, module in DEFAULT_PLUGINS.items():
        pm.register(importlib.import_module(module), name=name)
        infos[name] = PluginInfo(name, __version__, builtin=True)
    if not os.environ.get(DISABLE_ENV):
        for ep in entry_points(group=GROUP):
            info = infos.setdefault(ep.name, PluginInfo(ep.name, ep.dist.version if ep.dist else "?"))
            try:
                pm.register(ep.load(), name=ep.name)
            except pluggy.PluginValidationError as exc:  # a hookimpl asking for arguments tlx lacks
                info.error = "; ".join(str(exc).splitlines())
            except Exception as exc:  # a broken plugin must not break tlx
                info.error = describe(exc)
    _unregister_unknown_hooks(pm, infos)

    plugins = Plugins(
        Registry("backbone"),
        Registry("head"),
        Registry("dataset"),
        Registry("tracker"),
        Registry("engine"),
        list(infos.values()),
    )
    hooks = (
        pm.hook.register_backbones,
        pm.hook.register_heads,
        pm.hook.register_datasets,
        pm.hook.register_trackers,
        pm.hook.register_engines,
    )
    for hook, registry in zip(hooks, plugins.registries()):
        for impl in hook.get_hookimpls():
            # each implementation gets the arguments it declares, so a hook can gain arguments later
            offered = {"register": registry.registrar(impl.plugin_name)}
            try:
                impl.function(**{name: offered[name] for name in impl.argnames})
            except Exception as exc:
                infos[impl.plugin_name].error = f"{hook.name} failed: {describe(exc)}"
    plugins.backbones.drop_shadowing()
    for info in infos.values():
        conflicts = [msg for r in plugins.registries() for msg in r.conflict_errors(info.name)]
        conflicts += plugins.backbones.shadowing_errors(info.name)
        if conflicts and not info.error:
            info.error = "; ".join(conflicts)
    broken = [info.name for info in infos.values() if info.error]
    for registry in plugins.registries():
        registry.broken_plugins = broken
    for info in infos.values():
        if info.error:
            print(f"tlx: warning: plugin {info.name!r}: {info.error}", file=sys.stderr)
    return plugins


def _unregister_unknown_hooks(pm: pluggy.PluginManager, infos: dict[str, PluginInfo]) -> None:
    """A plugin implementing a hook tlx does not have (``register_head``) is broken: record and drop it."""
    while True:
        try:
            pm.check_pending()
            return
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or "?"
            unknown = str(exc).split(" in plugin ")[0]
            infos[name].error = f"{unknown}; tlx's hooks are {', '.join(HOOKS)}"
            pm.unregister(exc.plugin)
