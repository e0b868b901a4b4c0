import pytest
import torch
from conftest import anisotropic_inputs, decaying_matrix
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sigmascale_core.methods import METHODS, decompose, learn_scaling, loss_curve, truncation_loss
from sigmascale_core.metrics import activation_loss
from sigmascale_core.stats import ActivationStats

FAST = {"steps": 15}  # sigmascale options that keep the tests quick


def options(method: str, **extra) -> dict:
    return {**FAST, **extra} if method == "sigmascale" else extra


def relative_loss(W, factors, stats) -> float:
    return activation_loss(W, factors.to_dense(), stats)


def whitened_tail_reference(W, X, k) -> float:
    """Independent float64 recomputation: Σ dropped σ²(W·L) / ‖WX‖², L = chol(XᵀX) from raw X."""
    X = X.to(torch.float64)
    L = torch.linalg.cholesky(X.T @ X)
    sigma = torch.linalg.svdvals(W.to(torch.float64) @ L)
    return (sigma[k:].square().sum() / (W.to(torch.float64) @ X.T).square().sum()).item()


@pytest.mark.parametrize(("m", "n", "k"), [(12, 7, 3), (7, 12, 3), (8, 8, 5)])
def test_truncation_loss_equals_the_explicit_scaled_truncation(m, n, k):
    # Reference: W′ = D_r⁻¹·T_k(D_r W D_c)·D_c⁻¹ with torch's SVD, loss from raw X, all float64.
    g = torch.Generator().manual_seed(m * 10 + n)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(50, n, generator=g, dtype=torch.float64) * torch.linspace(
        0.2, 3.0, n, dtype=torch.float64
    )
    r = 0.5 * torch.randn(m, generator=g, dtype=torch.float64)
    c = 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(r.exp()[:, None] * W * c.exp(), full_matrices=False)
    W_hat = ((U[:, :k] * S[:k]) @ Vh[:k]) / r.exp()[:, None] / c.exp()
    explicit = ((W - W_hat) @ X.T).square().sum() / (W @ X.T).square().sum()
    loss = truncation_loss(W, X.T @ X, k)
    assert loss(r, c).item() == pytest.approx(explicit.item(), rel=1e-10)
    rc = (r.clone().requires_grad_(True), c.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(loss, rc)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(4, 40),
    n=st.integers(4, 40),
    seed=st.integers(0, 10_000),
    rank_fraction=st.floats(0.05, 0.95),
)
def test_svdllm_is_the_exact_optimum(m, n, seed, rank_fraction):
    W = decaying_matrix(m, n, seed)
    X = anisotropic_inputs(3 * n + 10, n, seed + 1)
    stats = ActivationStats.from_inputs(X)
    k = max(1, int(rank_fraction * min(m, n)))
    best = relative_loss(W, decompose(W, stats, k, "svdllm"), stats)
    assert best == pytest.approx(whitened_tail_reference(W, X, k), rel=1e-7, abs=1e-12)
    for method in ("svd", "asvd", "sigmascale"):
        other = relative_loss(W, decompose(W, stats, k, method, **options(method)), stats)
        assert other >= best * (1 - 1e-9) - 1e-12, method


def test_sigmascale_never_ends_above_its_initialisation(layer):
    W, _, stats = layer
    for k in (3, 10, 20):
        svd = relative_loss(W, decompose(W, stats, k, "svd"), stats)
        asvd = relative_loss(W, decompose(W, stats, k, "asvd"), stats)
        from_identity = relative_loss(
            W, decompose(W, stats, k, "sigmascale", init="identity", steps=30), stats
        )
        from_asvd = relative_loss(W, decompose(W, stats, k, "sigmascale", init="asvd", steps=30), stats)
        assert from_identity <= svd * (1 + 1e-12)
        assert from_asvd <= asvd * (1 + 1e-12)


def test_sigmascale_improves_on_plain_svd_with_anisotropic_inputs(layer):
    W, _, stats = layer
    svd = relative_loss(W, decompose(W, stats, 10, "svd"), stats)
    learned = relative_loss(W, decompose(W, stats, 10, "sigmascale", init="identity", steps=60), stats)
    assert learned < 0.7 * svd


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("m", "n"), [(12, 7), (7, 12)])
def test_full_rank_reproduces_W(method, m, n):
    W = decaying_matrix(m, n, seed=3)
    stats = ActivationStats.from_inputs(anisotropic_inputs(60, n, seed=4))
    factors = decompose(W, stats, min(m, n), method, **options(method))
    torch.testing.assert_close(factors.to_dense(), W, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("m", "n"), [(30, 18), (18, 30)])
def test_loss_curve_agrees_with_decompose(method, m, n):
    W = decaying_matrix(m, n, seed=5)
    stats = ActivationStats.from_inputs(anisotropic_inputs(200, n, seed=6))
    learned_at = 6
    curve = loss_curve(W, stats, method, rank=learned_at, **options(method))
    assert curve.shape == (min(m, n) + 1,)
    assert curve[0].item() == pytest.approx(1.0, rel=1e-9)
    assert curve[-1].item() == pytest.approx(0.0, abs=1e-12)
    ranks = [learned_at] if method == "sigmascale" else [1, 4, learned_at, min(m, n) - 1]
    for k in ranks:
        direct = relative_loss(W, decompose(W, stats, k, method, **options(method)), stats)
        assert curve[k].item() == pytest.approx(direct, rel=1e-8, abs=1e-14), k


def test_loss_curve_on_held_out_stats(layer):
    W, _, stats = layer
    held_out = ActivationStats.from_inputs(anisotropic_inputs(300, 32, seed=9))
    curve = loss_curve(W, stats, "svdllm", eval_stats=held_out)
    factors = decompose(W, stats, 5, "svdllm")
    assert curve[5].item() == pytest.approx(activation_loss(W, factors.to_dense(), held_out), rel=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient_gram_gives_finite_factors(method):
    n = 40
    W = decaying_matrix(24, n, seed=7)
    X = anisotropic_inputs(25, n, seed=8, dead=5)  # fewer tokens than channels, 5 dead channels
    stats = ActivationStats.from_inputs(X)
    factors = decompose(W, stats, 8, method, **options(method))
    assert torch.isfinite(factors.left).all() and torch.isfinite(factors.right).all()
    loss = relative_loss(W, factors, stats)
    assert 0 <= loss < 1
    assert torch.isfinite(loss_curve(W, stats, method, rank=8, **options(method))).all()


def test_factors_carry_shapes_scales_and_dtype(layer):
    W, _, stats = layer
    W32 = W.float()
    f = decompose(W32, stats, 5, "sigmascale", init="asvd", **FAST)
    assert f.left.shape == (48, 5) and f.right.shape == (5, 32) and f.rank == 5
    assert f.left.dtype == f.right.dtype == torch.float32 and f.left.device == W32.device
    assert f.row_scale.shape == (48,) and f.col_scale.shape == (32,)
    assert f.scaled_singular_values.shape == (32,)
    assert decompose(W32, stats, 5, "asvd").row_scale is None
    assert decompose(W32, None, 5, "svd").col_scale is None


def test_sigmascale_is_deterministic_per_seed(layer):
    W, _, stats = layer
    a = decompose(W, stats, 5, "sigmascale", steps=10, init_noise=0.1, seed=1)
    b = decompose(W, stats, 5, "sigmascale", steps=10, init_noise=0.1, seed=1)
    c = decompose(W, stats, 5, "sigmascale", steps=10, init_noise=0.1, seed=2)
    assert torch.equal(a.left, b.left) and torch.equal(a.right, b.right)
    assert not torch.equal(a.left, c.left)


def test_works_under_inference_mode(layer):
    W, _, stats = layer
    with torch.inference_mode():
        f = decompose(W, stats, 5, "sigmascale", **FAST)
    assert torch.isfinite(f.left).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda W, s: decompose(W, s, 0, "svd"), "rank must be in"),
        (lambda W, s: decompose(W, s, 33, "svd"), "rank must be in"),
        (lambda W, s: decompose(W, s, 2.0, "svd"), "rank must be an int"),
        (lambda W, s: decompose(W[0], s, 2, "svd"), "2-D"),
        (lambda W, s: decompose(W[:, :10], s, 2, "asvd"), "width 32"),
        (lambda W, s: decompose(W, s, 2, "pca"), "unknown method"),
        (lambda W, s: decompose(W, s, 2, "asvd", beta=1), "unknown option"),
        (lambda W, s: decompose(W, s, 2, "svd", alpha=1), "unknown option"),
        (lambda W, s: decompose(W, s, 2, "sigmascale", init="random"), "unknown init"),
        (lambda W, s: decompose(W, s, 2, "sigmascale", steps=-1), "steps"),
        (lambda W, s: decompose(W, s, 2, "sigmascale", lr=0), "lr"),
        (lambda W, s: decompose(W, None, 2, "svdllm"), "needs activation stats"),
        (lambda W, s: loss_curve(W, s, "sigmascale"), "rank="),
    ],
)
def test_bad_input_raises_value_error(layer, call, message):
    W, _, stats = layer
    with pytest.raises(ValueError, match=message):
        call(W, stats)


def test_non_finite_inputs_raise(layer):
    W, _, stats = layer
    bad_W = W.clone()
    bad_W[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        decompose(bad_W, stats, 2, "svd")
    bad_stats = ActivationStats(32, gram=stats.gram.clone(), abs_sum=stats.abs_sum.clone(), count=stats.count)
    bad_stats.gram[1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        decompose(W, bad_stats, 2, "svdllm")


# ---------------------------------------------------------------------------------------------------
# Rank-deficient W: zero directions give zero factors and every method reaches its own optimum


def rank_deficient(m: int, n: int, rank: int, zero_rows: int, duplicate: bool, seed: int) -> torch.Tensor:
    """An (m, n) float64 matrix of rank ≤ `rank`: a product of thin factors, some zero rows, and
    optionally its last column a copy of its first."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, n, generator=g, dtype=torch.float64
    )
    W[:zero_rows] = 0
    if duplicate:
        W[:, -1] = W[:, 0]
    return W


def scaled_metric(W64, factors, method, X):
    """(W_s, error_s): the matrix each method truncates and the approximation error in its own
    metric, all float64 from the raw inputs (the optimum of that error is the tail of W_s's spectrum)."""
    row = torch.ones(W64.shape[0], dtype=torch.float64) if factors.row_scale is None else factors.row_scale
    col = torch.ones(W64.shape[1], dtype=torch.float64) if factors.col_scale is None else factors.col_scale
    E = W64 - factors.left.double() @ factors.right.double()
    if method == "svdllm":  # min over rank-k W′ of ‖(W − W′)Xᵀ‖ for X of full column rank
        return W64 @ X.T, E @ X.T
    row, col = row.double()[:, None], col.double()
    return row * W64 * col, row * E * col


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(3, 20),
    n=st.integers(3, 20),
    true_rank=st.integers(1, 6),
    zero_rows=st.integers(0, 3),
    duplicate=st.booleans(),
    rank_fraction=st.floats(0.05, 1.0),
    seed=st.integers(0, 1000),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_rank_deficient_w_gives_finite_factors_and_the_optimal_loss(
    m, n, true_rank, zero_rows, duplicate, rank_fraction, seed, dtype
):
    W = rank_deficient(m, n, true_rank, min(zero_rows, m - 1), duplicate, seed).to(dtype)
    W64 = W.double()  # the matrix the methods see, exactly
    X = anisotropic_inputs(3 * n + 10, n, seed + 1)
    stats = ActivationStats.from_inputs(X)
    k = max(1, round(rank_fraction * min(m, n)))
    rank_of_W = int(torch.linalg.matrix_rank(W64))
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5  # of ‖W_s‖²; float32 factors round at ~6e-8
    for method in METHODS:
        diagonal = {"steps": 3, "init": "asvd"}  # scaled_metric reads diagonal scales
        factors = decompose(W, stats, k, method, **(diagonal if method == "sigmascale" else {}))
        assert torch.isfinite(factors.left).all() and torch.isfinite(factors.right).all(), method
        Ws, error = scaled_metric(W64, factors, method, X.double())
        optimum = torch.linalg.svdvals(Ws)[k:].square().sum()
        scale = Ws.square().sum()
        assert abs(error.square().sum() - optimum) <= tolerance * scale, method
        if k > rank_of_W:  # the directions beyond W's rank carry nothing: exactly zero factors
            assert (factors.left[:, rank_of_W:] == 0).all() and (factors.right[rank_of_W:] == 0).all(), method


def test_a_tie_at_the_cut_does_not_stall_or_break_the_fit():
    # σ₄ = σ₅ = 1 with k = 4 and init="identity": the fit starts exactly on a tie of the scaled spectrum.
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    W = (U[:, :8] * torch.tensor([4, 3, 2, 1, 1, 0.5, 0.3, 0.1], dtype=torch.float64)) @ V.T
    stats = ActivationStats.from_inputs(anisotropic_inputs(200, 8, seed=3))
    exact = truncation_loss(W, stats.gram, 4)
    start = exact(torch.zeros(12, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)).item()
    scaling = learn_scaling(W, stats.gram, stats.abs_mean, 4, steps=20, init="identity")
    assert torch.isfinite(scaling.row).all() and torch.isfinite(scaling.col).all()
    learned = exact(scaling.row.log(), scaling.col.log()).item()
    assert learned <= start
    # the first gradient is ~1/ε at the tie unless bounded, and Adam then barely moves for the whole fit
    assert learned < 0.2 * start


def test_the_whitening_jitter_each_matrix_needed_is_reported():
    W = decaying_matrix(24, 40, seed=7)
    singular = ActivationStats.from_inputs(anisotropic_inputs(25, 40, seed=8, dead=5))  # rank ≤ 25 < 40
    full = ActivationStats.from_inputs(anisotropic_inputs(400, 40, seed=8))
    jitter = decompose(W, singular, 8, "svdllm").jitter
    gram = singular.gram
    eye = torch.eye(40, dtype=torch.float64)
    # the smallest of the tried levels 1e-10..1·mean(diag) that makes the Gram positive definite
    levels = [gram.diagonal().mean().item() * 10.0**e for e in range(-10, 1)]
    assert jitter in levels
    assert torch.linalg.cholesky_ex(gram + jitter * eye).info == 0
    assert all(torch.linalg.cholesky_ex(gram + lam * eye).info != 0 for lam in levels if lam < jitter)
    assert torch.linalg.cholesky_ex(gram).info != 0  # it did need one
    assert decompose(W, full, 8, "svdllm").jitter == 0.0
    for method in ("svd", "asvd"):
        assert decompose(W, singular, 8, method).jitter == 0.0
    assert decompose(W, singular, 8, "sigmascale", init="asvd", **FAST).jitter == 0.0
    assert decompose(W, singular, 8, "sigmascale", **FAST).jitter > 0  # init="whiten" whitens too
