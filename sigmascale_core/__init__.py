"""SigmaScale: truncated-SVD compression of LLM linear layers with learned scaling."""

from sigmascale_core.stats import ActivationStats

__all__ = ["ActivationStats"]
