"""compute_dtype="float32": the truncation in float32, Cholesky and the checks in float64 (issue 18).

References: Eckart–Young's closed-form tail Σ_{i>k} σ_i² for a matrix of known singular values, and
each method's own float64 run, with every loss recomputed in float64 from the float64 Gram.
"""

import pytest
import torch

from sigmascale_core.methods import METHODS, decompose, fit_scaling, truncate
from sigmascale_core.metrics import gram_error
from sigmascale_core.plan import CompressionPlan, parse_options
from sigmascale_core.spectral import gram_eigh, truncated_svd
from sigmascale_core.stats import ActivationStats


def known_spectrum(m: int, n: int, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """U·diag(σ)·Vᵀ with random orthonormal U, V (float64)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(sigma), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(sigma), generator=g, dtype=torch.float64))
    return U * sigma @ V.mT


def test_float32_truncation_reaches_eckart_young_where_the_squared_gram_cannot():
    sigma = torch.logspace(0, -5, 200, dtype=torch.float64)  # σ₀ = 1 … 1e-5
    X = known_spectrum(300, 200, sigma)
    rank = 100  # σ_k ≈ 3e-3: below what a float32 Gram (λ resolved to ~n·ε·λ₀) can separate
    optimum = sigma[rank:].square().sum()
    left, right, s = truncated_svd(X.float(), rank)
    error = (X - left.double() @ right.double()).square().sum()
    assert left.dtype == right.dtype == torch.float32
    torch.testing.assert_close(s.double()[:rank], sigma[:rank], rtol=1e-4, atol=1e-6)
    assert error / optimum - 1 < 1e-2, "float32 SVD misses the best rank-k error"
    # The float64 route run in float32 (what the truncation must not do): the squared spectrum resolves
    # only λ > n·ε·λ₀, fewer than `rank` directions here, and keeping only those costs the rest.
    eigenvalues, V = gram_eigh(X.float())
    resolved = int((eigenvalues > X.shape[1] * torch.finfo(torch.float32).eps * eigenvalues[0]).sum())
    assert resolved < rank
    V_kept = V[:, :resolved].double()
    squared = (X - X @ V_kept @ V_kept.mT).square().sum()
    assert squared / optimum > 1.5, "the reference case no longer tells the two routes apart"


def ill_conditioned_problem(m: int = 96, n: int = 64, tokens: int = 4000, seed: int = 0):
    """W and the stats of inputs whose channel energies span 1e6 and are correlated (LLM-like)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5
    scales = torch.logspace(-3, 0, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    mix = (
        torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    )
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix * scales
    return W, ActivationStats.from_inputs(X)


def relative_loss(W: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    return float(gram_error(W - approx.double(), gram) / gram_error(W, gram))


@pytest.mark.parametrize("method", METHODS)
def test_float32_decomposition_matches_float64_loss(method, monkeypatch):
    W, stats = ill_conditioned_problem()
    rank = 24
    dtypes = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda X, **kw: dtypes.append(X.dtype) or svd(X, **kw))
    f64 = decompose(W, stats, rank, method)
    assert dtypes == [], "float64 truncates through the Gram's eigh"
    f32 = decompose(W, stats, rank, method, compute_dtype="float32")
    assert dtypes == [torch.float32], "float32 truncates through one float32 SVD"
    assert f32.left.dtype == f32.right.dtype == torch.float64  # factors in W's dtype
    exact, single = relative_loss(W, f64.to_dense(), stats.gram), relative_loss(W, f32.to_dense(), stats.gram)
    assert abs(single / exact - 1) < 1e-4, (method, exact, single)
    assert not torch.equal(f32.left, f64.left)


def test_whitening_factor_stays_float64_under_float32(monkeypatch):
    W, stats = ill_conditioned_problem(seed=1)
    seen = []
    cholesky = torch.linalg.cholesky_ex
    monkeypatch.setattr(
        torch.linalg, "cholesky_ex", lambda G, **kw: seen.append(G.dtype) or cholesky(G, **kw)
    )
    scaling = fit_scaling(W.float(), stats, "svdllm", compute_dtype="float32")
    assert seen == [torch.float64] and scaling.col.dtype == torch.float64
    assert scaling.compute_dtype == torch.float32
    factors = truncate(W.float(), scaling, 24, "svdllm")  # the probe's path: fit once, truncate per rank
    assert factors.left.dtype == torch.float32


def test_sigmascale_float32_keeps_its_start_and_its_float64_check():
    W, stats = ill_conditioned_problem(seed=2)
    rank = 24
    learned = decompose(W, stats, rank, "sigmascale", steps=10, compute_dtype="float32")
    start = decompose(W, stats, rank, "sigmascale", steps=0, compute_dtype="float32")
    reference = decompose(W, stats, rank, "sigmascale", steps=10)
    gram = stats.gram
    assert relative_loss(W, learned.to_dense(), gram) <= relative_loss(W, start.to_dense(), gram) * (1 + 1e-5)
    assert relative_loss(W, learned.to_dense(), gram) == pytest.approx(
        relative_loss(W, reference.to_dense(), gram), rel=1e-3
    )


def test_compute_dtype_travels_in_the_plan():
    options = parse_options(["compute_dtype=float32"], "svdllm")
    plan = CompressionPlan.uniform({"a.weight": (8, 8)}, 0.5, "svdllm", "fingerprint", options=options)
    assert CompressionPlan.from_dict(plan.to_dict()).options == {"compute_dtype": "float32"}
    with pytest.raises(ValueError, match="compute_dtype of svd must be one of"):
        parse_options(["compute_dtype=bfloat16"], "svd")
