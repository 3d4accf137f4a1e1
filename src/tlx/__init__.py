"""tlx: transfer learning from a YAML recipe — dataset, pretrained backbone, trainable head."""

from importlib.metadata import PackageNotFoundError, version

from tlx.hookspecs import hookimpl

try:
    __version__ = version("tlx")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__", "hookimpl"]
