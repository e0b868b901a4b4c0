"""Shrunk whitening (svdllm shrink=λ), SigmaScale learned on top of it (init="whiten"), and the
held-out choice of λ: each checked against an independent float64 recomputation from the raw inputs."""

import pytest
import torch
from conftest import anisotropic_inputs, decaying_matrix

from sigmascale_core.methods import (
    SHRINK_GRID,
    choose_shrink,
    decompose,
    fit_scaling,
    learn_scaling,
    shrunk_gram,
    truncation_loss,
    whitening_factor,
)
from sigmascale_core.stats import ActivationStats


def raw_loss(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """‖(W − Ŵ)Xᵀ‖² / ‖WXᵀ‖² from the tokens themselves, float64."""
    W, W_hat, X = (t.to(torch.float64) for t in (W, W_hat, X))
    return (((W - W_hat) @ X.T).square().sum() / (W @ X.T).square().sum()).item()


def whitened_truncation(W: torch.Tensor, G: torch.Tensor, k: int) -> torch.Tensor:
    """Reference W′ = T_k(W·L)·L⁻¹, L = chol(G), by a full SVD and an explicit inverse."""
    L = torch.linalg.cholesky(G)
    U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k] @ torch.linalg.inv(L)


@pytest.fixture
def small_calibration():
    """Few tokens for the width (n = 32, 48 tokens): whitening overfits them; plenty of held-out ones."""
    W = decaying_matrix(40, 32, seed=3)
    X = anisotropic_inputs(48, 32, seed=4)
    X_held = anisotropic_inputs(2048, 32, seed=4)[48:]  # same channel scales and mixing, other tokens
    return W, X, X_held


def test_shrink_zero_is_svdllm_exactly(layer):
    W, X, stats = layer
    old = decompose(W, stats, 9, "svdllm")
    zero = decompose(W, stats, 9, "svdllm", shrink=0.0)
    assert torch.equal(old.left, zero.left) and torch.equal(old.right, zero.right)
    reference = whitened_truncation(W, X.T @ X, 9)
    assert torch.allclose(zero.to_dense(), reference, atol=1e-9)


@pytest.mark.parametrize("shrink", [0.3, 0.999999])
def test_shrunk_whitening_is_the_closed_form(layer, shrink):
    W, X, stats = layer
    G = X.T @ X
    shrunk = (1 - shrink) * G + shrink * torch.diag(torch.diag(G))
    got = decompose(W, stats, 9, "svdllm", shrink=shrink).to_dense()
    assert torch.allclose(got, whitened_truncation(W, shrunk, 9), atol=1e-8)
    if shrink > 0.99:  # → diag(G): the column scale √(Σ x²) and nothing else
        d = torch.diag(G).sqrt()
        U, S, Vh = torch.linalg.svd(W * d, full_matrices=False)
        diagonal_only = (U[:, :9] * S[:9]) @ Vh[:9] / d
        assert torch.allclose(got, diagonal_only, atol=1e-5)


@pytest.mark.parametrize("shrink", [0.0, 0.2, 0.6])
def test_whiten_init_is_never_worse_than_svdllm_with_the_same_shrink(layer, shrink):
    W, X, stats = layer
    k = 10
    svdllm = raw_loss(W, decompose(W, stats, k, "svdllm", shrink=shrink).to_dense(), X)
    learned = decompose(W, stats, k, "sigmascale", init="whiten", shrink=shrink, steps=30)
    assert learned.col_scale is None and learned.row_scale is not None  # S_col = L·diag(eᶜ) is a matrix
    ours = raw_loss(W, learned.to_dense(), X)
    optimum = raw_loss(W, decompose(W, stats, k, "svdllm").to_dense(), X)
    assert ours <= svdllm * (1 + 1e-9)
    assert ours >= optimum * (1 - 1e-9)  # unshrunk whitening is the exact optimum on these tokens
    if shrink > 0:
        assert ours < svdllm * (1 - 1e-4)  # the learned scales recover part of what shrinking gave up


def test_whiten_scaling_is_lower_triangular(layer):
    W, _, stats = layer
    scaling = fit_scaling(W, stats, "sigmascale", 6, init="whiten", shrink=0.1, steps=3)
    assert scaling.col.shape == (32, 32) and torch.equal(scaling.col, scaling.col.tril())


@pytest.mark.parametrize(
    ("method", "options"), [("svdllm", {}), ("sigmascale", {"init": "whiten", "steps": 5})]
)
def test_choose_shrink_is_the_held_out_argmin_of_the_grid(small_calibration, method, options):
    W, X, X_held = small_calibration
    stats, held = ActivationStats.from_inputs(X), ActivationStats.from_inputs(X_held)
    k = 8
    chosen, losses = choose_shrink(W, stats, held, k, method, **options)
    brute = {
        lam: raw_loss(W, decompose(W, stats, k, method, shrink=lam, **options).to_dense(), X_held)
        for lam in SHRINK_GRID
    }
    assert set(losses) == set(brute)
    for lam in SHRINK_GRID:
        assert losses[lam] == pytest.approx(brute[lam], rel=1e-6)
    assert chosen == min(brute, key=brute.__getitem__)
    assert chosen > 0  # 48 tokens for 32 channels: some shrinking generalises better than none


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("svdllm", {"shrink": 1.0}, r"shrink of svdllm must be in \[0, 1\)"),
        ("svdllm", {"shrink": -0.1}, r"shrink of svdllm must be in \[0, 1\)"),
        ("svdllm", {"shrink": "0.1"}, "expects float"),
        ("sigmascale", {"shrink": 1.5}, r"shrink of sigmascale must be in \[0, 1\)"),
        ("sigmascale", {"init": "whitened"}, "unknown init"),
        ("asvd", {"shrink": 0.1}, "unknown option"),
    ],
)
def test_option_validation(layer, method, options, message):
    W, _, stats = layer
    with pytest.raises(ValueError, match=message):
        decompose(W, stats, 4, method, **options)


def test_sigmascale_defaults_learn_on_shrunk_whitening_and_other_inits_ignore_shrink(layer):
    W, _, stats = layer
    default = decompose(W, stats, 7, "sigmascale", steps=5)
    explicit = decompose(W, stats, 7, "sigmascale", steps=5, init="whiten", shrink=0.01)
    assert torch.equal(default.left, explicit.left) and torch.equal(default.right, explicit.right)
    asvd = decompose(W, stats, 7, "sigmascale", steps=5, init="asvd", shrink=0.3)
    asvd_unshrunk = decompose(W, stats, 7, "sigmascale", steps=5, init="asvd", shrink=0.0)
    assert torch.equal(asvd.left, asvd_unshrunk.left) and asvd.col_scale is not None


def test_choose_shrink_needs_a_grid(layer):
    W, _, stats = layer
    with pytest.raises(ValueError, match="non-empty grid"):
        choose_shrink(W, stats, stats, 4, grid=())


def test_wide_matrices_learn_from_the_outputs_gram_alone():
    """m < n: init="whiten" skips L⁻¹·G·L⁻ᵀ (two n³ solves); the loss it uses, from W·G·Wᵀ, must equal
    the loss of W̃ = W·L under G̃ = L⁻¹·G·L⁻ᵀ at any scales, and the fit must stay at or below its start."""
    W = decaying_matrix(24, 56, seed=5)
    X = anisotropic_inputs(400, 56, seed=6)
    G = X.T @ X
    L, _ = whitening_factor(shrunk_gram(G, 0.05))
    W_tilde = W @ L
    G_tilde = torch.linalg.solve_triangular(
        L, torch.linalg.solve_triangular(L, G, upper=False).mT, upper=False
    )
    explicit = truncation_loss(W_tilde, G_tilde, 10)
    from_outputs = truncation_loss(W_tilde, None, 10, output_gram=W @ G @ W.mT)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        r, c = (
            0.3 * torch.randn(24, generator=g, dtype=torch.float64),
            0.3 * torch.randn(56, generator=g, dtype=torch.float64),
        )
        torch.testing.assert_close(from_outputs(r, c), explicit(r, c), rtol=1e-9, atol=0)
    stats = ActivationStats.from_inputs(X)
    learned = learn_scaling(W, G, stats.abs_mean, 10, steps=15, shrink=0.05)
    start = fit_scaling(W, stats, "svdllm", shrink=0.05)
    learned_loss = raw_loss(W, decompose(W, stats, 10, "sigmascale", steps=15, shrink=0.05).to_dense(), X)
    start_loss = raw_loss(W, decompose(W, stats, 10, "svdllm", shrink=0.05).to_dense(), X)
    assert learned.col.shape == start.col.shape == (56, 56)
    assert learned_loss <= start_loss * (1 + 1e-9)
