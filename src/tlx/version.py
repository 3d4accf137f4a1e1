"""The installed version of tlx, and of the packages whose version can change a number."""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version

#: tlx's distribution name on PyPI (``tlx`` there is an unrelated package); the import and command are ``tlx``
DISTRIBUTION = "tlx-vision"

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"


def versions(packages: Iterable[str]) -> dict[str, str]:
    """The installed version of each package (``absent`` when it is not installed)."""
    found = {}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found
