"""Where the backbone runs: the recipe's ``device`` (auto, cpu, cuda, cuda:N or mps) as a torch device."""

from __future__ import annotations

import torch

from tlx.errors import TlxError

#: images per backbone call when ``extract.batch_size`` is not set: on a CPU, small batches keep
#: activations in cache; an accelerator wants enough images to fill it
DEFAULT_BATCH = {"cpu": 4, "accelerator": 64}


def resolve(name: str) -> torch.device:
    """``auto``: the first CUDA device, else Apple's MPS, else the CPU; a named one must be present."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TlxError(
            f"device: {name} is not available here (torch finds no CUDA device); set device=cpu or auto"
        )
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        raise TlxError(f"device: {name} does not exist; this machine has cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TlxError(f"device: {name} is not available here; set device=cpu or auto")
    return device


def batch_size(configured: int | None, device: torch.device) -> int:
    """``extract.batch_size`` as set, else the default for ``device``."""
    return configured or DEFAULT_BATCH["cpu" if device.type == "cpu" else "accelerator"]
