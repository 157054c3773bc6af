"""A linear head fitted by a solver instead of epochs: weighted multinomial logistic regression with an L2 penalty,
full-batch L-BFGS on cached features (the linear probe of Radford et al. 2021 and Kornblith et al. 2019).

Seconds where epochs of minibatches take a minute, and the same answer from any start (the objective is strictly
convex), so that the out-of-fold heads of cross-validation can start from the real head and converge in a few
dozen steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LinearFit:
    """``logits = ((x - mean) / std) @ weight.T + bias``."""

    weight: torch.Tensor  # (classes, d)
    bias: torch.Tensor  # (classes,)
    mean: torch.Tensor  # (d,)
    std: torch.Tensor  # (d,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std) @ self.weight.T + self.bias


def fit_linear(x: torch.Tensor, y: torch.Tensor, n_classes: int, *, weight: torch.Tensor | None = None,
               l2: float = 1e-3, standardise: bool = True, init: LinearFit | None = None, max_iter: int = 200,
               stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> LinearFit:
    """Minimises ``sum_i w_i CE(x_i, y_i) / sum_i w_i + l2 / 2 * |W|^2`` over ``(W, b)``.

    ``standardise``: the features are standardised on ``x`` first (or on ``stats``, the mean and std to use);
    ``init``: a head to start from (its weights are mapped onto this head's standardisation).
    """
    x = x.float()
    if stats is not None:
        mean, std = stats
    elif standardise:
        mean, std = x.mean(0), x.std(0) + 1e-3
    else:
        mean, std = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    z = (x - mean) / std
    w = torch.ones(len(x)) if weight is None else weight.float()
    w = w / w.sum()
    if init is not None:  # the same logits under this standardisation: W' = W * std / std0, b' = b + W (mean - mean0) / std0
        W0 = init.weight * (std / init.std)
        b0 = init.bias + (init.weight * ((mean - init.mean) / init.std)).sum(1)
    else:
        W0, b0 = torch.zeros(n_classes, x.shape[1]), torch.zeros(n_classes)
    W, b = W0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w * F.cross_entropy(z @ W.T + b, y, reduction="none")).sum() + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearFit(W.detach(), b.detach(), mean, std)
