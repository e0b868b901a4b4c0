"""A weight-like matrix and LLM-like inputs, for demos and benchmarks that need no model."""

from __future__ import annotations

import torch


def synthetic_layer(m: int, n: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (m, n), X (tokens, n)): W with random singular vectors and a power-law spectrum σ_i = i^-0.6;
    X with log-normal channel scales and 1/64 of the channels as 30× outliers, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    W = (U * torch.arange(1, r + 1) ** -0.6) @ V.T
    scales = torch.exp(torch.randn(n, generator=g))
    scales[torch.randperm(n, generator=g)[: max(1, n // 64)]] *= 30
    return W, torch.randn(tokens, n, generator=g) * scales
