"""Truncated SVD through the eigendecomposition of the smaller Gram WᵀW, with an exact, stable gradient.

Why not torch.linalg.svd: `eigh` of the min(m,n)² Gram is 3–4× faster on CPU, and the best rank-k
approximation T_k(X) = X·V_k·V_kᵀ depends only on the *subspace* of the top k singular vectors, so its
derivative needs no left vectors and couples kept with dropped directions only. torch's SVD backward
divides by σᵢ²−σⱼ² for every pair and turns NaN on any repeated singular value; this one divides only
across the cut, by λ_kept − λ_dropped.
"""

from __future__ import annotations

import torch


def gram_eigh(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ, V) of XᵀX for X (m, n), m ≥ n: λ (n,) descending = σ², V (n, n) the right singular vectors."""
    eigenvalues, vectors = torch.linalg.eigh(X.mT @ X)  # ascending
    return eigenvalues.flip(-1).clamp_min(0), vectors.flip(-1)


def singular_values(X: torch.Tensor) -> torch.Tensor:
    """All min(m, n) singular values of X, descending (via the smaller Gram)."""
    return gram_eigh(X if X.shape[0] >= X.shape[1] else X.mT)[0].sqrt()


def truncated_svd(X: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(left, right, σ): X ≈ left @ right with left (m, k) = U_k·Σ_k^½, right (k, n) = Σ_k^½·V_kᵀ.

    σ holds all min(m, n) singular values. The balanced split keeps both factors equally scaled.
    """
    if X.shape[0] < X.shape[1]:
        right_t, left_t, sigma = truncated_svd(X.mT, rank)
        return left_t.mT, right_t.mT, sigma
    eigenvalues, V = gram_eigh(X)
    sigma = eigenvalues.sqrt()
    V_k = V[:, :rank]  # (n, k)
    root = sigma[:rank].clamp_min(torch.finfo(X.dtype).tiny).sqrt()
    left = (X @ V_k) / root  # X v_i = σ_i u_i  →  u_i σ_i^½
    right = root[:, None] * V_k.mT
    return left, right, sigma


class _RankTruncation(torch.autograd.Function):
    """T_k(X) = X·V_k·V_kᵀ, the best rank-k approximation of X (m ≥ n)."""

    @staticmethod
    def forward(ctx, X: torch.Tensor, rank: int) -> torch.Tensor:
        eigenvalues, V = gram_eigh(X)
        V_k = V[:, :rank]
        ctx.save_for_backward(X, eigenvalues, V)
        ctx.rank = rank
        return (X @ V_k) @ V_k.mT

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # With H = Vᵀ Xᵀ Ḡ V and λ = σ², the adjoint of the differential of T_k is
        #   X̄ = Ḡ V_k V_kᵀ + X V F Vᵀ,  F_ij = (H_ij + H_ji) / (λ_kept − λ_dropped) when exactly one of
        #   i, j is kept, else 0. (Derived from the first-order perturbation of the top-k subspace.)
        X, eigenvalues, V = ctx.saved_tensors
        k = ctx.rank
        V_k = V[:, :k]
        XV = X @ V  # (m, n)
        H = XV.mT @ (grad @ V)  # (n, n)
        gap = eigenvalues[:k, None] - eigenvalues[None, k:]  # (k, n−k), ≥ 0
        floor = torch.finfo(X.dtype).eps * eigenvalues[0].clamp_min(torch.finfo(X.dtype).tiny)
        cross = (H[:k, k:] + H[k:, :k].mT) / gap.clamp_min(floor)
        F = torch.zeros_like(H)
        F[:k, k:] = cross
        F[k:, :k] = cross.mT
        return (grad @ V_k) @ V_k.mT + XV @ (F @ V.mT), None


def rank_truncation(X: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-k approximation of X (any shape), differentiable with the stable gradient above."""
    if X.shape[0] < X.shape[1]:
        return _RankTruncation.apply(X.mT, rank).mT
    return _RankTruncation.apply(X, rank)
