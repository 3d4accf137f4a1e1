"""The built-in heads: ``linear``, ``mlp`` and ``logreg``.

Registering them imports no torch (each factory imports it when it builds a head), so that a run whose
features need no torch model starts its extraction before torch is loaded (:mod:`tlx.extraction.pipeline`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from tlx import hookimpl

if TYPE_CHECKING:
    from torch import nn

    from tlx.logreg import LogisticRegression

#: logreg's L2 strengths tried by default: 1e-5 … 10 in half-decade steps (loss = mean CE + l2/2 · |W|²)
DEFAULT_GRID = [round(10.0 ** (e / 2), 8) for e in range(-10, 3)]
#: mlp's activations, by their names in torch.nn
ACTIVATIONS = {"relu": "ReLU", "gelu": "GELU", "silu": "SiLU", "tanh": "Tanh"}


class LinearOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MLPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden: list[PositiveInt] = [512]
    dropout: float = Field(0.0, ge=0, lt=1)
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"


class LogRegOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    #: candidate L2 strengths; one value skips the selection
    l2: list[PositiveFloat] = Field(default_factory=lambda: list(DEFAULT_GRID), min_length=1)
    #: cross-validation folds when there is no validation split
    cv: int = Field(5, ge=2)
    max_iter: int = Field(500, ge=1)


@hookimpl
def register_heads(register):
    register(
        "linear", linear_head, description="one linear layer (logistic regression)", options=LinearOptions
    )
    register("mlp", mlp_head, description="hidden layers (sizes, activation, dropout)", options=MLPOptions)
    register(
        "logreg",
        logreg_head,
        description="multinomial logistic regression by L-BFGS, L2 chosen on the training split",
        options=LogRegOptions,
    )


def linear_head(in_features: int, num_classes: int, options: LinearOptions) -> nn.Module:
    from torch import nn

    return nn.Linear(in_features, num_classes)


def mlp_head(in_features: int, num_classes: int, options: MLPOptions) -> nn.Module:
    from torch import nn

    layers: list[nn.Module] = []
    width = in_features
    for hidden in options.hidden:
        activation = getattr(nn, ACTIVATIONS[options.activation])()
        layers += [nn.Linear(width, hidden), activation, nn.Dropout(options.dropout)]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def logreg_head(in_features: int, num_classes: int, options: LogRegOptions) -> LogisticRegression:
    from tlx.logreg import LogisticRegression

    return LogisticRegression(in_features, num_classes, **options.model_dump())
