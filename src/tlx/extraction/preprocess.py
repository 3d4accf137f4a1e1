"""The evaluation transform a backbone's data config asks for: image → normalized (3, H, W) array.

timm's ``create_transform(**data_config, is_training=False)`` defines it. For the configs nearly every
model has (crop mode ``center`` or ``squash``, a crop inside the resized image) the same steps are done
here with Pillow and NumPy, giving the same values bit for bit: importing timm and torchvision costs a
cold start seconds, and a backbone whose exported model is cached needs neither (nor torch: the
extraction workers of ONNX Runtime never import it). Any other config goes to timm itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

#: torchvision's names of Pillow's resampling filters (timm's ``interpolation``)
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
#: timm's defaults for keys a data config leaves out
DEFAULT_CROP_PCT = 0.875


def eval_transform(data_config: dict[str, Any]) -> Callable[[Image.Image], np.ndarray]:
    """The transform of ``data_config`` (an RGB image in, a float32 (3, H, W) array out)."""
    plan = _plan(data_config)
    if plan is None:
        from timm.data import create_transform

        return AsArray(create_transform(**data_config, is_training=False))
    return _Transform(*plan)


class AsArray:
    """A torchvision transform (image → tensor) giving NumPy arrays, as every tlx transform does."""

    def __init__(self, transform: Callable[[Image.Image], Any]):
        self.transform = transform

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.transform(image).numpy()


def _plan(cfg: dict[str, Any]) -> tuple[Any, ...] | None:
    """What :class:`_Transform` needs for ``cfg``, or None when only timm's transform does it right."""
    known = {"input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"}
    mode = cfg.get("crop_mode") or "center"
    _, height, width = cfg["input_size"]
    crop_pct = cfg.get("crop_pct") or DEFAULT_CROP_PCT
    resample = _RESAMPLE.get(cfg.get("interpolation", "bilinear"))
    if set(cfg) - known or mode not in ("center", "squash") or resample is None or crop_pct > 1:
        return None
    if mode == "center" and height != width:  # timm's ResizeKeepRatio: not replicated here
        return None
    scale = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    mean = np.asarray(cfg["mean"], dtype=np.float32)
    std = np.asarray(cfg["std"], dtype=np.float32)
    return mode, scale, (height, width), resample, mean, std


class _Transform:
    """torchvision's ``Resize`` (shorter side, or both sides to squash), ``CenterCrop``, ``ToTensor``
    and ``Normalize`` on a Pillow image, as timm composes them for evaluation."""

    def __init__(
        self,
        mode: str,
        scale: tuple[int, int],
        crop: tuple[int, int],
        resample: Image.Resampling,
        mean: np.ndarray,
        std: np.ndarray,
    ):
        self.mode, self.scale, self.crop, self.resample = mode, scale, crop, resample
        self.mean, self.std = mean[:, None, None], std[:, None, None]

    def __call__(self, image: Image.Image) -> np.ndarray:
        width, height = image.size
        if self.mode == "squash":
            new_h, new_w = self.scale
        else:  # the shorter side to the scale size, the longer in proportion (rounded down)
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.scale[0], int(self.scale[0] * long / short)
            new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), self.resample)
        crop_h, crop_w = self.crop
        top, left = round((new_h - crop_h) / 2.0), round((new_w - crop_w) / 2.0)
        image = image.crop((left, top, left + crop_w, top + crop_h))
        pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        return (pixels - self.mean) / self.std
