"""An mlp head's first layer, trained within the span of its training rows.

SGD moves a linear layer's weight only by gradients ``gᵀ·x_b`` whose rows are training rows, so with
``Q`` an orthonormal basis of those rows (``r ≤ n`` columns) the weight after any number of steps is
``W₀ + M·Qᵀ``, and for any row ``x``: ``x·Wᵀ = x·W₀ᵀ + (x·Q)·Mᵀ``. Training the ``(hidden, r)``
matrix ``M`` from zero on the features ``(x·Q, x·W₀ᵀ)``, computed once, takes the same steps as
training the ``(hidden, in)`` weight: the same batches, momentum, schedule, class weights and label
smoothing, the same gradient norms. Weight decay (it shrinks ``W₀`` too) and AdamW (per coordinate,
so not blind to the rotation ``Q``) break the identity; such heads train as they are. With 1280
features and about 200 training images, a step reads a sixth of the memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tlx.recipe import TrainConfig
from tlx.tensors import Features


class SpanLinear(nn.Module):
    """A linear layer on span features ``(z, offset)``: ``z·Mᵀ + offset + b``, ``z`` the first ``rank``
    columns."""

    def __init__(self, rank: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.rank = rank
        self.weight = nn.Parameter(torch.zeros(out_features, rank))
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(x[:, self.rank :], x[:, : self.rank], self.weight.t())
        return out if self.bias is None else out + self.bias


def span_basis(rows: torch.Tensor) -> torch.Tensor | None:
    """An orthonormal basis (float64, ``(in, n)``) of the span of ``rows`` ``(n, in)``; None when
    ``n > in / 2``, where the narrowed layer would save less than half of the full one."""
    n, width = rows.shape
    if 2 * n > width:
        return None
    return torch.linalg.qr(rows.double().t()).Q


@dataclass
class InSpan:
    """``head`` with its first layer replaced by a :class:`SpanLinear` (``narrow``); the other layers are
    the original's own modules, so training ``narrow`` trains them."""

    head: nn.Sequential
    narrow: nn.Sequential
    basis: torch.Tensor
    initial: torch.Tensor

    def features(self, features: Features) -> Features:
        """``features`` as the narrowed head takes them: ``(x·Q, x·W₀ᵀ)``."""
        x = features.x
        z = (x.double() @ self.basis).float()
        return Features(torch.cat([z, x @ self.initial.t()], dim=1), features.y, features.skipped)

    @torch.no_grad()
    def write_back(self) -> None:
        """Give the original first layer the trained weight ``W₀ + M·Qᵀ`` and bias."""
        first, span = self.head[0], self.narrow[0]
        first.weight.copy_(self.initial.double() + span.weight.double() @ self.basis.t())
        if first.bias is not None:
            first.bias.copy_(span.bias)


def narrowable(head: nn.Module, config: TrainConfig) -> bool:
    """Whether training ``head``'s first layer within a span is exact: a plain ``nn.Sequential`` (a
    subclass may have its own forward) that starts with a trainable ``nn.Linear`` and has more layers,
    plain SGD. Cheap: ask before computing a :func:`span_basis`."""
    if config.optimizer != "sgd" or config.weight_decay != 0:
        return False
    if type(head) is not nn.Sequential or len(head) < 2 or type(head[0]) is not nn.Linear:
        return False
    return all(param.requires_grad for param in head[0].parameters())


def in_span(head: nn.Sequential, basis: torch.Tensor | None) -> InSpan | None:
    """``head`` (:func:`narrowable`) narrowed to ``basis``, the :func:`span_basis` of its training rows;
    None without a basis."""
    first = head[0]
    if basis is None or first.in_features != basis.shape[0]:
        return None
    span = SpanLinear(basis.shape[1], first.out_features, first.bias)
    narrow = nn.Sequential(span, *list(head)[1:])
    return InSpan(head, narrow, basis, first.weight.detach().clone())
