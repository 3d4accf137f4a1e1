"""The persistent feature cache: each image's features, kept on disk across runs.

Layout under the cache folder (``--cache-dir``, ``TLX_CACHE_DIR``, or the user cache directory)::

    CACHEDIR.TAG                             marks the folder as tlx's cache (bford.info/cachedir)
    features/<namespace>/identity.json       what the namespace stands for (backbone, weights, pixels)
    features/<namespace>/<uuid>.safetensors  one chunk: features (n, D) float32, image keys in metadata
    backbones/<key>.json                     a backbone's weights SHA-256, feature size and data config
    onnx/<key>.onnx, onnx/<key>.json         a backbone exported for ONNX Runtime, and its record
    timm/<kind>-<version>.json               what the timm plugin remembers (names, weights files)

A *namespace* hashes everything that changes a feature except the image: the backbone recipe keys,
the SHA-256 of the weights actually loaded, the preprocessing config and the library versions that
decode and transform the pixels. An image's key hashes its absolute path, size, mtime, ctime and
inode, so a changed or added image misses and only it is recomputed.

Each chunk carries the SHA-256 of its keys and feature bytes; a chunk that does not match, holds a
non-finite value or cannot be read is deleted and its images are recomputed.

Chunks are written to a temporary file and renamed, and never changed afterwards: a run killed
mid-extraction keeps every finished chunk, and concurrent runs never see half a file (no lock is
needed; two runs computing the same image just store it twice, identically).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlx import notices
from tlx.data import DECODING
from tlx.errors import TlxError, describe
from tlx.files import write_atomic, write_json
from tlx.version import __version__, versions

if TYPE_CHECKING:
    import numpy

    from tlx.recipe import BackboneConfig
    from tlx.registry import Backbone, Entry

ENV = "TLX_CACHE_DIR"
#: bumped whenever the stored layout or the meaning of a key changes
FORMAT = 2
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
    """The identity of one image file: absolute path, size, mtime, ctime and inode.

    ctime changes with any write or ``touch`` (even one that restores the mtime) and the inode with a
    file replaced by another, so an image rewritten in place with its old size and mtime still misses.
    """
    st = path.stat()
    return digest([os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])[:32]


def _warn(message: str) -> None:
    notices.warn(f"cache: {message}")


# --- backbones: the weights digest without building the model ---------------------------------------


@dataclass(frozen=True)
class BackboneInfo:
    """What the cache needs to know about a backbone, without its module."""

    sha256: str
    feature_dim: int
    data_config: dict[str, Any]
    weights: str

    @classmethod
    def of(cls, backbone: Backbone, sha256: str | None = None) -> BackboneInfo:
        """``backbone``'s info; ``sha256``: its weights' digest when already known (else computed)."""
        from tlx.extraction.weights import state_digest

        config = json.loads(json.dumps(backbone.data_config))  # tuples as lists, as read back from JSON
        return cls(sha256 or state_digest(backbone.module), backbone.feature_dim, config, backbone.weights)


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
        "versions": {"tlx": __version__, **versions(PIXEL_PACKAGES)},
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
        tag(root)
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
        "versions": versions(PIXEL_PACKAGES),
    }


#: where a key's cached result lives: its chunk, and its row there or the reason it failed to decode
Location = tuple[Path, int | str]


class FeatureStore:
    """The cached features of one namespace: look up images by key, add chunks of new ones.

    A chunk is read whole and verified (see :func:`_read_chunk`) before any of its images counts as
    cached, so a damaged or vanished chunk is a set of misses, never wrong features or a traceback.
    """

    def __init__(self, root: Path, identity: dict[str, Any]) -> None:
        self.root = root
        self.folder = root / "features" / digest(identity)[:32]
        self.identity = identity
        #: image key -> where its features (or decoding failure) are, from the chunks' metadata
        self._index: dict[str, Location] | None = None
        #: verified chunks not yet served by :meth:`get`
        self._tables: dict[Path, numpy.ndarray] = {}
        self._writable = True

    def _load_index(self) -> dict[str, Location]:
        if self._index is not None:
            return self._index
        from safetensors import safe_open

        index: dict[str, Location] = {}
        damaged: list[tuple[Path, str]] = []
        chunks = sorted(self.folder.glob("*.safetensors")) if self.folder.is_dir() else []
        for chunk in chunks:
            try:
                with safe_open(str(chunk), framework="np") as f:
                    meta = f.metadata() or {}
                keys = json.loads(meta["keys"])
                failed = json.loads(meta.get("failed", "{}"))
            except FileNotFoundError:  # removed by a concurrent `tlx cache clear`
                continue
            except Exception as exc:  # damaged from outside: safetensors and json raise many types
                damaged.append((chunk, f"unreadable: {type(exc).__name__}"))
                continue
            index.update({key: (chunk, row) for row, key in enumerate(keys)})
            index.update({key: (chunk, str(reason)) for key, reason in failed.items()})
        self._index = index
        _discard(damaged)
        return index

    def _verified(self, keys: Iterable[str]) -> dict[str, Location]:
        """The index, once every chunk that holds one of ``keys`` is read and verified.

        A chunk that vanished since the index was read is dropped quietly, a damaged one is deleted
        (see :func:`_discard`).
        """
        index = self._load_index()
        wanted = {index[key][0] for key in keys if key in index} - self._tables.keys()
        damaged: list[tuple[Path, str]] = []
        for chunk in sorted(wanted):
            table, problem = _read_chunk(chunk)
            if table is not None:
                self._tables[chunk] = table
                continue
            for key in [key for key, (where, _) in index.items() if where == chunk]:
                del index[key]
            if problem is not None:
                damaged.append((chunk, problem))
        _discard(damaged)
        return index

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys that have neither verified features nor a recorded decoding failure."""
        keys = list(keys)
        index = self._verified(keys)
        return [key for key in keys if key not in index]

    def get(self, keys: list[str]) -> tuple[dict[str, numpy.ndarray], dict[str, str]]:
        """Verified features of the cached ``keys``, and the reasons of those that failed to decode."""
        index = self._verified(keys)
        found: dict[str, numpy.ndarray] = {}
        failed: dict[str, str] = {}
        for key in keys:
            if key not in index:
                continue
            chunk, where = index[key]
            if isinstance(where, str):
                failed[key] = where
            else:
                found[key] = self._tables[chunk][where]
        self._tables.clear()  # served: the rows hold what is still needed
        return found, failed

    def put(self, keys: list[str], features: numpy.ndarray, failed: dict[str, str]) -> None:
        """Write one chunk atomically; a cache that cannot be written is warned about, never fatal."""
        if not self._writable or not (keys or failed):
            return
        import numpy
        from safetensors.numpy import save_file

        self._cleanup_tmp()
        table = numpy.ascontiguousarray(features, dtype=numpy.float32)
        meta = {"keys": json.dumps(keys), "failed": json.dumps(failed)}
        meta["sha256"] = _chunk_digest(meta["keys"], meta["failed"], table)
        try:
            tag(self.root)
            identity = self.folder / "identity.json"
            if not identity.is_file():
                write_json(identity, self.identity)
            chunk = self.folder / f"{uuid.uuid4().hex}.safetensors"
            write_atomic(chunk, lambda tmp: save_file({"features": table}, str(tmp), metadata=meta))
        except OSError as exc:
            self._writable = False
            _warn(f"cannot write to {self.folder} ({exc.strerror or exc}); features are not cached")
            return
        if self._index is not None:
            self._index.update({key: (chunk, row) for row, key in enumerate(keys)})
            self._index.update({key: (chunk, reason) for key, reason in failed.items()})

    def _cleanup_tmp(self) -> None:
        if not self.folder.is_dir():
            return
        now = time.time()
        for tmp in self.folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                    tmp.unlink()


def _discard(damaged: list[tuple[Path, str]]) -> None:
    """Delete damaged chunks (so each is reported once, not at every run), with one warning line."""
    for chunk, _ in damaged:
        with contextlib.suppress(OSError):
            chunk.unlink()
    if damaged:
        first, problem = damaged[0]
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        _warn(f"deleted damaged chunk {first} ({problem}){more}; their images are recomputed")


def _chunk_digest(keys: str, failed: str, table: numpy.ndarray) -> str:
    """SHA-256 of a chunk's keys, decoding failures and feature bytes (what a flipped bit changes)."""
    h = hashlib.sha256()
    for part in (keys, failed):
        h.update(part.encode())
        h.update(b"\0")
    h.update(table.tobytes())
    return h.hexdigest()


def _read_chunk(chunk: Path) -> tuple[numpy.ndarray | None, str | None]:
    """A chunk's features once verified, else None and why (None too when the file is gone).

    Verified: the file parses, its checksum matches, its rows match its keys and every value is finite.
    """
    import numpy
    from safetensors import safe_open

    try:
        with safe_open(str(chunk), framework="np") as f:
            meta = f.metadata() or {}
            table = f.get_tensor("features")
        keys = json.loads(meta["keys"])
    except FileNotFoundError:
        return None, None
    except Exception as exc:  # damaged from outside: safetensors and json raise many types
        return None, f"unreadable: {type(exc).__name__}"
    if "sha256" not in meta:
        return None, "no checksum"
    if table.dtype != numpy.float32 or table.ndim != 2 or (keys and table.shape[0] != len(keys)):
        return None, f"features of shape {tuple(table.shape)} for {len(keys)} images"
    if _chunk_digest(meta["keys"], meta.get("failed", "{}"), table) != meta["sha256"]:
        return None, "checksum mismatch"
    if not numpy.isfinite(table).all():
        return None, "non-finite features"
    return table, None


# --- the cache folder: its tag, tlx cache info / clear -------------------------------------------------

TAG = "CACHEDIR.TAG"
#: a Cache Directory Tagging Specification tag (bford.info/cachedir): backup tools skip the folder
TAG_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by tlx (its feature cache).\n"
    "# For information about cache directory tags, see: https://bford.info/cachedir/\n"
)
_HEX = "[0-9a-f]{32}"
_TMP = rf"\.{_HEX}\.tmp"
#: every file tlx writes in its cache, relative to the cache folder (a temporary one included)
OWN_FILE = re.compile(
    rf"{_TMP}"
    rf"|features/{_HEX}/(identity\.json|{_HEX}\.safetensors|{_TMP})"
    rf"|backbones/({_HEX}\.json|{_TMP})"
    rf"|onnx/({_HEX}\.(onnx|json)|{_TMP})"
    rf"|timm/((architectures|weights|pretrained)-[\w.+-]+\.json|{_TMP})"
)
OWN_FOLDERS = ("features", "backbones", "onnx", "timm")


def tag(root: Path) -> None:
    """Mark ``root`` as tlx's cache, unless it is marked or holds other files than tlx's.

    A folder that already holds other files is never tagged: backup tools would skip those files.
    """
    if (root / TAG).is_file():
        return
    if root.is_dir() and any(
        p.name not in (TAG, *OWN_FOLDERS) and not re.fullmatch(_TMP, p.name) for p in root.iterdir()
    ):
        return
    write_atomic(root / TAG, lambda tmp: tmp.write_text(TAG_TEXT, encoding="utf-8"))


def _tagged(root: Path) -> bool:
    """Whether ``root`` holds the cache directory tag tlx writes."""
    try:
        return (root / TAG).read_text(encoding="utf-8", errors="replace") == TAG_TEXT
    except OSError:
        return False


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
            with contextlib.suppress(Exception), safe_open(str(chunk), framework="np") as f:
                meta = f.metadata() or {}
                keys.update(json.loads(meta["keys"]), json.loads(meta.get("failed", "{}")))
        try:
            name = json.loads((folder / "identity.json").read_text())["backbone"]["name"]
        except (OSError, ValueError, KeyError, TypeError):
            name = "?"
        namespaces.append(NamespaceSummary(folder, name, len(keys), len(chunks), _size(folder)))
    return namespaces, sum(_size(root / name) for name in OWN_FOLDERS)


@dataclass(frozen=True)
class Cleared:
    """What :func:`clear` did: bytes and files really removed, and the files it could not remove."""

    freed: int
    removed: int
    failed: list[tuple[Path, str]]


def own_files(root: Path) -> list[Path]:
    """The files under ``root`` that tlx wrote (by name and place), the tag excluded."""
    found = [p for p in root.iterdir() if re.fullmatch(_TMP, p.name)]
    for name in OWN_FOLDERS:
        for path in (root / name).rglob("*") if (root / name).is_dir() else []:
            if OWN_FILE.fullmatch(path.relative_to(root).as_posix()):
                found.append(path)
    return sorted(found)


def clear(root: Path) -> Cleared:
    """Remove the files tlx wrote under ``root``, then the folders that leaves empty.

    Only files with tlx's own names in tlx's own places are removed, so another program's or the
    user's files survive even inside ``features/``. A folder with other contents that is neither
    tagged (:func:`tag`) nor holds any such file is refused: it is not a tlx cache. A cache from
    before the tag is recognised by its files alone.
    """
    if not root.exists():
        return Cleared(0, 0, [])
    if not root.is_dir():
        raise TlxError(f"cache: {root} is not a folder; pass the cache folder as --cache-dir")
    try:
        files = own_files(root)
    except OSError as exc:
        raise TlxError(f"cache: cannot read {root} ({exc.strerror or exc}); check its permissions") from None
    tagged = _tagged(root)
    if not files and not tagged and any(root.iterdir()):
        raise TlxError(
            f"cache: {root} is not a tlx cache (no {TAG} written by tlx, no tlx cache files); "
            "nothing was removed: check --cache-dir or $TLX_CACHE_DIR"
        )
    freed, removed, failed = 0, 0, []
    for file in files:
        try:
            size = file.stat().st_size
            file.unlink()
        except FileNotFoundError:  # removed meanwhile by another `tlx cache clear`
            continue
        except OSError as exc:
            failed.append((file, exc.strerror or describe(exc)))
            continue
        freed += size
        removed += 1
    folders = [p for name in OWN_FOLDERS for p in (root / name).glob("*") if p.is_dir()]
    for folder in [*folders, *(root / name for name in OWN_FOLDERS)]:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty: a folder that still holds files keeps them
    if tagged and not failed:
        with contextlib.suppress(OSError):
            (root / TAG).unlink()
    if tagged or removed:
        with contextlib.suppress(OSError):
            root.rmdir()  # only if empty: the user's files keep their folder
    return Cleared(freed, removed, failed)
