"""The built-in engine ``local``: the backbone runs on this machine (see :mod:`tlx.extraction.engines`)."""

from __future__ import annotations

from typing import Any

from tlx import hookimpl
from tlx.extraction.engines import LocalEngine
from tlx.extraction.frozen import BackboneSpec


def local_engine(options: Any, spec: BackboneSpec) -> LocalEngine:
    return LocalEngine()


@hookimpl
def register_engines(register):
    register("local", local_engine, description="this machine: decoding processes, its cores or a GPU")
