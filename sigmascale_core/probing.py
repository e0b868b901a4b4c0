"""Sensitivity probing: how much the model suffers when one matrix alone is truncated.

For every target matrix and every retention of a grid, the matrix's weight is swapped for its rank-k
reconstruction (by the chosen method, from the calibration stats), the perplexity of a small probing
batch is measured, and the weight is put back (in `finally`). The result is a `SensitivityTable`,
the input of `allocation.allocate`. `proxy_sensitivity` fills the same table from each matrix's
`loss_curve` alone (relative activation loss), without a single forward pass.

Text policy. The probing text is calibration-side: `calibration_side_batch` refuses (ValueError) any
spec that shares a document with an evaluation text (`text.check_disjoint`), so a sensitivity, and the
allocation built on it, is never tuned on the text perplexity is reported on. The default probing
batch is drawn from boolq:calibration with its own seed (ProbeConfig.seed = 1, calibration's is 0):
the windows are independent of the statistics' windows and may share tokens with them. That overlap is
allowed (both are calibration-side, the probe ranks matrices against each other, it reports nothing)
and measured: `probe` records the fraction of probing tokens that also fed the statistics.

Cost. One probe is a forward pass over the probing batch from the truncated matrix's decoder layer on
(the hidden states entering every layer are computed once), so ≈ matrices × grid × ½ forward. The
bundled SmolLM2-135M has 210 matrices; with the default 8-point grid and 4 × 256 tokens that is 1,680
partial forwards: hours on a laptop CPU, minutes on a GPU. `probe` therefore caches the finished
table under cache_root()/probes/ and checkpoints a partial one after every matrix, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sigmascale_core.artifacts import cache_root, write_json_atomic
from sigmascale_core.calibration import stats_key
from sigmascale_core.methods import check_options, decompose, fit_scaling, loss_curve, truncate
from sigmascale_core.models import (
    FAMILIES,
    LoadedModel,
    MatrixRef,
    decoder_layers,
    get_module,
    model_family,
    model_fingerprint,
    set_module,
    target_matrices,
    tokenizer_fingerprint,
)
from sigmascale_core.progress import Progress
from sigmascale_core.sensitivity import TABLE_VERSION, SensitivityTable, check_grid, probe_ranks
from sigmascale_core.stats import ActivationStats
from sigmascale_core.text import (
    DEFAULT_CALIBRATION_TEXT,
    DEFAULT_EVALUATION_TEXTS,
    calibration_side_batch,
    shared_token_fraction,
    token_stream,
)

DEFAULT_RETENTIONS: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
PROXY_RETENTIONS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 … 0.95
NESTED_METHODS = ("svd", "asvd", "svdllm")  # scaling independent of the rank: rank-k factors nest


# ---------------------------------------------------------------------------------------------------
# Scoring from a decoder layer on


class _TailScorer:
    """Mean next-token NLL of a fixed batch, recomputing only the decoder layers from `start` on.

    The hidden states entering every decoder layer are recorded once (pre-hooks, dense model). A matrix
    of layer i changes nothing before layer i, so its probe runs layers i… on the recorded input of
    layer i, passed as `inputs_embeds` to the model with its layer list cut to layers[i:]. That is
    exact for the registry's families (none scales its embeddings); a self-check at construction
    compares it with the full forward and falls back to full forwards if they disagree.
    """

    def __init__(self, model: nn.Module, tokens: torch.Tensor, batch_size: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.batches = [b.to(self.device) for b in tokens.split(batch_size)]  # (B, L) each
        self.tokens_scored = sum(b[:, 1:].numel() for b in self.batches)
        self.layers_path = FAMILIES[model_family(model)].layers
        self.inputs = self._record_layer_inputs()  # inputs[i][b]: (B, L, hidden) entering layer i
        self.dense_nll = self._full_nll()
        self.exact = math.isclose(self._tail_nll(0), self.dense_nll, rel_tol=1e-5, abs_tol=1e-6)

    @torch.no_grad()
    def _record_layer_inputs(self) -> list[list[torch.Tensor]]:
        layers = decoder_layers(self.model)
        inputs: list[list[torch.Tensor]] = [[] for _ in layers]

        def record(i: int) -> Callable:
            def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                inputs[i].append((args[0] if args else kwargs["hidden_states"]).detach())

            return hook

        hooks = [
            layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]
        try:
            for batch in self.batches:
                self.model(batch, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        return inputs

    @staticmethod
    def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
        logits = logits[:, :-1].float()  # (B, L-1, V)
        targets = ids[:, 1:].reshape(-1)
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum"))

    @torch.no_grad()
    def _full_nll(self) -> float:
        total = sum(self._nll_sum(self.model(b, use_cache=False).logits, b) for b in self.batches)
        return total / self.tokens_scored

    @torch.no_grad()
    def _tail_nll(self, start: int) -> float:
        layers = decoder_layers(self.model)
        set_module(self.model, self.layers_path, layers[start:])
        try:
            total = 0.0
            for hidden, ids in zip(self.inputs[start], self.batches, strict=True):
                total += self._nll_sum(self.model(inputs_embeds=hidden, use_cache=False).logits, ids)
        finally:
            set_module(self.model, self.layers_path, layers)
        return total / self.tokens_scored

    def nll(self, start: int) -> float:
        """Mean NLL of the model as it is now, given that layers before `start` are unchanged."""
        return self._tail_nll(start) if self.exact else self._full_nll()


@contextlib.contextmanager
def _swapped_weight(module: nn.Module, weight: torch.Tensor) -> Iterator[None]:
    """`module.weight` holds `weight` inside the block; the original tensor is back afterwards, always."""
    original = module.weight.data
    module.weight.data = weight
    try:
        yield
    finally:
        module.weight.data = original


def learning_rank(ranks: Sequence[int]) -> int:
    """The probed rank sigmascale's scaling is learned at (the median of the grid's ranks), then held
    fixed for every probed rank, as its loss curves in the app are: one fit per matrix, not one per rank."""
    ordered = sorted(ranks)
    return ordered[len(ordered) // 2]


def _factor_source(
    W: torch.Tensor, stats: ActivationStats | None, ranks: tuple[int, ...], method: str, options: dict
) -> Callable[[int], torch.Tensor]:
    """rank -> reconstruction left@right of W (W's dtype). Methods whose scaling does not depend on the
    rank decompose once at the largest rank: their rank-k factors are the first k columns/rows;
    sigmascale learns its scaling once (at `learning_rank`) and truncates under it at every rank."""
    if method in NESTED_METHODS:
        top = decompose(W, stats, max(ranks), method, **options)
        return lambda k: top.left[:, :k] @ top.right[:k]
    scaling = fit_scaling(W, stats, method, learning_rank(ranks), **options)
    return lambda k: truncate(W, scaling, k, method).to_dense()


def _matrix_stats(
    ref: MatrixRef, stats: dict[str, ActivationStats], required: bool
) -> ActivationStats | None:
    key = stats_key(ref.layer, ref.group)
    if key in stats:
        return stats[key]
    if required:
        raise ValueError(f"no calibration stats for {ref.name} (expected key {key!r})")
    return None


def _select(model: nn.Module, matrices: Sequence[str] | None) -> list[MatrixRef]:
    refs = target_matrices(model)
    if matrices is None:
        return refs
    known = {r.name for r in refs}
    unknown = [name for name in matrices if name not in known]
    if unknown:
        raise ValueError(f"no such target matrices: {unknown[:5]}")
    wanted = set(matrices)
    return [r for r in refs if r.name in wanted]


def probe_sensitivity(
    model: nn.Module,
    stats: dict[str, ActivationStats],
    probe_tokens: torch.Tensor,
    method: str = "svdllm",
    retentions: Sequence[float] = DEFAULT_RETENTIONS,
    options: dict[str, object] | None = None,
    batch_size: int = 4,
    matrices: Sequence[str] | None = None,
    known: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] | None = None,
    on_matrix: Callable[[str, tuple[int, ...], tuple[float, ...]], None] | None = None,
    progress: Progress | None = None,
) -> SensitivityTable:
    """Perplexity of `probe_tokens` (n_samples, seq_len) with one matrix at a time truncated to each rank
    of the retention grid (by `method`, fitted on `stats`), every other matrix dense.

    The model is left exactly as it was (weights swapped back in `finally`). `matrices` limits the probe
    to some target matrices; `known` supplies already-probed matrices (name -> (ranks, perplexities)),
    which are not probed again; `on_matrix(name, ranks, perplexities)` is called after each matrix (a
    checkpoint hook). Progress counts (matrix, rank) probes.
    """
    if probe_tokens.ndim != 2 or probe_tokens.shape[1] < 2:
        raise ValueError(f"probe_tokens must be (n_samples, seq_len ≥ 2), got {tuple(probe_tokens.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    options = check_options(method, options)
    grid = check_grid(retentions)
    refs = _select(model, matrices)
    known = dict(known or {})
    started = time.perf_counter()
    scorer = _TailScorer(model, probe_tokens, batch_size)
    todo = [r for r in refs if r.name not in known]
    total = sum(len(probe_ranks(r.shape, grid)) for r in todo)
    done = 0
    ranks_of: dict[str, tuple[int, ...]] = {}
    values_of: dict[str, tuple[float, ...]] = {}
    for ref in refs:
        ranks = probe_ranks(ref.shape, grid)
        if ref.name in known:
            ranks_of[ref.name], values_of[ref.name] = _known_entry(ref, ranks, known[ref.name])
            continue
        values = []
        if ranks:
            module = get_module(model, ref.name)
            W = module.weight.detach()
            layer_stats = _matrix_stats(ref, stats, required=method != "svd")
            layer_stats = None if layer_stats is None else layer_stats.to(W.device)
            reconstruct = _factor_source(W, layer_stats, ranks, method, options)
            for k in ranks:
                with _swapped_weight(module, reconstruct(k).to(W.dtype)):
                    values.append(math.exp(scorer.nll(ref.layer)))
                done += 1
                if progress is not None:
                    progress(done, total, f"{ref.name} rank {k}")
        ranks_of[ref.name], values_of[ref.name] = ranks, tuple(values)
        if on_matrix is not None:
            on_matrix(ref.name, ranks, tuple(values))
    info = {
        "probe_samples": int(probe_tokens.shape[0]),
        "probe_seq_len": int(probe_tokens.shape[1]),
        "tokens_scored": scorer.tokens_scored,
        "tail_forward": scorer.exact,
        "probes": total,
        "seconds": time.perf_counter() - started,
    }
    return SensitivityTable(
        metric="perplexity",
        dense=math.exp(scorer.dense_nll),
        retentions=grid,
        shapes={r.name: r.shape for r in refs},
        ranks=ranks_of,
        values=values_of,
        method=method,
        options=options,
        model_fingerprint=model_fingerprint(model),
        info=info,
    )


def _known_entry(
    ref: MatrixRef, ranks: tuple[int, ...], entry: tuple[Sequence[int], Sequence[float]]
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    known_ranks, known_values = tuple(int(k) for k in entry[0]), tuple(float(v) for v in entry[1])
    if known_ranks != ranks or len(known_values) != len(ranks):
        raise ValueError(f"{ref.name}: known probe has ranks {known_ranks}, the grid gives {ranks}")
    return known_ranks, known_values


def proxy_sensitivity(
    model: nn.Module,
    stats: dict[str, ActivationStats],
    method: str = "svdllm",
    retentions: Sequence[float] = PROXY_RETENTIONS,
    options: dict[str, object] | None = None,
    matrices: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> SensitivityTable:
    """The cheap stand-in for probing: each matrix's relative activation loss ‖(W−W′_k)X‖²/‖WX‖² at the
    grid's ranks, read off `methods.loss_curve` (one decomposition per matrix; sigmascale's scaling
    learned once, at `learning_rank`, as in the perplexity probe). No forward pass; every matrix weighs the same,
    so it ranks ranks within a matrix well and matrices against each other only roughly."""
    options = check_options(method, options)
    grid = check_grid(retentions)
    refs = _select(model, matrices)
    started = time.perf_counter()
    ranks_of: dict[str, tuple[int, ...]] = {}
    values_of: dict[str, tuple[float, ...]] = {}
    for done, ref in enumerate(refs, start=1):
        ranks = probe_ranks(ref.shape, grid)
        W = get_module(model, ref.name).weight.detach()
        layer_stats = _matrix_stats(ref, stats, required=True).to(W.device)  # the loss needs a Gram
        if not ranks:
            values: list[float] = []
        else:
            learned_at = learning_rank(ranks) if method == "sigmascale" else None
            curve = loss_curve(W, layer_stats, method, learned_at, **options)
            values = [float(curve[k]) for k in ranks]
        ranks_of[ref.name], values_of[ref.name] = ranks, tuple(values)
        if progress is not None:
            progress(done, len(refs), ref.name)
    return SensitivityTable(
        metric="relative_loss",
        dense=0.0,
        retentions=grid,
        shapes={r.name: r.shape for r in refs},
        ranks=ranks_of,
        values=values_of,
        method=method,
        options=options,
        model_fingerprint=model_fingerprint(model),
        info={"seconds": time.perf_counter() - started},
    )


# ---------------------------------------------------------------------------------------------------
# Whole-model job: probing text, cache, checkpoints


@dataclass(frozen=True)
class ProbeConfig:
    text: str = DEFAULT_CALIBRATION_TEXT  # calibration-side text spec; checked against `evaluation`
    samples: int = 4  # probing sequences
    seq_len: int = 256  # tokens per sequence
    seed: int = 1  # which windows are drawn (calibration's default seed is 0: different windows)
    batch_size: int = 4  # sequences per forward pass
    method: str = "svdllm"  # decomposition that truncates each matrix
    options: dict[str, object] = field(default_factory=dict)  # its options
    retentions: tuple[float, ...] = DEFAULT_RETENTIONS  # retention grid
    proxy: bool = False  # True: loss-curve proxy instead of perplexity (no probing text needed)
    evaluation: tuple[str, ...] = DEFAULT_EVALUATION_TEXTS  # texts the probing text must not touch
    matrices: tuple[str, ...] | None = None  # probe only these target matrices (None: all)


def stats_digest(stats: dict[str, ActivationStats]) -> str:
    """Short hex id of a stats dict (counts, abs sums, Gram diagonals and first rows): the probe cache
    must change whenever the statistics that shape the truncations do."""
    h = hashlib.blake2b(digest_size=8)
    for key in sorted(stats):
        s = stats[key]
        h.update(f"{key}\0{s.in_features}\0{s.count}\0".encode())
        for t in (s.abs_sum, s.gram.diagonal(), s.gram[0]):
            h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def probe_cache_path(key: dict[str, object]) -> Path:
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=12).hexdigest()
    return cache_root() / "probes" / f"{digest}.json"


def _read_cached(path: Path, key: dict[str, object]) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != json.loads(json.dumps(key, sort_keys=True)):
        return None
    return data


def probe(
    loaded: LoadedModel,
    stats: dict[str, ActivationStats],
    config: ProbeConfig = ProbeConfig(),
    calibration: tuple[str, int, int, int] | None = None,
    progress: Progress | None = None,
    use_cache: bool = True,
) -> tuple[SensitivityTable, dict]:
    """The sensitivity table of a loaded model, from cache when made before; else probed (or proxied),
    checkpointed after every matrix into `<key>.partial.json` and resumed from there after an interrupt.

    `calibration` = (text, samples, seq_len, seed) of the stats' windows, only to report the fraction of
    probing tokens they share. Returns (table, info), info saying where it came from and what it cost.
    """
    options = check_options(config.method, config.options)
    grid = check_grid(config.retentions)
    key: dict[str, object] = {
        "format": TABLE_VERSION,
        "model": loaded.fingerprint,
        "stats": stats_digest(stats),
        "method": config.method,
        "options": options,
        "retentions": list(grid),
        "proxy": config.proxy,
        "matrices": None if config.matrices is None else sorted(config.matrices),
    }
    if config.method == "sigmascale":  # older tables learned one scaling per probed rank
        key["learned_at"] = "median probed rank"
    if not config.proxy:
        key.update(
            tokenizer=tokenizer_fingerprint(loaded.tokenizer),
            text=config.text,
            samples=config.samples,
            seq_len=config.seq_len,
            seed=config.seed,
        )
    path = probe_cache_path(key)
    partial = path.with_name(path.stem + ".partial.json")
    info: dict[str, object] = {**key, "cache": str(path)}
    started = time.perf_counter()
    if use_cache and (cached := _read_cached(path, key)) is not None:
        with contextlib.suppress(KeyError, ValueError):
            table = SensitivityTable.from_dict(cached["table"])
            return table, {**info, "cached": True, "seconds": time.perf_counter() - started}
    if config.proxy:
        table = proxy_sensitivity(
            loaded.model, stats, config.method, grid, options, config.matrices, progress=progress
        )
    else:
        tokens = calibration_side_batch(
            loaded.tokenizer,
            loaded.family,
            config.text,
            config.samples,
            config.seq_len,
            config.seed,
            config.evaluation,
        )
        if calibration is not None and calibration[0] == config.text:
            n_tokens = token_stream(loaded.tokenizer, loaded.family, config.text).numel()
            probe_windows = (config.samples, config.seq_len, config.seed)
            info["shared_with_stats"] = shared_token_fraction(n_tokens, probe_windows, calibration[1:])
        known: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] = {}  # a bad partial file: start over
        if use_cache and (saved := _read_cached(partial, key)) is not None:
            with contextlib.suppress(KeyError, TypeError, ValueError, IndexError, AttributeError):
                known = {
                    str(name): (tuple(int(k) for k in e[0]), tuple(float(v) for v in e[1]))
                    for name, e in saved["matrices"].items()
                }
        info["resumed_matrices"] = len(known)

        def checkpoint(name: str, ranks: tuple[int, ...], values: tuple[float, ...]) -> None:
            known[name] = (ranks, values)
            if use_cache:
                write_json_atomic(
                    {"key": key, "matrices": {k: list(map(list, v)) for k, v in known.items()}}, partial
                )

        table = probe_sensitivity(
            loaded.model,
            stats,
            tokens,
            config.method,
            grid,
            options,
            config.batch_size,
            config.matrices,
            known=dict(known),
            on_matrix=checkpoint,
            progress=progress,
        )
        table = dataclasses.replace(table, info={**table.info, "text": config.text, "seed": config.seed})
    if use_cache:
        write_json_atomic({"key": key, "table": table.to_dict()}, path)
        partial.unlink(missing_ok=True)
    return table, {**info, "cached": False, "seconds": time.perf_counter() - started}
