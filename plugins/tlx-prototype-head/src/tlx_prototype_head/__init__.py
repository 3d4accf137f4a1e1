"""tlx plugin: the ``cosine`` head, logits = scale × cosine similarity of the features to class prototypes.

Only the direction of a feature vector counts, not its length, which suits pooled features whose norm
varies from image to image; ``scale`` (a temperature) sets how sharp the softmax over classes is.
The module (:mod:`tlx_prototype_head.head`) is imported when a head is built: registering it imports
no torch, so it never delays a run that needs none before its extraction starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, PositiveFloat

from tlx import hookimpl

if TYPE_CHECKING:
    from tlx_prototype_head.head import CosineHead


class CosineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    #: logits lie in [-scale, scale]
    scale: PositiveFloat = 16.0
    #: train the scale along with the prototypes
    learn_scale: bool = False


#: the cosine head's train defaults, where a recipe sets none: its logits are bounded by ``scale``, so
#: it needs a larger step than a linear layer (bench/RESULTS.md, issue 27: lr 0.001 against 0.1)
TRAIN_DEFAULTS = {"lr": 0.1}


@hookimpl
def register_heads(register):
    register(
        "cosine",
        cosine_head,
        description="scale × cosine similarity to a learned prototype per class",
        options=CosineOptions,
        train=TRAIN_DEFAULTS,
    )


def cosine_head(in_features: int, num_classes: int, options: CosineOptions) -> CosineHead:
    from tlx_prototype_head.head import CosineHead

    return CosineHead(in_features, num_classes, options.scale, options.learn_scale)
