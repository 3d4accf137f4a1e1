"""Multinomial logistic regression on standardized features, fitted by L-BFGS.

The L2 strength is chosen on the training split only: by the validation hold-out when there is one
(``train.val_fraction``), otherwise by stratified k-fold cross-validation. The fitted model is a
single ``nn.Linear`` with the standardization folded in, so it predicts from raw features like any head.
The solver is SciPy's L-BFGS-B (torch's LBFGS class imports ``torch._dynamo`` when built).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tlx.errors import TlxError
from tlx.folds import fold_ids
from tlx.tensors import Features, threads_set


class LogisticRegression(nn.Module):
    """``linear(x)``: logits; ``fit`` standardizes, picks the L2 strength among ``l2`` (on the validation
    split, else by ``cv``-fold cross-validation) and solves in at most ``max_iter`` iterations."""

    def __init__(self, in_features: int, num_classes: int, *, l2: list[float], cv: int, max_iter: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        self.l2, self.cv, self.max_iter = l2, cv, max_iter
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def fit(
        self, train: Features, val: Features | None, *, class_weight: torch.Tensor | None, seed: int
    ) -> tuple[list[dict[str, float]], dict[str, Any]]:
        import scipy.optimize  # noqa: F401 -- loads SciPy's BLAS, so that the limit below reaches it
        from threadpoolctl import threadpool_limits

        # small matrices: more threads (torch's, and the BLAS under SciPy's solver) only add
        # synchronisation, and spin idle on a busy machine
        with threads_set(1), threadpool_limits(1, user_api="blas"):
            return self._fit(train, val, class_weight, seed)

    def _fit(
        self, train: Features, val: Features | None, class_weight: torch.Tensor | None, seed: int
    ) -> tuple[list[dict[str, float]], dict[str, Any]]:
        x, y = train.x.double(), train.y
        mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        z = (x - mean) / std
        weight = class_weight.double() if class_weight is not None else None
        grid = self.l2
        if len(grid) == 1:
            rows, chosen = [{"l2": grid[0]}], {"l2": grid[0], "selected_by": "head.l2 (one value)"}
        else:
            losses = self._path(grid, z, y, val, mean, std, weight, seed)
            rows = [{"l2": l2, "val_loss": loss} for l2, loss in zip(grid, losses)]
            best = min(rows, key=lambda r: (r["val_loss"], -r["l2"]))  # ties: the stronger regularization
            where = "validation split" if val is not None else f"{self._folds(y)}-fold cross-validation"
            chosen = {"l2": best["l2"], "selected_by": where}
        w, b = self._solve(z, y, chosen["l2"], weight)
        with torch.no_grad():
            scaled = w / std
            self.linear.weight.copy_(scaled.float())
            self.linear.bias.copy_((b - scaled @ mean).float())
        return rows, chosen

    def _path(
        self,
        grid: list[float],
        z: torch.Tensor,
        y: torch.Tensor,
        val: Features | None,
        mean: torch.Tensor,
        std: torch.Tensor,
        weight: torch.Tensor | None,
        seed: int,
    ) -> list[float]:
        """Held-out cross-entropy of the fit with each strength of ``grid``: on ``val``, or averaged over
        folds.

        Each split's fits follow the regularization path, strongest first, each solve starting from
        the previous solution (as glmnet and scikit-learn's ``warm_start`` do): the optimum is unique
        (the objective is strictly convex) and is reached in fewer iterations, about half the time
        in all. Where the objective is flat (the weakest strengths on separable features) the solver
        stops within its tolerance of the optimum, not at it, so such a loss may differ by a percent
        from a fit started at zero.
        """
        from tlx.notices import bar

        if val is not None:
            splits = [(z, y, (val.x.double() - mean) / std, val.y)]
        else:
            folds = fold_ids(y, self._folds(y), seed)
            splits = [
                (z[folds != k], y[folds != k], z[folds == k], y[folds == k])
                for k in range(int(folds.max()) + 1)
            ]
        order = sorted(range(len(grid)), key=lambda i: -grid[i])
        losses = [[0.0] * len(splits) for _ in grid]
        for j, (z_fit, y_fit, z_out, y_out) in enumerate(
            bar(splits, desc="choosing head.l2", unit="split", leave=False, dynamic_ncols=True)
        ):
            start = None
            for i in order:
                w, b = self._solve(z_fit, y_fit, grid[i], weight, start)
                start = torch.cat([w.flatten(), b])
                losses[i][j] = F.cross_entropy(z_out @ w.T + b, y_out, weight=weight).item()
        return [sum(row) / len(row) for row in losses]

    def _folds(self, y: torch.Tensor) -> int:
        smallest = int(torch.bincount(y, minlength=self.num_classes).min())
        if smallest < 2:
            raise TlxError(
                f"head.cv: a class has {smallest} training image(s), too few to cross-validate the "
                "L2 strength; add images or give one value, e.g. --set head.l2=[0.01]"
            )
        return min(self.cv, smallest)

    def _solve(
        self,
        z: torch.Tensor,
        y: torch.Tensor,
        l2: float,
        weight: torch.Tensor | None,
        start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Minimize mean cross-entropy + l2/2 · |W|² (bias unpenalized) by L-BFGS-B; float64, from
        ``start`` (flat weights then biases) or zero."""
        from scipy.optimize import minimize

        n_classes, dim = self.num_classes, z.shape[1]
        targets = F.one_hot(y, n_classes).double()
        sample_weight = weight[y] if weight is not None else torch.ones(len(y), dtype=torch.float64)
        sample_weight = (sample_weight / sample_weight.sum()).unsqueeze(1)

        def loss_and_grad(params: np.ndarray) -> tuple[float, np.ndarray]:
            """Loss and its gradient in closed form: cheaper than autograd for this small problem."""
            flat = torch.from_numpy(params)
            w, b = flat[: n_classes * dim].view(n_classes, dim), flat[n_classes * dim :]
            log_p = torch.log_softmax(z @ w.T + b, dim=1)
            residual = sample_weight * (log_p.exp() - targets)
            loss = -(sample_weight * targets * log_p).sum() + 0.5 * l2 * (w * w).sum()
            grad = torch.cat([(residual.T @ z + l2 * w).flatten(), residual.sum(dim=0)])
            return loss.item(), grad.numpy()

        solution = minimize(
            loss_and_grad,
            np.zeros(n_classes * (dim + 1)) if start is None else start.numpy().copy(),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": self.max_iter, "gtol": 1e-7, "ftol": 1e-12, "maxcor": 20},
        )
        flat = torch.from_numpy(solution.x)
        return flat[: n_classes * dim].view(n_classes, dim).clone(), flat[n_classes * dim :].clone()
