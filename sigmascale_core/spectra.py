"""Per-model spectra and loss curves, cached on disk; the numbers the app's live plan totals read.

For every target matrix and method we keep the singular values of the scaled matrix the method
truncates and the relative activation loss at every rank, measured on the calibration tokens and on
held-out tokens. svd, asvd and svdllm cost one eigendecomposition each (~0.1 s a matrix), so a whole
model is computed layer by layer with a progress callback; sigmascale *learns* its scaling for one rank
(~1–3 s a matrix on CPU), so it is computed per matrix on request, at the rank of REFERENCE_RETENTION,
and its curve is that fixed scaling applied at every rank.

Files: cache_root()/spectra/<digest>-L<layer>.safetensors (cheap methods, one decoder layer) and
<digest>-<matrix>-sigmascale-r<rank>.safetensors, where the digest covers the model fingerprint, both
stats cache keys and the methods' options; written atomically, and an unreadable or foreign file is
recomputed. `SpectraBank` stacks them into (matrices × ranks) numpy arrays, so a plan's totals are
array lookups (`SpectraBank.evaluate`), microseconds for 210 matrices.

Nothing here imports Streamlit; the app calls these functions and draws the results.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from sigmascale_core.allocation import DamageCurve, damage_curve, max_rank
from sigmascale_core.artifacts import cache_root, save_tensors_atomic
from sigmascale_core.calibration import STATS_FORMAT, stats_key
from sigmascale_core.methods import METHOD_OPTIONS, METHODS, loss_curve, scaled_spectrum
from sigmascale_core.metrics import rank_for_retention
from sigmascale_core.models import MATRIX_KINDS, LoadedModel, MatrixRef, tokenizer_fingerprint
from sigmascale_core.pipeline import CalibrationConfig
from sigmascale_core.progress import Progress
from sigmascale_core.spectral import singular_values, truncated_svd
from sigmascale_core.stats import ActivationStats

SPECTRA_FORMAT = "1"  # bump when the layout of a spectra file changes
CHEAP_METHODS = ("svd", "asvd", "svdllm")  # computed for every matrix
SPLITS = ("calibration", "heldout")  # which tokens a loss curve is measured on
REFERENCE_RETENTION = 0.75  # sigmascale learns its scaling at this retention's rank


# ---------------------------------------------------------------------------------------------------
# Keys and paths


def calibration_key(loaded: LoadedModel, config: CalibrationConfig) -> dict[str, object]:
    """The key under which pipeline.calibrate caches `config`'s stats for this model (same fields)."""
    device = next(loaded.model.parameters()).device
    return {
        "model": loaded.fingerprint,
        "tokenizer": tokenizer_fingerprint(loaded.tokenizer),
        "text": config.text,
        "samples": config.samples,
        "seq_len": config.resolved_seq_len(device),
        "seed": config.seed,
    }


@dataclass(frozen=True)
class SpectraKey:
    """Everything the cached spectra of one model depend on."""

    model: str  # model fingerprint
    calibration: str  # json of the calibration stats key
    heldout: str  # json of the held-out stats key
    options: str = field(default_factory=lambda: json.dumps(METHOD_OPTIONS, sort_keys=True))

    @classmethod
    def build(cls, fingerprint: str, calibration: dict, heldout: dict) -> SpectraKey:
        dump = lambda d: json.dumps(d, sort_keys=True)  # noqa: E731
        return cls(fingerprint, dump(calibration), dump(heldout))

    def as_dict(self) -> dict[str, str]:
        return {"format": SPECTRA_FORMAT, "stats_format": STATS_FORMAT, **self.__dict__}

    @property
    def digest(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True)
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def spectra_dir() -> Path:
    return cache_root() / "spectra"


def layer_path(key: SpectraKey, layer: int) -> Path:
    return spectra_dir() / f"{key.digest}-L{layer:03d}.safetensors"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", name)


def sigmascale_path(key: SpectraKey, name: str, rank: int) -> Path:
    return spectra_dir() / f"{key.digest}-{_slug(name)}-sigmascale-r{rank}.safetensors"


def reference_rank(shape: tuple[int, int], retention: float = REFERENCE_RETENTION) -> int:
    return max(1, rank_for_retention(*shape, retention))


# ---------------------------------------------------------------------------------------------------
# Computing one matrix (pure: tensors in, numpy arrays out)


@dataclass(frozen=True)
class MethodSpectrum:
    """One method on one matrix: what it truncates and what truncating costs."""

    sigma: np.ndarray  # (min(m, n),) singular values of the scaled matrix, descending
    loss: dict[str, np.ndarray]  # split -> (min(m, n) + 1,) relative loss at ranks 0..min(m, n)
    rank: int | None = None  # the rank the scaling was learned at (sigmascale), else None


def method_spectrum(
    W: torch.Tensor,
    stats: ActivationStats,
    heldout: ActivationStats,
    method: str,
    rank: int | None = None,
) -> MethodSpectrum:
    """σ of `method`'s scaled W and its loss curves on the calibration and held-out stats.

    The scaling is always fitted on the calibration stats; the held-out curve only measures it on
    other tokens (so the gap between the two curves is the method's overfitting to calibration).
    """
    sigma = scaled_spectrum(W, stats, method, rank=rank)
    calibration = loss_curve(W, stats, method, rank=rank)
    held = loss_curve(W, stats, method, rank=rank, eval_stats=heldout)
    return MethodSpectrum(
        sigma.cpu().numpy(),
        {"calibration": calibration.cpu().numpy(), "heldout": held.cpu().numpy()},
        rank,
    )


# ---------------------------------------------------------------------------------------------------
# Disk cache


def _tensors(prefix: str, spectrum: MethodSpectrum) -> dict[str, torch.Tensor]:
    out = {f"{prefix}.sigma": torch.from_numpy(np.ascontiguousarray(spectrum.sigma))}
    for split, curve in spectrum.loss.items():
        out[f"{prefix}.loss.{split}"] = torch.from_numpy(np.ascontiguousarray(curve))
    return out


def _read(path: Path, meta_key: str) -> dict[str, np.ndarray] | None:
    """The arrays of a spectra file, or None when it is missing, unreadable or written for another key."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != SPECTRA_FORMAT or meta.get("key") != meta_key:
                return None
            return {name: fh.get_tensor(name).numpy() for name in fh.keys()}  # noqa: SIM118
    except Exception:  # missing, truncated, not safetensors: recompute rather than trust it
        return None


def _parse(arrays: dict[str, np.ndarray], prefix: str, shape: tuple[int, int]) -> MethodSpectrum | None:
    r = min(shape)
    sigma = arrays.get(f"{prefix}.sigma")
    curves = {split: arrays.get(f"{prefix}.loss.{split}") for split in SPLITS}
    ok = sigma is not None and sigma.shape == (r,) and np.isfinite(sigma).all()
    ok = ok and all(c is not None and c.shape == (r + 1,) and np.isfinite(c).all() for c in curves.values())
    return MethodSpectrum(sigma, curves) if ok else None


def _layer_meta_key(key: SpectraKey, layer: int, refs: Sequence[MatrixRef]) -> str:
    return json.dumps({**key.as_dict(), "layer": layer, "shapes": {r.kind: r.shape for r in refs}})


def load_layer(key: SpectraKey, refs: Sequence[MatrixRef]) -> dict[str, dict[str, MethodSpectrum]] | None:
    """{matrix name: {method: MethodSpectrum}} of one layer's cheap methods, or None if not cached."""
    layer = refs[0].layer
    arrays = _read(layer_path(key, layer), _layer_meta_key(key, layer, refs))
    if arrays is None:
        return None
    out: dict[str, dict[str, MethodSpectrum]] = {}
    for ref in refs:
        out[ref.name] = {}
        for method in CHEAP_METHODS:
            spectrum = _parse(arrays, f"{ref.kind}.{method}", ref.shape)
            if spectrum is None:
                return None
            out[ref.name][method] = spectrum
    return out


def compute_layer(
    key: SpectraKey,
    refs: Sequence[MatrixRef],
    weights: dict[str, torch.Tensor],
    stats: dict[str, ActivationStats],
    heldout: dict[str, ActivationStats],
) -> dict[str, dict[str, MethodSpectrum]]:
    """The cheap methods on one layer's matrices, saved atomically to the layer's file."""
    layer = refs[0].layer
    out: dict[str, dict[str, MethodSpectrum]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for ref in refs:
        sk = stats_key(ref.layer, ref.group)
        W = weights[ref.name]
        out[ref.name] = {}
        for method in CHEAP_METHODS:
            spectrum = method_spectrum(W, stats[sk], heldout[sk], method)
            out[ref.name][method] = spectrum
            tensors.update(_tensors(f"{ref.kind}.{method}", spectrum))
    meta = {"format": SPECTRA_FORMAT, "key": _layer_meta_key(key, layer, refs)}
    save_tensors_atomic(tensors, layer_path(key, layer), meta)
    return out


def layers_of(refs: Sequence[MatrixRef]) -> dict[int, list[MatrixRef]]:
    out: dict[int, list[MatrixRef]] = {}
    for ref in refs:
        out.setdefault(ref.layer, []).append(ref)
    return out


def missing_layers(key: SpectraKey, refs: Sequence[MatrixRef]) -> list[int]:
    """Layers whose cheap spectra are not (validly) cached."""
    return [layer for layer, group in layers_of(refs).items() if load_layer(key, group) is None]


def precompute(
    key: SpectraKey,
    refs: Sequence[MatrixRef],
    weights: dict[str, torch.Tensor],
    stats: dict[str, ActivationStats],
    heldout: dict[str, ActivationStats],
    progress: Progress | None = None,
) -> dict[str, dict[str, MethodSpectrum]]:
    """Every matrix's cheap spectra: cached layers are read, the others computed and saved, one layer
    at a time (an interrupted precompute keeps the layers it finished)."""
    groups = layers_of(refs)
    out: dict[str, dict[str, MethodSpectrum]] = {}
    for done, (_layer, group) in enumerate(groups.items(), start=1):
        cached = load_layer(key, group)
        out.update(cached if cached is not None else compute_layer(key, group, weights, stats, heldout))
        if progress is not None:
            progress(done, len(groups), "spectra")
    return out


def _sigmascale_meta_key(key: SpectraKey, ref: MatrixRef, rank: int) -> str:
    return json.dumps({**key.as_dict(), "matrix": ref.name, "shape": ref.shape, "rank": rank})


def load_sigmascale(key: SpectraKey, ref: MatrixRef, rank: int) -> MethodSpectrum | None:
    arrays = _read(sigmascale_path(key, ref.name, rank), _sigmascale_meta_key(key, ref, rank))
    if arrays is None:
        return None
    spectrum = _parse(arrays, "sigmascale", ref.shape)
    return None if spectrum is None else MethodSpectrum(spectrum.sigma, spectrum.loss, rank)


def learn_sigmascale(
    key: SpectraKey,
    ref: MatrixRef,
    W: torch.Tensor,
    stats: ActivationStats,
    heldout: ActivationStats,
    rank: int,
) -> MethodSpectrum:
    """SigmaScale's spectrum and curves for one matrix, learned at `rank`; cached on disk."""
    cached = load_sigmascale(key, ref, rank)
    if cached is not None:
        return cached
    spectrum = method_spectrum(W, stats, heldout, "sigmascale", rank=rank)
    meta = {"format": SPECTRA_FORMAT, "key": _sigmascale_meta_key(key, ref, rank)}
    save_tensors_atomic(_tensors("sigmascale", spectrum), sigmascale_path(key, ref.name, rank), meta)
    return spectrum


# ---------------------------------------------------------------------------------------------------
# The bank: every matrix's curves stacked for vectorised lookups


def _padded(rows: list[np.ndarray], width: int, fill: float) -> np.ndarray:
    out = np.full((len(rows), width), fill, dtype=np.float64)
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row
    return out


@dataclass(frozen=True)
class SpectrumSums:
    """Prefix sums of one method's spectra, (N, R + 1): column k sums the top k singular values."""

    s1: np.ndarray  # Σ σ
    s_log: np.ndarray  # Σ σ·log σ (0·log 0 = 0)
    s2: np.ndarray  # Σ σ²

    @classmethod
    def of(cls, spectra: list[np.ndarray], width: int) -> SpectrumSums:
        sigma = _padded(spectra, width - 1, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            s_log = np.where(sigma > 0, sigma * np.log(np.where(sigma > 0, sigma, 1.0)), 0.0)
        zero = np.zeros((len(spectra), 1))
        cumulate = lambda a: np.concatenate([zero, np.cumsum(a, axis=1)], axis=1)  # noqa: E731
        return cls(cumulate(sigma), cumulate(s_log), cumulate(sigma * sigma))


@dataclass
class PlanNumbers:
    """A plan's per-matrix numbers (arrays over the bank's matrices) and model totals."""

    ranks: np.ndarray  # (N,) rank kept (min(m, n) for a dense matrix)
    dense: np.ndarray  # (N,) bool: the matrix stays dense (break-even or beyond)
    retention: np.ndarray  # (N,) parameters after / before
    loss: dict[str, np.ndarray]  # split -> (N,) relative activation loss at the rank
    effective_rank: np.ndarray  # (N,) exp(entropy) of the kept singular values
    energy: np.ndarray  # (N,) Σσ² kept / Σσ²
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

    def mean_loss(self, split: str) -> float:
        return float(self.loss[split].mean())


class SpectraBank:
    """Spectra and loss curves of every target matrix of one model, as (N, R + 1) arrays.

    Rows follow `refs` (model order); column k of a curve is the relative loss when keeping k singular
    triplets (NaN past min(m, n)). SigmaScale rows exist only for matrices it was learned on
    (`add_sigmascale`); elsewhere the sigmascale lookups fall back to ASVD, its starting point.
    """

    def __init__(
        self,
        refs: Sequence[MatrixRef],
        spectra: dict[str, dict[str, MethodSpectrum]],
        total_params: int,
    ) -> None:
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
        self.break_even = np.array([reference_rank(r.shape, 1.0) for r in self.refs])  # dense from here
        self.width = int(self.full_rank.max()) + 1
        self.spectra = {method: [spectra[name][method] for name in self.names] for method in CHEAP_METHODS}
        self.curves = {
            (method, split): _padded([s.loss[split] for s in self.spectra[method]], self.width, np.nan)
            for method in CHEAP_METHODS
            for split in SPLITS
        }
        self.sums = {
            method: SpectrumSums.of([s.sigma for s in self.spectra[method]], self.width)
            for method in CHEAP_METHODS
        }
        self.learned: dict[str, MethodSpectrum] = {}  # matrix name -> sigmascale, as learned so far
        self._rebuild_sigmascale()

    # -- sigmascale rows ---------------------------------------------------------------------------
    def add_sigmascale(self, name: str, spectrum: MethodSpectrum) -> None:
        """Record a learned SigmaScale result; the arrays are rebuilt and swapped in whole."""
        self.learned = {**self.learned, name: spectrum}
        self._rebuild_sigmascale()

    def _rebuild_sigmascale(self) -> None:
        learned = self.learned
        rows = [learned.get(n) or self.spectra["asvd"][i] for i, n in enumerate(self.names)]
        curves = {
            ("sigmascale", split): _padded([s.loss[split] for s in rows], self.width, np.nan)
            for split in SPLITS
        }
        sums = SpectrumSums.of([s.sigma for s in rows], self.width)
        self.curves = {**self.curves, **curves}
        self.sums = {**self.sums, "sigmascale": sums}

    def spectrum(self, name: str, method: str) -> MethodSpectrum | None:
        """One matrix's result for `method` (None for sigmascale not learned yet)."""
        if method == "sigmascale":
            return self.learned.get(name)
        return self.spectra[method][self.index[name]]

    # -- conversions -------------------------------------------------------------------------------
    def ranks_for_retention(self, retention: np.ndarray | float) -> np.ndarray:
        """Per-matrix rank ⌊r·m·n/(m+n)⌋ (at least 1) as the plan's `uniform` does; full rank when dense."""
        retention = np.broadcast_to(np.asarray(retention, dtype=np.float64), self.full_rank.shape)
        ranks = np.floor(retention * self.params_before / self.params_per_rank + 1e-9).astype(np.int64)
        ranks = np.clip(ranks, 1, self.full_rank)
        return np.where(ranks * self.params_per_rank >= self.params_before, self.full_rank, ranks)

    def normalise(self, ranks: np.ndarray) -> np.ndarray:
        """Clip ranks into [1, min(m, n)], and ranks at or past break-even to min(m, n) (dense)."""
        ranks = np.clip(np.asarray(ranks, dtype=np.int64), 1, self.full_rank)
        return np.where(ranks * self.params_per_rank >= self.params_before, self.full_rank, ranks)

    def retention_of(self, ranks: np.ndarray) -> np.ndarray:
        dense = ranks * self.params_per_rank >= self.params_before
        return np.where(dense, 1.0, ranks * self.params_per_rank / self.params_before)

    # -- the live numbers --------------------------------------------------------------------------
    def evaluate(self, ranks: np.ndarray, method: str) -> PlanNumbers:
        """A plan's numbers from array lookups only (no decomposition): O(N)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        ranks = self.normalise(ranks)
        dense = ranks >= self.full_rank
        rows = np.arange(len(ranks))
        after = np.where(dense, self.params_before, ranks * self.params_per_rank)
        loss = {split: np.where(dense, 0.0, self.curves[method, split][rows, ranks]) for split in SPLITS}
        sums = self.sums[method]
        s1, s_log = sums.s1[rows, ranks], sums.s_log[rows, ranks]
        with np.errstate(divide="ignore", invalid="ignore"):
            # H(p), p = σ/S over the kept values: log S − Σσ·log σ / S
            entropy = np.where(
                s1 > 0, np.log(np.where(s1 > 0, s1, 1.0)) - s_log / np.where(s1 > 0, s1, 1.0), 0.0
            )
            energy = sums.s2[rows, ranks] / sums.s2[rows, self.full_rank]
        return PlanNumbers(
            ranks=ranks,
            dense=dense,
            retention=after / self.params_before,
            loss=loss,
            effective_rank=np.exp(entropy),
            energy=np.nan_to_num(energy, nan=1.0),
            params_before=int(self.params_before.sum()),
            params_after=int(after.sum()),
            total_params=self.total_params,
        )

    def damage_curves(self, method: str, split: str = "calibration") -> dict[str, DamageCurve]:
        """The cached loss curves as allocation.DamageCurve, every rank below break-even measured: the
        loss-curve proxy of a sensitivity probe (no forward pass). Calibration tokens by default, so an
        allocation is never tuned on held-out (evaluation-side) text."""
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

    def ranks_after(self, ranks: np.ndarray) -> np.ndarray:
        """Parameters each matrix keeps at `ranks`."""
        ranks = self.normalise(ranks)
        return np.where(ranks >= self.full_rank, self.params_before, ranks * self.params_per_rank)

    # -- tables ------------------------------------------------------------------------------------
    def grid(self, values: np.ndarray) -> tuple[list[int], list[str], np.ndarray]:
        """Per-matrix values laid out as layers × kinds (NaN where a layer lacks a kind)."""
        layers = sorted(set(self.layers.tolist()))
        kinds = [k for k in MATRIX_KINDS if k in set(self.kinds)]
        out = np.full((len(layers), len(kinds)), np.nan)
        row = {layer: i for i, layer in enumerate(layers)}
        col = {k: j for j, k in enumerate(kinds)}
        for i, ref in enumerate(self.refs):
            out[row[ref.layer], col[ref.kind]] = values[i]
        return layers, kinds, out

    def find(self, layer: int, kind: str) -> int:
        for i, ref in enumerate(self.refs):
            if ref.layer == layer and ref.kind == kind:
                return i
        raise ValueError(f"no matrix {kind!r} in layer {layer}")


def effective_ranks(bank: SpectraBank, method: str) -> np.ndarray:
    """Effective rank exp(H(σ/Σσ)) of each matrix's full spectrum under `method`, (N,)."""
    numbers = bank.evaluate(bank.full_rank, method)
    return numbers.effective_rank


def participation_ratios(bank: SpectraBank, method: str) -> np.ndarray:
    """(Σσ)²/Σσ² of each matrix's full spectrum under `method`, (N,)."""
    rows = np.arange(len(bank.names))
    sums = bank.sums[method]
    s1, s2 = sums.s1[rows, bank.full_rank], sums.s2[rows, bank.full_rank]
    return s1 * s1 / np.where(s2 > 0, s2, 1.0)


# ---------------------------------------------------------------------------------------------------
# Plotting helpers (pure)


def downsample_indices(n: int, max_points: int = 256) -> np.ndarray:
    """Indices of at most ~max_points samples of a length-n spectrum that keep both ends' shape.

    Half the budget is spread uniformly; the rest is log-spaced from each end, so the first values
    (the head) and the last ones (where a spectrum often drops by orders of magnitude) stay dense.
    """
    if n <= max_points:
        return np.arange(n)
    uniform = np.linspace(0, n - 1, max_points // 2)
    ends = np.geomspace(1, n, max_points // 4) - 1
    idx = np.concatenate([uniform, ends, n - 1 - ends]).round().astype(np.int64)
    return np.unique(np.clip(idx, 0, n - 1))


def cumulative_energy(sigma: np.ndarray) -> np.ndarray:
    """Σ_{i<k} σ_i² / Σσ², k = 1..len(σ)."""
    s2 = np.asarray(sigma, dtype=np.float64) ** 2
    total = s2.sum()
    return np.cumsum(s2) / (total if total > 0 else 1.0)


# ---------------------------------------------------------------------------------------------------
# The teaching toy: a small matrix, its inputs, and hand-set scales


@dataclass(frozen=True)
class Toy:
    """A small weight matrix and the inputs it sees."""

    W: torch.Tensor  # (m, n) float64
    X: torch.Tensor  # (tokens, n) float64 inputs

    @property
    def gram(self) -> torch.Tensor:
        return self.X.T @ self.X  # (n, n)


TOYS = ("outlier channels", "flat spectrum")


def toy_problem(kind: str = "outlier channels", seed: int = 0, m: int = 8, n: int = 6) -> Toy:
    """'outlier channels': a decaying-spectrum W whose inputs have one channel 12× louder than the rest —
    scaling pays. 'flat spectrum': an orthogonal W with isotropic inputs — nothing to steepen."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    r = min(m, n)
    X = torch.randn(400, n, generator=g, dtype=torch.float64)
    if kind == "flat spectrum":  # exactly isotropic inputs: XᵀX = tokens·I
        Q, _ = torch.linalg.qr(X)
        return Toy((U[:, :r] @ V[:, :r].T), Q * X.shape[0] ** 0.5)
    if kind != "outlier channels":
        raise ValueError(f"unknown toy {kind!r}; choose one of {TOYS}")
    sigma = torch.arange(1, r + 1, dtype=torch.float64) ** -0.5
    X[:, 0] *= 12.0
    return Toy((U[:, :r] * sigma) @ V[:, :r].T, X)


@dataclass(frozen=True)
class ToyResult:
    sigma: np.ndarray  # singular values of W
    scaled_sigma: np.ndarray  # singular values of S_row·W·S_col
    plain_error: float  # ‖W − W′‖²_F / ‖W‖²_F
    activation_error: float  # ‖(W − W′)X‖²_F / ‖WX‖²_F
    optimal_activation_error: float  # the best any rank-k W′ can do on these inputs (SVD-LLM's whitening)


# W′ = S_row⁻¹ · T_k(S_row·W·S_col) · S_col⁻¹: truncate the scaled matrix, fold the scales back.
def toy_truncation(toy: Toy, row_log2: Sequence[float], col_log2: Sequence[float], rank: int) -> ToyResult:
    """Truncate the toy's W at `rank` after scaling its rows and columns by 2^row_log2, 2^col_log2."""
    W, gram = toy.W, toy.gram
    row = torch.tensor(list(row_log2), dtype=torch.float64).exp2()  # (m,)
    col = torch.tensor(list(col_log2), dtype=torch.float64).exp2()  # (n,)
    Ws = row[:, None] * W * col
    left, right, scaled_sigma = truncated_svd(Ws, rank)
    W_hat = (left @ right) / row[:, None] / col
    E = W - W_hat
    whitened = W @ torch.linalg.cholesky(gram + 1e-12 * torch.eye(gram.shape[0], dtype=gram.dtype))
    best = float(singular_values(whitened)[rank:].square().sum() / whitened.square().sum())
    return ToyResult(
        sigma=singular_values(W).numpy(),
        scaled_sigma=scaled_sigma.numpy(),
        plain_error=float(E.square().sum() / W.square().sum()),
        activation_error=float(((E @ gram) * E).sum() / ((W @ gram) * W).sum()),
        optimal_activation_error=best,
    )


def asvd_log2_scales(toy: Toy, alpha: float = 0.5) -> np.ndarray:
    """ASVD's column scales mean|x|^α as log2 (what the Learn page's button sets)."""
    return alpha * np.log2(toy.X.abs().mean(0).numpy())


def learned_log2_scales(toy: Toy, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """SigmaScale's learned (row, column) scales for the toy at `rank`, as log2."""
    from sigmascale_core.methods import decompose

    stats = ActivationStats.from_inputs(toy.X)
    f = decompose(toy.W, stats, rank, "sigmascale", steps=200)
    return np.log2(f.row_scale.numpy()), np.log2(f.col_scale.numpy())
