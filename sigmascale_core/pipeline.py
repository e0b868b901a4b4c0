"""Whole-model jobs built from the engine: calibrate (cached), plan, compress, save, evaluate.

The CLI and the app call these; progress is a callback, so the core never prints or draws.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sigmascale_core.allocation import STRATEGIES, allocate
from sigmascale_core.calibration import collect_stats, load_stats, save_stats, stats_cache_path, stats_key
from sigmascale_core.finetune import distill, evaluate_distillation
from sigmascale_core.models import LoadedModel, target_matrices, tokenizer_fingerprint
from sigmascale_core.perplexity import perplexity
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.probing import NESTED_METHODS, ProbeConfig, calibration_side_batch, probe
from sigmascale_core.progress import Progress
from sigmascale_core.stats import ActivationStats
from sigmascale_core.surgery import compress, target_shapes
from sigmascale_core.text import calibration_batch, check_disjoint, evaluation_tokens

DEFAULT_CALIBRATION_TEXT = "boolq:calibration"
DEFAULT_EVALUATION_TEXTS = ("boolq:evaluation", "lambada")
ALLOCATIONS = ("uniform", *STRATEGIES)  # uniform retention per matrix, or a budget spent by allocation.py


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


def probe_config_for(
    method: str,
    text: str = DEFAULT_CALIBRATION_TEXT,
    evaluation: Sequence[str] = (),
    proxy: bool = False,
    probe_method: str | None = None,
) -> ProbeConfig:
    """The probe behind an allocated `method` plan, on the calibration `text` (other windows than the
    statistics': ProbeConfig.seed). Unless `probe_method` says otherwise, the plan's own method where its
    rank-k factors nest (one decomposition per matrix serves the whole grid), else svdllm (a learned
    SigmaScale fit per grid point would cost 8 fits per matrix). The probing text is checked against
    the default evaluation texts and `evaluation`."""
    chosen = probe_method or (method if method in NESTED_METHODS else "svdllm")
    texts = tuple(dict.fromkeys((*DEFAULT_EVALUATION_TEXTS, *evaluation)))
    return ProbeConfig(text=text, method=chosen, proxy=proxy, evaluation=texts)


def build_plan(
    loaded: LoadedModel,
    stats: dict[str, ActivationStats],
    retention: float,
    method: str,
    options: dict | None = None,
    allocation: str = "uniform",
    probe_config: ProbeConfig | None = None,
    calibration: tuple[str, int, int, int] | None = None,
    progress: Progress | None = None,
) -> tuple[CompressionPlan, dict]:
    """The plan for a global parameter retention: the same retention for every matrix ("uniform"), or
    that budget spent by allocation.allocate ("sensitivity": ASVD's binary search, "greedy": our
    optimiser) on a sensitivity probe (cached under cache/probes). Returns (plan, info about the probe)."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; choose one of {ALLOCATIONS}")
    template = uniform_plan(loaded, retention, method, options)
    if allocation == "uniform":
        return template, {}
    config = probe_config or probe_config_for(method)
    table, info = probe(loaded, stats, config, calibration=calibration, progress=progress)
    return allocate(template, table, retention, allocation), {"probe": info}


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 100  # AdamW steps on the low-rank factors (finetune.distill)
    lr: float = 1e-4  # peak learning rate: 10 % linear warm-up, cosine down to 10 %
    temperature: float = 1.0  # distillation temperature T (the KL is scaled by T²)
    ce_weight: float = 0.0  # share of next-token cross-entropy mixed into the loss
    text: str = DEFAULT_CALIBRATION_TEXT  # calibration-side text; refused if it touches an evaluation text
    samples: int = 64  # training sequences (cycled through when steps × batch_size exceeds them)
    seq_len: int = 256  # tokens per sequence
    batch_size: int = 4  # sequences per step
    seed: int = 2  # which windows (calibration draws with seed 0, probing with 1)
    held_out: int = 4  # further sequences, never trained on, for the before/after distillation loss


def finetune(
    loaded: LoadedModel,
    teacher: nn.Module,
    config: FinetuneConfig = FinetuneConfig(),
    evaluation: Sequence[str] = (),
    progress: Progress | None = None,
) -> dict:
    """Distil the dense `teacher` into the compressed `loaded.model` (only its factors train), on
    calibration-side text checked against the default evaluation texts and `evaluation`. Returns the
    distillation loss on held-out calibration-side windows before and after, and the run's record."""
    if config.held_out < 1:
        raise ValueError(f"held_out must be at least 1, got {config.held_out!r}")
    texts = tuple(dict.fromkeys((*DEFAULT_EVALUATION_TEXTS, *evaluation)))
    ids = calibration_side_batch(
        loaded.tokenizer,
        loaded.family,
        config.text,
        config.samples + config.held_out,
        config.seq_len,
        config.seed,
        texts,
        role="fine-tuning",
    )
    train = list(ids[: config.samples].split(config.batch_size))
    held_out = list(ids[config.samples :].split(config.batch_size))
    terms = {"temperature": config.temperature, "ce_weight": config.ce_weight}
    before = evaluate_distillation(loaded.model, teacher, held_out, **terms)
    result = distill(loaded.model, teacher, train, config.steps, lr=config.lr, progress=progress, **terms)
    after = evaluate_distillation(loaded.model, teacher, held_out, **terms)
    record = result.to_dict()
    record.pop("history")
    return {"config": asdict(config), "held_out_before": before, "held_out_after": after, **record}


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
