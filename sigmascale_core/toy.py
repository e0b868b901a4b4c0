"""The Learn page's teaching toy: a small matrix, the inputs it sees, and hand-set row / column scales,
so a reader can watch scaling change what truncation keeps (plain vs activation-weighted error)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sigmascale_core.methods import decompose
from sigmascale_core.spectral import singular_values, truncated_svd
from sigmascale_core.stats import ActivationStats


@dataclass(frozen=True)
class Toy:
    """A small weight matrix and the inputs it sees."""

    W: torch.Tensor  # (m, n) float64
    X: torch.Tensor  # (tokens, n) float64 inputs

    @property
    def gram(self) -> torch.Tensor:
        return self.X.T @ self.X  # (n, n)


TOYS = ("outlier channels", "flat spectrum")


def toy_problem(kind: str = "outlier channels", seed: int = 0, m: int = 8, n: int = 6) -> Toy:
    """'outlier channels': a decaying-spectrum W whose inputs have one channel 12× louder than the rest —
    scaling pays. 'flat spectrum': an orthogonal W with isotropic inputs — nothing to steepen."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    r = min(m, n)
    X = torch.randn(400, n, generator=g, dtype=torch.float64)
    if kind == "flat spectrum":  # exactly isotropic inputs: XᵀX = tokens·I
        Q, _ = torch.linalg.qr(X)
        return Toy((U[:, :r] @ V[:, :r].T), Q * X.shape[0] ** 0.5)
    if kind != "outlier channels":
        raise ValueError(f"unknown toy {kind!r}; choose one of {TOYS}")
    sigma = torch.arange(1, r + 1, dtype=torch.float64) ** -0.5
    X[:, 0] *= 12.0
    return Toy((U[:, :r] * sigma) @ V[:, :r].T, X)


@dataclass(frozen=True)
class ToyResult:
    sigma: np.ndarray  # singular values of W
    scaled_sigma: np.ndarray  # singular values of S_row·W·S_col
    plain_error: float  # ‖W − W′‖²_F / ‖W‖²_F
    activation_error: float  # ‖(W − W′)X‖²_F / ‖WX‖²_F
    optimal_activation_error: float  # the best any rank-k W′ can do on these inputs (SVD-LLM's whitening)


# W′ = S_row⁻¹ · T_k(S_row·W·S_col) · S_col⁻¹: truncate the scaled matrix, fold the scales back.
def toy_truncation(toy: Toy, row_log2: Sequence[float], col_log2: Sequence[float], rank: int) -> ToyResult:
    """Truncate the toy's W at `rank` after scaling its rows and columns by 2^row_log2, 2^col_log2."""
    W, gram = toy.W, toy.gram
    row = torch.tensor(list(row_log2), dtype=torch.float64).exp2()  # (m,)
    col = torch.tensor(list(col_log2), dtype=torch.float64).exp2()  # (n,)
    Ws = row[:, None] * W * col
    left, right, scaled_sigma = truncated_svd(Ws, rank)
    W_hat = (left @ right) / row[:, None] / col
    E = W - W_hat
    whitened = W @ torch.linalg.cholesky(gram + 1e-12 * torch.eye(gram.shape[0], dtype=gram.dtype))
    best = float(singular_values(whitened)[rank:].square().sum() / whitened.square().sum())
    return ToyResult(
        sigma=singular_values(W).numpy(),
        scaled_sigma=scaled_sigma.numpy(),
        plain_error=float(E.square().sum() / W.square().sum()),
        activation_error=float(((E @ gram) * E).sum() / ((W @ gram) * W).sum()),
        optimal_activation_error=best,
    )


def asvd_log2_scales(toy: Toy, alpha: float = 0.5) -> np.ndarray:
    """ASVD's column scales mean|x|^α as log2 (what the Learn page's button sets)."""
    return alpha * np.log2(toy.X.abs().mean(0).numpy())


def learned_log2_scales(toy: Toy, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """SigmaScale's learned (row, column) scales for the toy at `rank`, as log2."""
    stats = ActivationStats.from_inputs(toy.X)
    f = decompose(toy.W, stats, rank, "sigmascale", steps=200, init="asvd")  # diagonal scales to show
    return np.log2(f.row_scale.numpy()), np.log2(f.col_scale.numpy())
