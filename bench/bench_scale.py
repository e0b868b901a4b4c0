"""Scale benchmark: Llama-3.1-8B's matrix shapes and decoder layers, with random weights.

    python bench/bench_scale.py --json bench/results/scale.json          # the CPU run in the README
    python bench/bench_scale.py --device cuda --json scale_cuda.json     # the same script on a GPU

The model is built from Llama-3.1-8B's config (hidden 4096, MLP 14336, 32 heads, 8 KV heads) with random
weights: there is no hub access here. Measured, per shape (4096×4096 q/o, 1024×4096 k/v, 14336×4096
gate/up, 4096×14336 down): one `decompose` per method on synthetic statistics, SigmaScale's fixed part
and one Adam step (its 20-step time is fixed + 20 steps + the float64 re-check; on the cheap k/v shape
the full 20-step fit is also timed, to check that sum), and one step of the paper's loop (extrapolated
to its 1000). Per layer: calibration of a few decoder layers. Whole model: 32 layers of those, and the
same per-op model with a GPU's rates (stated as assumptions) for the GPU figures. Everything in one
process, so ratios compare like with like.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_baseline import paper_sigmascale

from sigmascale_core import ActivationStats, activation_loss, decompose, rank_for_retention
from sigmascale_core.calibration import collect_stats
from sigmascale_core.distributed import shard_by_cost
from sigmascale_core.methods import METHOD_OPTIONS, METHODS, truncation_loss
from sigmascale_core.models import GROUP_OF_KIND

# Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json); vocab shrunk: it does not enter any measured cost
LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=131072,
)
LAYERS_8B = 32
PARAMS_8B = 8.03e9
SHAPES = {"k/v": (1024, 4096), "q/o": (4096, 4096), "down": (4096, 14336), "gate/up": (14336, 4096)}
PER_LAYER = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}  # matrices of each shape in one decoder layer
RETENTION = 0.75
PAPER_STEPS, OUR_STEPS = 1000, 20

# Assumed rates of one H100 SXM (spec sheet × ~0.6 efficiency): FP64/FP32 matmul 67 TFLOP/s spec (FP64
# tensor cores; FP32 without TF32), a symmetric eigensolver (cuSOLVER syevd) at ~1.5 TFLOP/s (float64),
# ~3 TFLOP/s (float32) effective on 9·n³ flops (it is bandwidth-bound), bf16 forward 990 TFLOP/s spec.
# Assumptions, not measurements.
GPU_RATES = {"matmul64": 40e12, "matmul32": 40e12, "eigh": 1.5e12, "eigh32": 3e12, "bf16": 400e12}


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn, device: torch.device) -> tuple[object, float]:
    start = now(device)
    out = fn()
    return out, now(device) - start


def synthetic_problem(
    m: int, n: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, ActivationStats]:
    """W (m, n) as the model's init (N(0, 0.02²)), and statistics of LLM-like inputs built directly as a
    Gram (log-normal channel scales, 1/64 outlier channels, a rank-256 correlation): no n-wide token
    matrix needed."""
    g = torch.Generator().manual_seed(seed)
    W = (0.02 * torch.randn(m, n, generator=g)).to(device)
    scales = torch.exp(torch.randn(n, generator=g, dtype=torch.float64))
    scales[torch.randperm(n, generator=g)[: n // 64]] *= 30
    B = torch.randn(n, 256, generator=g, dtype=torch.float64) / 16
    tokens = 65536
    gram = tokens * scales[:, None] * (0.5 * torch.eye(n, dtype=torch.float64) + B @ B.T) * scales
    abs_sum = tokens * 0.8 * scales
    return W, ActivationStats(n, gram=gram.to(device), abs_sum=abs_sum.to(device), count=tokens)


def one_adam_step(W: torch.Tensor, stats: ActivationStats, rank: int) -> float:
    """Seconds of one step of the learned-scaling loop (forward + backward through the truncation)."""
    loss_of = truncation_loss(W.float(), (stats.gram / stats.gram.diagonal().mean()).float(), rank)
    r = torch.zeros(W.shape[0], device=W.device, requires_grad=True)
    c = torch.zeros(W.shape[1], device=W.device, requires_grad=True)
    with torch.enable_grad():
        return timed(lambda: loss_of(r, c).backward(), W.device)[1]


def float64_check(W: torch.Tensor, stats: ActivationStats, rank: int) -> float:
    """Seconds of the float64 loss evaluation learn_scaling runs twice after the loop."""
    loss_of = truncation_loss(W.double(), stats.gram, rank)
    r = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
    c = torch.zeros(W.shape[1], dtype=torch.float64, device=W.device)
    with torch.no_grad():
        return timed(lambda: loss_of(r, c), W.device)[1]


def paper_step(W: torch.Tensor, stats: ActivationStats, rank: int, tokens: int) -> float:
    """Seconds of one step of the paper's loop (full SVD + loss from X, forward + backward), X with the
    statistics' channel scales and `tokens` tokens: one call of 1 step minus its closing SVD."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(W.shape[1], tokens, generator=g).to(W.device) * stats.abs_mean.float()[:, None]
    _, with_svd = timed(lambda: paper_sigmascale(W.float(), X, rank, steps=1), W.device)
    _, svd = timed(lambda: torch.linalg.svd(W.float(), full_matrices=False), W.device)
    return with_svd - svd


def shape_rows(
    device: torch.device, paper_tokens: int, full_fit: set[str], shrink: int = 1, skip: set[str] = frozenset()
) -> Iterator[dict]:
    """One row per shape of SHAPES not in `skip`, as each is measured."""
    for i, (kind, (m, n)) in enumerate(SHAPES.items()):
        if kind in skip:
            continue
        m, n = m // shrink, n // shrink
        W, stats = synthetic_problem(m, n, device, seed=i)
        rank = rank_for_retention(m, n, RETENTION)
        row: dict = {"shape": kind, "m": m, "n": n, "rank": rank, "seconds": {}, "loss": {}}
        row["sigmascale_init"] = METHOD_OPTIONS["sigmascale"]["init"]  # what the sigmascale times ran
        for method in ("svd", "asvd", "svdllm"):
            factors, seconds = timed(
                lambda W=W, stats=stats, rank=rank, method=method: decompose(W, stats, rank, method), device
            )
            row["seconds"][method] = seconds
            row["loss"][method] = activation_loss(W, factors.to_dense(), stats)
            print(f"{kind} {method}: {seconds:.1f}s loss {row['loss'][method]:.5f}", flush=True)
        _, fixed = timed(
            lambda W=W, stats=stats, rank=rank: decompose(W, stats, rank, "sigmascale", steps=0), device
        )
        step = one_adam_step(W, stats, rank)
        check = float64_check(W, stats, rank)
        row["sigmascale_parts"] = {"fixed_s": fixed, "step_s": step, "float64_check_s": check}
        row["seconds"]["sigmascale"] = fixed + OUR_STEPS * step + 2 * check
        row["sigmascale_timed"] = "fixed + 20 × one step + 2 × float64 check (each measured)"
        if kind in full_fit:
            factors, seconds = timed(
                lambda W=W, stats=stats, rank=rank: decompose(W, stats, rank, "sigmascale"), device
            )
            row["sigmascale_full_fit_s"] = seconds
            row["loss"]["sigmascale"] = activation_loss(W, factors.to_dense(), stats)
        paper = paper_step(W, stats, rank, paper_tokens)
        row["paper_step_s"] = paper
        row["paper_loop_s"] = PAPER_STEPS * paper  # extrapolated from one step
        row["speedup_vs_paper"] = row["paper_loop_s"] / row["seconds"]["sigmascale"]
        print(
            f"{kind} sigmascale {row['seconds']['sigmascale']:.1f}s, paper {row['paper_loop_s']:.0f}s",
            flush=True,
        )
        yield row


def batched_eigh(device: torch.device, n: int, batch: int) -> dict:
    """eigh of `batch` same-shape Grams at once against one by one (float64): adopt only if faster."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(batch, n, n, generator=g, dtype=torch.float64).to(device)
    A = A @ A.mT
    _, together = timed(lambda: torch.linalg.eigh(A), device)
    _, apart = timed(lambda: [torch.linalg.eigh(a) for a in A], device)
    return {"n": n, "batch": batch, "batched_s": together, "one_by_one_s": apart, "speedup": apart / together}


def calibration_rows(
    device: torch.device, dtype: torch.dtype, layers: int, samples: tuple[int, ...], seq_len: int
) -> dict:
    """Seconds per decoder layer of collect_stats on an 8B-shaped model of `layers` layers, at several
    token counts: t(T) = fixed + per_token·T fitted on the fastest layer of the smallest and largest."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA_8B, "num_hidden_layers": layers}, vocab_size=4096)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    runs = []
    for count in samples:
        ids = torch.randint(0, config.vocab_size, (count, seq_len))
        stamps = [now(device)]
        collect_stats(model, ids, batch_size=1, progress=lambda *_, s=stamps: s.append(now(device)))
        per_layer = [b - a for a, b in itertools.pairwise(stamps)]
        runs.append({"tokens": count * seq_len, "seconds_per_layer": per_layer})
        print(runs[-1], flush=True)
    (t0, s0), (t1, s1) = [(r["tokens"], min(r["seconds_per_layer"])) for r in (runs[0], runs[-1])]
    per_token = (s1 - s0) / (t1 - t0)
    return {
        "layers": layers,
        "dtype": str(dtype).removeprefix("torch."),
        "runs": runs,
        "fixed_s": s0 - per_token * t0,
        "per_token_s": per_token,
    }


def memory_model(tokens: int) -> dict[str, float]:
    """GiB one GPU holds compressing Llama-3.1-8B (bf16 weights, layer-by-layer calibration, float64 stats
    moved to the host after each layer, one matrix's float64 working set at a time)."""
    gib = 2**30
    weights = PARAMS_8B * 2 / gib
    hidden = 2 * tokens * 4096 * 2 / gib  # one layer's inputs and outputs for the whole calibration set
    layer_stats = (3 * 4096**2 + 14336**2) * 8 / gib  # four float64 Grams of one layer
    batch_temporaries = 4 * 2048 * 14336 * 2 * 4 / gib  # MLP intermediates of one 4×2048 batch
    decompose_ws = (14336 * 4096 * 8 * 3 + 4096**2 * 8 * 6) / gib  # float64 W, W_s, left + n² Gram, L, V…
    return {
        "weights_bf16": weights,
        "hidden_states": hidden,
        "layer_stats_float64": layer_stats,
        "batch_temporaries": batch_temporaries,
        "decompose_working_set": decompose_ws,
        "peak": weights + hidden + layer_stats + batch_temporaries + decompose_ws,
        "host_stats_float64_all_layers": LAYERS_8B * layer_stats,
        "host_stats_float32_all_layers": LAYERS_8B * layer_stats / 2,  # --gram-dtype float32
    }


def op_counts(m: int, n: int, rank: int, method: str, init: str = "whiten") -> dict[str, float]:
    """Flops of the dominant ops of one fit (see methods.py): matmuls by dtype and eigh sizes; sigmascale
    with `init` (the default "whiten" adds svdllm's Cholesky, W·L and the two solves for L⁻¹·G·L⁻ᵀ)."""
    s, big = min(m, n), max(m, n)
    eigh = 9 * s**3
    truncate = {"matmul64": 2 * big * s * s + 2 * big * s * rank, "eigh": eigh}
    if method in ("svd", "asvd"):
        return truncate
    if method == "svdllm":
        return {"matmul64": truncate["matmul64"] + 2 * m * n * n + n**3 / 3 + rank * n * n, "eigh": eigh}
    step = {"matmul32": 3 * (2 * big * s * s) + 12 * s**3, "eigh": eigh}
    check = {"matmul64": 2 * big * s * s + 6 * s**3, "eigh": eigh}
    # truncation_loss's constant, once per loss function: WᵀW (m ≥ n), W·G·Wᵀ (m < n, with the n² Gram)
    setup = 2 * m * n * n + (2 * m * m * n if m < n else 0)
    # init="whiten": Cholesky and W·L, then L⁻¹·G·L⁻ᵀ by two solves (m ≥ n) or, for m < n, W·G·Wᵀ formed
    # once in float64 and shared by both loss functions (no float32 setup)
    shared = init == "whiten" and m < n
    whiten = n**3 / 3 + 2 * m * n * n + (0 if m < n else 2 * n**3) if init == "whiten" else 0
    return {
        "matmul64": truncate["matmul64"] + 2 * check["matmul64"] + setup + whiten,
        "matmul32": OUR_STEPS * step["matmul32"] + 2 * big * s * s + (0 if shared else setup),
        "eigh": eigh * (1 + 2),  # the truncation, the float64 re-check
        "eigh32": eigh * (OUR_STEPS + 1),  # one per loop step, float32
    }


def paper_counts(m: int, n: int, rank: int, tokens: int) -> dict[str, float]:
    """Flops of the paper's loop: per step a full SVD (~ 4·m·n·s + 8·s³ on each of forward and backward)
    and the loss from X (2·m·n·tokens forward, twice that backward)."""
    s = min(m, n)
    per_step = 2 * (4 * m * n * s + 8 * s**3) + 6 * m * n * tokens + 2 * m * n * s
    return {"matmul32": PAPER_STEPS * per_step}


def gpu_seconds(counts: dict[str, float]) -> float:
    return (
        counts.get("matmul64", 0) / GPU_RATES["matmul64"]
        + counts.get("matmul32", 0) / GPU_RATES["matmul32"]
        + counts.get("eigh", 0) / GPU_RATES["eigh"]
        + counts.get("eigh32", 0) / GPU_RATES["eigh32"]
    )


def whole_model(rows: list[dict], calibration: dict, tokens_8b: int, paper_tokens: int) -> dict:
    """Whole-8B figures: 32 layers of the measured per-shape and per-layer times (this device), and the
    op model at the assumed GPU rates."""
    measured_layer_s = calibration["fixed_s"] + calibration["per_token_s"] * tokens_8b
    out: dict = {"calibration_tokens": tokens_8b, "this_device": {}, "gpu_model": {}}
    for method in METHODS:
        per_layer = sum(PER_LAYER[r["shape"]] * r["seconds"][method] for r in rows)
        out["this_device"][method] = {
            "calibration_s": LAYERS_8B * measured_layer_s,
            "compression_s": LAYERS_8B * per_layer,
            "total_min": LAYERS_8B * (measured_layer_s + per_layer) / 60,
        }
        gpu_layer = sum(
            PER_LAYER[r["shape"]] * gpu_seconds(op_counts(r["m"], r["n"], r["rank"], method)) for r in rows
        )
        # calibration: bf16 forward (2 flops per parameter per token) + float32 Grams of the four inputs
        flops = tokens_8b * (2 * PARAMS_8B / LAYERS_8B + 2 * (3 * 4096**2 + 14336**2))
        gpu_calibration = flops / GPU_RATES["matmul32"]
        out["gpu_model"][method] = {
            "calibration_s": LAYERS_8B * gpu_calibration,
            "compression_s": LAYERS_8B * gpu_layer,
            "total_min": LAYERS_8B * (gpu_calibration + gpu_layer) / 60,
        }
    out["gpu_model"]["paper_loop_per_matrix_s"] = {
        r["shape"]: gpu_seconds(paper_counts(r["m"], r["n"], r["rank"], paper_tokens)) for r in rows
    }
    out["gpu_model"]["speedup_vs_paper"] = {
        r["shape"]: gpu_seconds(paper_counts(r["m"], r["n"], r["rank"], 65536))
        / gpu_seconds(op_counts(r["m"], r["n"], r["rank"], "sigmascale"))
        for r in rows
    }
    return out


def measure_rates(device: torch.device, n: int = 2048) -> dict[str, float]:
    """This device's flop rates for the op model's classes: n² products in float64 and float32, and a
    float64 `eigh` counted as 9·n³ flops."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, n, generator=g, dtype=torch.float64).to(device)
    S = A @ A.mT
    rates = {}
    for name, X in (("matmul64", A), ("matmul32", A.float())):
        rates[name] = 2 * n**3 / timed(lambda X=X: X @ X, device)[1]
    rates["eigh"] = 9 * n**3 / timed(lambda: torch.linalg.eigh(S), device)[1]
    rates["eigh32"] = 9 * n**3 / timed(lambda: torch.linalg.eigh(S.float()), device)[1]
    return rates


def check_op_model(rows: list[dict], rates: dict[str, float]) -> dict[str, float]:
    """Modelled / measured seconds of every fit of the run, at this device's measured rates: how far the
    op model that gives the GPU figures is from what was timed."""

    def seconds(counts: dict[str, float]) -> float:
        return sum(counts.get(k, 0) / rates[k] for k in rates)

    return {
        f"{r['shape']}/{method}": seconds(op_counts(r["m"], r["n"], r["rank"], method, r["sigmascale_init"]))
        / r["seconds"][method]
        for r in rows
        for method in METHODS
    }


LLAMA_70B = {"q/o": (8192, 8192), "k/v": (1024, 8192), "gate/up": (28672, 8192), "down": (8192, 28672)}
LAYERS_70B, PARAMS_70B = 80, 70.6e9


# The table row (shape) of each target matrix of a decoder layer; the input it reads is GROUP_OF_KIND's
ROW_OF_KIND = {
    "q": "q/o",
    "k": "k/v",
    "v": "k/v",
    "o": "q/o",
    "gate": "gate/up",
    "up": "gate/up",
    "down": "down",
}


def shard_stats_gib(
    shapes: dict[str, tuple[int, int]], layers: int, world: int, bytes_per: int
) -> list[float]:
    """GiB of input statistics each rank reads when `world` ranks shard the model's matrices by cost
    (distributed.shard_by_cost, as the run does): the n² Grams of the inputs its matrices read."""
    matrices = {
        f"{layer}.{kind}": shapes[row] for layer in range(layers) for kind, row in ROW_OF_KIND.items()
    }
    per_rank = []
    for shard in shard_by_cost(matrices, world):
        inputs = {
            (name.split(".")[0], GROUP_OF_KIND[name.split(".")[1]]): matrices[name][1] for name in shard
        }
        per_rank.append(sum(n * n for n in inputs.values()) * bytes_per / 2**30)
    return per_rank


def design_70b(tokens: int, worlds: tuple[int, ...] = (1, 8, 16)) -> dict:
    """Llama-3.1-70B by the same op model at the assumed GPU rates: SigmaScale fit time per rank for
    `worlds` GPUs (LPT over 560 matrices balances to within one matrix), what is communicated, memory."""
    gib = 2**30
    per_matrix = {
        kind: gpu_seconds(op_counts(m, n, rank_for_retention(m, n, RETENTION), "sigmascale"))
        for kind, (m, n) in LLAMA_70B.items()
    }
    total_fit = LAYERS_70B * sum(PER_LAYER[k] * t for k, t in per_matrix.items())
    target_params = LAYERS_70B * sum(PER_LAYER[k] * m * n for k, (m, n) in LLAMA_70B.items())
    factor_bytes = 2 * RETENTION * target_params  # bf16 factors at the retention
    grams = (3 * 8192**2 + 28672**2) * 8  # float64, one layer
    calibration_flops = tokens * (2 * PARAMS_70B + LAYERS_70B * 2 * (3 * 8192**2 + 28672**2))
    largest = max(per_matrix.values())
    return {
        "sigmascale_fit_s_per_matrix": per_matrix,
        "fit_s_per_rank": {str(w): total_fit / w + largest for w in worlds},
        "calibration_s_one_gpu_offloaded": calibration_flops / GPU_RATES["matmul32"]
        + 2 * PARAMS_70B / (25 * 1e9),  # + bf16 weights streamed over PCIe (25 GB/s) once
        "stats_float64_gib": LAYERS_70B * grams / gib,
        "factors_bf16_gib": factor_bytes / gib,
        "gathered_to_rank0_gib": {str(w): factor_bytes * (w - 1) / w / gib for w in worlds},
        "gpu_working_set_per_rank_gib": (28672 * 8192 * 8 * 3 + 8192**2 * 8 * 6) / gib,
        "host_per_rank_gib": {"model_bf16": 2 * PARAMS_70B / gib, "stats_float64": LAYERS_70B * grams / gib},
        "shard_stats_per_rank_gib": {  # what each rank reads (a plan known up front), its largest share
            f"{dtype}/{w}": max(shard_stats_gib(LLAMA_70B, LAYERS_70B, w, size))
            for dtype, size in (("float64", 8), ("float32", 4))
            for w in worlds
        },
    }


def markdown(result: dict) -> str:
    """The README's tables from a results JSON."""
    lines = [
        "| shape | rank | svd s | asvd s | svdllm s | sigmascale s (20 steps) | paper's loop s (1000 steps) "
        "| speed-up | loss asvd / svdllm / sigmascale |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["shapes"]:
        t, loss = r["seconds"], r["loss"]
        ours = f"{t['sigmascale']:.0f}" + (
            f" (full fit: {r['sigmascale_full_fit_s']:.0f})" if "sigmascale_full_fit_s" in r else ""
        )
        sigma_loss = f"{loss['sigmascale']:.5f}" if "sigmascale" in loss else "–"
        lines.append(
            f"| {r['shape']} {r['m']}×{r['n']} | {r['rank']} | {t['svd']:.0f} | {t['asvd']:.0f} | "
            f"{t['svdllm']:.0f} | {ours} | {r['paper_loop_s']:.0f} | {r['speedup_vs_paper']:.0f}× | "
            f"{loss['asvd']:.5f} / {loss['svdllm']:.5f} / {sigma_loss} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calibration-layers", type=int, default=2, help="8B-shaped layers calibrated")
    parser.add_argument(
        "--samples", default="1,8", help="calibration sequences, one run per count (8B run: 32)"
    )
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (8B run: 2048)")
    parser.add_argument("--paper-tokens", type=int, default=4096, help="tokens of X in the paper's loop")
    parser.add_argument("--shrink", type=int, default=1, help="divide the shapes by this (smoke tests only)")
    parser.add_argument("--json", type=Path, help="write the results here (after every section)")
    parser.add_argument("--resume", action="store_true", help="keep the sections --json already holds")
    parser.add_argument("--table", type=Path, help="only print the README tables of this results JSON")
    args = parser.parse_args()
    if args.table is not None:
        print(markdown(json.loads(args.table.read_text())))
        return
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    result: dict = {
        "note": "Llama-3.1-8B-shaped model built from its config with RANDOM weights (no hub access here); "
        "synthetic statistics per shape. The paper's loop is timed for one step and extrapolated to 1000. "
        "SigmaScale's 20-step time at the large shapes is fixed part + 20 × one measured step + 2 × the "
        "float64 re-check (the k/v row also runs the full fit). Whole-8B figures are a model: 32 × the "
        "measured per-layer times on this device, and an op-count model at ASSUMED GPU rates.",
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "retention": RETENTION,
    }
    if args.resume and args.json is not None and args.json.exists():  # keep what an earlier run measured
        earlier = json.loads(args.json.read_text())
        kept = ("shapes", "calibration", "batched_eigh", "rates_this_device", "measured")
        result.update({k: earlier[k] for k in kept if k in earlier})
    result.setdefault("shapes", [])
    if "calibration" not in result:
        samples = tuple(int(x) for x in args.samples.split(","))
        result["calibration"] = calibration_rows(
            device, dtype, args.calibration_layers, samples, args.seq_len
        )
        save(result, args.json)
    if "batched_eigh" not in result:
        result["batched_eigh"] = [batched_eigh(device, n, 2) for n in (1024, 2048)]
        print(result["batched_eigh"], flush=True)
        save(result, args.json)
    done = {row["shape"] for row in result["shapes"]}
    for row in shape_rows(device, args.paper_tokens, {"k/v"}, args.shrink, done):
        result["shapes"].append(row)
        result["shapes"].sort(key=lambda r: list(SHAPES).index(r["shape"]))  # a resumed run: table order
        save(result, args.json)
    result["gpu_rates_assumed"] = GPU_RATES
    if "rates_this_device" not in result:
        result["rates_this_device"] = measure_rates(device)
    result["op_model_over_measured"] = check_op_model(result["shapes"], result["rates_this_device"])
    result["design_70b"] = design_70b(32 * 2048)
    result["whole_8b"] = whole_model(result["shapes"], result["calibration"], 32 * 2048, args.paper_tokens)
    result["memory_model_gib"] = memory_model(32 * 2048)
    result.setdefault(
        "measured",
        {  # the first run's (a --resume that only recomputes keeps them)
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            **({"peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30} if device.type == "cuda" else {}),
            "bench_seconds": time.perf_counter() - started,
        },
    )
    print(json.dumps(result, indent=2))
    save(result, args.json)


def save(result: dict, path: Path | None) -> None:
    """Write the results so far (atomically): a long run keeps what it measured."""
    if path is not None:
        from sigmascale_core.artifacts import write_text_atomic

        write_text_atomic(json.dumps(result, indent=2) + "\n", path)


if __name__ == "__main__":
    main()
