"""Reading weight files safely and loading them into a model, with errors that name the key."""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tlx.errors import TlxError, describe

StateDict = dict[str, torch.Tensor]


def read_state_dict(path: Path, key: str = "backbone.weights") -> StateDict:
    """Read a ``.safetensors`` or ``.pth`` state dict; pickles that would run code are refused."""
    if not path.is_file():
        raise TlxError(f"{key}: weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0]
        raise TlxError(
            f"{key}: refused to load {path}: it holds Python objects, not only tensors ({reason}); "
            "save a plain state dict with torch.save(model.state_dict(), ...) or use .safetensors"
        ) from None
    except Exception as exc:  # torch and safetensors raise many kinds for damaged files
        raise TlxError(
            f"{key}: cannot read {path}: truncated or not a weights file ({describe(exc)})"
        ) from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise TlxError(f"{key}: {path} is not a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in data.items()}


def mismatch(model: nn.Module, state: StateDict) -> str | None:
    """The first difference between ``state`` and the model's parameters and buffers, or None."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            return f"key {name!r} is missing from the file"
        if tuple(state[name].shape) != tuple(tensor.shape):
            return (
                f"key {name!r} has shape {tuple(state[name].shape)} in the file, "
                f"{tuple(tensor.shape)} in the model"
            )
    for name in state:
        if name not in expected:
            return f"key {name!r} in the file is not in the model"
    return None


def load_into(
    model: nn.Module,
    state: StateDict,
    *,
    source: str,
    arch: str,
    drop_prefixes: tuple[str, ...] = (),
    key: str = "backbone.weights",
) -> None:
    """Load ``state`` into ``model`` strictly; the model's own checkpoint filter is tried on a mismatch.

    ``drop_prefixes`` removes keys the feature extractor does not have (the replaced classifier).
    """
    candidates = [state]
    converter: Callable[..., StateDict] | None = getattr(
        sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None
    )
    if converter is not None:
        with contextlib.suppress(Exception):  # a converter that does not fit this file is no error
            candidates.append(converter(state, model))
    first_problem = None
    for candidate in candidates:
        kept = {k: v for k, v in candidate.items() if not k.startswith(drop_prefixes)}
        problem = mismatch(model, kept)
        if problem is None:
            model.load_state_dict(kept)
            return
        first_problem = first_problem or problem
    raise TlxError(f"{key}: {source} does not fit {arch}: {first_problem}")


def state_digest(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers: the identity of the weights actually loaded."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
