import pytest
import torch

from sigmascale_core.stats import ActivationStats


def anisotropic_inputs(tokens: int, n: int, seed: int, dead: int = 0) -> torch.Tensor:
    """Inputs like an LLM's: log-normal channel scales, a few outlier channels, correlated channels."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(n, generator=g, dtype=torch.float64))
    scales[torch.randperm(n, generator=g)[: max(1, n // 16)]] *= 20.0
    mixing = (
        torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    )
    x = (torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mixing) * scales
    if dead:
        x[:, :dead] = 0
    return x


def decaying_matrix(m: int, n: int, seed: int) -> torch.Tensor:
    """A weight-like matrix: random singular vectors, power-law singular values (float64)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    r = min(m, n)
    sigma = torch.arange(1, r + 1, dtype=torch.float64) ** -0.7
    return (U[:, :r] * sigma) @ V[:, :r].T


@pytest.fixture
def layer():
    """(W, X, stats) for a 48×32 matrix with anisotropic inputs."""
    W = decaying_matrix(48, 32, seed=1)
    X = anisotropic_inputs(500, 32, seed=2)
    return W, X, ActivationStats.from_inputs(X)
