"""SigmaScale: truncated-SVD compression of LLM linear layers with learned scaling."""

from sigmascale_core.methods import (
    METHOD_OPTIONS,
    METHODS,
    LowRankFactors,
    decompose,
    loss_curve,
    scaled_spectrum,
)
from sigmascale_core.metrics import (
    activation_loss,
    effective_rank,
    participation_ratio,
    rank_for_retention,
    retention_for_rank,
)
from sigmascale_core.stats import ActivationStats

__all__ = [
    "METHODS",
    "METHOD_OPTIONS",
    "ActivationStats",
    "LowRankFactors",
    "activation_loss",
    "decompose",
    "effective_rank",
    "loss_curve",
    "participation_ratio",
    "rank_for_retention",
    "retention_for_rank",
    "scaled_spectrum",
]
