"""tlx plugin: the ``cosine`` head, logits = scale × cosine similarity of the features to class prototypes.

Only the direction of a feature vector counts, not its length, which suits pooled features whose norm
varies from image to image; ``scale`` (a temperature) sets how sharp the softmax over classes is.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, PositiveFloat
from torch import nn
from torch.nn import functional as F

from tlx import hookimpl


class CosineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: logits lie in [-scale, scale]
    scale: PositiveFloat = 16.0
    #: train the scale along with the prototypes
    learn_scale: bool = False


class CosineHead(nn.Module):
    """One prototype per class; a feature's logit for a class is ``scale · cos(feature, prototype)``."""

    def __init__(self, in_features: int, num_classes: int, scale: float, learn_scale: bool) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.prototypes)
        log_scale = torch.tensor(math.log(scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cosine = F.normalize(features, dim=1) @ F.normalize(self.prototypes, dim=1).T
        return self.log_scale.exp() * cosine


@hookimpl
def register_heads(register):
    register(
        "cosine",
        cosine_head,
        description="scale × cosine similarity to a learned prototype per class",
        options=CosineOptions,
    )


def cosine_head(in_features: int, num_classes: int, options: CosineOptions) -> nn.Module:
    return CosineHead(in_features, num_classes, options.scale, options.learn_scale)
