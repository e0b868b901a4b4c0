"""The live numbers of a plan: every matrix's spectra and loss curves stacked into (matrices × ranks)
arrays, so a plan's totals are array lookups (`SpectraBank.evaluate`), microseconds for 210 matrices.

Rows fill in as the compute service (compute.py) finishes them: the plain spectrum of W first (weights
only), then the cheap methods' curves (after calibration), then SigmaScale's learned ones; each
followed by its spectral diagnostics (`diagnostics`, WeightWatcher's numbers). A row that
is not ready is NaN and is never replaced by another method's numbers: `PlanNumbers.ready` says which
rows the totals cover. SigmaScale may hold several learned variants of one matrix (one per rank it was
learned at); a plan's numbers use, per matrix, the variant learned closest to the plan's rank.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sigmascale_core.allocation import DamageCurve, damage_curve, max_rank
from sigmascale_core.diagnostics import warning
from sigmascale_core.methods import METHODS
from sigmascale_core.metrics import rank_for_retention
from sigmascale_core.models import MATRIX_KINDS, MatrixRef
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.spectra import SPLITS, MethodSpectrum

RELEARN_TOLERANCE = 0.25  # a learned curve is an approximation beyond ±25 % of the rank it was learned at
RELEARN_MIN_GAP = 8  # ... and beyond 8 ranks (small matrices)


def reference_rank(shape: tuple[int, int], retention: float) -> int:
    """The rank a uniform plan at `retention` gives a matrix of `shape` (at least 1)."""
    return max(1, rank_for_retention(*shape, retention))


def is_approximation(rank: np.ndarray, learned_rank: np.ndarray) -> np.ndarray:
    """Where a curve learned at `learned_rank` is read far from it (the scaling would differ there)."""
    gap = np.abs(np.asarray(rank) - np.asarray(learned_rank))
    return gap > np.maximum(RELEARN_MIN_GAP, RELEARN_TOLERANCE * np.asarray(learned_rank))


@dataclass
class PlanNumbers:
    """A plan's per-matrix numbers (arrays over the bank's matrices) and model totals."""

    ranks: np.ndarray  # (N,) rank kept (min(m, n) for a dense matrix)
    dense: np.ndarray  # (N,) bool: the matrix stays dense (break-even or beyond)
    retention: np.ndarray  # (N,) parameters after / before
    loss: dict[str, np.ndarray]  # split -> (N,) relative activation loss at the rank (NaN: not ready)
    effective_rank: np.ndarray  # (N,) exp(entropy) of the kept singular values (NaN: not ready)
    energy: np.ndarray  # (N,) Σσ² kept / Σσ² (NaN: not ready)
    ready: np.ndarray  # (N,) bool: this method's curve of the matrix is computed
    learned_rank: np.ndarray  # (N,) sigmascale: the rank the curve in use was learned at (0: none)
    params_before: int  # target linears
    params_after: int
    total_params: int  # whole model, dense

    @property
    def parameter_retention(self) -> float:
        """Parameters of the target linears after / before (the papers' convention)."""
        return self.params_after / self.params_before

    @property
    def model_retention(self) -> float:
        return (self.total_params - (self.params_before - self.params_after)) / self.total_params

    @property
    def pending(self) -> int:
        return int((~self.ready).sum())

    @property
    def approximate(self) -> np.ndarray:
        """(N,) bool: sigmascale curves read far from the rank they were learned at."""
        learned = self.learned_rank > 0
        return learned & ~self.dense & is_approximation(self.ranks, self.learned_rank)

    def mean_loss(self, split: str) -> float:
        """Mean relative loss over the ready matrices (NaN when none is ready)."""
        return self.mean(self.loss[split])

    def mean(self, values: np.ndarray) -> float:
        """Mean of per-matrix `values` over the ready matrices (NaN when none is ready)."""
        values = values[self.ready]
        return float(values.mean()) if values.size else float("nan")


class SpectraBank:
    """Spectra and loss curves of every target matrix of one model, as (N, R + 1) arrays.

    Rows follow `refs` (model order); column k of a curve is the relative loss when keeping k singular
    triplets (NaN past min(m, n), and for rows not computed yet). Writers (the compute service) add
    rows under a lock; readers get consistent numbers under the same lock.
    """

    def __init__(self, refs: Sequence[MatrixRef], total_params: int) -> None:
        self.refs = list(refs)
        self.names = [r.name for r in self.refs]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.layers = np.array([r.layer for r in self.refs])
        self.kinds = [r.kind for r in self.refs]
        self.shapes = np.array([r.shape for r in self.refs], dtype=np.int64)  # (N, 2)
        self.total_params = int(total_params)
        m, n = self.shapes[:, 0], self.shapes[:, 1]
        self.full_rank = np.minimum(m, n)  # (N,)
        self.params_before = m * n  # (N,)
        self.params_per_rank = m + n  # (N,)
        self.width = int(self.full_rank.max()) + 1
        N = len(self.names)
        self.curves = {(method, s): np.full((N, self.width), np.nan) for method in METHODS for s in SPLITS}
        self.sums = {method: _Sums(N, self.width) for method in METHODS}
        self.weights_sigma: dict[str, np.ndarray] = {}  # name -> σ(W), known before calibration
        self.cheap: dict[str, dict[str, MethodSpectrum]] = {}  # name -> method -> spectrum
        self.learned: dict[str, dict[int, MethodSpectrum]] = {}  # name -> rank -> sigmascale spectrum
        # name -> method -> diagnostics.Diagnostics.to_dict() of the matrix it truncates ("svd": W itself;
        # "sigmascale": the scaling learned at the reference rank)
        self.diagnostics: dict[str, dict[str, dict[str, float]]] = {}
        self._lock = threading.Lock()

    # -- writers -----------------------------------------------------------------------------------
    def set_weights(self, name: str, sigma: np.ndarray) -> None:
        """σ(W) of one matrix: its plain spectrum (svd) is drawable before any calibration."""
        with self._lock:
            self.weights_sigma[name] = sigma
            self.sums["svd"].set(self.index[name], sigma)

    def set_cheap(self, name: str, spectra: dict[str, MethodSpectrum]) -> None:
        """The cheap methods' spectra and curves of one matrix."""
        i = self.index[name]
        with self._lock:
            self.cheap[name] = spectra
            for method, spectrum in spectra.items():
                self._set_row(i, method, spectrum)

    def set_learned(self, name: str, spectrum: MethodSpectrum) -> None:
        """A SigmaScale result learned at `spectrum.rank`; the first one fills the vectorised row."""
        if spectrum.rank is None:
            raise ValueError("a learned spectrum must say the rank it was learned at")
        with self._lock:
            variants = self.learned.setdefault(name, {})
            variants[spectrum.rank] = spectrum
            if len(variants) == 1:
                self._set_row(self.index[name], "sigmascale", spectrum)

    def set_diagnostics(self, name: str, method: str, values: dict[str, float]) -> None:
        """The spectral diagnostics of the matrix `method` truncates for `name`."""
        with self._lock:
            self.diagnostics.setdefault(name, {})[method] = values

    def _set_row(self, i: int, method: str, spectrum: MethodSpectrum) -> None:
        for split in SPLITS:
            self.curves[method, split][i, : spectrum.loss[split].shape[0]] = spectrum.loss[split]
        self.sums[method].set(i, spectrum.sigma)

    # -- readers -----------------------------------------------------------------------------------
    def ready(self, method: str) -> np.ndarray:
        """(N,) bool: the matrices whose `method` curves exist."""
        if method == "sigmascale":
            return np.array([n in self.learned for n in self.names])
        return np.array([n in self.cheap for n in self.names])

    def spectrum(self, name: str, method: str, rank: int | None = None) -> MethodSpectrum | None:
        """One matrix's result for `method`, None until computed (sigmascale: the variant learned
        closest to `rank`, or the first learned one)."""
        if method == "sigmascale":
            variants = self.learned.get(name)
            if not variants:
                return None
            return variants[_closest(list(variants), rank) if rank is not None else next(iter(variants))]
        return self.cheap.get(name, {}).get(method)

    def sigma(self, name: str, method: str) -> np.ndarray | None:
        """The singular values `method` truncates (σ(W) for svd as soon as the weights are read)."""
        if method == "svd" and name in self.weights_sigma:
            return self.weights_sigma[name]
        spectrum = self.spectrum(name, method)
        return None if spectrum is None else spectrum.sigma

    def has_diagnostics(self, name: str, method: str) -> bool:
        return method in self.diagnostics.get(name, {})

    def diagnostic(self, field: str, method: str) -> np.ndarray:
        """(N,) one diagnostic of every matrix under `method` (NaN: pending; flags as 0/1)."""
        with self._lock:
            return np.array(
                [float(self.diagnostics.get(n, {}).get(method, {}).get(field, np.nan)) for n in self.names]
            )

    def diagnostic_rows(self, methods: Sequence[str]) -> list[dict[str, object]]:
        """One row per matrix and method whose diagnostics are ready, in model order: matrix, layer, kind,
        method, every diagnostic and WeightWatcher's warning (what the Spectra table and the CLI list)."""
        rows = []
        with self._lock:
            for ref in self.refs:
                for method in methods:
                    values = self.diagnostics.get(ref.name, {}).get(method)
                    if values is not None:
                        warn = warning(values["under_trained"], values["over_trained"])
                        rows.append(
                            {"matrix": ref.name, "layer": ref.layer, "kind": ref.kind, "method": method}
                            | values
                            | {"warning": warn}
                        )
        return rows

    # -- conversions -------------------------------------------------------------------------------
    def ranks_for_retention(self, retention: np.ndarray | float) -> np.ndarray:
        """Per-matrix rank ⌊r·m·n/(m+n)⌋ (at least 1) as the plan's `uniform` does; full rank when dense."""
        retention = np.broadcast_to(np.asarray(retention, dtype=np.float64), self.full_rank.shape)
        return self.normalise(rank_for_retention(self.shapes[:, 0], self.shapes[:, 1], retention))

    def normalise(self, ranks: np.ndarray) -> np.ndarray:
        """Clip ranks into [1, min(m, n)], and ranks at or past break-even to min(m, n) (dense)."""
        ranks = np.clip(np.asarray(ranks, dtype=np.int64), 1, self.full_rank)
        return np.where(ranks * self.params_per_rank >= self.params_before, self.full_rank, ranks)

    def rank_array(self, plan: CompressionPlan) -> np.ndarray:
        """A plan's ranks in bank order (dense = min(m, n)); ValueError unless it fits this model."""
        unknown = sorted(set(plan.matrices) - set(self.names))
        missing = sorted(set(self.names) - set(plan.matrices))
        if unknown or missing:
            raise ValueError(
                f"the plan's matrices differ from the model's (unknown {unknown[:3]}, missing {missing[:3]})"
            )
        ranks = []
        for i, name in enumerate(self.names):
            matrix = plan.matrices[name]
            if tuple(matrix.shape) != tuple(int(x) for x in self.shapes[i]):
                raise ValueError(
                    f"{name}: the plan says shape {matrix.shape}, the model has {tuple(self.shapes[i])}"
                )
            ranks.append(self.full_rank[i] if matrix.is_dense else matrix.rank)
        return self.normalise(np.array(ranks))

    def plan_ranks(self, ranks: np.ndarray) -> dict[str, int | None]:
        """Bank-order ranks as a plan's {name: rank}, dense (break-even or beyond) as None: one encoding."""
        ranks = self.normalise(ranks)
        return {n: None if ranks[i] >= self.full_rank[i] else int(ranks[i]) for i, n in enumerate(self.names)}

    def ranks_after(self, ranks: np.ndarray) -> np.ndarray:
        """Parameters each matrix keeps at `ranks`."""
        ranks = self.normalise(ranks)
        return np.where(ranks >= self.full_rank, self.params_before, ranks * self.params_per_rank)

    # -- the live numbers --------------------------------------------------------------------------
    def evaluate(self, ranks: np.ndarray, method: str) -> PlanNumbers:
        """A plan's numbers from array lookups only (no decomposition): O(N)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        ranks = self.normalise(ranks)
        dense = ranks >= self.full_rank
        rows = np.arange(len(ranks))
        after = np.where(dense, self.params_before, ranks * self.params_per_rank)
        with self._lock:
            ready = self.ready(method)
            loss = {s: self.curves[method, s][rows, ranks].copy() for s in SPLITS}
            s1, s_log, s2 = self.sums[method].at(rows, ranks)
            _, _, s2_full = self.sums[method].at(rows, self.full_rank)
            learned_rank = np.zeros(len(ranks), dtype=np.int64)
            if method == "sigmascale":
                self._closest_learned(ranks, loss, learned_rank)
        with np.errstate(divide="ignore", invalid="ignore"):
            # H(p), p = σ/S over the kept values: log S − Σσ·log σ / S
            entropy = np.log(s1) - s_log / s1
            energy = s2 / s2_full
        for split in SPLITS:
            loss[split] = np.where(dense & ready, 0.0, np.where(ready, loss[split], np.nan))
        return PlanNumbers(
            ranks=ranks,
            dense=dense,
            retention=after / self.params_before,
            loss=loss,
            effective_rank=np.exp(entropy),
            energy=energy,
            ready=ready,
            learned_rank=learned_rank,
            params_before=int(self.params_before.sum()),
            params_after=int(after.sum()),
            total_params=self.total_params,
        )

    def _closest_learned(self, ranks: np.ndarray, loss: dict[str, np.ndarray], out: np.ndarray) -> None:
        """Per matrix, the learned variant closest to the plan's rank: its rank into `out`, its loss
        into `loss` where it is not the variant stored in the vectorised row (called under the lock)."""
        for name, variants in self.learned.items():
            i = self.index[name]
            chosen = _closest(list(variants), int(ranks[i]))
            out[i] = chosen
            if chosen != next(iter(variants)):
                for split in SPLITS:
                    loss[split][i] = variants[chosen].loss[split][ranks[i]]

    def damage_curves(self, method: str, split: str = "calibration") -> dict[str, DamageCurve]:
        """The cached loss curves as allocation.DamageCurve, every rank below break-even measured: the
        loss-curve proxy of a sensitivity probe (no forward pass). Calibration tokens by default, so an
        allocation is never tuned on held-out (evaluation-side) text. ValueError while any is pending."""
        ready = self.ready(method)
        if not ready.all():
            raise ValueError(
                f"{int((~ready).sum())} of {len(ready)} matrices have no {method} curve yet: "
                "allocate once they are computed"
            )
        curves = {}
        for i, name in enumerate(self.names):
            shape = (int(self.shapes[i, 0]), int(self.shapes[i, 1]))
            ranks = list(range(1, max_rank(shape) + 1))
            curves[name] = damage_curve(shape, ranks, self.curves[method, split][i, ranks].tolist())
        return curves

    def ranks_of(self, allocation: dict[str, int | None]) -> np.ndarray:
        """Per-matrix ranks (array, dense = min(m, n)) from a {name: rank or None} allocation."""
        ranks = [
            self.full_rank[i] if allocation[n] is None else allocation[n] for i, n in enumerate(self.names)
        ]
        return self.normalise(np.array(ranks))

    # -- tables ------------------------------------------------------------------------------------
    def grid(self, values: np.ndarray) -> tuple[list[int], list[str], np.ndarray]:
        """Per-matrix values laid out as layers × kinds (NaN where a layer lacks a kind)."""
        layers = sorted(set(self.layers.tolist()))
        kinds = self.kind_order()
        out = np.full((len(layers), len(kinds)), np.nan)
        row = {layer: i for i, layer in enumerate(layers)}
        col = {k: j for j, k in enumerate(kinds)}
        for i, ref in enumerate(self.refs):
            out[row[ref.layer], col[ref.kind]] = values[i]
        return layers, kinds, out

    def kind_order(self) -> list[str]:
        return [k for k in MATRIX_KINDS if k in set(self.kinds)]

    def find(self, layer: int, kind: str) -> int:
        for i, ref in enumerate(self.refs):
            if ref.layer == layer and ref.kind == kind:
                return i
        raise ValueError(f"no matrix {kind!r} in layer {layer}")

    def effective_ranks(self, method: str) -> np.ndarray:
        """Effective rank exp(H(σ/Σσ)) of each matrix's full spectrum under `method` (NaN: pending)."""
        return self.evaluate(self.full_rank, method).effective_rank

    def participation_ratios(self, method: str) -> np.ndarray:
        """(Σσ)²/Σσ² of each matrix's full spectrum under `method` (NaN: pending)."""
        rows = np.arange(len(self.names))
        with self._lock:
            s1, _, s2 = self.sums[method].at(rows, self.full_rank)
        with np.errstate(divide="ignore", invalid="ignore"):
            return s1 * s1 / s2


class _Sums:
    """Prefix sums of one method's spectra, (N, R + 1): column k sums the top k singular values
    (NaN rows until set)."""

    def __init__(self, rows: int, width: int) -> None:
        self.s1 = np.full((rows, width), np.nan)  # Σ σ
        self.s_log = np.full((rows, width), np.nan)  # Σ σ·log σ (0·log 0 = 0)
        self.s2 = np.full((rows, width), np.nan)  # Σ σ²

    def set(self, i: int, sigma: np.ndarray) -> None:
        sigma = np.asarray(sigma, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            s_log = np.where(sigma > 0, sigma * np.log(np.where(sigma > 0, sigma, 1.0)), 0.0)
        k = sigma.shape[0] + 1
        for target, values in ((self.s1, sigma), (self.s_log, s_log), (self.s2, sigma * sigma)):
            target[i, 0] = 0.0
            target[i, 1:k] = np.cumsum(values)

    def at(self, rows: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.s1[rows, ranks], self.s_log[rows, ranks], self.s2[rows, ranks]


def _closest(ranks: list[int], rank: int) -> int:
    return min(ranks, key=lambda r: (abs(r - rank), r))
