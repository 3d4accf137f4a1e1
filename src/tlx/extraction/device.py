"""Where the backbone runs: the recipe's ``device`` (auto, cpu, cuda, cuda:N or mps) as torch names it."""

from __future__ import annotations

import sys
from pathlib import Path

from tlx.errors import TlxError

#: images per backbone call when ``extract.batch_size`` is not set: on a CPU, small batches keep
#: activations in cache; an accelerator wants enough images to fill it
DEFAULT_BATCH = {"cpu": 4, "accelerator": 64}
#: device nodes of the drivers through which torch reaches an accelerator on Linux: NVIDIA's, ROCm's
#: and WSL's GPU; where none exists, torch finds no CUDA device
ACCELERATOR_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def resolve(name: str) -> str:
    """``auto``: the first CUDA device, else Apple's MPS, else the CPU; a named one must be present.

    ``cpu``, and ``auto`` on a Linux machine without accelerator drivers, are answered without
    importing torch (seconds that a run whose backbone runs in ONNX Runtime need not wait for).
    """
    if name == "cpu" or (name == "auto" and no_accelerator()):
        return "cpu"
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
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
    return str(device)


def no_accelerator() -> bool:
    """True on a Linux machine with none of the :data:`ACCELERATOR_NODES`."""
    return sys.platform == "linux" and not any(Path(node).exists() for node in ACCELERATOR_NODES)


def batch_size(configured: int | None, device: str) -> int:
    """``extract.batch_size`` as set, else the default for ``device``."""
    return configured or DEFAULT_BATCH["cpu" if device == "cpu" else "accelerator"]
