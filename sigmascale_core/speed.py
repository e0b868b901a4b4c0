"""Time break-even: the rank above which two thin matmuls are slower than the dense one they replace.

Factors of rank k hold fewer parameters than W (m, n) while k < mn/(m+n), the parameter break-even a
plan honours (plan.MatrixPlan.is_dense). Time is another matter: x Wᵀ is one large matmul, x Rᵀ Lᵀ two
thinner ones whose kernels run less efficiently, so on a given device, dtype and token count the
factorised layer can be slower well below the parameter break-even. `keep_dense_where_slower` measures
that break-even per shape on the running device and keeps such matrices dense, saying what it costs.

Timings go through a `timer(m, n, rank, tokens) -> seconds` (rank None: dense), so the decisions can be
tested with a synthetic timer; `matmul_timer` is the real one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sigmascale_core.plan import CompressionPlan

Timer = Callable[[int, int, "int | None", int], float]  # (m, n, rank or None for dense, tokens) -> seconds
BREAK_EVEN_TOKENS = 512  # tokens per matmul when a plan keeps slow matrices dense: a prefill's length


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_seconds(
    m: int,
    n: int,
    rank: int | None,
    tokens: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    repeats: int = 5,
    min_seconds: float = 0.02,
) -> float:
    """Seconds of y = x Wᵀ (rank None) or y = (x Rᵀ) Lᵀ, x (tokens, n), W (m, n), R (k, n), L (m, k): the
    products nn.Linear and LowRankLinear compute. Each of `repeats` measurements averages enough calls to
    last `min_seconds`; the least of them is returned (as timeit advises: the higher ones measure other
    processes, not the product)."""
    device = torch.device(device)
    x = torch.randn(tokens, n, dtype=dtype, device=device)
    if rank is None:
        weight = torch.randn(m, n, dtype=dtype, device=device)

        def run() -> torch.Tensor:
            return F.linear(x, weight)  # (tokens, m)
    else:
        right = torch.randn(rank, n, dtype=dtype, device=device)
        left = torch.randn(m, rank, dtype=dtype, device=device)

        def run() -> torch.Tensor:
            return F.linear(F.linear(x, right), left)  # (tokens, k) -> (tokens, m)

    def seconds_per_call(calls: int) -> float:
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            run()
        _synchronize(device)
        return (time.perf_counter() - start) / calls

    with torch.no_grad():
        first = seconds_per_call(1)  # also warms caches and kernels up
        calls = max(1, math.ceil(min_seconds / max(first, 1e-9)))
        return min(seconds_per_call(calls) for _ in range(repeats))


def matmul_timer(dtype: torch.dtype, device: str | torch.device, repeats: int = 5) -> Timer:
    """The real timer: matmul_seconds on `device` in `dtype`."""

    def timer(m: int, n: int, rank: int | None, tokens: int) -> float:
        return matmul_seconds(m, n, rank, tokens, dtype, device, repeats)

    return timer


def parameter_break_even(m: int, n: int) -> float:
    """mn/(m+n): factors of a lower rank hold fewer parameters than W."""
    return m * n / (m + n)


def time_break_even_rank(m: int, n: int, tokens: int, timer: Timer) -> int:
    """The largest rank k ≤ min(m, n) whose factorised product is faster than the dense one (0: none).

    Bisection, assuming the factorised time grows with k (it does up to timing noise): ≈ log2(min(m, n))
    timings after the dense one. Where noise breaks monotonicity it returns a crossing, not necessarily
    the last one."""
    dense = timer(m, n, None, tokens)

    def faster(k: int) -> bool:
        return timer(m, n, k, tokens) < dense

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
    timer: Timer | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[CompressionPlan, dict]:
    """The plan with every compressed matrix whose rank is above its shape's time break-even set dense
    (rank None), and a report: each shape's time and parameter break-even, the matrices kept dense and
    the parameters that costs. One break-even search per distinct shape, with `timer` (default: the
    real one on `device` in `dtype`)."""
    timer = timer or matmul_timer(dtype, device)
    shapes = sorted({m.shape for m in plan.compressed.values()})
    time_break_even = {shape: time_break_even_rank(*shape, tokens, timer) for shape in shapes}
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
