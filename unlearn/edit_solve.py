"""The least-squares update of one linear map: write new values for some keys, keep the rest.

For a layer W (out x in) with keys K (in x n, one column per edited fact) and
the residuals R (out x n) their outputs must gain, MEMIT (Meng et al. 2023)
minimises

    sum_i ||(W + D) k_i - (W k_i + r_i)||^2  +  sum_j c_j ||D p_j||^2  +  rho ||D||_F^2

over D, where the p_j are keys whose outputs must not move (weighted by c_j; their
second moment is C = sum_j c_j p_j p_j^T). Setting the gradient to zero gives

    D (C + K K^T + rho I) = R K^T,  so  D = R X^T  with  X = (C + K K^T + rho I)^-1 K.

D is returned as the factors U = R (out x n) and V = X (in x n), D = U V^T, of rank
at most n: a LoRA-shaped adapter. With C = 0 and rho -> 0, D K = R exactly
(when the keys are independent); a preserved key with a large weight gets D p ~ 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRankDelta:
    u: torch.Tensor  # (out, n)
    v: torch.Tensor  # (in, n)

    def matrix(self) -> torch.Tensor:
        return self.u @ self.v.T

    @property
    def rank(self) -> int:
        return self.u.shape[1]


def least_squares_update(keys: torch.Tensor, residuals: torch.Tensor, preserve: torch.Tensor | None,
                         ridge: float) -> LowRankDelta:
    """D = R X^T with X = (PRESERVE + K K^T + RIDGE I)^-1 K (see module doc).

    KEYS (in x n), RESIDUALS (out x n), PRESERVE (in x in, symmetric PSD) or None. Solved in
    float64: the system mixes a covariance scaled by thousands with a few rank-one terms.
    """
    k = keys.double()
    system = k @ k.T
    if preserve is not None:
        system = system + preserve.double()
    system = system + ridge * torch.eye(system.shape[0], dtype=torch.float64)
    x = torch.linalg.solve(system, k)
    return LowRankDelta(u=residuals.double().to(keys.dtype), v=x.to(keys.dtype))


class SecondMoment:
    """A running sum of k k^T over key vectors, and their count, for a mean second moment."""

    def __init__(self, dim: int):
        self.sum = torch.zeros((dim, dim), dtype=torch.float64)
        self.count = 0

    def add(self, keys: torch.Tensor) -> None:
        """Add the rows of KEYS (m x dim)."""
        k = keys.double().reshape(-1, keys.shape[-1])
        self.sum += k.T @ k
        self.count += k.shape[0]

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            return torch.zeros_like(self.sum)
        return self.sum / self.count
