"""A Griffe extension for the API reference: tlx's docstrings cross-reference with Sphinx roles
(:func:`fit`), which Markdown does not know; each becomes the code span it names (`fit`)."""

from __future__ import annotations

import re
from typing import Any

import griffe

#: a Sphinx role and its target, ``~`` (show the last part only) dropped
ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring Griffe loads, before mkdocstrings renders it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"``\1``", obj.docstring.value)
