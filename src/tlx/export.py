"""``tlx export``: backbone and head as one model file (ONNX or TorchScript), preprocessing beside it.

The model takes a normalized image batch ``image`` (N, 3, H, W), float32, and returns ``logits``
(N, classes); N may vary. The JSON beside it says how to get from an image file to that batch.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from tlx.artifacts import TrainedRun
from tlx.files import write_json
from tlx.report import describe_preprocessing

Format = Literal["onnx", "torchscript"]
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


def preprocessing_path(model_path: Path) -> Path:
    return model_path.with_name(f"{model_path.stem}.preprocessing.json")


def preprocessing(run: TrainedRun) -> dict[str, Any]:
    """The input the exported model expects, as a timm data config plus words, and the class names."""
    config = run.backbone.data_config
    return {
        "input": "image",
        "output": "logits",
        "layout": "NCHW, float32, RGB",
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "steps": describe_preprocessing(config) + "; values scaled to [0, 1] before the mean and std",
        "classes": run.classes,
        "flip_averaged": run.recipe.extract.flip,
    }


def export(run: TrainedRun, fmt: Format, output: Path) -> Path:
    """Write the model to ``output`` and its preprocessing beside it; returns the preprocessing path."""
    model = run.model()
    _, height, width = run.backbone.data_config["input_size"]
    example = torch.zeros(2, 3, height, width)
    output.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes
        if fmt == "onnx":
            program = torch.onnx.export(
                model,
                (example,),
                input_names=["image"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
                dynamo=True,
                verbose=False,
            )
            program.save(str(output))
        else:
            with torch.no_grad():
                torch.jit.trace(model, example).save(str(output))
    meta = preprocessing_path(output)
    write_json(meta, preprocessing(run))
    return meta
