"""Whole-model jobs built from the engine: calibrate (cached), plan, compress, save, evaluate.

The CLI and the app call these; progress is a callback, so the core never prints or draws.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import resource
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sigmascale_core.allocation import STRATEGIES, allocate
from sigmascale_core.calibration import collect_stats, load_stats, save_stats, stats_cache_path, stats_key
from sigmascale_core.distributed import (
    Group,
    check_distributable,
    fit_distributed,
    main_rank_first,
    shard_of,
)
from sigmascale_core.finetune import distill, evaluate_distillation
from sigmascale_core.methods import METHOD_OPTIONS, METHODS, LowRankFactors, check_options
from sigmascale_core.models import (
    LoadedModel,
    execution_device,
    load_model,
    target_matrices,
    tokenizer_fingerprint,
)
from sigmascale_core.perplexity import perplexity
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.probing import NESTED_METHODS, ProbeConfig, probe
from sigmascale_core.progress import EventSink, Progress, tracked
from sigmascale_core.speed import Speedup, keep_dense_where_slower
from sigmascale_core.stats import FLOAT_DTYPES, ActivationStats
from sigmascale_core.surgery import (
    apply_factors,
    check_output_dir,
    check_plan_matches,
    compress,
    input_stats_keys,
    save_compressed,
    target_shapes,
)
from sigmascale_core.text import (
    DEFAULT_CALIBRATION_TEXT,
    DEFAULT_EVALUATION_TEXTS,
    calibration_batch,
    calibration_side_batch,
    check_disjoint,
    documents,
    evaluation_tokens,
    token_stream,
)

ALLOCATIONS = ("uniform", *STRATEGIES)  # uniform retention per matrix, or a budget spent by allocation.py
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_positive(name: str, value: object, optional: bool = False) -> None:
    """ValueError unless `value` is an int ≥ 1 (or None, when `optional`); `name` is the flag."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class CalibrationConfig:
    text: str = DEFAULT_CALIBRATION_TEXT  # text spec (see text.py)
    samples: int = 32  # calibration sequences
    seq_len: int | None = None  # tokens per sequence; None: 512 on CPU, 2048 on GPU (the paper's)
    seed: int = 0  # which windows of the text are drawn
    batch_size: int = 4  # sequences per forward pass
    gram_dtype: str = "float64"  # the Grams' storage, one of FLOAT_DTYPES ("float32" halves their memory)

    def __post_init__(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            check_positive(f"--{name.replace('_', '-')}", getattr(self, name), optional=name == "seq_len")
        if self.gram_dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"--gram-dtype must be one of {', '.join(FLOAT_DTYPES)}, got {self.gram_dtype!r}"
            )

    def resolved_seq_len(self, device: torch.device) -> int:
        return self.seq_len or (2048 if device.type == "cuda" else 512)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def calibration_key(loaded: LoadedModel, config: CalibrationConfig) -> dict[str, object]:
    """What `config`'s statistics of this model depend on: their cache key (pipeline.calibrate's and the
    app's). gram_dtype only when not float64, so float64 statistics keep the keys, and the cache files,
    they had before the option existed."""
    device = execution_device(loaded.model.get_input_embeddings())  # also under a device map
    key: dict[str, object] = {
        "model": loaded.fingerprint,
        "tokenizer": tokenizer_fingerprint(loaded.tokenizer),
        "text": config.text,
        "samples": config.samples,
        "seq_len": config.resolved_seq_len(device),
        "seed": config.seed,
    }
    if config.gram_dtype != "float64":
        key["gram_dtype"] = config.gram_dtype
    return key


def calibrate(
    loaded: LoadedModel,
    config: CalibrationConfig = CalibrationConfig(),
    progress: Progress | None = None,
    use_cache: bool = True,
    only: Collection[str] | None = None,
) -> tuple[dict[str, ActivationStats], dict]:
    """Statistics of every target's input on the calibration text, from cache/ when computed before;
    with `only`, just those stats keys are kept (a distributed rank's shard: read from the cache one
    tensor at a time, or computed whole, saved, then dropped to the shard).

    Returns (stats, info) where info says where they came from, how many tokens and how long it took.
    """
    key = calibration_key(loaded, config)
    seq_len = int(key["seq_len"])
    path = stats_cache_path(key)
    info = {**key, "gram_dtype": config.gram_dtype, "tokens": config.samples * seq_len, "cache": str(path)}
    start = time.perf_counter()
    if use_cache:
        cached = load_stats(path, key, only)
        if cached is not None:
            return cached, {**info, "cached": True, "seconds": time.perf_counter() - start}
    ids = calibration_batch(
        loaded.tokenizer, loaded.family, config.text, config.samples, seq_len, config.seed
    )
    stats = collect_stats(
        loaded.model, ids, batch_size=config.batch_size, progress=progress, gram_dtype=config.gram_dtype
    )
    if use_cache:
        save_stats(stats, path, key)
    if only is not None:
        stats = {name: stats[name] for name in only}
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

    jitter: dict[str, float] = {}

    def compress_layer(layer: int, layer_stats: dict[str, ActivationStats]) -> None:
        only_this_layer = plan.with_ranks({name: None for name in plan.matrices if layer_of[name] != layer})
        keyed = {stats_key(layer, group): s for group, s in layer_stats.items()}
        jitter.update(whitening_jitter(compress(loaded.model, only_this_layer, keyed)))

    stats = collect_stats(
        loaded.model,
        ids,
        batch_size=config.batch_size,
        progress=progress,
        compress_layer=compress_layer,
        gram_dtype=config.gram_dtype,
    )
    info = {
        "text": config.text,
        "samples": config.samples,
        "seq_len": seq_len,
        "seed": config.seed,
        "gram_dtype": config.gram_dtype,
        "tokens": config.samples * seq_len,
        "sequential": True,
        "whitening_jitter": jitter,
        "seconds": time.perf_counter() - start,
    }
    return stats, info


def whitening_jitter(factors: dict[str, LowRankFactors]) -> dict[str, float]:
    """{matrix: λ} for the matrices whose Gram needed λ·I added before whitening (none: {})."""
    return {name: f.jitter for name, f in factors.items() if f.jitter > 0}


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
    options: dict | None = None,
) -> ProbeConfig:
    """The probe behind an allocated `method` plan, on the calibration `text` (other windows than the
    statistics': ProbeConfig.seed). Unless `probe_method` says otherwise, the plan's own method where its
    rank-k factors nest (one decomposition per matrix serves the whole grid), else svdllm (sigmascale's
    own probe, `probe_method="sigmascale"`, learns its scaling once per matrix; see the README's
    issue 19 study). The probing text is checked against
    the default evaluation texts and `evaluation`. The plan's `options` go to the probe where its
    method takes them (svdllm's probe of a sigmascale plan keeps only shrink)."""
    chosen = probe_method or (method if method in NESTED_METHODS else "svdllm")
    texts = tuple(dict.fromkeys((*DEFAULT_EVALUATION_TEXTS, *evaluation)))
    kept = {k: v for k, v in (options or {}).items() if k in METHOD_OPTIONS[chosen]}
    return ProbeConfig(text=text, method=chosen, options=kept, proxy=proxy, evaluation=texts)


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
    config = probe_config or probe_config_for(method, options=options)
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


# --------------------------------------------------------------------------------------------------
# The compression pipeline: one typed entry point for the CLI, the job runner and the benchmarks


@dataclass(frozen=True)
class CompressionConfig:
    """Everything one compression run needs; its JSON twin is to_dict/from_dict. Each field is the
    CLI flag of the same name (`sigmascale compress --seq-len` is seq_len)."""

    out: str  # output folder (refused if it exists, unless force)
    model: str = "smollm2-135m"  # bundled model, a local HF folder, a .gguf file or a hub id
    device: str = "cpu"  # torch device
    dtype: str = "float32"  # weights dtype while working (one of DTYPES)
    method: str = "sigmascale"  # decomposition, one of METHODS (a plan's own method wins)
    retention: float | None = None  # uniform parameter retention in (0, 1]; or give plan
    plan: str | None = None  # path of a CompressionPlan JSON instead of retention
    options: dict[str, object] = field(default_factory=dict)  # method options (see METHOD_OPTIONS)
    allocation: str = "uniform"  # one of ALLOCATIONS: how a retention's budget is spent over matrices
    probe: str = "perplexity"  # sensitivity probe of an allocation: "perplexity" or "proxy"
    probe_method: str | None = None  # decomposition of the probe (None: see probe_config_for)
    sequential: bool = False  # calibrate each layer on the outputs of the compressed layers before it
    text: str = DEFAULT_CALIBRATION_TEXT  # calibration text spec (see text.py)
    samples: int = 32  # calibration sequences
    seq_len: int | None = None  # tokens per sequence; None: 512 on CPU, 2048 on GPU
    seed: int = 0  # which windows of the calibration text are drawn
    batch_size: int = 4  # sequences per forward pass
    gram_dtype: str = "float64"  # the calibration Grams' storage: float64, or float32 (half the memory)
    finetune_steps: int = 0  # distillation steps on the factors after compressing (0: none)
    finetune_lr: float = 1e-4  # peak fine-tune learning rate
    finetune_seq_len: int | None = None  # tokens per fine-tune sequence (None: the calibration's)
    evaluation: tuple[str, ...] = ()  # perplexity texts, disjoint from the calibration text
    window: int | None = None  # perplexity window (None: min(2048, model max))
    max_eval_tokens: int | None = None  # score only the first N tokens of each evaluation text
    force: bool = False  # replace an existing out
    keep_dense_if_slower: bool = False  # keep dense the matrices whose factors are slower here (speed.py)

    def to_dict(self) -> dict:
        return {**asdict(self), "evaluation": list(self.evaluation)}

    @classmethod
    def from_dict(cls, data: dict) -> CompressionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown compression config field(s) {unknown}")
        return cls(**{**data, "evaluation": tuple(data.get("evaluation") or ())})

    @property
    def calibration(self) -> CalibrationConfig:
        return CalibrationConfig(
            self.text, self.samples, self.seq_len, self.seed, self.batch_size, self.gram_dtype
        )


def check_device(device: str) -> torch.device:
    """The torch device named `device`, or ValueError saying why it cannot be used here."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")
    elif resolved.type != "cpu":
        raise ValueError(f"--device {device}: unsupported device type; use cpu, cuda, cuda:N or mps")
    return resolved


def check_finite(model: nn.Module) -> None:
    """ValueError naming the first weight or buffer (compressed or not) holding a NaN or an Inf."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"the model's {name} holds {bad} NaN/Inf value(s): refusing to compress it")


def check_config(config: CompressionConfig) -> CompressionPlan | None:
    """Every check that needs no model, before anything loads (seconds): numbers, device, method
    options, the plan file, the texts, the output folder. Returns the plan read from config.plan."""
    config.calibration  # noqa: B018 (its constructor checks samples, seq_len, batch_size, gram_dtype)
    for name in ("finetune_seq_len", "window", "max_eval_tokens"):
        check_positive(f"--{name.replace('_', '-')}", getattr(config, name), optional=True)
    if isinstance(config.finetune_steps, bool) or not isinstance(config.finetune_steps, int):
        raise ValueError(f"--finetune-steps must be an integer, got {config.finetune_steps!r}")
    if config.finetune_steps < 0:
        raise ValueError(f"--finetune-steps must be ≥ 0, got {config.finetune_steps}")
    if not (isinstance(config.finetune_lr, int | float) and math.isfinite(config.finetune_lr)):
        raise ValueError(f"--finetune-lr must be a finite number, got {config.finetune_lr!r}")
    if config.finetune_lr <= 0:
        raise ValueError(f"--finetune-lr must be positive, got {config.finetune_lr}")
    if not isinstance(config.keep_dense_if_slower, bool):
        raise ValueError(f"keep_dense_if_slower must be true or false, got {config.keep_dense_if_slower!r}")
    if config.dtype not in DTYPES:
        raise ValueError(f"--dtype {config.dtype!r}: choose one of {tuple(DTYPES)}")
    if config.allocation not in ALLOCATIONS:
        raise ValueError(f"--allocation {config.allocation!r}: choose one of {ALLOCATIONS}")
    if config.probe not in ("perplexity", "proxy"):
        raise ValueError(f"--probe {config.probe!r}: choose perplexity or proxy")
    if config.probe_method is not None and config.probe_method not in METHODS:
        raise ValueError(f"--probe-method {config.probe_method!r}: choose one of {METHODS}")
    if config.plan and config.allocation != "uniform":
        raise ValueError("--allocation builds a plan; it cannot be combined with --plan")
    if config.plan and config.retention is not None:
        raise ValueError("give --retention R or --plan PLAN.json, not both")
    check_device(config.device)
    check_output_dir(config.out, config.force)
    plan = None
    if config.plan:
        plan = CompressionPlan.load(config.plan)
    elif config.retention is None:
        raise ValueError("give --retention R or --plan PLAN.json")
    else:
        check_options(config.method, config.options)
    documents(config.text)  # the calibration text exists
    check_texts(config.text, list(config.evaluation))  # the evaluation texts exist and are disjoint
    return plan


def check_loaded(loaded: LoadedModel, config: CompressionConfig, plan: CompressionPlan | None) -> None:
    """The checks that need the loaded model, right after it loads and before any calibration: finite
    weights, the plan made for this model, sequence lengths within its positions, enough text."""
    check_finite(loaded.model)
    if plan is not None:
        check_plan_matches(loaded.model, plan, loaded.fingerprint)
    device = next(loaded.model.parameters()).device
    seq_len = config.calibration.resolved_seq_len(device)
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    for flag, value in (("--seq-len", seq_len), ("--finetune-seq-len", config.finetune_seq_len)):
        if limit is not None and value is not None and value > limit:
            raise ValueError(f"{flag} {value} exceeds the model's {limit} positions")
    if limit is not None and config.window is not None and config.window > limit:
        raise ValueError(f"--window {config.window} exceeds the model's {limit} positions")
    found = token_stream(loaded.tokenizer, loaded.family, config.text).numel()
    needed = config.samples * seq_len
    if found < needed:
        raise ValueError(
            f"calibration text {config.text!r} has {found} tokens; {config.samples} samples of "
            f"{seq_len} tokens need {needed}: use fewer or shorter samples, or a longer text"
        )
    if config.finetune_steps:
        tune_len = config.finetune_seq_len or seq_len
        tune_needed = (config.samples + FinetuneConfig.held_out) * tune_len
        if found < tune_needed:
            raise ValueError(
                f"calibration text {config.text!r} has {found} tokens; fine-tuning on {config.samples}"
                f" + {FinetuneConfig.held_out} held-out samples of {tune_len} tokens needs {tune_needed}"
            )


def run_compression(
    config: CompressionConfig,
    events: EventSink | None = None,
    speedup: Speedup | None = None,
    group: Group | None = None,
) -> dict:
    """Check, load, calibrate, plan, compress, (fine-tune,) evaluate and save: the whole run.

    Every input is checked before work starts (check_config, then check_loaded right after the model
    loads); ValueError names the problem. Progress goes to `events` as ProgressEvents. With
    keep_dense_if_slower (the config's or the plan's), matrices whose factors `speedup` (default: real
    matmuls on the run's device and dtype) finds slower than dense stay dense. With a torchrun `group`
    (distributed.py), the fits are sharded across its ranks and rank 0 alone saves; the other ranks
    return their part of the report. Returns the report that is also saved as report.json in config.out.
    """
    plan = check_config(config)
    if group is not None:
        check_distributable(config, plan)

    def progress(stage: str) -> Progress | None:
        return None if events is None else tracked(events, stage)

    started = time.perf_counter()
    loaded = load_model(config.model, device=config.device, dtype=DTYPES[config.dtype])
    check_loaded(loaded, config, plan)
    evaluation = list(config.evaluation)
    total_before = parameter_count(loaded.model)
    teacher = copy.deepcopy(loaded.model) if config.finetune_steps else None
    stats, calibration, planning, only = None, None, {}, None
    if group is not None and (plan is not None or config.allocation == "uniform"):
        # the plan needs no statistics: each rank holds only its shard's (the probe would need all)
        plan = plan or uniform_plan(loaded, config.retention, config.method, config.options)
        only = set(input_stats_keys(loaded.model, shard_of(plan, group)).values())
    if not config.sequential or config.allocation != "uniform":  # the probe reads the dense stats
        with main_rank_first(group):  # rank 0 fills the stats cache, the others read it
            stats, calibration = calibrate(loaded, config.calibration, progress("calibration"), only=only)
    if plan is None:
        windows = None
        if calibration is not None:  # (text, samples, seq_len, seed) of the stats, for the probe
            windows = (config.text, config.samples, int(calibration["seq_len"]), config.seed)
        probe_config = probe_config_for(
            config.method,
            config.text,
            evaluation,
            config.probe == "proxy",
            config.probe_method,
            config.options,
        )
        plan, planning = build_plan(
            loaded,
            stats,
            config.retention,
            config.method,
            config.options,
            config.allocation,
            probe_config,
            windows,
            progress("probe"),
        )
    speed = None
    if config.keep_dense_if_slower or plan.keep_dense_if_slower:
        plan, speed = keep_dense_where_slower(
            dataclasses.replace(plan, keep_dense_if_slower=True),
            speedup=speedup,
            dtype=DTYPES[config.dtype],
            device=config.device,
        )
    start = time.perf_counter()
    if config.sequential:
        _, calibration = compress_sequential(loaded, plan, config.calibration, progress("calibration"))
        jitter = calibration.pop("whitening_jitter")
    elif group is None:
        jitter = whitening_jitter(compress(loaded.model, plan, stats, progress=progress("compress")))
    else:
        factors, planning["distributed"] = fit_distributed(
            loaded.model, plan, stats, group, progress("compress")
        )
        if factors is None:  # not rank 0: its factors went there
            return {"rank": group.rank, **planning["distributed"]}
        apply_factors(loaded.model, factors)
        jitter = whitening_jitter(factors)
    report = {
        "model": config.model,
        "fingerprint": loaded.fingerprint,
        "method": plan.method,
        "options": plan.options,
        "allocation": plan.allocation,
        "target_retention": plan.target_retention,
        "parameter_retention": plan.parameter_retention(),
        "model_retention": plan.model_retention(total_before),
        "parameters_before": total_before,
        "parameters_after": parameter_count(loaded.model),
        "calibration": calibration,
        **planning,
        "whitening_jitter": jitter,  # λ added to a Gram's diagonal so its Cholesky factor exists
        "keep_dense_if_slower": speed,  # None, or speed.keep_dense_where_slower's report
        "compress_seconds": time.perf_counter() - start,
    }

    def evaluate() -> dict:
        return evaluate_perplexity(
            loaded, evaluation, config.window, config.max_eval_tokens, progress=progress("perplexity")
        )

    if teacher is not None:
        if evaluation:
            report["perplexity_before_finetune"] = evaluate()
        tune = FinetuneConfig(  # the calibration's text and window size, other windows (seed 2)
            steps=config.finetune_steps,
            lr=config.finetune_lr,
            text=config.text,
            samples=config.samples,
            seq_len=config.finetune_seq_len or int(calibration["seq_len"]),
        )
        report["finetune"] = finetune(loaded, teacher, tune, evaluation, progress("finetune"))
        del teacher
    if evaluation:
        report["perplexity"] = evaluate()
    report["total_seconds"] = time.perf_counter() - started
    report.update(peak_memory())
    save_compressed(loaded.model, plan, config.out, loaded.tokenizer, report, force=config.force)
    return report
