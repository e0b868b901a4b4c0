"""toy.py: the Learn page's teaching toy against closed forms."""

import numpy as np
import pytest

from sigmascale_core import toy as toys
from sigmascale_core.methods import decompose
from sigmascale_core.metrics import activation_loss
from sigmascale_core.stats import ActivationStats


def test_toy_truncation_closed_forms():
    toy = toys.toy_problem("outlier channels")
    m, n = toy.W.shape
    k = 2
    plain = toys.toy_truncation(toy, [0.0] * m, [0.0] * n, k)
    s2 = plain.sigma**2
    assert plain.plain_error == pytest.approx(s2[k:].sum() / s2.sum())  # Eckart–Young
    np.testing.assert_allclose(plain.scaled_sigma, plain.sigma)
    stats = ActivationStats.from_inputs(toy.X)
    best = activation_loss(toy.W, decompose(toy.W, stats, k, "svdllm").to_dense(), stats)
    assert plain.optimal_activation_error == pytest.approx(best, rel=1e-6)
    assert plain.activation_error >= plain.optimal_activation_error - 1e-12
    # ASVD's scales help on outlier inputs; a common shift of all scales changes nothing
    asvd = toys.toy_truncation(toy, [0.0] * m, toys.asvd_log2_scales(toy), k)
    assert asvd.activation_error < plain.activation_error
    shifted = toys.toy_truncation(toy, [1.5] * m, [1.5] * n, k)
    assert shifted.activation_error == pytest.approx(plain.activation_error)
    rows, cols = toys.learned_log2_scales(toy, k)
    learned = toys.toy_truncation(toy, rows, cols, k)
    assert learned.activation_error <= asvd.activation_error + 1e-9


def test_flat_spectrum_cannot_be_helped():
    toy = toys.toy_problem("flat spectrum")
    m, n = toy.W.shape
    plain = toys.toy_truncation(toy, [0.0] * m, [0.0] * n, 3)
    np.testing.assert_allclose(plain.sigma, np.ones(n), atol=1e-12)
    rng = np.random.default_rng(1)
    for _ in range(5):
        scaled = toys.toy_truncation(toy, rng.normal(size=m), rng.normal(size=n), 3)
        assert scaled.activation_error >= plain.optimal_activation_error - 1e-12
    assert plain.activation_error == pytest.approx(plain.optimal_activation_error, abs=1e-9)
    assert plain.plain_error == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown toy"):
        toys.toy_problem("nope")
