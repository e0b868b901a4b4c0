"""The SigmaScale paper's public algorithm, written faithfully as the benchmark baseline.

Per matrix: log-scales r, c from zero (identity), `steps` AdamW steps, each taking a full
torch.linalg.svd of W_s = diag(eʳ) W diag(eᶜ) and the loss ‖(W − W′)X‖²_F / (m·n) from the explicit
activation matrix X (n × tokens), W′ = diag(e⁻ʳ) U_k Σ_k V_kᵀ diag(e⁻ᶜ). Not part of the product.
"""

from __future__ import annotations

import torch


def paper_sigmascale(
    W: torch.Tensor, X: torch.Tensor, rank: int, steps: int = 1000, lr: float = 1e-3
) -> tuple[torch.Tensor, list[float]]:
    """Returns (W′ after the last step, loss per step). X: (n, tokens)."""
    m, n = W.shape
    r = torch.zeros(m, requires_grad=True)
    c = torch.zeros(n, requires_grad=True)
    optimizer = torch.optim.AdamW([r, c], lr=lr)
    history = []
    for _ in range(steps):
        W_s = r.exp()[:, None] * W * c.exp()
        U, S, Vh = torch.linalg.svd(W_s, full_matrices=False)
        W_hat = (U[:, :rank] * S[:rank]) @ Vh[:rank] / r.exp()[:, None] / c.exp()
        loss = ((W - W_hat) @ X).square().sum() / (m * n)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    with torch.no_grad():
        W_s = r.exp()[:, None] * W * c.exp()
        U, S, Vh = torch.linalg.svd(W_s, full_matrices=False)
        W_hat = (U[:, :rank] * S[:rank]) @ Vh[:rank] / r.exp()[:, None] / c.exp()
    return W_hat, history
