"""tlx: transfer learning from a YAML recipe — dataset, pretrained backbone, trainable head.

Two public surfaces, both importable from here and nowhere else:

- the Python API: ``fit``, ``load``, ``sweep``, ``audit``, ``Run``, ``Classifier``, ``Audit``, ``Recipe``;
- the plugin API (``docs/plugins.md``): ``hookimpl`` and what the five hooks register or receive:
  ``Backbone`` and its factories, ``Split``/``Splits``, ``Tracker``, the engines' ``BackboneSpec``,
  ``FrozenBackbone``, ``Engine``, ``Job``, ``Batch``, weights helpers, ``TlxError`` and ``describe``.

Plugin packages import only these names (an import contract in CI keeps it so); the modules behind
them may move. Everything but ``hookimpl``, ``TlxError``, ``describe`` and ``__version__`` loads on
first use, so ``import tlx`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tlx.errors import TlxError, describe
from tlx.hookspecs import hookimpl
from tlx.version import __version__

if TYPE_CHECKING:
    from tlx.api import Classifier, Run, audit, fit, load
    from tlx.audits import Audit
    from tlx.components import validate_options
    from tlx.data import Split, Splits
    from tlx.extraction.engines import Engine, Job
    from tlx.extraction.frozen import BackboneSpec, FrozenBackbone
    from tlx.extraction.pipeline import Batch
    from tlx.extraction.weights import StateDict, load_into, read_state_dict
    from tlx.recipe import Recipe
    from tlx.registry import (
        Backbone,
        BackboneFactory,
        DatasetFactory,
        HeadFactory,
        Tracker,
        TrackerFactory,
        WeightFiles,
    )
    from tlx.sweeps import sweep


#: public name -> the module that defines it
_LAZY = {
    "fit": "tlx.api",
    "audit": "tlx.api",
    "Audit": "tlx.audits",
    "load": "tlx.api",
    "Run": "tlx.api",
    "Classifier": "tlx.api",
    "Recipe": "tlx.recipe",
    "Backbone": "tlx.registry",
    "BackboneSpec": "tlx.extraction.frozen",
    "Batch": "tlx.extraction.pipeline",
    "Engine": "tlx.extraction.engines",
    "Job": "tlx.extraction.engines",
    "FrozenBackbone": "tlx.extraction.frozen",
    "Split": "tlx.data",
    "Splits": "tlx.data",
    "BackboneFactory": "tlx.registry",
    "HeadFactory": "tlx.registry",
    "DatasetFactory": "tlx.registry",
    "WeightFiles": "tlx.registry",
    "Tracker": "tlx.registry",
    "TrackerFactory": "tlx.registry",
    "read_state_dict": "tlx.extraction.weights",
    "validate_options": "tlx.components",
    "StateDict": "tlx.extraction.weights",
    "load_into": "tlx.extraction.weights",
    "sweep": "tlx.sweeps",
}

__all__ = [
    "Audit",
    "Backbone",
    "BackboneFactory",
    "BackboneSpec",
    "Batch",
    "Classifier",
    "DatasetFactory",
    "Engine",
    "FrozenBackbone",
    "HeadFactory",
    "Job",
    "Recipe",
    "Run",
    "Split",
    "Splits",
    "StateDict",
    "TlxError",
    "Tracker",
    "TrackerFactory",
    "WeightFiles",
    "__version__",
    "audit",
    "describe",
    "fit",
    "hookimpl",
    "load",
    "load_into",
    "read_state_dict",
    "sweep",
    "validate_options",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tlx' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
