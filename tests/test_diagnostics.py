"""WeightWatcher-style diagnostics against closed forms, random-matrix theory and brute-force references."""

import dataclasses

import numpy as np
import pytest
from scipy import stats

from sigmascale_core.diagnostics import (
    DESCRIPTIONS,
    Diagnostics,
    diagnostics,
    esd_histogram,
    fit_power_law,
    hard_rank,
    mp_edges,
    power_law_line,
    rank_loss,
    shuffled_eigenvalues,
    spike_threshold,
    training_flags,
)


def svals(W: np.ndarray) -> np.ndarray:
    return np.linalg.svd(W, compute_uv=False)


def pareto_sample(alpha: float, n: int, xmin: float, seed: int) -> np.ndarray:
    """n draws from p(λ) ∝ λ^−α on [xmin, ∞), by inverting the CDF 1 − (λ/xmin)^(1−α)."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1 - u) ** (-1 / (alpha - 1))


def gaussian(n_rows: int, n_cols: int, seed: int, std: float = 1.0) -> np.ndarray:
    return std * np.random.default_rng(seed).standard_normal((n_rows, n_cols))


def test_norms_and_stable_rank_closed_form():
    sigma = np.array([3.0, 2.0, 1.0, 0.0])
    d = diagnostics(sigma, (4, 6))
    assert d.stable_rank == pytest.approx((9 + 4 + 1) / 9)
    assert d.log_norm == pytest.approx(np.log10(14))
    assert d.log_spectral_norm == pytest.approx(np.log10(9))  # λ_max = σ₁², not σ₁
    assert d.alpha_weighted == pytest.approx(d.alpha * np.log10(9))
    assert d.log_alpha_norm == pytest.approx(np.log10(9**d.alpha + 4**d.alpha + 1))
    assert (d.hard_rank, d.rank_loss) == (3, 1)


def test_power_law_fit_matches_brute_force_scipy_reference():
    """Our vectorised scan equals a per-xmin loop of scipy's Pareto MLE and the KS step distance."""
    lam = np.concatenate([np.random.default_rng(3).uniform(0.1, 1.0, 150), pareto_sample(3.0, 150, 1.0, 4)])
    x = np.sort(lam)
    best = (np.inf, None, None)
    for i in range(x.size - 1):
        tail = x[i:]
        b, _, _ = stats.pareto.fit(tail, floc=0, fscale=x[i])  # density ∝ λ^−(b+1)
        n = tail.size
        ks = np.max(np.abs(stats.pareto.cdf(tail, b, scale=x[i]) - np.arange(n) / n))
        if ks < best[0]:
            best = (ks, b + 1, x[i])
    fit = fit_power_law(lam)
    np.testing.assert_allclose(fit.D, best[0], rtol=1e-9)
    assert fit.alpha == pytest.approx(best[1], rel=1e-9)
    assert fit.xmin == best[2]
    assert fit.n_tail == np.count_nonzero(x >= fit.xmin)
    assert fit.sigma == pytest.approx((fit.alpha - 1) / np.sqrt(fit.n_tail))


@pytest.mark.parametrize("alpha", [2.5, 4.0])
def test_power_law_alpha_recovered_within_two_standard_errors(alpha):
    lam = pareto_sample(alpha, 2000, xmin=0.5, seed=7)
    fit = fit_power_law(lam)
    assert abs(fit.alpha - alpha) < 2 * fit.sigma
    assert fit.sigma < 0.2  # the KS scan kept a real tail, not a handful of points
    # the spectrum route: σ = √λ gives the same fit through `diagnostics`
    d = diagnostics(np.sqrt(lam), (2000, 4000))
    assert d.alpha == pytest.approx(fit.alpha) and d.xmin == pytest.approx(fit.xmin)


def test_training_flags_follow_weightwatcher_thresholds():
    assert training_flags(6.5) == (True, False)
    assert training_flags(1.8) == (False, True)
    assert training_flags(3.0) == (False, False)
    d = diagnostics(np.sqrt(pareto_sample(1.7, 500, 1.0, seed=1)), (500, 800))
    assert d.over_trained and d.warning == "over-trained"


def test_gaussian_matrix_sits_inside_the_mp_bulk():
    W = gaussian(400, 1000, seed=0, std=0.02)
    d = diagnostics(svals(W), W.shape, W)
    assert d.mp_variance == pytest.approx(0.02**2, rel=0.01)
    lo, hi = mp_edges(W.shape, 0.02**2)  # closed form: s²(√N ± √M)²
    assert hi == pytest.approx(0.02**2 * (np.sqrt(1000) + np.sqrt(400)) ** 2)
    assert lo == pytest.approx(0.02**2 * (np.sqrt(1000) - np.sqrt(400)) ** 2)
    assert d.lambda_plus == pytest.approx(hi, rel=0.01)
    assert d.num_spikes == 0
    lam = np.sort(svals(W) ** 2)
    assert lam[0] > 0.95 * d.lambda_minus  # the whole ESD is in the bulk
    assert d.mp_softrank == pytest.approx(d.lambda_plus / lam[-1])
    assert abs(d.mp_softrank - 1) < 0.03  # λ_max sits at the edge, within Tracy–Widom fluctuations
    assert d.num_traps == 0 and abs(d.rand_softrank - 1) < 0.05
    assert d.alpha > 6 and d.under_trained  # a random matrix has no heavy tail


def test_planted_rank_one_spike_is_counted():
    N, M = 1000, 400
    rng = np.random.default_rng(1)
    u, v = rng.standard_normal(N), rng.standard_normal(M)
    theta = 3 * (N * M) ** 0.25  # 3× the BBP threshold (N·M)^¼ for unit-variance noise
    W = gaussian(N, M, seed=2) + theta * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    d = diagnostics(svals(W), W.shape, W)
    assert d.num_spikes == 1
    # BBP outlier location: σ₁² → (θ² + N)(θ² + M)/θ²
    assert 10**d.log_spectral_norm == pytest.approx((theta**2 + N) * (theta**2 + M) / theta**2, rel=0.03)
    assert d.mp_variance == pytest.approx(1.0, rel=0.01)  # the spike does not inflate the bulk's variance
    assert d.mp_softrank < 0.5
    # shuffling destroys the rank-one structure: no trap, and the shuffled λ_max falls back to the edge
    assert d.num_traps == 0
    assert d.rand_softrank < 0.5


def test_spike_count_threshold_sits_above_the_edge():
    edge = mp_edges((1000, 400), 1.0)[1]
    assert edge < spike_threshold((1000, 400), 1.0) < 1.05 * edge


def test_shuffling_keeps_a_correlation_trap():
    """A few huge entries make spikes that survive shuffling: traps. Learned structure does not."""
    W = gaussian(300, 600, seed=5)
    W[7, 11] = W[200, 400] = 200.0
    d = diagnostics(svals(W), W.shape, W)
    assert d.num_spikes == 2 and d.num_traps == 2
    assert d.rand_softrank == pytest.approx(1.0, rel=0.05)  # the spike is the entry, wherever it lands


def test_shuffled_eigenvalues_are_seeded_and_preserve_the_entries():
    W = np.arange(12.0).reshape(3, 4)
    a, b = shuffled_eigenvalues(W, seed=1), shuffled_eigenvalues(W, seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.sum() == pytest.approx(np.sum(W**2))  # Frobenius norm is invariant under permutation
    assert not np.allclose(a, shuffled_eigenvalues(W, seed=2))


def test_hard_rank_of_rank_deficient_matrix():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((60, 7)) @ rng.standard_normal((7, 40))
    s = svals(W)
    assert hard_rank(s, W.shape) == 7 == np.linalg.matrix_rank(W)
    assert rank_loss(s, W.shape) == 33
    d = diagnostics(s, W.shape, W)
    assert (d.hard_rank, d.rank_loss) == (7, 33)
    assert d.n_tail <= 7  # numerical zeros are not part of the power-law fit


def test_zero_matrix_gives_nan_not_an_exception():
    W = np.zeros((5, 8))
    d = diagnostics(svals(W), W.shape, W)
    assert (d.hard_rank, d.rank_loss) == (0, 5)
    assert np.isnan(d.alpha) and not d.under_trained and not d.over_trained


def test_esd_histogram_log_bins_and_density():
    lam = pareto_sample(3.0, 1000, 1.0, seed=2)
    edges, centres, density = esd_histogram(np.concatenate([lam, [0.0]]), bins=20)
    assert edges.size == 21 and centres.size == density.size == 20
    np.testing.assert_allclose(np.diff(np.log(edges)), np.log(edges[1] / edges[0]))  # log-spaced
    assert edges[0] == pytest.approx(lam.min()) and edges[-1] == pytest.approx(lam.max())
    assert np.sum(density * np.diff(edges)) == pytest.approx(1.0)  # the zero is dropped, the rest counted
    np.testing.assert_allclose(centres, np.sqrt(edges[:-1] * edges[1:]))
    # on log–log axes a Pareto(3) density falls with slope ≈ −3 where bins are well populated
    ok = density > 0
    slope = np.polyfit(np.log(centres[ok][:8]), np.log(density[ok][:8]), 1)[0]
    assert slope == pytest.approx(-3.0, abs=0.4)


def test_every_number_has_a_one_line_description():
    d = diagnostics(svals(gaussian(30, 50, seed=0)), (30, 50))
    keys = set(d.to_dict())
    assert keys == set(DESCRIPTIONS) == {f.name for f in dataclasses.fields(Diagnostics)}
    assert all(text and "\n" not in text for text in DESCRIPTIONS.values())
    assert np.isnan(d.to_dict()["rand_lambda_max"]) and d.num_traps == -1  # no W, no shuffle


def test_matches_weightwatcher_when_installed():
    """Same alpha/xmin/D and norms as weightwatcher's own code on the same ESD (runs where it is installed)."""
    ww_powerlaw = pytest.importorskip("weightwatcher.WW_powerlaw")
    rmt = pytest.importorskip("weightwatcher.RMT_Util")
    W = gaussian(256, 512, seed=3) * np.exp(np.random.default_rng(4).standard_normal(512))  # heavy columns
    s = svals(W)
    d = diagnostics(s, W.shape, W)
    lam = np.sort(s**2)
    ref = ww_powerlaw.WWFit(lam[lam > 1e-5])
    assert d.alpha == pytest.approx(ref.alpha, rel=1e-9)
    assert d.xmin == pytest.approx(ref.xmin, rel=1e-12)
    np.testing.assert_allclose(d.D, ref.D, rtol=1e-9)
    assert d.stable_rank == pytest.approx(rmt.stable_rank(lam))
    assert d.hard_rank == rmt.matrix_rank(s, max(W.shape))


def test_power_law_line_is_the_tail_density_on_the_histograms_scale():
    lam, density = power_law_line(alpha=3.0, xmin=1.0, n_tail=50, n=100, lam_max=2.0, points=3)
    # p(λ) = (50/100)·(3 − 1)/1·λ⁻³: 1 at λ = 1, 1/8 at λ = 2
    np.testing.assert_allclose(lam, [1.0, np.sqrt(2.0), 2.0])
    np.testing.assert_allclose(density[[0, 2]], [1.0, 0.125])
    assert power_law_line(np.nan, 1.0, 5, 10, 2.0)[0].size == 0  # no fit, no line
