import pytest
import torch

from sigmascale_core.spectral import rank_truncation, singular_values, truncated_svd


def reference_truncation(X: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


@pytest.mark.parametrize(("m", "n", "k"), [(9, 5, 2), (5, 9, 3), (7, 7, 4), (12, 3, 1), (6, 6, 6)])
def test_truncation_and_its_gradient_match_torch_svd(m, n, k):
    g = torch.Generator().manual_seed(m * 100 + n)
    X = torch.randn(m, n, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(m, n, generator=g, dtype=torch.float64)
    ours = rank_truncation(X, k)
    ref = reference_truncation(X, k)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    (grad_ours,) = torch.autograd.grad((ours * upstream).sum(), X)
    (grad_ref,) = torch.autograd.grad((ref * upstream).sum(), X)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-8, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x: rank_truncation(x, k), (X,))


def test_gradient_stays_finite_with_repeated_kept_singular_values():
    # σ = (3, 3, 1, 0.5), k = 2: torch's SVD backward divides by σ₁² − σ₂² = 0; the truncation itself
    # is smooth here (the kept subspace is well defined), so its gradient must be finite and exact.
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(6, 4, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    X = (U * torch.tensor([3.0, 3.0, 1.0, 0.5], dtype=torch.float64)) @ V.T
    upstream = torch.randn(6, 4, generator=g, dtype=torch.float64)
    X.requires_grad_(True)
    (grad,) = torch.autograd.grad((rank_truncation(X, 2) * upstream).sum(), X)
    assert torch.isfinite(grad).all()
    step = 1e-6
    for i, j in [(0, 0), (3, 2), (5, 1)]:
        bump = torch.zeros_like(X)
        bump[i, j] = step
        with torch.no_grad():
            plus = (rank_truncation(X + bump, 2) * upstream).sum()
            minus = (rank_truncation(X - bump, 2) * upstream).sum()
        assert grad[i, j].item() == pytest.approx(((plus - minus) / (2 * step)).item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(("m", "n"), [(8, 5), (5, 8)])
def test_truncated_svd_factors(m, n):
    X = torch.randn(m, n, dtype=torch.float64)
    left, right, sigma = truncated_svd(X, 3)
    assert left.shape == (m, 3) and right.shape == (3, n)
    torch.testing.assert_close(left @ right, reference_truncation(X, 3), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sigma, torch.linalg.svdvals(X), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(left.norm(dim=0), right.norm(dim=1))  # balanced split
    torch.testing.assert_close(singular_values(X), torch.linalg.svdvals(X), rtol=1e-10, atol=1e-12)
