"""Truncated SVD through the eigendecomposition of the smaller Gram XᵀX, with an exact, stable gradient.

Why not torch.linalg.svd (in float64): `eigh` of the min(m,n)² Gram is 2–4× faster on CPU, and the best rank-k
approximation T_k(X) = X·V_k·V_kᵀ depends only on the *subspace* of the top k singular vectors, so its
derivative needs no singular vectors beyond that subspace's projector and couples kept with dropped
directions only. torch's SVD backward divides by σᵢ²−σⱼ² for every pair and turns NaN on any repeated
singular value; `tail_projector`'s divides only across the cut, by λ_kept − λ_dropped.
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

    σ holds all min(m, n) singular values. The balanced split keeps both factors equally scaled. A
    direction below X's rounding level gets zero factors; it would otherwise be noise divided by a
    near-zero √σ. float64 goes through the Gram's `eigh` (fast; its λ ≤ n·ε·λ₀ cut costs at most that
    much of ‖X‖²). Any other dtype goes through `torch.linalg.svd` (σ ≤ max(m, n)·ε·σ₀ cut): squaring X
    in float32 leaves only σ ≳ 0.02·σ₀ resolved at n = 4096, which lost 1.6× of the loss on one of
    SmolLM2's whitened down-projections at 0.75 (bench/bench_compute_dtype.py).
    """
    if X.dtype != torch.float64:
        U, sigma, Vh = torch.linalg.svd(X, full_matrices=False)
        live = sigma[:rank] > max(X.shape) * torch.finfo(X.dtype).eps * sigma[0]
        root = torch.where(live, sigma[:rank], 0).sqrt()
        return U[:, :rank] * root, root[:, None] * Vh[:rank], sigma
    if X.shape[0] < X.shape[1]:
        right_t, left_t, sigma = truncated_svd(X.mT, rank)
        return left_t.mT, right_t.mT, sigma
    eigenvalues, V = gram_eigh(X)
    V_k = V[:, :rank]  # (n, k)
    XV = X @ V_k  # (m, k), columns σ_i u_i
    live = eigenvalues[:rank] > X.shape[1] * torch.finfo(X.dtype).eps * eigenvalues[0]
    root = torch.where(live, XV.norm(dim=0), 0).sqrt()  # σ_i^½ from ‖X v_i‖: exact balance
    left = torch.where(live, XV / torch.where(live, root, 1), 0)
    right = root[:, None] * V_k.mT
    return left, right, eigenvalues.sqrt()


class _TailProjector(torch.autograd.Function):
    """P = V_D·V_Dᵀ, the projector onto all but the top-k eigenvectors of a symmetric S."""

    @staticmethod
    def forward(ctx, S: torch.Tensor, rank: int) -> torch.Tensor:
        eigenvalues, V = torch.linalg.eigh(S)
        eigenvalues, V = eigenvalues.flip(-1), V.flip(-1)  # descending
        V_dropped = V[:, rank:]
        ctx.save_for_backward(eigenvalues, V)
        ctx.rank = rank
        return V_dropped @ V_dropped.mT

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # First-order perturbation of the top-k eigenspace: with H = Vᵀ dS V, the kept/dropped block of
        # Vᵀ dP V is −H_ij / (λ_i − λ_j) (i kept, j dropped), mirrored; every other block is 0. Its
        # adjoint: S̄ = −(V_K C V_Dᵀ + V_D Cᵀ V_Kᵀ), C = V_Kᵀ sym(P̄) V_D / (λ_K − λ_D).
        # 1/gap is smoothed to gap/(gap² + δ²), δ = √ε·λ₀: exact to δ²/gap² (≤ 1% once gap ≥ 10δ),
        # bounded by 1/(2δ) when eigenvalues tie across the cut, so ‖S̄‖ ≤ ‖P̄‖/δ. Below that gap eigh's
        # eigenvectors (error ~ ε·λ₀/gap) hold less than half their digits: a sharper gradient would
        # steer by rounding noise, and one step of ~1/ε would stall Adam for the rest of the fit.
        eigenvalues, V = ctx.saved_tensors
        k = ctx.rank
        V_kept, V_dropped = V[:, :k], V[:, k:]
        symmetric = (grad + grad.mT) / 2
        gap = eigenvalues[:k, None] - eigenvalues[None, k:]  # (k, n−k), ≥ 0
        finfo = torch.finfo(V.dtype)
        delta = finfo.eps**0.5 * eigenvalues[0].abs().clamp_min(finfo.tiny)
        C = (V_kept.mT @ symmetric @ V_dropped) * (gap / (gap.square() + delta.square()))
        half = (V_kept @ C) @ V_dropped.mT
        return -(half + half.mT), None


def tail_projector(S: torch.Tensor, rank: int) -> torch.Tensor:
    """Projector onto the span of all but the top-`rank` eigenvectors of the symmetric matrix S.

    For S = XᵀX this is I − V_k V_kᵀ, the part of X's row space that a rank-k truncation drops. The
    gradient divides only across the cut, so repeated eigenvalues on one side of it are harmless.
    """
    return _TailProjector.apply(S, rank)
