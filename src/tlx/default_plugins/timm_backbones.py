"""Every timm model as a backbone, pretrained weights from the Hugging Face hub or its local cache."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlparse

from tlx import hookimpl
from tlx.errors import TlxError, describe
from tlx.registry import Backbone

HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
LOCATION_KEYS = ("hf_hub_id", "hf_hub_filename", "url", "file")


@hookimpl
def register_backbones(register):
    register(
        "timm",
        create_timm_backbone,
        description="any timm model name, with a pretrained tag if wanted (resnet18.tv_in1k)",
        matches=_is_timm_model,
        catalog=_architectures,
        search=_search,
        weight_files=_weight_files,
        offline=_weights_here,
    )


def _is_timm_model(name: str) -> bool:
    """Whether timm has the architecture ``name`` (a pretrained tag after a dot is allowed)."""
    return name.split(".", 1)[0] in _architectures()


def _architectures() -> list[str]:
    """timm's model architectures (``timm.list_models()``)."""
    return _remembered("architectures", "list_models")


def _pretrained_names() -> list[str]:
    """timm's pretrained names with their tags (``timm.list_pretrained()``)."""
    return _remembered("pretrained", "list_pretrained")


def _remembered(kind: str, listing: str) -> list[str]:
    """timm's ``listing()`` as recorded for this timm version, asked of timm (and recorded) when not."""
    record = _record(kind)
    names = _read(record)
    if names is None:
        import timm

        names = getattr(timm, listing)()
        _write(record, names)
    return names


def _search(pattern: str, *, pretrained: bool) -> list[str]:
    """``timm.list_models(pattern, pretrained=...)``, from the records of its names: with
    ``pretrained``, a pattern without a tag matches each architecture's tags, as timm's does."""
    if not pretrained:
        return fnmatch.filter(_architectures(), pattern)
    patterns = [pattern] if "." in pattern else [f"{pattern}.*", pattern]
    return [name for name in _pretrained_names() if any(fnmatch.fnmatch(name, p) for p in patterns)]


def _weights_here(name: str) -> bool:
    """Whether ``name``'s pretrained weights are on this machine: a file, or the hub or torch hub cache.

    ``_weight_files`` answers this too, but remembers each name on disk for the next run's start-up;
    a listing asks for hundreds of names, so it asks timm directly.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return False
    if cfg.file:
        return Path(cfg.file).is_file()
    return _cached_file(cfg) is not None


def _weight_files(name: str, *, pretrained: bool, weights: Path | None) -> list[Path] | None:
    """The local file the weights come from; None if they would be downloaded or are random."""
    if weights is not None:
        return [weights]
    if not pretrained:
        return None
    cfg = _weights_location(name)
    if cfg is None:
        return None
    cached = cfg.file or _cached_file(cfg)
    return [Path(cached)] if cached else None


def _weights_location(name: str) -> SimpleNamespace | None:
    """Where timm's pretrained config for ``name`` finds its weights (hub id and file, url, file)."""
    record = _record("weights")
    known = _read(record) or {}
    if name not in known:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        known[name] = cfg and {k: getattr(cfg, k) and str(getattr(cfg, k)) for k in LOCATION_KEYS}
        _write(record, known)
    return SimpleNamespace(**known[name]) if known[name] else None


# Importing timm takes seconds: what a run whose features are all cached needs from it (is a name
# a timm model, where are its weights) is remembered per timm version in tlx's default cache folder
# ($TLX_CACHE_DIR, else the user cache; a plugin does not see --cache-dir). Unwritable: timm is asked
# every time, which is only slower.


def _record(kind: str) -> Path:
    from importlib.metadata import version

    from tlx.extraction.store import cache_dir

    return cache_dir() / "timm" / f"{kind}-{version('timm')}.json"


def _read(record: Path) -> Any:
    try:
        return json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write(record: Path, data: Any) -> None:
    from tlx.files import write_json

    with contextlib.suppress(OSError):  # not remembered: the next run asks timm again
        write_json(record, data)


def create_timm_backbone(name: str, *, pretrained: bool, weights: Path | None) -> Backbone:
    """A timm model without its classifier (``num_classes=0``): its output is the pooled features."""
    import timm

    from tlx.extraction.weights import load_into, read_state_dict

    if weights is not None:
        model = timm.create_model(name, pretrained=False, num_classes=0)
        classifier = model.pretrained_cfg.get("classifier") or "fc"
        prefixes = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
        load_into(model, read_state_dict(weights), source=str(weights), arch=name, drop_prefixes=prefixes)
        source = f"file {weights}"
    elif pretrained:
        cached, where = _pretrained_source(name)
        overlay = {"file": cached} if cached else None
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
        except Exception as exc:  # hub and network errors come in many types
            raise TlxError(
                f"backbone.pretrained: could not load pretrained weights for {name} from {where} "
                f"({describe(exc)}); "
                "pass --set backbone.weights=FILE"
            ) from None
        source = f"pretrained {where}" + (" (local cache)" if cached else "")
    else:
        model = timm.create_model(name, pretrained=False, num_classes=0)
        source = "random initialisation (backbone.pretrained: false)"
    feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    data_config = timm.data.resolve_data_config({}, model=model)
    return Backbone(model, feature_dim, data_config, source)


def _pretrained_source(name: str) -> tuple[str | None, str]:
    """(cached file or None, description) for ``name``'s pretrained weights.

    Raises at once, without timm's long retries, when they are not cached and cannot be downloaded.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise TlxError(
            f"backbone.name: timm has no pretrained weights for {name!r}; pick a tagged name "
            "(`timm.list_models(pretrained=True)`), pass --set backbone.weights=FILE, "
            "or --set backbone.pretrained=false for random weights"
        )
    if cfg.file:
        return str(cfg.file), f"file {cfg.file}"
    cached = _cached_file(cfg)
    where = f"hub {cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
    if cached:
        return cached, where
    host = (
        urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
        if cfg.hf_hub_id
        else urlparse(cfg.url).hostname
    )
    if _offline() or not _reachable(host or ""):
        raise TlxError(
            f"backbone.pretrained: the weights of {name} ({where}) are not in the local cache and "
            f"{host} cannot be reached; pass --set backbone.weights=FILE (a .pth or .safetensors "
            "state dict) or --set backbone.pretrained=false for random weights"
        )
    return None, where


def _cached_file(cfg: Any) -> str | None:
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in (cfg.hf_hub_filename, *HUB_FILES):
            if filename:
                found = try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(found, str):
                    return found
    if cfg.url:
        import torch.hub

        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if path.is_file():
            return str(path)
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _reachable(host: str, timeout: float = 2.0) -> bool:
    """A short TCP probe, so an offline machine gets its answer at once, not after retries."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
