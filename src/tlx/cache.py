"""The persistent feature cache: each image's features, kept on disk across runs.

Layout under the cache folder (``--cache-dir``, ``TLX_CACHE_DIR``, or the user cache directory)::

    features/<namespace>/identity.json       what the namespace stands for (backbone, weights, pixels)
    features/<namespace>/<uuid>.safetensors  one chunk: features (n, D) float32, image keys in metadata
    backbones/<key>.json                     a backbone's weights SHA-256, feature size and data config

A *namespace* hashes everything that changes a feature except the image: the backbone recipe keys,
the SHA-256 of the weights actually loaded, the preprocessing config and the library versions that
decode and transform the pixels. An image's key hashes its absolute path, size and mtime, so a
changed or added image misses and only it is recomputed.

Chunks are written to a temporary file and renamed, and never changed afterwards: a run killed
mid-extraction keeps every finished chunk, and concurrent runs never see half a file (no lock is
needed; two runs computing the same image just store it twice, identically).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlx.data import DECODING
from tlx.files import write_atomic, write_json

if TYPE_CHECKING:
    import torch

    from tlx.backbone import Backbone
    from tlx.recipe import BackboneConfig
    from tlx.registry import Entry

ENV = "TLX_CACHE_DIR"
#: bumped whenever the stored layout or the meaning of a key changes
FORMAT = 1
#: images buffered before a chunk is written: what a killed run can lose at most
CHUNK_IMAGES = 256
#: temporary files older than this were left by a killed run and are removed
STALE_TMP_SECONDS = 3600
#: packages whose version can change the pixels or the features
PIXEL_PACKAGES = ("torch", "timm", "pillow")


def cache_dir(option: Path | None = None) -> Path:
    """``--cache-dir``, else ``$TLX_CACHE_DIR``, else the user cache directory."""
    if option is not None:
        return option
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    from platformdirs import user_cache_path

    return user_cache_path("tlx", appauthor=False)


def digest(data: Any) -> str:
    """SHA-256 of ``data`` as canonical JSON (tuples and lists alike)."""
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def image_key(path: Path) -> str:
    """The identity of one image file: absolute path, size and modification time."""
    st = path.stat()
    return digest([os.path.abspath(path), st.st_size, st.st_mtime_ns])[:32]


def _versions(packages: Iterable[str]) -> dict[str, str]:
    found = {}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def _warn(message: str) -> None:
    print(f"tlx: warning: cache: {message}", file=sys.stderr)


# --- backbones: the weights digest without building the model ---------------------------------------


@dataclass(frozen=True)
class BackboneInfo:
    """What the cache needs to know about a backbone, without its module."""

    sha256: str
    feature_dim: int
    data_config: dict[str, Any]
    weights: str

    @classmethod
    def of(cls, backbone: Backbone) -> BackboneInfo:
        from tlx.weights import state_digest

        config = json.loads(json.dumps(backbone.data_config))  # tuples as lists, as read back from JSON
        return cls(state_digest(backbone.module), backbone.feature_dim, config, backbone.weights)


def _backbone_record(root: Path, entry: Entry, config: BackboneConfig, plugin_version: str) -> Path | None:
    """Where the backbone's info is remembered, or None when its weights files are not known.

    The key covers the plugin and its version, the recipe's backbone keys and the path, size,
    mtime, ctime and inode of every file the weights come from: a changed file changes the key.
    """
    if entry.weight_files is None:
        return None
    files = entry.weight_files(config.name, pretrained=config.pretrained, weights=config.weights)
    if files is None:
        return None
    stats = []
    for file in files:
        try:
            st = Path(file).stat()
        except OSError:
            return None
        stats.append([os.path.abspath(file), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    key = {
        "format": FORMAT,
        "plugin": [entry.plugin, plugin_version],
        "backbone": config.model_dump(mode="json"),
        "files": stats,
        "versions": _versions(("tlx", *PIXEL_PACKAGES)),
    }
    return root / "backbones" / f"{digest(key)[:32]}.json"


def recall_backbone(
    root: Path, entry: Entry, config: BackboneConfig, plugin_version: str
) -> BackboneInfo | None:
    """The remembered info of this backbone, if its weights files are unchanged since it was built."""
    record = _backbone_record(root, entry, config, plugin_version)
    if record is None or not record.is_file():
        return None
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        return BackboneInfo(**data)
    except (OSError, ValueError, TypeError):
        return None


def remember_backbone(
    root: Path, entry: Entry, config: BackboneConfig, plugin_version: str, info: BackboneInfo
) -> None:
    record = _backbone_record(root, entry, config, plugin_version)
    if record is None:
        return
    try:
        write_json(record, asdict(info))
    except OSError as exc:
        _warn(f"cannot write {record} ({exc.strerror or exc})")


# --- features -----------------------------------------------------------------------------------------


def namespace_identity(
    backbone: dict[str, Any], info: BackboneInfo, pixels: dict[str, Any]
) -> dict[str, Any]:
    """Everything but the image that decides a feature; ``pixels`` holds other preprocessing options."""
    return {
        "format": FORMAT,
        "decoding": DECODING,
        "backbone": backbone,
        "weights_sha256": info.sha256,
        "feature_dim": info.feature_dim,
        "data_config": info.data_config,
        "pixels": pixels,
        "versions": _versions(PIXEL_PACKAGES),
    }


class FeatureStore:
    """The cached features of one namespace: look up images by key, add chunks of new ones."""

    def __init__(self, root: Path, identity: dict[str, Any]) -> None:
        self.folder = root / "features" / digest(identity)[:32]
        self.identity = identity
        #: image key -> (chunk file, row), or (None, reason) for an image that could not be decoded
        self._index: dict[str, tuple[Path | None, int | str]] | None = None
        self._writable = True

    def _load_index(self) -> dict[str, tuple[Path | None, int | str]]:
        if self._index is not None:
            return self._index
        from safetensors import safe_open

        index: dict[str, tuple[Path | None, int | str]] = {}
        chunks = sorted(self.folder.glob("*.safetensors")) if self.folder.is_dir() else []
        for chunk in chunks:
            try:
                with safe_open(str(chunk), framework="pt") as f:
                    meta = f.metadata() or {}
                keys = json.loads(meta["keys"])
                failed = json.loads(meta.get("failed", "{}"))
            except FileNotFoundError:  # removed by a concurrent `tlx cache clear`
                continue
            except Exception as exc:  # damaged from outside: its images are recomputed
                _warn(f"ignoring unreadable chunk {chunk} ({type(exc).__name__})")
                continue
            index.update({key: (chunk, row) for row, key in enumerate(keys)})
            index.update({key: (None, reason) for key, reason in failed.items()})
        self._index = index
        return index

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys that have neither features nor a recorded decoding failure."""
        index = self._load_index()
        return [key for key in keys if key not in index]

    def get(self, keys: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Features of the cached ``keys`` (by key), and the reasons of those that failed to decode."""
        from safetensors.torch import load_file

        index = self._load_index()
        by_chunk: dict[Path, list[tuple[str, int]]] = {}
        failed: dict[str, str] = {}
        for key in keys:
            chunk, where = index.get(key, (None, None))
            if chunk is not None:
                by_chunk.setdefault(chunk, []).append((key, int(where)))
            elif where is not None:
                failed[key] = str(where)
        found: dict[str, torch.Tensor] = {}
        for chunk, rows in by_chunk.items():
            try:
                table = load_file(str(chunk))["features"]
            except Exception as exc:  # removed or damaged since the index was read
                _warn(f"ignoring unreadable chunk {chunk} ({type(exc).__name__})")
                continue
            found.update({key: table[row] for key, row in rows})
        return found, failed

    def put(self, keys: list[str], features: torch.Tensor, failed: dict[str, str]) -> None:
        """Write one chunk atomically; a cache that cannot be written is warned about, never fatal."""
        if not self._writable or not (keys or failed):
            return
        from safetensors.torch import save_file

        self._cleanup_tmp()
        meta = {"keys": json.dumps(keys), "failed": json.dumps(failed)}
        tensors = {"features": features.detach().float().contiguous()}
        try:
            identity = self.folder / "identity.json"
            if not identity.is_file():
                write_json(identity, self.identity)
            chunk = self.folder / f"{uuid.uuid4().hex}.safetensors"
            write_atomic(chunk, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        except OSError as exc:
            self._writable = False
            _warn(f"cannot write to {self.folder} ({exc.strerror or exc}); features are not cached")
            return
        if self._index is not None:
            self._index.update({key: (chunk, row) for row, key in enumerate(keys)})
            self._index.update({key: (None, reason) for key, reason in failed.items()})

    def _cleanup_tmp(self) -> None:
        if not self.folder.is_dir():
            return
        now = time.time()
        for tmp in self.folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                    tmp.unlink()


# --- tlx cache info / clear ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NamespaceSummary:
    folder: Path
    backbone: str
    entries: int
    chunks: int
    bytes: int


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def summary(root: Path) -> tuple[list[NamespaceSummary], int]:
    """One summary per namespace (unique images cached), and the total size in bytes of the cache."""
    from safetensors import safe_open

    namespaces = []
    features = root / "features"
    for folder in sorted(features.iterdir()) if features.is_dir() else []:
        if not folder.is_dir():
            continue
        keys: set[str] = set()
        chunks = sorted(folder.glob("*.safetensors"))
        for chunk in chunks:
            with contextlib.suppress(Exception), safe_open(str(chunk), framework="pt") as f:
                meta = f.metadata() or {}
                keys.update(json.loads(meta["keys"]), json.loads(meta.get("failed", "{}")))
        try:
            name = json.loads((folder / "identity.json").read_text())["backbone"]["name"]
        except (OSError, ValueError, KeyError, TypeError):
            name = "?"
        namespaces.append(NamespaceSummary(folder, name, len(keys), len(chunks), _size(folder)))
    return namespaces, _size(features) + _size(root / "backbones")


def clear(root: Path) -> int:
    """Remove what tlx stored under ``root`` (and ``root`` if that leaves it empty); returns bytes freed.

    Only tlx's own folders are removed, so a mistaken ``--cache-dir`` never deletes other files.
    """
    freed = 0
    for name in ("features", "backbones"):
        folder = root / name
        freed += _size(folder)
        shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        root.rmdir()
    return freed
