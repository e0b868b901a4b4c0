"""Perplexity over non-overlapping windows: exp(mean next-token NLL), fp32 logits, token count reported."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sigmascale_core.progress import Progress


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored: every window's positions after its first
    windows: int
    window: int  # window length L

    def to_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "nll": self.nll,
            "tokens": self.tokens,
            "windows": self.windows,
            "window": self.window,
        }


def default_window(model: nn.Module, cap: int = 2048) -> int:
    """min(cap, the model's maximum context)."""
    return min(cap, int(getattr(model.config, "max_position_embeddings", cap) or cap))


def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    window: int | None = None,
    batch_size: int = 1,
    max_tokens: int | None = None,
    progress: Progress | None = None,
) -> PerplexityResult:
    """Perplexity of `tokens` (1-D ids) in non-overlapping windows of `window` tokens (default
    min(2048, model max)); a last partial window is scored too. `max_tokens` caps the text first."""
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    window = window or default_window(model)
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if tokens.numel() < 2:
        raise ValueError(f"need at least 2 tokens to score, got {tokens.numel()}")
    device = next(model.parameters()).device
    full = tokens.numel() // window
    windows = list(tokens[: full * window].view(full, window))
    if tokens.numel() - full * window >= 2:
        windows.append(tokens[full * window :])
    total_nll, scored = 0.0, 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    with torch.no_grad():
        for done, batch in enumerate(batches, start=1):
            for same_length in _by_length(batch):
                ids = torch.stack(same_length).to(device)
                logits = model(ids, use_cache=False).logits[:, :-1].float()  # (B, L-1, V)
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                )
                total_nll += float(nll)
                scored += ids[:, 1:].numel()
            if progress is not None:
                progress(done, len(batches), "perplexity")
    mean = total_nll / scored
    return PerplexityResult(math.exp(mean), mean, scored, len(windows), window)


def _by_length(batch: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Split a batch so that only equal-length windows are stacked (the last window may be short)."""
    groups: dict[int, list[torch.Tensor]] = {}
    for w in batch:
        groups.setdefault(w.numel(), []).append(w)
    return list(groups.values())
