import math

import pytest
import torch

from sigmascale_core.metrics import (
    activation_loss,
    effective_rank,
    participation_ratio,
    rank_for_retention,
    retention_for_rank,
)
from sigmascale_core.stats import ActivationStats


@pytest.mark.parametrize("r", [1, 2, 7, 100])
def test_effective_rank_of_flat_spectrum_is_its_length(r):
    assert effective_rank(torch.full((r,), 3.0)) == pytest.approx(r, rel=1e-12)
    assert participation_ratio(torch.full((r,), 3.0)) == pytest.approx(r, rel=1e-12)


def test_effective_rank_of_single_value_is_one():
    s = torch.tensor([5.0, 0.0, 0.0, 0.0])
    assert effective_rank(s) == pytest.approx(1.0)
    assert participation_ratio(s) == pytest.approx(1.0)


def test_effective_rank_matches_entropy_formula():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    p = [x / 8 for x in (4, 2, 1, 1)]
    assert effective_rank(s) == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), rel=1e-12)
    assert participation_ratio(s) == pytest.approx(64 / 22, rel=1e-12)


@pytest.mark.parametrize(
    "bad", [torch.tensor([]), torch.tensor([1.0, -1.0]), torch.zeros(3), torch.ones(2, 2)]
)
def test_bad_spectra_raise(bad):
    with pytest.raises(ValueError, match="singular values"):
        effective_rank(bad)


def test_rank_for_retention_and_inverse():
    assert rank_for_retention(576, 576, 0.75) == 216
    assert rank_for_retention(1536, 576, 0.75) == math.floor(0.75 * 1536 * 576 / 2112)
    for m, n in [(576, 576), (192, 576), (1536, 576), (7, 3)]:
        for k in range(1, min(m, n)):
            if retention_for_rank(m, n, k) <= 1:
                assert rank_for_retention(m, n, retention_for_rank(m, n, k)) == k


@pytest.mark.parametrize("retention", [0, -0.1, 1.01, float("nan"), "0.5", True])
def test_bad_retention_raises(retention):
    with pytest.raises(ValueError, match="retention"):
        rank_for_retention(10, 10, retention)


def test_activation_loss_matches_explicit_activations():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(9, 6, generator=g, dtype=torch.float64)
    W_hat = W + 0.1 * torch.randn(9, 6, generator=g, dtype=torch.float64)
    X = torch.randn(6, 40, generator=g, dtype=torch.float64)  # (n, tokens)
    stats = ActivationStats.from_inputs(X.T)
    err = ((W - W_hat) @ X).square().sum().item()
    assert activation_loss(W, W_hat, stats, "sum") == pytest.approx(err, rel=1e-12)
    assert activation_loss(W, W_hat, stats, "paper") == pytest.approx(err / 54, rel=1e-12)
    ref = (W @ X).square().sum().item()
    assert activation_loss(W, W_hat, stats) == pytest.approx(err / ref, rel=1e-12)


def test_activation_loss_rejects_mismatches():
    stats = ActivationStats.from_inputs(torch.randn(10, 4))
    with pytest.raises(ValueError, match="shape"):
        activation_loss(torch.ones(3, 4), torch.ones(4, 3), stats)
    with pytest.raises(ValueError, match="width 4"):
        activation_loss(torch.ones(3, 5), torch.ones(3, 5), stats)
    with pytest.raises(ValueError, match="reduction"):
        activation_loss(torch.ones(3, 4), torch.ones(3, 4), stats, "mean")


def test_rank_for_retention_elementwise_equals_the_scalar_rule():
    import numpy as np

    m = np.array([576, 192, 1536, 576, 7])
    n = np.array([576, 576, 576, 1536, 3])
    for retention in (0.05, 0.5, 0.75, 1.0):
        got = rank_for_retention(m, n, np.full(5, retention))
        assert got.tolist() == [
            rank_for_retention(int(a), int(b), retention) for a, b in zip(m, n, strict=True)
        ]
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        rank_for_retention(m, n, np.array([0.5, 0.5, 0.0, 0.5, 0.5]))
