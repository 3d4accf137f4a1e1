"""Writing files so that a reader never sees half of one: a temporary file beside the target, renamed."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: the mode a plain ``open()`` would give a new file; writers that create 0600 files are widened to it
FILE_MODE = 0o666 & ~_umask()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path``.

    A process killed while writing leaves at most a ``.<uuid>.tmp`` file, never a truncated ``path``;
    the file gets the umask's mode, whatever mode ``write`` created it with.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def to_json(data: Any) -> str:
    """Strict JSON: a NaN or infinity is an error (``ValueError``), never an invalid file."""
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as strict JSON (see :func:`to_json`), atomically."""
    text = to_json(data)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes as hex, read in blocks (it may be large); OSError if unreadable."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):  # hashlib.file_digest is Python 3.11+
            digest.update(block)
    return digest.hexdigest()
