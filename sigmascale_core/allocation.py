"""Allocation: per-matrix ranks that meet a global parameter budget while minimising predicted damage.

Every matrix i of shape (m, n) is either dense (m·n parameters, damage 0) or kept at a rank
k ∈ [1, k_max], k_max = the largest k with k·(m+n) < m·n (below break-even), costing k·(m+n). Its damage
d_i(k) comes from a sensitivity table (allocation takes Δ mean NLL, or the proxy's relative loss) and
is assumed additive over matrices. The budget is B = target · Σ m·n; a solution meets it "within one
rank": B − (m_max+n_max) < Σ params ≤ B.

Two strategies, same curves, same budget:
  sensitivity  the reference, after ASVD (Yuan et al. 2023, `binary_search_truncation_rank`): all
               (matrix, probed rank) pairs are sorted by damage; a threshold τ lets every matrix drop
               to its smallest probed rank with damage ≤ τ (dense if none); the smallest τ whose
               allocation fits the budget is found by binary search. ASVD stops there, up to a grid
               step off the budget; we then hand the left-over parameters back, one rank at a time, to the
               matrices that the last threshold step cut, so the budget is met within one rank.
  greedy       the optimiser: on each curve's lower convex hull (in the params–damage plane) steps are
               taken in order of least damage per parameter saved (a heap: the Lagrangian solution of
               this multiple-choice knapsack); the budget-crossing cut is made by whichever single
               matrix does least damage removing the excess; then the knapsack is solved exactly in a
               window of ±8 levels per matrix around that solution (dynamic programming over the
               parameter sum, in units of its gcd), which mends unequal step sizes and non-convex
               curves; left-over parameters go back where they save most.

Curves between probed ranks are linear in the rank; above the highest probed rank they fall linearly
to 0 at break-even (= dense). Neither strategy goes below a matrix's lowest measured rank (its
`floor`): one matrix probed at 0.2 retention says nothing about rank 1, and extrapolating the
0.2–0.3 slope there made "free" cuts that wrecked the model (measured: svdllm at 0.75 on the bundled
SmolLM2, perplexity 119 uniform, 2,332 greedy with extrapolation). Damage is made monotone (fewer
ranks never hurt less) and non-negative before allocating.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from sigmascale_core.metrics import check_retention
from sigmascale_core.plan import CompressionPlan, MatrixPlan
from sigmascale_core.sensitivity import SensitivityTable

STRATEGIES = ("sensitivity", "greedy")


@dataclass(frozen=True)
class DamageCurve:
    """Predicted damage of one matrix at every rank 0..k_max; dense costs m·n and does no damage."""

    shape: tuple[int, int]  # (m, n)
    damage: torch.Tensor  # (k_max + 1,) float64, non-increasing in the rank, ≥ 0; [0] is unused
    knots: tuple[int, ...]  # the ranks that were measured: the reference search's candidates

    @property
    def k_max(self) -> int:
        return self.damage.numel() - 1

    @property
    def floor(self) -> int:
        """The lowest rank an allocation may take: the lowest measured one (nothing below is known)."""
        return min(self.knots, default=1)

    @property
    def step(self) -> int:
        """Parameters per rank: m + n."""
        return self.shape[0] + self.shape[1]

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]

    def params(self, rank: int | None) -> int:
        return self.dense_params if rank is None else rank * self.step

    def at(self, rank: int | None) -> float:
        return 0.0 if rank is None else float(self.damage[rank])


def max_rank(shape: tuple[int, int]) -> int:
    """The largest rank whose factors are smaller than the dense matrix: k·(m+n) < m·n."""
    m, n = shape
    return min(min(m, n), (m * n - 1) // (m + n))


def damage_curve(shape: tuple[int, int], ranks: Sequence[int], damage: Sequence[float]) -> DamageCurve:
    """Interpolate measured (rank, damage) points over every rank 0..k_max (see the module docstring)."""
    m, n = shape
    k_max = max_rank(shape)
    points = sorted(zip(ranks, damage, strict=True))
    if any(not 1 <= k <= k_max for k, _ in points) or len({k for k, _ in points}) != len(points):
        raise ValueError(f"{shape}: measured ranks must be distinct and in [1, {k_max}], got {list(ranks)}")
    if not all(math.isfinite(d) for _, d in points):
        raise ValueError(f"{shape}: damage must be finite")
    if k_max == 0:  # no rank is below break-even: the matrix can only stay dense
        return DamageCurve((m, n), torch.zeros(1, dtype=torch.float64), ())
    if not points:
        raise ValueError(f"{shape}: no measured rank to interpolate from")
    # knots in rank: the measurements, and break-even (real-valued) where the matrix turns dense; below
    # the lowest measurement the first segment's slope continues, but no allocation goes there (floor)
    xs = [float(k) for k, _ in points] + [m * n / (m + n)]
    ys = [float(d) for _, d in points] + [0.0]
    grid = torch.arange(k_max + 1, dtype=torch.float64)
    values = torch.empty_like(grid)
    for k in range(k_max + 1):
        j = min(max(bisect.bisect_right(xs, k) - 1, 0), len(xs) - 2)  # segment [xs[j], xs[j+1]]
        t = (k - xs[j]) / (xs[j + 1] - xs[j])
        values[k] = ys[j] + t * (ys[j + 1] - ys[j])
    # monotone envelope: damage at rank k is at least the damage at any higher rank (and ≥ 0)
    values = values.clamp_min(0).flip(0).cummax(0).values.flip(0)
    return DamageCurve((m, n), values, tuple(k for k, _ in points))


def damage_curves(table: SensitivityTable) -> dict[str, DamageCurve]:
    """One DamageCurve per matrix of a sensitivity table."""
    curves = {}
    for name, shape in table.shapes.items():
        ranks, damage = table.damage(name)
        curves[name] = damage_curve(shape, ranks, damage)
    return curves


def predicted_damage(curves: Mapping[str, DamageCurve], ranks: Mapping[str, int | None]) -> float:
    """Σ_i d_i(rank_i), dense counting 0."""
    return sum(curves[name].at(rank) for name, rank in ranks.items())


def total_params(curves: Mapping[str, DamageCurve], ranks: Mapping[str, int | None]) -> int:
    return sum(curves[name].params(rank) for name, rank in ranks.items())


def _check_budget(curves: Mapping[str, DamageCurve], budget: float) -> None:
    if not curves:
        raise ValueError("nothing to allocate: no matrices")
    least = sum(c.params(c.floor) if c.k_max >= 1 else c.dense_params for c in curves.values())
    if budget < least:
        dense = sum(c.dense_params for c in curves.values())
        raise ValueError(
            f"a budget of {budget:.0f} parameters ({budget / dense:.4f} retention) is below the lowest "
            f"measured rank everywhere ({least} parameters, {least / dense:.4f}): probe lower retentions"
        )


# ---------------------------------------------------------------------------------------------------
# Reference: ASVD's binary search over a damage threshold


def _threshold_ranks(curves: Mapping[str, DamageCurve], tau: float) -> dict[str, int | None]:
    """Every matrix at its smallest measured rank with damage ≤ τ; dense where none is."""
    ranks: dict[str, int | None] = {}
    for name, curve in curves.items():
        ok = [k for k in curve.knots if curve.at(k) <= tau]
        ranks[name] = min(ok) if ok else None
    return ranks


def binary_search_ranks(curves: Mapping[str, DamageCurve], budget: float) -> dict[str, int | None]:
    """The reference allocation (ASVD's threshold search, then the budget filled within one rank)."""
    _check_budget(curves, budget)
    dense = {name: None for name in curves}
    if total_params(curves, dense) <= budget:
        return dense
    thresholds = sorted({c.at(k) for c in curves.values() for k in c.knots})
    if not thresholds:
        raise ValueError(f"no matrix has a measured rank below break-even to meet {budget:.0f} parameters")
    low, high = 0, len(thresholds) - 1  # params(τ) is non-increasing in τ: smallest τ that fits
    while low < high:
        mid = (low + high) // 2
        if total_params(curves, _threshold_ranks(curves, thresholds[mid])) <= budget:
            high = mid
        else:
            low = mid + 1
    ranks = _threshold_ranks(curves, thresholds[low])
    before = _threshold_ranks(curves, thresholds[low - 1]) if low > 0 else dense  # over budget
    # Hand the slack back to the matrices the last threshold step cut, largest damage saved first.
    cut = sorted(
        (name for name in curves if ranks[name] != before[name]),
        key=lambda name: (curves[name].at(before[name]) - curves[name].at(ranks[name]), name),
    )
    slack = budget - total_params(curves, ranks)
    for name in cut:
        curve, k, ceiling = curves[name], ranks[name], before[name]
        top = curve.k_max if ceiling is None else ceiling
        raised = min(top, k + int(slack // curve.step))
        slack -= (raised - k) * curve.step
        ranks[name] = raised
        if ceiling is None and raised == curve.k_max and slack >= curve.dense_params - raised * curve.step:
            slack -= curve.dense_params - raised * curve.step
            ranks[name] = None
    return ranks


# ---------------------------------------------------------------------------------------------------
# Greedy on the convex hulls


def _levels(curve: DamageCurve) -> list[tuple[int, float]]:
    """(params, damage) of every state, from the floor rank up to dense."""
    ranks = range(curve.floor, curve.k_max + 1)
    return [(k * curve.step, curve.at(k)) for k in ranks] + [(curve.dense_params, 0.0)]


def _hull(points: list[tuple[int, float]]) -> list[int]:
    """Indices of the lower convex hull of points sorted by x (params ascending)."""
    hull: list[int] = []
    for i, (x, y) in enumerate(points):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = points[hull[-2]], points[hull[-1]]
            if (y2 - y1) * (x - x1) >= (y - y1) * (x2 - x1):  # the middle point is not below the chord
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _rank_of_level(curve: DamageCurve, level: int) -> int | None:
    """Level index (0-based into _levels) -> rank, None for dense."""
    rank = curve.floor + level
    return None if rank > curve.k_max else rank


def greedy_ranks(curves: Mapping[str, DamageCurve], budget: float) -> dict[str, int | None]:
    """Least predicted damage per parameter saved, step by step, on the convex hulls; exact completion."""
    _check_budget(curves, budget)
    names = sorted(curves)
    levels = {name: _levels(curves[name]) for name in names}
    hulls = {name: _hull(levels[name]) for name in names}
    at = {name: len(levels[name]) - 1 for name in names}  # current level: dense
    hull_pos = {name: len(hulls[name]) - 1 for name in names}
    params = sum(curves[name].dense_params for name in names)

    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        pos = hull_pos[name]
        if pos > 0:
            (x_hi, y_hi), (x_lo, y_lo) = levels[name][hulls[name][pos]], levels[name][hulls[name][pos - 1]]
            heapq.heappush(heap, ((y_lo - y_hi) / (x_hi - x_lo), name))

    for name in names:
        push(name)
    # 1. whole hull segments, cheapest damage per parameter first, while they stay above the budget
    while heap and params > budget:
        _, name = heap[0]
        lower = hulls[name][hull_pos[name] - 1]
        saved = levels[name][at[name]][0] - levels[name][lower][0]
        if params - saved <= budget:
            break
        heapq.heappop(heap)
        params -= saved
        at[name], hull_pos[name] = lower, hull_pos[name] - 1
        push(name)
    # 2. the budget-crossing cut: the single matrix whose smallest sufficient cut does least damage
    if params > budget:
        excess = params - budget
        best: tuple[float, int, str, int] | None = None
        for name in names:
            here_x, here_y = levels[name][at[name]]
            for level in range(at[name] - 1, -1, -1):
                x, y = levels[name][level]
                if here_x - x >= excess:
                    candidate = (y - here_y, here_x - x, name, level)
                    best = candidate if best is None or candidate < best else best
                    break
        assert best is not None, "the budget check guarantees a feasible cut"
        _, saved, name, level = best
        params -= saved
        at[name] = level
    # 3. exact knapsack in a window around that: every matrix may move up to _WINDOW levels either way
    _polish(levels, at, budget)
    # 4. any slack left goes to raises that save damage, then to any raise at all (budget within a rank)
    slack = budget - sum(levels[name][at[name]][0] for name in names)
    slack = _fill(levels, at, slack, only_gains=True)
    _fill(levels, at, slack, only_gains=False)
    return {name: _rank_of_level(curves[name], at[name]) for name in curves}


def _fill(
    levels: dict[str, list[tuple[int, float]]], at: dict[str, int], slack: float, only_gains: bool
) -> float:
    """Raise matrices (in place) while some raise fits the slack: the one saving most damage first, then
    the one using most parameters; raises that save nothing too unless `only_gains`. Returns the slack."""
    while True:
        best: tuple[float, int, str, int] | None = None
        for name in sorted(at):
            here_x, here_y = levels[name][at[name]]
            top = at[name]
            while top + 1 < len(levels[name]) and levels[name][top + 1][0] - here_x <= slack:
                top += 1
            if top > at[name] and not (only_gains and levels[name][top][1] >= here_y):
                x, y = levels[name][top]
                candidate = (y - here_y, here_x - x, name, top)
                best = candidate if best is None or candidate < best else best
        if best is None:
            return slack
        _, minus_used, name, level = best
        slack += minus_used
        at[name] = level


_WINDOW = 8  # levels each matrix may move, either way, in the knapsack polish
_MAX_STATES = 1 << 18  # bound on the knapsack's table of parameter sums (in units of their gcd)


# The multiple-choice knapsack restricted to a window: matrix i picks a level ℓ ∈ [a_i − W, a_i + W]
# (a = the greedy state), at offset o_i(ℓ) = params_i(ℓ) − params_i(a_i) and damage change
# Δ_i(ℓ) = d_i(ℓ) − d_i(a_i); minimise Σ Δ_i subject to Σ o_i ≤ budget − Σ params_i(a_i). Offsets are
# integers in units of their gcd g, so a DP over matrices with state = partial sum of offsets is exact
# (states beyond _MAX_STATES are cut off, which can only lose alternatives, never feasibility: the
# greedy state itself is the all-zero path). Cost O(matrices × (2W+1) × states).
def _polish(levels: dict[str, list[tuple[int, float]]], at: dict[str, int], budget: float) -> None:
    names = sorted(at)
    options: list[list[tuple[int, int, float]]] = []  # per matrix: (level, offset, Δdamage), base first
    for name in names:
        base_x, base_y = levels[name][at[name]]
        window = range(max(0, at[name] - _WINDOW), min(len(levels[name]), at[name] + _WINDOW + 1))
        candidates = [ell for ell in window if ell != at[name]]
        others = [(ell, levels[name][ell][0] - base_x, levels[name][ell][1] - base_y) for ell in candidates]
        options.append([(at[name], 0, 0.0), *others])
    g = 0
    for opts in options:
        for _, offset, _ in opts:
            g = math.gcd(g, abs(offset))
    if g == 0:
        return  # nobody can move
    slack_units = math.floor((budget - sum(levels[n][at[n]][0] for n in names)) / g)
    lowest = sum(min(o[1] for o in opts) for opts in options) // g
    highest = sum(max(o[1] for o in opts) for opts in options) // g
    lo = max(lowest, min(0, slack_units) - _MAX_STATES // 2)
    hi = min(highest, max(slack_units, 0) + _MAX_STATES // 2)
    size = hi - lo + 1
    inf = math.inf
    cost = torch.full((size,), inf, dtype=torch.float64)
    cost[-lo] = 0.0
    choices = []
    for opts in options:
        new = torch.full_like(cost, inf)
        choice = torch.zeros(size, dtype=torch.int16)
        for j, (_, offset, delta) in enumerate(opts):
            u = offset // g
            if abs(u) >= size:
                continue
            src = cost[max(0, -u) : size - max(0, u)] + delta  # states s → s + u
            dst = slice(max(0, u), size - max(0, -u))
            better = src < new[dst]
            new[dst] = torch.where(better, src, new[dst])
            choice[dst] = torch.where(better, torch.tensor(j, dtype=torch.int16), choice[dst])
        cost = new
        choices.append(choice)
    feasible = cost[: slack_units - lo + 1] if slack_units >= lo else cost[:0]
    if feasible.numel() == 0 or not torch.isfinite(feasible).any():
        return
    # least damage; among equals, the state nearest the budget (the last index of the minimum)
    best = float(feasible.min())
    state = int(torch.nonzero(feasible <= best).max())
    if best >= 0:
        return  # nothing better than the greedy state
    for i in range(len(names) - 1, -1, -1):
        level, offset, _ = options[i][int(choices[i][state])]
        at[names[i]] = level
        state -= offset // g


# ---------------------------------------------------------------------------------------------------
# Plans


def allocate_ranks(
    curves: Mapping[str, DamageCurve], target_retention: float, strategy: str = "greedy"
) -> dict[str, int | None]:
    """Ranks (None: dense) meeting `target_retention` of the matrices' parameters within one rank."""
    check_retention(target_retention)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown allocation strategy {strategy!r}; choose one of {STRATEGIES}")
    budget = target_retention * sum(c.dense_params for c in curves.values())
    search = binary_search_ranks if strategy == "sensitivity" else greedy_ranks
    return search(curves, budget)


def allocate(
    template: CompressionPlan | Mapping[str, tuple[int, int]],
    sensitivity: SensitivityTable | Mapping[str, DamageCurve],
    target_retention: float,
    strategy: str = "greedy",
) -> CompressionPlan:
    """A CompressionPlan for `template`'s matrices (a plan, or name -> shape) with ranks chosen by
    `strategy` from the sensitivity table (or ready curves) to meet `target_retention` within one rank.

    A plan template gives the method, options and model fingerprint; with bare shapes they are the
    table's. The table may have been probed with another method than the plan's (e.g. a cheap svdllm
    probe for a sigmascale plan): the curves then only approximate the plan method's damage.
    """
    if isinstance(template, CompressionPlan):
        shapes = {name: m.shape for name, m in template.matrices.items()}
        method, options, fingerprint = template.method, dict(template.options), template.model_fingerprint
        keep_dense_if_slower = template.keep_dense_if_slower
    else:
        if not isinstance(sensitivity, SensitivityTable):
            raise ValueError("with bare shapes, pass a SensitivityTable (it names the method and model)")
        shapes = {name: tuple(shape) for name, shape in template.items()}
        method, options = sensitivity.method, dict(sensitivity.options)
        fingerprint = sensitivity.model_fingerprint
        keep_dense_if_slower = False
    if isinstance(sensitivity, SensitivityTable):
        if sensitivity.model_fingerprint != fingerprint:
            raise ValueError(
                f"the sensitivity table is for model {sensitivity.model_fingerprint}, the plan for "
                f"{fingerprint}: probe this model"
            )
        curves = damage_curves(sensitivity)
    else:
        curves = dict(sensitivity)
    missing = sorted(set(shapes) - set(curves))
    if missing:
        raise ValueError(f"no sensitivity for {len(missing)} matrices, e.g. {missing[:3]}")
    for name, shape in shapes.items():
        if tuple(curves[name].shape) != tuple(shape):
            raise ValueError(
                f"{name}: the sensitivity is for shape {curves[name].shape}, the plan has {shape}"
            )
    ranks = allocate_ranks({name: curves[name] for name in shapes}, target_retention, strategy)
    matrices = {name: MatrixPlan(tuple(shapes[name]), ranks[name]) for name in shapes}
    return CompressionPlan(
        fingerprint, method, options, matrices, target_retention, strategy, keep_dense_if_slower
    )
