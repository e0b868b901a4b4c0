"""Time break-even: the rank above which two thin matmuls are slower than the dense one they replace.

Factors of rank k hold fewer parameters than W (m, n) while k < mn/(m+n), the parameter break-even a
plan honours (plan.MatrixPlan.is_dense). Time is another matter: x Wᵀ is one large matmul, x Rᵀ Lᵀ two
thinner ones whose kernels run less efficiently, so on a given device, dtype and token count the
factorised layer can be slower well below the parameter break-even. `keep_dense_where_slower` measures
that break-even per shape on the running device and keeps such matrices dense, saying what it costs.

Measurements go through a `speedup(m, n, rank, tokens) -> dense seconds / factorised seconds`, so the
decisions can be tested with a synthetic one; `matmul_speedup` is the real one. It times the two products
alternately and takes the median ratio: on a shared machine other processes slow both alike, where two
separate timings minutes apart would compare two different loads.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sigmascale_core.plan import CompressionPlan

Speedup = Callable[[int, int, int, int], float]  # (m, n, rank, tokens) -> dense s / factorised s
BREAK_EVEN_TOKENS = 512  # tokens per matmul when a plan keeps slow matrices dense: a prefill's length


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_speedup(
    m: int,
    n: int,
    rank: int,
    tokens: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    repeats: int = 5,
    min_seconds: float = 0.02,
) -> float:
    """Seconds of y = x Wᵀ over seconds of y = (x Rᵀ) Lᵀ, x (tokens, n), W (m, n), R (k, n), L (m, k): the
    products nn.Linear and LowRankLinear compute (> 1: the factors are faster). `repeats` pairs, dense
    then factorised, each timing enough calls to last `min_seconds`; the median of the pairs' ratios."""
    device = torch.device(device)
    x = torch.randn(tokens, n, dtype=dtype, device=device)
    weight = torch.randn(m, n, dtype=dtype, device=device)
    right = torch.randn(rank, n, dtype=dtype, device=device)
    left = torch.randn(m, rank, dtype=dtype, device=device)

    def dense() -> torch.Tensor:
        return F.linear(x, weight)  # (tokens, m)

    def factorised() -> torch.Tensor:
        return F.linear(F.linear(x, right), left)  # (tokens, k) -> (tokens, m)

    def seconds_per_call(product: Callable[[], torch.Tensor], calls: int) -> float:
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            product()
        _synchronize(device)
        return (time.perf_counter() - start) / calls

    with torch.no_grad():
        seconds_per_call(factorised, 1)  # warms caches and kernels up
        first = seconds_per_call(dense, 1)
        calls = max(1, math.ceil(min_seconds / max(first, 1e-9)))
        ratios = [
            seconds_per_call(dense, calls) / seconds_per_call(factorised, calls) for _ in range(repeats)
        ]
    return statistics.median(ratios)


def matmul_speedups(dtype: torch.dtype, device: str | torch.device, repeats: int = 5) -> Speedup:
    """The real measurement: matmul_speedup on `device` in `dtype`."""

    def speedup(m: int, n: int, rank: int, tokens: int) -> float:
        return matmul_speedup(m, n, rank, tokens, dtype, device, repeats)

    return speedup


def parameter_break_even(m: int, n: int) -> float:
    """mn/(m+n): factors of a lower rank hold fewer parameters than W."""
    return m * n / (m + n)


def time_break_even_rank(m: int, n: int, tokens: int, speedup: Speedup) -> int:
    """The largest rank k ≤ min(m, n) whose factorised product is faster than the dense one (0: none).

    Bisection, assuming the speed-up falls as k grows (it does up to timing noise): ≈ log2(min(m, n))
    measurements. Where noise breaks monotonicity it returns a crossing, not necessarily the last one."""

    def faster(k: int) -> bool:
        return speedup(m, n, k, tokens) > 1

    low, high = 0, min(m, n)  # invariant: faster at low (or low = 0), slower above high
    if faster(high):
        return high
    high -= 1
    while low < high:
        mid = (low + high + 1) // 2
        if faster(mid):
            low = mid
        else:
            high = mid - 1
    return low


def keep_dense_where_slower(
    plan: CompressionPlan,
    tokens: int = BREAK_EVEN_TOKENS,
    speedup: Speedup | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[CompressionPlan, dict]:
    """The plan with every compressed matrix whose rank is above its shape's time break-even set dense
    (rank None), and a report: each shape's time and parameter break-even, the matrices kept dense and
    the parameters that costs. One break-even search per distinct shape, with `speedup` (default: the
    real measurement on `device` in `dtype`)."""
    speedup = speedup or matmul_speedups(dtype, device)
    shapes = sorted({m.shape for m in plan.compressed.values()})
    time_break_even = {shape: time_break_even_rank(*shape, tokens, speedup) for shape in shapes}
    slower = {name: m for name, m in plan.compressed.items() if m.rank > time_break_even[m.shape]}
    kept = plan.with_ranks({name: None for name in slower})
    report = {
        "tokens": tokens,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "shapes": {
            f"{m}x{n}": {
                "time_break_even_rank": time_break_even[(m, n)],
                "parameter_break_even_rank": parameter_break_even(m, n),
            }
            for m, n in shapes
        },
        "kept_dense": {name: m.rank for name, m in slower.items()},  # matrix -> the rank it would have had
        "parameters_cost": sum(m.params_before - m.params_after for m in slower.values()),
        "parameter_retention_before": plan.parameter_retention(),
        "parameter_retention_after": kept.parameter_retention(),
    }
    return kept, report
