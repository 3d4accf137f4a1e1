"""Hook specifications: how plugins register backbones, heads, datasets, experiment trackers and engines.

Each hook receives a ``register`` callable (see :class:`tlx.registry.Registry.register`):

    @tlx.hookimpl
    def register_heads(register):
        register("cosine", CosineHead, options=CosineOptions)
"""

import pluggy

hookspec = pluggy.HookspecMarker("tlx")
hookimpl = pluggy.HookimplMarker("tlx")


@hookspec
def register_backbones(register):
    """Register backbone factories: ``factory(name, *, pretrained, weights) -> tlx.Backbone``.

    ``register(name, factory, weight_files=fn)`` with ``fn(name, *, pretrained, weights)`` returning
    the files the weights are loaded from (None: not known) lets a run whose features are all cached
    skip building the backbone, and tells ``tlx list backbones --pretrained`` whether the weights are
    on this machine (``offline=fn(name)`` answers instead where that is cheaper). A family
    (``matches=``) may give ``search=fn(pattern, *, pretrained)`` for the names it lists.
    """


@hookspec
def register_heads(register):
    """Register head factories: ``factory(in_features, num_classes, options) -> torch.nn.Module``."""


@hookspec
def register_datasets(register):
    """Register dataset factories: ``factory(options) -> tlx.data.Splits``."""


@hookspec
def register_trackers(register):
    """Register experiment trackers: ``factory(options, run_dir) -> tlx.Tracker`` (its methods: there).

    A recipe's ``track: [{kind: NAME, ...options}]`` names them; ``options=Model`` validates the options.
    """


@hookspec
def register_engines(register):
    """Register extraction engines: ``factory(options, spec) -> tlx.Engine``, ``spec`` a
    :class:`tlx.BackboneSpec` (how a worker elsewhere gets the driver's frozen backbone).

    A recipe's ``extract.engine: {kind: NAME, ...options}`` names one; ``options=Model`` validates the
    options. The built-in ``local`` runs on this machine (see :mod:`tlx.extraction.engines`).
    """
