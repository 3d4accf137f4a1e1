"""What tlx prints outside a run's :class:`~tlx.report.Console`: progress bars and cache warnings.

A quiet caller (``tlx.fit(quiet=True)``, :class:`tlx.api.Classifier`) silences both within its own
context (:func:`collected`): bars are not drawn, and warnings go to the caller's list, not stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

#: where warnings go while a quiet caller runs; None: to stderr, with progress bars drawn
_sink: ContextVar[list[str] | None] = ContextVar("tlx_notices", default=None)


def bar(iterable: Iterable[Any] | None = None, **options: Any) -> tqdm:
    """A tqdm progress bar (a notebook widget in Jupyter, :mod:`tqdm.auto`), not drawn for a quiet caller."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=_sink.get() is not None, **options)


def warn(text: str) -> None:
    """``tlx: warning: TEXT`` on stderr, or ``text`` appended to a quiet caller's list."""
    sink = _sink.get()
    if sink is None:
        print(f"tlx: warning: {text}", file=sys.stderr)
    else:
        sink.append(text)


@contextmanager
def collected(sink: list[str]) -> Iterator[None]:
    """Within the block, draw no progress bar and append warnings to ``sink``."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)
