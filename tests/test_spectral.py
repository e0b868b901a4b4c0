import pytest
import torch

from sigmascale_core.spectral import singular_values, tail_projector, truncated_svd


def reference_truncation(X: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def reference_tail_projector(X: torch.Tensor, k: int) -> torch.Tensor:
    """I − V_k·V_kᵀ from torch's SVD of X (its autograd is exact for distinct singular values)."""
    Vh = torch.linalg.svd(X, full_matrices=False)[2]
    return torch.eye(X.shape[1], dtype=X.dtype) - Vh[:k].mT @ Vh[:k]


@pytest.mark.parametrize(("m", "n", "k"), [(9, 5, 2), (7, 7, 4), (12, 3, 1), (6, 6, 5)])
def test_tail_projector_and_its_gradient_match_torch_svd(m, n, k):
    g = torch.Generator().manual_seed(m * 100 + n)
    X = torch.randn(m, n, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(n, n, generator=g, dtype=torch.float64)
    ours = tail_projector(X.mT @ X, k)
    ref = reference_tail_projector(X, k)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    (grad_ours,) = torch.autograd.grad((ours * upstream).sum(), X)
    (grad_ref,) = torch.autograd.grad((ref * upstream).sum(), X)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-8, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x: tail_projector(x.mT @ x, k), (X,))


def test_gradient_stays_finite_with_repeated_kept_eigenvalues():
    # λ = (9, 9, 1, 0.25), k = 2: torch's eigh/SVD backward divides by λ₁ − λ₂ = 0; the kept subspace
    # is well defined here, so the projector is smooth and its gradient must be finite and exact.
    g = torch.Generator().manual_seed(0)
    V, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    S = (V * torch.tensor([9.0, 9.0, 1.0, 0.25], dtype=torch.float64)) @ V.T
    upstream = torch.randn(4, 4, generator=g, dtype=torch.float64)

    def objective(S: torch.Tensor) -> torch.Tensor:
        return (tail_projector((S + S.mT) / 2, 2) * upstream).sum()

    S.requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(S), S)
    assert torch.isfinite(grad).all()
    step = 1e-6
    for i, j in [(0, 0), (3, 2), (1, 3)]:
        bump = torch.zeros_like(S)
        bump[i, j] = step
        with torch.no_grad():
            numeric = (objective(S + bump) - objective(S - bump)) / (2 * step)
        assert grad[i, j].item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(("m", "n"), [(8, 5), (5, 8)])
def test_truncated_svd_factors(m, n):
    X = torch.randn(m, n, dtype=torch.float64)
    left, right, sigma = truncated_svd(X, 3)
    assert left.shape == (m, 3) and right.shape == (3, n)
    torch.testing.assert_close(left @ right, reference_truncation(X, 3), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sigma, torch.linalg.svdvals(X), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(left.norm(dim=0), right.norm(dim=1))  # balanced split
    torch.testing.assert_close(singular_values(X), torch.linalg.svdvals(X), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_is_bounded_when_eigenvalues_tie_across_the_cut(dtype):
    # λ = (9, 1, 1, 0.25), k = 2: the kept subspace is undefined and 1/(λ₂ − λ₃) is 1/rounding. The
    # gradient must stay within ‖P̄‖/(√ε·λ₀), the documented bound, and away from gaps it is unchanged.
    g = torch.Generator().manual_seed(1)
    V, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    upstream = torch.randn(4, 4, generator=g, dtype=dtype)
    S = ((V * torch.tensor([9.0, 1.0, 1.0, 0.25], dtype=torch.float64)) @ V.T).to(dtype)
    S.requires_grad_(True)
    (grad,) = torch.autograd.grad((tail_projector(S, 2) * upstream).sum(), S)
    bound = upstream.norm() / (torch.finfo(dtype).eps ** 0.5 * 9.0)
    assert torch.isfinite(grad).all() and grad.norm() <= bound
