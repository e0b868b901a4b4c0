"""Scalar measures of a matrix, its spectrum and its truncation error; input checks they share."""

from __future__ import annotations

import math

import numpy as np
import torch

from sigmascale_core.stats import ActivationStats

LOSS_REDUCTIONS = ("relative", "paper", "sum")


def check_matrix(W: torch.Tensor, name: str = "W") -> None:
    """ValueError unless W is a finite floating-point 2-D tensor."""
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got shape {tuple(W.shape)}")
    if not torch.is_floating_point(W):
        raise ValueError(f"{name} must be floating point, got {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"{name} is empty, shape {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise ValueError(f"{name} contains NaN or Inf")


def check_stats(stats: ActivationStats, in_features: int) -> None:
    """ValueError unless stats describe inputs of width `in_features` and are finite."""
    if not isinstance(stats, ActivationStats):
        raise ValueError(f"stats must be ActivationStats, got {type(stats).__name__}")
    if stats.in_features != in_features:
        raise ValueError(f"stats are for inputs of width {stats.in_features}, W has {in_features} columns")
    stats.validate()


def check_rank(rank: int, m: int, n: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank must be an int, got {rank!r}")
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for a {m}×{n} matrix, got {rank}")


def check_retention(retention: float) -> None:
    if isinstance(retention, bool) or not isinstance(retention, int | float) or not 0 < retention <= 1:
        raise ValueError(f"retention must be in (0, 1], got {retention!r}")


def gram_error(error: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """‖E·X‖²_F = tr(E·gram·Eᵀ), from the Gram alone; differentiable, in the dtype of its inputs."""
    return ((error @ gram) * error).sum()


# relative: ‖(W−Ŵ)X‖²_F / ‖WX‖²_F     paper: ‖(W−Ŵ)X‖²_F / (m·n)     sum: ‖(W−Ŵ)X‖²_F
def activation_loss(
    W: torch.Tensor, W_hat: torch.Tensor, stats: ActivationStats, reduction: str = "relative"
) -> float:
    """Activation-aware truncation error of Ŵ against W on the inputs summarised by `stats` (float64)."""
    check_matrix(W)
    check_matrix(W_hat, "W_hat")
    if W_hat.shape != W.shape:
        raise ValueError(f"W_hat has shape {tuple(W_hat.shape)}, W has {tuple(W.shape)}")
    check_stats(stats, W.shape[1])
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {LOSS_REDUCTIONS}")
    gram = stats.gram.to(device=W.device, dtype=torch.float64)  # a float32 Gram too: the loss is float64
    W64 = W.to(torch.float64)
    error = gram_error(W64 - W_hat.to(device=W.device, dtype=torch.float64), gram)
    if reduction == "sum":
        return float(error)
    if reduction == "paper":
        return float(error) / W.numel()
    reference = gram_error(W64, gram)
    if reference <= 0:
        raise ValueError("‖WX‖² is zero (no tokens or W is zero on them): the relative loss is undefined")
    return float(error / reference)


def _check_spectrum(singular_values: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(singular_values).to(torch.float64)
    if s.ndim != 1 or s.numel() == 0:
        raise ValueError(f"singular values must be a non-empty 1-D tensor, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("singular values must be finite and non-negative")
    if s.sum() <= 0:
        raise ValueError("singular values are all zero: the spectrum has no shape")
    return s


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(H(p)), p = σ/Σσ (Roy & Vetterli 2007): r for a flat spectrum of length r, 1 for a single value."""
    s = _check_spectrum(singular_values)
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def participation_ratio(singular_values: torch.Tensor) -> float:
    """(Σσ)² / Σσ²: another effective-rank measure, more sensitive to the head of the spectrum."""
    s = _check_spectrum(singular_values)
    return float(s.sum() ** 2 / (s * s).sum())


def rank_for_retention(m: int, n: int, retention: float) -> int:
    """⌊retention·m·n/(m+n)⌋: the rank whose factors (m·k + k·n) hold `retention` of W's m·n parameters.

    Also elementwise over numpy arrays of shapes and retentions (the app's live plan numbers), where
    every retention must be in (0, 1]."""
    if isinstance(retention, np.ndarray) or isinstance(m, np.ndarray):
        retention = np.asarray(retention, dtype=np.float64)
        if not ((retention > 0) & (retention <= 1)).all():
            raise ValueError("every retention must be in (0, 1]")
        return np.floor(retention * m * n / (m + n) + 1e-9).astype(np.int64)
    check_retention(retention)
    # a hair of tolerance so that retention_for_rank(k) maps back to k despite float rounding
    return math.floor(retention * m * n / (m + n) + 1e-9)


def retention_for_rank(m: int, n: int, rank: int) -> float:
    """k·(m+n)/(m·n): the fraction of W's parameters that rank-k factors keep (> 1 past break-even)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}")
    return rank * (m + n) / (m * n)
