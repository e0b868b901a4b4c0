"""Whole-model jobs built from the engine: calibrate (cached), plan, compress, save, evaluate.

The CLI and the app call these; progress is a callback, so the core never prints or draws.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch

from sigmascale_core.calibration import collect_stats, load_stats, save_stats, stats_cache_path, stats_key
from sigmascale_core.models import LoadedModel, target_matrices, tokenizer_fingerprint
from sigmascale_core.perplexity import perplexity
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.progress import Progress
from sigmascale_core.stats import ActivationStats
from sigmascale_core.surgery import compress, target_shapes
from sigmascale_core.text import calibration_batch, check_disjoint, evaluation_tokens

DEFAULT_CALIBRATION_TEXT = "boolq:calibration"
DEFAULT_EVALUATION_TEXTS = ("boolq:evaluation", "lambada")


@dataclass(frozen=True)
class CalibrationConfig:
    text: str = DEFAULT_CALIBRATION_TEXT  # text spec (see text.py)
    samples: int = 32  # calibration sequences
    seq_len: int | None = None  # tokens per sequence; None: 512 on CPU, 2048 on GPU (the paper's)
    seed: int = 0  # which windows of the text are drawn
    batch_size: int = 4  # sequences per forward pass

    def resolved_seq_len(self, device: torch.device) -> int:
        return self.seq_len or (2048 if device.type == "cuda" else 512)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def calibrate(
    loaded: LoadedModel,
    config: CalibrationConfig = CalibrationConfig(),
    progress: Progress | None = None,
    use_cache: bool = True,
) -> tuple[dict[str, ActivationStats], dict]:
    """Statistics of every target's input on the calibration text, from cache/ when computed before.

    Returns (stats, info) where info says where they came from, how many tokens and how long it took.
    """
    device = next(loaded.model.parameters()).device
    seq_len = config.resolved_seq_len(device)
    key = {
        "model": loaded.fingerprint,
        "tokenizer": tokenizer_fingerprint(loaded.tokenizer),
        "text": config.text,
        "samples": config.samples,
        "seq_len": seq_len,
        "seed": config.seed,
    }
    path = stats_cache_path(key)
    info = {**key, "tokens": config.samples * seq_len, "cache": str(path)}
    start = time.perf_counter()
    if use_cache:
        cached = load_stats(path, key)
        if cached is not None:
            return cached, {**info, "cached": True, "seconds": time.perf_counter() - start}
    ids = calibration_batch(
        loaded.tokenizer, loaded.family, config.text, config.samples, seq_len, config.seed
    )
    stats = collect_stats(loaded.model, ids, batch_size=config.batch_size, progress=progress)
    if use_cache:
        save_stats(stats, path, key)
    return stats, {**info, "cached": False, "seconds": time.perf_counter() - start}


def compress_sequential(
    loaded: LoadedModel,
    plan: CompressionPlan,
    config: CalibrationConfig = CalibrationConfig(),
    progress: Progress | None = None,
) -> tuple[dict[str, ActivationStats], dict]:
    """The sequential variant: calibrate and compress layer by layer, so each layer's statistics are
    taken on the outputs of the already-compressed layers before it. Not cached (they depend on the plan).
    """
    device = next(loaded.model.parameters()).device
    seq_len = config.resolved_seq_len(device)
    start = time.perf_counter()
    ids = calibration_batch(
        loaded.tokenizer, loaded.family, config.text, config.samples, seq_len, config.seed
    )
    layer_of = {ref.name: ref.layer for ref in target_matrices(loaded.model)}

    def compress_layer(layer: int, layer_stats: dict[str, ActivationStats]) -> None:
        only_this_layer = plan.with_ranks({name: None for name in plan.matrices if layer_of[name] != layer})
        keyed = {stats_key(layer, group): s for group, s in layer_stats.items()}
        compress(loaded.model, only_this_layer, keyed)

    stats = collect_stats(
        loaded.model, ids, batch_size=config.batch_size, progress=progress, compress_layer=compress_layer
    )
    info = {
        "text": config.text,
        "samples": config.samples,
        "seq_len": seq_len,
        "seed": config.seed,
        "tokens": config.samples * seq_len,
        "sequential": True,
        "seconds": time.perf_counter() - start,
    }
    return stats, info


def uniform_plan(
    loaded: LoadedModel, retention: float, method: str, options: dict | None = None
) -> CompressionPlan:
    return CompressionPlan.uniform(
        target_shapes(loaded.model), retention, method, loaded.fingerprint, options
    )


def check_texts(calibration: str | None, evaluation: list[str]) -> None:
    """ValueError if any evaluation text shares a document with the calibration text."""
    for spec in evaluation:
        check_disjoint(calibration=calibration, evaluation=spec)


def evaluate_perplexity(
    loaded: LoadedModel,
    texts: list[str],
    window: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> dict[str, dict]:
    """Perplexity on each evaluation text spec."""
    results = {}
    for spec in texts:
        tokens = evaluation_tokens(loaded.tokenizer, loaded.family, spec)
        start = time.perf_counter()
        result = perplexity(loaded.model, tokens, window, batch_size, max_tokens, progress)
        results[spec] = {**result.to_dict(), "seconds": time.perf_counter() - start}
    return results


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (GiB), and of the GPU when one was used."""
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out
