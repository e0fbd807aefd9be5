"""A defect-type head fitted from per-type feature sums, so that sites can pool what they saw without sharing it.

Each federated site computes, with the *global* detector, the count, sum and sum of squares of the
mask-pooled features of the defects of the types it holds (:meth:`DADDA.defect_type_statistics`).
Sums add up across sites, and from the pooled sums the server fits a linear discriminant with one
diagonal covariance shared by all types (Gaussian naive Bayes with a shared variance, uniform prior):

    logit_c(x) = x . (mu_c / sigma^2) - 1/2 sum(mu_c^2 / sigma^2)

which is linear in the features, so it fits D-ADDA's ``type_weight``/``type_bias`` buffers as the
local head (:meth:`DADDA.fit_defect_type_head`) does. Types no site holds get a bias of ``-inf``: never predicted.
"""

from dataclasses import dataclass

import torch

# Variance floor, relative to the mean within-type variance: keeps constant features from dominating.
VARIANCE_FLOOR = 1e-3


@dataclass
class DefectTypeStatistics:
    """Per type (rows of the type tables): how many feature vectors, their sum, and the sum of their squares."""

    count: torch.Tensor  # (T,) float64
    total: torch.Tensor  # (T, D) float64
    squares: torch.Tensor  # (T, D) float64

    @classmethod
    def empty(cls, types: int, dim: int) -> "DefectTypeStatistics":
        return cls(
            torch.zeros(types, dtype=torch.float64),
            torch.zeros(types, dim, dtype=torch.float64),
            torch.zeros(types, dim, dtype=torch.float64),
        )

    def add_features(self, features: torch.Tensor, labels: torch.Tensor) -> "DefectTypeStatistics":
        """Count ``features`` ``(N, D)`` into the rows ``labels`` ``(N,)`` (in place); returns ``self``."""
        features = torch.as_tensor(features, dtype=torch.float64)
        labels = torch.as_tensor(labels, dtype=torch.long)
        self.count.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))
        self.total.index_add_(0, labels, features)
        self.squares.index_add_(0, labels, features.square())
        return self

    def __add__(self, other: "DefectTypeStatistics") -> "DefectTypeStatistics":
        if self.total.shape != other.total.shape:
            msg = (
                f"Cannot pool defect-type statistics of shapes {tuple(self.total.shape)} and "
                f"{tuple(other.total.shape)}: the sites build the model with different settings."
            )
            raise ValueError(msg)
        return DefectTypeStatistics(self.count + other.count, self.total + other.total, self.squares + other.squares)

    def arrays(self) -> list:
        """``[count, total, squares]`` as NumPy arrays (what a site sends)."""
        return [tensor.numpy().copy() for tensor in (self.count, self.total, self.squares)]

    @classmethod
    def from_arrays(cls, arrays: list) -> "DefectTypeStatistics":
        count, total, squares = (torch.as_tensor(array, dtype=torch.float64) for array in arrays)
        return cls(count, total, squares)


def pooled_type_head(statistics: DefectTypeStatistics) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, weight (len(rows), D), bias (len(rows),))`` of the shared-diagonal-covariance discriminant."""
    present = statistics.count > 0
    rows = torch.nonzero(present).flatten()
    dim = statistics.total.shape[1]
    if len(rows) == 0:
        return rows, torch.zeros(0, dim, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    count = statistics.count[rows].unsqueeze(1)
    means = statistics.total[rows] / count
    within = (statistics.squares[rows] - count * means.square()).sum(dim=0).clamp_min(0)
    samples = float(statistics.count.sum())
    variance = within / max(samples - len(rows), 1.0)
    variance = variance + VARIANCE_FLOOR * variance.mean().clamp_min(1e-12)
    weight = means / variance
    bias = -0.5 * (means.square() / variance).sum(dim=1)
    return rows, weight, bias
