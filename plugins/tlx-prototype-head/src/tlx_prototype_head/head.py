"""The cosine head's module: one prototype per class, logits = scale × cosine similarity."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


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
