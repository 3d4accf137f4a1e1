"""tlx: transfer learning from a YAML recipe — dataset, pretrained backbone, trainable head.

The Python API (``fit``, ``load``, ``Run``, ``Classifier``, ``Recipe``) and the plugin API are
importable from here; everything but ``hookimpl`` and ``TlxError`` loads on first use, so
``import tlx`` does not import torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from tlx.errors import TlxError
from tlx.hookspecs import hookimpl

if TYPE_CHECKING:
    from tlx.api import Classifier, Run, fit, load
    from tlx.backbone import Backbone
    from tlx.components import validate_options
    from tlx.data import Split, Splits
    from tlx.recipe import Recipe
    from tlx.registry import (
        BackboneFactory,
        DatasetFactory,
        HeadFactory,
        Tracker,
        TrackerFactory,
        WeightFiles,
    )
    from tlx.sweeps import sweep
    from tlx.weights import StateDict, load_into, read_state_dict

try:
    __version__ = version("tlx")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

#: public name -> the module that defines it
_LAZY = {
    "fit": "tlx.api",
    "load": "tlx.api",
    "Run": "tlx.api",
    "Classifier": "tlx.api",
    "Recipe": "tlx.recipe",
    "Backbone": "tlx.backbone",
    "Split": "tlx.data",
    "Splits": "tlx.data",
    "BackboneFactory": "tlx.registry",
    "HeadFactory": "tlx.registry",
    "DatasetFactory": "tlx.registry",
    "WeightFiles": "tlx.registry",
    "Tracker": "tlx.registry",
    "TrackerFactory": "tlx.registry",
    "read_state_dict": "tlx.weights",
    "validate_options": "tlx.components",
    "StateDict": "tlx.weights",
    "load_into": "tlx.weights",
    "sweep": "tlx.sweeps",
}

__all__ = [
    "Backbone",
    "BackboneFactory",
    "Classifier",
    "DatasetFactory",
    "HeadFactory",
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
