"""The built-in heads: ``linear`` and ``mlp``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from tlx import hookimpl
from tlx.logreg import LogisticRegression, LogRegOptions


class LinearOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MLPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden: list[PositiveInt] = [512]
    dropout: float = Field(0.0, ge=0, lt=1)
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@hookimpl
def register_heads(register):
    register(
        "linear", linear_head, description="one linear layer (logistic regression)", options=LinearOptions
    )
    register("mlp", mlp_head, description="hidden layers (sizes, activation, dropout)", options=MLPOptions)
    register(
        "logreg",
        LogisticRegression,
        description="multinomial logistic regression by L-BFGS, L2 chosen on the training split",
        options=LogRegOptions,
    )


def linear_head(in_features: int, num_classes: int, options: LinearOptions) -> nn.Module:
    return nn.Linear(in_features, num_classes)


def mlp_head(in_features: int, num_classes: int, options: MLPOptions) -> nn.Module:
    layers: list[nn.Module] = []
    width = in_features
    for hidden in options.hidden:
        layers += [nn.Linear(width, hidden), ACTIVATIONS[options.activation](), nn.Dropout(options.dropout)]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, num_classes))
