"""A linear head fitted by a solver instead of epochs: weighted multinomial logistic regression with an L2 penalty,
full-batch L-BFGS on cached features (the linear probe of Radford et al. 2021 and Kornblith et al. 2019).

Seconds where epochs of minibatches take a minute, and the same answer from any start (the objective is strictly
convex), so that the out-of-fold heads of cross-validation can start from the real head and converge in a few
dozen steps. The features are read a chunk at a time from where they are (the memory-mapped feature cache, by row
index): memory stays that of one chunk, however many images there are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

CHUNK = 16_384  # rows read at a time: 80 MB of float32 at 1,280 features


@dataclass(frozen=True)
class LinearFit:
    """``logits = ((x - mean) / std) @ weight.T + bias``."""

    weight: torch.Tensor  # (classes, d)
    bias: torch.Tensor  # (classes,)
    mean: torch.Tensor  # (d,)
    std: torch.Tensor  # (d,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) / self.std) @ self.weight.T + self.bias


class Rows:
    """Feature rows taken from one or more tensors (row indices, or all rows of each), never copied as a whole."""

    def __init__(self, *parts: torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]) -> None:
        self.parts = [(p, None) if isinstance(p, torch.Tensor) else (p[0], p[1]) for p in parts]
        self.dim = self.parts[0][0].shape[1]

    def __len__(self) -> int:
        return sum(len(x) if idx is None else len(idx) for x, idx in self.parts)

    def chunks(self, size: int = CHUNK) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(where in the rows, float32 features)`` a chunk at a time, in order."""
        at = 0
        for x, idx in self.parts:
            n = len(x) if idx is None else len(idx)
            for s in range(0, n, size):
                rows = x[s : s + size] if idx is None else x[idx[s : s + size]]
                yield slice(at + s, at + s + len(rows)), rows.float()
            at += n

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The rows at ``index`` (positions in these rows), as one float32 tensor."""
        index = torch.as_tensor(index, dtype=torch.long)
        out = torch.empty(len(index), self.dim)
        at = 0
        for x, idx in self.parts:
            n = len(x) if idx is None else len(idx)
            mine = (index >= at) & (index < at + n)
            local = index[mine] - at
            out[mine] = (x[local] if idx is None else x[idx[local]]).float()
            at += n
        return out

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    def __getitem__(self, key: slice | torch.Tensor) -> torch.Tensor:
        """Rows by position (a slice or an index tensor), as float32: ``rows[a:b]``, ``rows[index]``."""
        if isinstance(key, slice):
            return self.take(torch.arange(len(self))[key])
        key = torch.as_tensor(key)
        return self.take(torch.nonzero(key).flatten() if key.dtype == torch.bool else key)

    def __add__(self, other: "Rows") -> "Rows":
        return Rows(*self.parts, *other.parts)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and standard deviation (+ 1e-3), in float64 over the chunks."""
        total, square, n = torch.zeros(self.dim, dtype=torch.float64), torch.zeros(self.dim, dtype=torch.float64), 0
        for _, x in self.chunks():
            total += x.double().sum(0)
            square += (x.double() ** 2).sum(0)
            n += len(x)
        mean = total / max(1, n)
        var = (square - n * mean**2) / max(1, n - 1)
        return mean.float(), var.clamp(min=0).sqrt().float() + 1e-3


def fit_linear(
    x: torch.Tensor | Rows,
    y: torch.Tensor,
    n_classes: int,
    *,
    weight: torch.Tensor | None = None,
    l2: float = 1e-3,
    standardise: bool = True,
    init: LinearFit | None = None,
    max_iter: int = 200,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    label_smoothing: float = 0.0,
) -> LinearFit:
    """Minimises ``sum_i w_i CE(x_i, y_i) / sum_i w_i + l2 / 2 * |W|^2`` over ``(W, b)`` (CE with
    ``label_smoothing`` where given). ``x``: a tensor, or ``Rows`` read a chunk at a time.

    ``standardise``: the features are standardised on ``x`` first (or on ``stats``, the mean and std to use);
    ``init``: a head to start from (its weights are mapped onto this head's standardisation).
    """
    rows = x if isinstance(x, Rows) else Rows(x)
    if stats is not None:
        mean, std = stats
    elif standardise:
        mean, std = rows.mean_std()
    else:
        mean, std = torch.zeros(rows.dim), torch.ones(rows.dim)
    y = y.long()
    w = torch.ones(len(rows)) if weight is None else weight.float()
    w = w / w.sum()
    if (
        init is not None
    ):  # the same logits under this standardisation: W' = W * std / std0, b' = b + W (mean - mean0) / std0
        W0 = init.weight * (std / init.std)
        b0 = init.bias + (init.weight * ((mean - init.mean) / init.std)).sum(1)
    else:
        W0, b0 = torch.zeros(n_classes, rows.dim), torch.zeros(n_classes)
    W, b = W0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = 0.0
        # the standardisation folded into the weights: ((x - mean) / std) W^T + b = x (W / std)^T + b - (W / std) mean,
        # so the rows are read as they are (two passes fewer over them on every evaluation: half the time); per chunk,
        # as each chunk's backward frees its graph
        for where, chunk in rows.chunks():
            Ws = W / std
            bs = b - Ws @ mean
            ce = F.cross_entropy(chunk @ Ws.T + bs, y[where], reduction="none", label_smoothing=label_smoothing)
            loss = (w[where] * ce).sum()
            loss.backward()  # gradients add up over the chunks
            total += loss.item()
        penalty = 0.5 * l2 * (W * W).sum()
        penalty.backward()
        return torch.tensor(total + penalty.item())

    opt.step(closure)
    return LinearFit(W.detach(), b.detach(), mean, std)
