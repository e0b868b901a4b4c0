"""WeightWatcher's spectral diagnostics of one matrix, as pure functions over its singular values.

Users who know WeightWatcher (Martin & Mahoney) expect its numbers: the power-law exponent alpha of the
empirical spectral density (ESD) tail, its norms, the Marchenko–Pastur (MP) bulk edge and spikes, the
shuffled-W "correlation traps", rank loss. The definitions follow weightwatcher 0.7.7 (read from its
source, `weightwatcher.py`, `RMT_Util.py`, `WW_powerlaw.py`) with its default parameters:

- the ESD is the eigenvalues λ = σ² of WᵀW, *not* divided by N (WeightWatcher's `normalize=False`);
- alpha, xmin and D come from its default fit (`pl_package="ww"`): the continuous maximum-likelihood
  estimator of Clauset–Shalizi–Newman at every candidate xmin, and the xmin whose Kolmogorov–Smirnov
  distance is smallest;
- under-trained when alpha > 6, over-trained when alpha < 2 (`UNDER_TRAINED_THRESH`, `OVER_TRAINED_THRESH`).

Where we differ, on purpose: the MP variance is estimated from the bulk (the mean of the eigenvalues
below the edge, iterated to a fixed point) instead of WeightWatcher's kernel-density brute-force fit, and
spikes are counted above λ₊ + 2.02·σ_TW (the 99 % Tracy–Widom quantile) instead of λ₊ + √σ_TW.
bench/bench_weightwatcher.py measures both differences on a model.

Activation-aware versions: pass the spectrum (and the matrix) of the scaled matrix a method truncates,
e.g. W·S with S the activation scaling, instead of W's; every function here is agnostic to which.

Nothing here does I/O or plotting; `esd_histogram` returns plain arrays for the app to draw.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

UNDER_TRAINED_ALPHA = 6.0  # weightwatcher constants.UNDER_TRAINED_THRESH
OVER_TRAINED_ALPHA = 2.0  # weightwatcher constants.OVER_TRAINED_THRESH
TW_QUANTILE_99 = 2.0234  # 99 % quantile of the Tracy–Widom (β = 1) law: the spike margin, in σ_TW units
_CHUNK = 256  # candidate xmins scored per vectorised block in the power-law scan


def eigenvalues(sigma: np.ndarray) -> np.ndarray:
    """The ESD, λ = σ² of WᵀW, ascending (float64)."""
    return np.sort(np.asarray(sigma, dtype=np.float64) ** 2)


def rank_tolerance(sigma: np.ndarray, shape: tuple[int, int]) -> float:
    """numpy's (and WeightWatcher's) numerical-rank cut-off on singular values."""
    # tol = σ₁ · max(m, n) · ε
    return float(np.max(sigma, initial=0.0) * max(shape) * np.finfo(np.float64).eps)


def hard_rank(sigma: np.ndarray, shape: tuple[int, int]) -> int:
    """Numerical rank: singular values above the standard tolerance (as np.linalg.matrix_rank)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    return int(np.count_nonzero(sigma > rank_tolerance(sigma, shape)))


def rank_loss(sigma: np.ndarray, shape: tuple[int, int]) -> int:
    """Directions lost to numerical zero: min(m, n) − rank."""
    return min(shape) - hard_rank(sigma, shape)


def stable_rank(sigma: np.ndarray) -> float:
    """A rank that does not jump with noise: how many σ₁-sized directions carry the energy."""
    lam = eigenvalues(sigma)
    # stable rank = Σσ² / σ₁² = ‖W‖_F² / ‖W‖₂²
    return float(lam.sum() / lam[-1])


def log_norm(sigma: np.ndarray) -> float:
    """WeightWatcher's log_norm: log10 of the squared Frobenius norm."""
    # log10 ‖W‖_F² = log10 Σλ
    return float(np.log10(eigenvalues(sigma).sum()))


def log_spectral_norm(sigma: np.ndarray) -> float:
    """WeightWatcher's log_spectral_norm: log10 of the largest eigenvalue of WᵀW (σ₁², not σ₁)."""
    # log10 λ_max = log10 σ₁²
    return float(np.log10(eigenvalues(sigma)[-1]))


def alpha_weighted(alpha: float, sigma: np.ndarray) -> float:
    """WeightWatcher's alpha-hat: alpha scaled by the layer's size, comparable across layers."""
    # α̂ = α · log10 λ_max
    return float(alpha * log_spectral_norm(sigma))


def log_alpha_norm(alpha: float, sigma: np.ndarray) -> float:
    """WeightWatcher's log_alpha_norm: log10 of the Schatten α-norm to the power α."""
    # log10 Σ λᵢ^α
    return float(np.log10(np.sum(eigenvalues(sigma) ** alpha)))


@dataclass(frozen=True)
class PowerLawFit:
    """The ESD tail p(λ) ∝ λ^−α for λ ≥ xmin: exponent, cut, KS distance, tail size and alpha's standard error."""

    alpha: float  # MLE exponent of the density
    xmin: float  # start of the tail (an eigenvalue)
    D: float  # KS distance between the fitted and empirical tail CDFs
    n_tail: int  # eigenvalues ≥ xmin
    sigma: float  # standard error of alpha: (α − 1)/√n_tail


def fit_power_law(lam: np.ndarray) -> PowerLawFit:
    """Clauset–Shalizi–Newman fit of a continuous power law, xmin by minimum KS distance (WeightWatcher's).

    Every eigenvalue but the largest is a candidate xmin; the tail statistics come from suffix sums and the
    KS distance is scored in blocks, so a 4096-eigenvalue ESD costs ~n²/2 flops, no Python loop per xmin.
    """
    x = np.sort(np.asarray(lam, dtype=np.float64))
    x = x[x > 0]
    n = x.size
    if n < 2:
        return PowerLawFit(np.nan, np.nan, np.nan, n, np.nan)
    log_x = np.log(x)
    candidates = n - 1  # WeightWatcher: xmins = data[:-1]
    tail = n - np.arange(candidates)  # n_i = tail size for xmin = x_i
    suffix = np.cumsum(log_x[::-1])[::-1][:candidates]  # Σ_{j ≥ i} log x_j
    # α_i = 1 + n_i / Σ_{j ≥ i} log(x_j / x_i)
    with np.errstate(divide="ignore"):
        alphas = 1.0 + tail / (suffix - tail * log_x[:candidates])
    Ds = np.ones(candidates)
    for start in range(0, candidates, _CHUNK):
        i = np.arange(start, min(start + _CHUNK, candidates))  # (c,)
        k = np.arange(n)[None, :] - i[:, None]  # (c, n): rank of x_j inside the tail of x_i
        inside = k >= 0
        ratio = np.where(inside, x[None, :] / x[i, None], 1.0)
        a = alphas[i, None]
        # D_i = max_{j ≥ i} |1 − (x_j / x_i)^(1−α_i) − (j − i)/n_i|  (fitted CDF vs WeightWatcher's step CDF)
        gap = np.abs(1.0 - ratio ** (1.0 - a) - k / tail[i, None])
        valid = np.isfinite(alphas[i]) & (alphas[i] > 1)
        Ds[i] = np.where(valid, np.max(np.where(inside, gap, 0.0), axis=1), 1.0)
    best = int(np.argmin(Ds))
    alpha = float(alphas[best])
    n_tail = int(tail[best])
    # σ_α = (α − 1) / √n_tail
    return PowerLawFit(alpha, float(x[best]), float(Ds[best]), n_tail, float((alpha - 1.0) / np.sqrt(n_tail)))


def training_flags(alpha: float) -> tuple[bool, bool]:
    """(under_trained, over_trained) in WeightWatcher's sense: alpha > 6, alpha < 2."""
    return bool(alpha > UNDER_TRAINED_ALPHA), bool(alpha < OVER_TRAINED_ALPHA)


def mp_edges(shape: tuple[int, int], variance: float) -> tuple[float, float]:
    """(λ₋, λ₊): the MP bulk of WᵀW for an N×M matrix of i.i.d. entries of the given variance.

    Convention: eigenvalues of WᵀW itself (unnormalised, as `eigenvalues`), N = max(m, n), M = min(m, n);
    for WᵀW/N the edges are the textbook s²(1 ± √(M/N))².
    """
    N, M = max(shape), min(shape)
    # λ± = N s² (1 ± √(M/N))² = s² (√N ± √M)²
    return variance * (np.sqrt(N) - np.sqrt(M)) ** 2, variance * (np.sqrt(N) + np.sqrt(M)) ** 2


def tracy_widom_scale(shape: tuple[int, int], variance: float) -> float:
    """σ_TW: the width of λ_max's fluctuation at the MP edge (Johnstone 2001), in eigenvalue units."""
    N, M = max(shape) - 0.5, min(shape) - 0.5
    # σ_TW = s² (√N + √M) (1/√N + 1/√M)^(1/3)
    return float(variance * (np.sqrt(N) + np.sqrt(M)) * (1 / np.sqrt(N) + 1 / np.sqrt(M)) ** (1 / 3))


def spike_threshold(shape: tuple[int, int], variance: float) -> float:
    """The eigenvalue above which a noise matrix's λ_max falls with probability 1 %: λ₊ + 2.02 σ_TW."""
    return mp_edges(shape, variance)[1] + TW_QUANTILE_99 * tracy_widom_scale(shape, variance)


def mp_variance(lam: np.ndarray, shape: tuple[int, int], max_iter: int = 100) -> float:
    """Entry variance s² of the MP bulk, from the eigenvalues inside it (spikes would inflate ‖W‖_F²/NM).

    Starts from s² = Σλ/(N·M) (WeightWatcher's rescaling to mean eigenvalue 1 is the same number), then
    refits on the eigenvalues below the spike threshold until that set stops changing; the threshold only
    falls, so this ends.
    """
    lam = np.asarray(lam, dtype=np.float64)
    N = max(shape)
    # for WᵀW of i.i.d. entries: E[mean λ] = N s², so s² = Σ_bulk λ / (N · |bulk|)
    bulk = lam
    for _ in range(max_iter):
        variance = float(bulk.sum() / (N * max(bulk.size, 1)))
        inside = lam[lam <= spike_threshold(shape, variance)]
        if inside.size == bulk.size or inside.size == 0:
            break
        bulk = inside
    return variance


@dataclass(frozen=True)
class MPFit:
    """The MP bulk of one ESD: variance, edges, spikes above it and WeightWatcher's mp_softrank."""

    variance: float  # s², entry variance of the bulk
    lambda_minus: float  # lower bulk edge λ₋
    lambda_plus: float  # upper bulk edge λ₊
    num_spikes: int  # eigenvalues above λ₊ + 2.02 σ_TW
    softrank: float  # λ₊ / λ_max


def mp_fit(lam: np.ndarray, shape: tuple[int, int]) -> MPFit:
    """Fit the MP bulk to an ESD and count the spikes: the directions training (or a trap) put there."""
    lam = np.asarray(lam, dtype=np.float64)
    variance = mp_variance(lam, shape)
    lo, hi = mp_edges(shape, variance)
    spikes = int(np.count_nonzero(lam > spike_threshold(shape, variance)))
    # mp_softrank = λ₊ / λ_max  (WeightWatcher's; > 1 when even λ_max sits inside the bulk)
    return MPFit(variance, lo, hi, spikes, float(hi / lam.max()))


def shuffled_eigenvalues(W: np.ndarray, seed: int = 0) -> np.ndarray:
    """ESD of W with its entries randomly permuted (seeded): same entry distribution, correlations gone."""
    W = np.asarray(W, dtype=np.float64)
    R = np.random.default_rng(seed).permutation(W.ravel()).reshape(W.shape)
    # eigenvalues of the smaller Gram (RᵀR or RRᵀ): ~3× faster than an SVD of R, and a shuffled matrix
    # is well conditioned, so λ_max and the bulk keep full relative precision
    gram = R.T @ R if R.shape[0] >= R.shape[1] else R @ R.T
    return np.sort(np.clip(np.linalg.eigvalsh(gram), 0.0, None))


def esd_histogram(lam: np.ndarray, bins: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(edges, centres, density) of the positive eigenvalues on log-spaced bins, for a log–log plot.

    density integrates to one over the bins (Σ density·width = 1); centres are geometric means of edges.
    """
    lam = np.asarray(lam, dtype=np.float64)
    lam = lam[lam > 0]
    lo, hi = lam.min(), lam.max()
    if hi <= lo:
        hi = lo * (1 + 1e-9)
    edges = np.logspace(np.log10(lo), np.log10(hi), bins + 1)
    edges[0], edges[-1] = lo, hi  # 10**log10(x) can round below x and drop the extreme eigenvalues
    counts, _ = np.histogram(lam, bins=edges)
    # density_b = count_b / (n · width_b)
    density = counts / (lam.size * np.diff(edges))
    return edges, np.sqrt(edges[:-1] * edges[1:]), density


def power_law_line(
    alpha: float, xmin: float, n_tail: int, n: int, lam_max: float, points: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """(λ, density) of the fitted tail on [xmin, λ_max], on the scale of `esd_histogram` over all n eigenvalues.

    The tail holds n_tail of the n eigenvalues, so its share of the whole ESD's density is n_tail/n.
    """
    if not (np.isfinite(alpha) and np.isfinite(xmin) and xmin > 0 and lam_max > xmin and n > 0):
        return np.empty(0), np.empty(0)
    lam = np.geomspace(xmin, lam_max, points)
    # p(λ) = (n_tail / n) · (α − 1)/xmin · (λ/xmin)^−α
    return lam, (n_tail / n) * (alpha - 1.0) / xmin * (lam / xmin) ** -alpha


@dataclass(frozen=True)
class Diagnostics:
    """Every WeightWatcher-style number for one matrix; `to_dict` gives name → value for tables and the UI."""

    n_rows: int
    n_cols: int
    stable_rank: float
    log_norm: float
    log_spectral_norm: float
    alpha: float
    alpha_sigma: float
    xmin: float
    D: float
    n_tail: int
    alpha_weighted: float
    log_alpha_norm: float
    mp_variance: float
    lambda_minus: float
    lambda_plus: float
    num_spikes: int
    mp_softrank: float
    rand_lambda_max: float
    rand_lambda_plus: float
    num_traps: int
    rand_softrank: float
    hard_rank: int
    rank_loss: int
    under_trained: bool
    over_trained: bool

    @property
    def warning(self) -> str:
        """WeightWatcher's `warning` column: "under-trained", "over-trained" or ""."""
        return warning(self.under_trained, self.over_trained)

    def to_dict(self) -> dict[str, float]:
        return {k: (float(v) if not isinstance(v, bool) else v) for k, v in asdict(self).items()}


def warning(under_trained: bool, over_trained: bool) -> str:
    """WeightWatcher's `warning` text for a pair of flags (also for diagnostics read back from a cache)."""
    if over_trained:
        return "over-trained"
    return "under-trained" if under_trained else ""


FIELDS = tuple(f.name for f in fields(Diagnostics))  # the order of `to_dict`, and of the cached vectors
FLAGS = ("under_trained", "over_trained")  # the boolean fields

DESCRIPTIONS: dict[str, str] = {
    "n_rows": "Rows of the matrix.",
    "n_cols": "Columns of the matrix.",
    "stable_rank": "Σσ²/σ₁²: how many directions as strong as the strongest carry the energy.",
    "log_norm": "log10 of the squared Frobenius norm Σσ² (WeightWatcher's log_norm).",
    "log_spectral_norm": "log10 of the largest eigenvalue σ₁² of WᵀW (WeightWatcher's log_spectral_norm).",
    "alpha": "Power-law exponent of the ESD tail; 2–6 is typical of well-trained layers.",
    "alpha_sigma": "Standard error of alpha, (alpha − 1)/√n_tail.",
    "xmin": "Smallest eigenvalue of the fitted power-law tail (chosen by minimum KS distance).",
    "D": "Kolmogorov–Smirnov distance of the power-law fit; smaller is a better fit.",
    "n_tail": "Eigenvalues in the fitted tail (λ ≥ xmin).",
    "alpha_weighted": "alpha · log10 λ_max (WeightWatcher's alpha-hat), comparable across layer sizes.",
    "log_alpha_norm": "log10 Σ λ^alpha, the log Schatten alpha-norm (WeightWatcher's log_alpha_norm).",
    "mp_variance": "Entry variance of the Marchenko–Pastur bulk, estimated from the eigenvalues inside it.",
    "lambda_minus": "Lower edge of the Marchenko–Pastur bulk of WᵀW.",
    "lambda_plus": "Upper edge λ₊ of the Marchenko–Pastur bulk of WᵀW; noise lives below it.",
    "num_spikes": "Eigenvalues clearly above the bulk edge (λ₊ + 2 Tracy–Widom widths): learned directions.",
    "mp_softrank": "λ₊/λ_max (WeightWatcher's mp_softrank): near 1 is noise-like, near 0 is spike-dominated.",
    "rand_lambda_max": "Largest eigenvalue after randomly shuffling W's entries.",
    "rand_lambda_plus": "Marchenko–Pastur bulk edge of the shuffled W.",
    "num_traps": "Spikes that survive shuffling (correlation traps): a few huge entries, not learned structure.",
    "rand_softrank": "Shuffled λ_max over real λ_max (WeightWatcher's ww_softrank); near 1 means W looks random.",
    "hard_rank": "Numerical rank: singular values above σ₁·max(m,n)·machine epsilon.",
    "rank_loss": "min(m,n) − hard rank: directions collapsed to numerical zero.",
    "under_trained": "alpha > 6: the tail is too light, the layer looks under-trained (WeightWatcher).",
    "over_trained": "alpha < 2: the tail is very heavy, the layer may be over-trained (WeightWatcher).",
}


def model_averages(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each diagnostic over matrices (the flags' means are the share flagged), NaNs skipped;
    "matrices" counts the rows. A model-level summary, as WeightWatcher's `get_summary`."""
    out: dict[str, float] = {"matrices": len(rows)}
    for field in FIELDS:
        values = np.array([float(r[field]) for r in rows], dtype=np.float64)
        values = values[np.isfinite(values)]
        out[field] = float(values.mean()) if values.size else float("nan")
    return out


def diagnostics(
    sigma: np.ndarray, shape: tuple[int, int], W: np.ndarray | None = None, seed: int = 0
) -> Diagnostics:
    """All diagnostics of a matrix from its singular values; the shuffled-W numbers need W (NaN without).

    A zero matrix (a pruned layer) gives NaN/inf numbers, not an exception.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return _diagnostics(np.asarray(sigma, dtype=np.float64), shape, W, seed)


def _diagnostics(sigma: np.ndarray, shape: tuple[int, int], W: np.ndarray | None, seed: int) -> Diagnostics:
    lam = eigenvalues(sigma)
    tol = rank_tolerance(sigma, shape)
    pl = fit_power_law(lam[lam > tol**2])
    mp = mp_fit(lam, shape)
    if W is not None:
        rand = shuffled_eigenvalues(W, seed)
        rand_mp = mp_fit(rand, shape)
        rand_max, rand_plus, traps = float(rand[-1]), rand_mp.lambda_plus, rand_mp.num_spikes
    else:
        rand_max, rand_plus, traps = np.nan, np.nan, -1
    under, over = training_flags(pl.alpha)
    return Diagnostics(
        n_rows=shape[0],
        n_cols=shape[1],
        stable_rank=stable_rank(sigma),
        log_norm=log_norm(sigma),
        log_spectral_norm=log_spectral_norm(sigma),
        alpha=pl.alpha,
        alpha_sigma=pl.sigma,
        xmin=pl.xmin,
        D=pl.D,
        n_tail=pl.n_tail,
        alpha_weighted=alpha_weighted(pl.alpha, sigma),
        log_alpha_norm=log_alpha_norm(pl.alpha, sigma),
        mp_variance=mp.variance,
        lambda_minus=mp.lambda_minus,
        lambda_plus=mp.lambda_plus,
        num_spikes=mp.num_spikes,
        mp_softrank=mp.softrank,
        rand_lambda_max=rand_max,
        rand_lambda_plus=rand_plus,
        num_traps=traps,
        rand_softrank=float(np.divide(rand_max, lam[-1])),
        hard_rank=hard_rank(sigma, shape),
        rank_loss=rank_loss(sigma, shape),
        under_trained=under,
        over_trained=over,
    )
