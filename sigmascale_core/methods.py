"""The four ways to pick a rank-k replacement of W: svd, asvd, svdllm, sigmascale.

Each method only chooses a *scaling* (S_row, S_col) of W; the shared truncation then keeps the top k
singular triplets of W_s = S_row·W·S_col and folds the scaling back:
    W′ = S_row⁻¹ · U_k Σ_k V_kᵀ · S_col⁻¹  =  left (m×k) @ right (k×n)
so inference pays nothing for the scaling. S_row is a diagonal (a vector) or absent; S_col is a
diagonal, SVD-LLM's lower-triangular whitening factor L (gram = L·Lᵀ), sigmascale's L·diag(eᶜ)
(init="whiten", still lower-triangular), or absent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sigmascale_core.metrics import check_matrix, check_rank, check_stats, gram_error
from sigmascale_core.spectral import gram_eigh, singular_values, tail_projector, truncated_svd
from sigmascale_core.stats import FLOAT_DTYPES, ActivationStats

METHODS = ("svd", "asvd", "svdllm", "sigmascale")

# The options each method accepts, with their defaults. compute_dtype (one of FLOAT_DTYPES): the dtype of
# the truncation (W_s, its SVD, the factors mapped back); Cholesky, the whitened Gram and sigmascale's
# final check stay float64.
METHOD_OPTIONS: dict[str, dict[str, object]] = {
    "svd": {"compute_dtype": "float64"},
    "asvd": {"alpha": 0.5, "compute_dtype": "float64"},  # column scale = abs_mean ** alpha
    # λ: whiten (1−λ)·G + λ·diag(G) instead of G (0: G itself, SVD-LLM)
    "svdllm": {"shrink": 0.0, "compute_dtype": "float64"},
    "sigmascale": {
        "steps": 20,  # Adam steps on (r, c)
        "lr": 0.05,  # Adam learning rate, in log-scale units
        "init": "whiten",  # "identity" (r = c = 0, as the paper), "asvd" (c = alpha·log abs_mean) or
        # "whiten" (r, c learned on top of svdllm's whitening factor L: S_col = L·diag(eᶜ)); issue 19 study
        "alpha": 0.5,  # ASVD exponent used by init="asvd"
        "l2": 1e-4,  # weight of mean(r²) + mean(c²), keeps the scales bounded
        "seed": 0,  # seeds the start: the optimiser is deterministic for a given seed
        "init_noise": 0.0,  # std of Gaussian noise added to the initial (r, c)
        "shrink": 0.01,  # λ of the whitened Gram, as svdllm's (init="whiten"; other inits ignore it)
        "compute_dtype": "float64",
    },
}
SIGMASCALE_INITS = ("identity", "asvd", "whiten")
SHRINK_GRID: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3)  # the λ that choose_shrink tries


@dataclass(frozen=True)
class LowRankFactors:
    """W ≈ left @ right, the result of `decompose`."""

    left: torch.Tensor  # (m, k)
    right: torch.Tensor  # (k, n)
    scaled_singular_values: torch.Tensor  # (min(m, n),) spectrum of the scaled matrix that was truncated
    method: str
    row_scale: torch.Tensor | None = None  # (m,) S_row, the learned e^r (sigmascale)
    col_scale: torch.Tensor | None = None  # (n,) S_col when diagonal: abs_mean^α (asvd), e^c (sigmascale)
    jitter: float = 0.0  # λ added to the Gram's diagonal to make it PD (svdllm on a singular Gram), else 0

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def to_dense(self) -> torch.Tensor:
        return self.left @ self.right


@dataclass(frozen=True)
class Scaling:
    """S_row (vector or None), S_col (vector, lower-triangular matrix or None) of one matrix."""

    row: torch.Tensor | None = None  # (m,)
    col: torch.Tensor | None = None  # (n,) diagonal, or (n, n) lower-triangular L
    jitter: float = 0.0  # λ in L·Lᵀ = gram + λ·I, when the whitening needed one
    compute_dtype: torch.dtype = torch.float64  # what `truncate` runs in (row and col are kept float64)

    def to(self, dtype: torch.dtype) -> Scaling:
        """The same scaling with its tensors in `dtype`."""
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return Scaling(cast(self.row), cast(self.col), self.jitter, self.compute_dtype)

    def apply(self, W: torch.Tensor) -> torch.Tensor:
        """W_s = S_row · W · S_col."""
        if self.row is not None:
            W = self.row[:, None] * W
        if self.col is None:
            return W
        return W * self.col if self.col.ndim == 1 else W @ self.col

    def unapply_right(self, right: torch.Tensor) -> torch.Tensor:
        """right · S_col⁻¹ (a triangular solve for the whitening factor, never an explicit inverse)."""
        if self.col is None:
            return right
        if self.col.ndim == 1:
            return right / self.col
        return torch.linalg.solve_triangular(self.col, right, upper=False, left=False)

    def unapply_left(self, left: torch.Tensor) -> torch.Tensor:
        """S_row⁻¹ · left."""
        return left if self.row is None else left / self.row[:, None]


def check_options(method: str, options: dict[str, object] | None) -> dict[str, object]:
    """The one check of a method's options (plans, probes, CLI, app): known names, each value of its
    default's type (an int is a float) and in range. Returns them as given; ValueError names the bad one."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ValueError(f"options must be a JSON object, got {type(options).__name__}")
    allowed = METHOD_OPTIONS[method]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = ", ".join(allowed) or "none"
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; it takes: {known}")
    for key, value in options.items():
        kind = type(allowed[key])
        ok = isinstance(value, int | float) if kind is float else isinstance(value, kind)
        if isinstance(value, bool) or not ok:
            raise ValueError(f"option {key} of {method} expects {kind.__name__}, got {value!r}")
        if kind in (int, float) and (value != value or value in (float("inf"), float("-inf"))):
            raise ValueError(f"option {key} of {method} must be finite, got {value!r}")
    merged = {**allowed, **options}
    if merged["compute_dtype"] not in FLOAT_DTYPES:
        raise ValueError(
            f"option compute_dtype of {method} must be one of {tuple(FLOAT_DTYPES)}, got {merged['compute_dtype']!r}"
        )
    if "shrink" in merged and not 0 <= merged["shrink"] < 1:
        raise ValueError(f"option shrink of {method} must be in [0, 1), got {merged['shrink']!r}")
    if method == "sigmascale":
        if merged["steps"] < 0 or not merged["lr"] > 0:
            raise ValueError(f"sigmascale needs steps ≥ 0 and lr > 0, got {merged['steps']}, {merged['lr']}")
        if merged["init"] not in SIGMASCALE_INITS:
            raise ValueError(f"unknown init {merged['init']!r}; choose one of {SIGMASCALE_INITS}")
        if merged["l2"] < 0 or merged["init_noise"] < 0:
            raise ValueError(
                f"sigmascale needs l2, init_noise ≥ 0, got {merged['l2']}, {merged['init_noise']}"
            )
    return dict(options)


def _options(method: str, options: dict[str, object]) -> dict[str, object]:
    """The method's options with its defaults filled in (checked by `check_options`)."""
    checked = check_options(method, options)  # ValueError for an unknown method too
    return {**METHOD_OPTIONS[method], **checked}


def _check_inputs(W: torch.Tensor, stats: ActivationStats | None, method: str) -> None:
    check_matrix(W)
    if method == "svd" and stats is None:
        return
    if stats is None:
        raise ValueError(f"method {method!r} needs activation stats")
    check_stats(stats, W.shape[1])


def asvd_col_scale(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """ASVD's column scale abs_mean^α; dead channels (mean 0) get the smallest live scale, not zero."""
    if not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    live = abs_mean[abs_mean > 0]
    floor = live.min() if live.numel() else abs_mean.new_tensor(1.0)
    return abs_mean.clamp_min(floor) ** alpha


def whitening_factor(gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(L, λ): lower-triangular L with L·Lᵀ = gram + λ·I (float64), λ the smallest jitter that makes it PD.

    λ is 0 for a positive-definite Gram, else it starts at 1e-10·mean(diag) and grows 10× per try: a
    rank-deficient Gram (fewer tokens than channels, dead channels) gets the least regularisation that
    keeps the Cholesky factor finite. λ is returned so that reports can say how much each matrix needed.
    """
    gram = gram.to(torch.float64)
    L, info = torch.linalg.cholesky_ex(gram)
    if info == 0:
        return L, 0.0
    scale = gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for exponent in range(-10, 1):
        jitter = float(scale) * 10.0**exponent
        L, info = torch.linalg.cholesky_ex(gram + jitter * eye)
        if info == 0:
            return L, jitter
    raise ValueError("the Gram matrix is not positive semi-definite even with jitter: are the stats corrupt?")


def shrunk_gram(gram: torch.Tensor, shrink: float) -> torch.Tensor:
    """(1−λ)·G + λ·diag(G): the Gram pulled towards its diagonal (λ = 0: G itself, exactly; λ → 1: only
    the channel energies, ASVD-like). Whitening this instead of G trusts the calibration set's
    correlations less, which can generalise better to other tokens when that set is small."""
    if shrink == 0:
        return gram
    return (1 - shrink) * gram + shrink * torch.diag(gram.diagonal())


def _fit_scaling(
    W: torch.Tensor, stats: ActivationStats | None, rank: int | None, method: str, opts: dict[str, object]
) -> Scaling:
    dtype = FLOAT_DTYPES[opts["compute_dtype"]]
    if method == "svd":
        return Scaling(compute_dtype=dtype)
    abs_mean = stats.abs_mean.to(device=W.device, dtype=torch.float64)
    if method == "asvd":
        return Scaling(col=asvd_col_scale(abs_mean, opts["alpha"]), compute_dtype=dtype)
    gram = stats.gram.to(device=W.device, dtype=torch.float64)  # float32 statistics: cast once, here
    if method == "svdllm":
        L, jitter = whitening_factor(shrunk_gram(gram, opts["shrink"]))
        return Scaling(col=L, jitter=jitter, compute_dtype=dtype)
    if rank is None:
        raise ValueError("method 'sigmascale' learns its scaling for one rank: pass rank=")
    return learn_scaling(W, gram, abs_mean, rank, **opts)


def _truncate(
    W: torch.Tensor, scaling: Scaling, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(left, right, σ) of the rank-k truncation, computed in the scaling's compute dtype."""
    cast = scaling.to(scaling.compute_dtype)
    left, right, sigma = truncated_svd(cast.apply(W.to(scaling.compute_dtype)), rank)
    return cast.unapply_left(left), cast.unapply_right(right), sigma


def decompose(
    W: torch.Tensor, stats: ActivationStats | None, rank: int, method: str = "svd", **options: object
) -> LowRankFactors:
    """Rank-`rank` factors of W by `method` on W's device, factors in W's dtype. The math is float64, or
    float32 with `compute_dtype="float32"` (Cholesky, the whitened Gram and sigmascale's check stay float64)."""
    return truncate(W, fit_scaling(W, stats, method, rank, **options), rank, method)


def fit_scaling(
    W: torch.Tensor,
    stats: ActivationStats | None,
    method: str = "svd",
    rank: int | None = None,
    **options: object,
) -> Scaling:
    """The scaling `method` truncates W under (float64, W's device; the truncation's dtype recorded in
    it); sigmascale learns it at `rank` (checked whenever given). Fitted once, it serves every rank
    through `truncate` (how the probe and the curves use sigmascale)."""
    opts = _options(method, options)
    _check_inputs(W, stats, method)
    if rank is not None:
        check_rank(rank, *W.shape)
    return _fit_scaling(W.to(FLOAT_DTYPES[opts["compute_dtype"]]), stats, rank, method, opts)


def truncate(W: torch.Tensor, scaling: Scaling, rank: int, method: str) -> LowRankFactors:
    """Rank-`rank` factors of W under a fitted `scaling` (math in its compute dtype, factors in W's)."""
    check_rank(rank, *W.shape)
    left, right, sigma = _truncate(W, scaling, rank)
    diagonal_col = scaling.col if scaling.col is not None and scaling.col.ndim == 1 else None
    return LowRankFactors(
        left=left.to(W.dtype),
        right=right.to(W.dtype),
        scaled_singular_values=sigma.to(W.dtype),
        method=method,
        row_scale=None if scaling.row is None else scaling.row.to(W.dtype),
        col_scale=None if diagonal_col is None else diagonal_col.to(W.dtype),
        jitter=scaling.jitter,
    )


def scaled_spectrum(
    W: torch.Tensor,
    stats: ActivationStats | None,
    method: str = "svd",
    rank: int | None = None,
    **options: object,
) -> torch.Tensor:
    """Singular values of the scaled matrix each method truncates (float64): what the app plots."""
    return singular_values(scaled_matrix(W, stats, method, rank, **options))


# loss(k) = Σ_{i,j>k} σ_i σ_j (u_iᵀ S_row⁻² u_j) (v_iᵀ S_col⁻¹ G S_col⁻ᵀ v_j): the error of keeping k
# triplets of W_s is their tail, mapped back through the scaling and weighed by the Gram. One SVD gives
# every rank at once as the diagonal of a 2-D suffix sum.
def loss_curve(
    W: torch.Tensor,
    stats: ActivationStats,
    method: str = "svd",
    rank: int | None = None,
    eval_stats: ActivationStats | None = None,
    **options: object,
) -> torch.Tensor:
    """Relative activation loss ‖(W−W′_k)X‖²/‖WX‖² for every rank k = 0..min(m, n) (float64, length r+1).

    The scaling is fitted on `stats` (for sigmascale: learned at `rank`, then held fixed for the other
    ranks); the loss is measured on `eval_stats` when given (held-out tokens), else on `stats`.
    """
    measured = stats if eval_stats is None else eval_stats
    return method_curves(W, stats, method, rank, (measured,), **options)[1][0]


def method_curves(
    W: torch.Tensor,
    stats: ActivationStats,
    method: str,
    rank: int | None,
    measured: tuple[ActivationStats, ...],
    **options: object,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(σ of the scaled matrix `method` truncates, [its loss curve on each of `measured`]), float64
    whatever `compute_dtype` says (it sets how `decompose` truncates; these are the views of it).

    The scaling is fitted once on `stats` and one eigendecomposition serves every curve: what the app
    shows per matrix (calibration and held-out curves) costs one fit, not one per curve.
    """
    opts = _options(method, options)
    _check_inputs(W, stats, method)
    if method == "sigmascale" and rank is not None:
        check_rank(rank, *W.shape)
    for s in measured:
        check_stats(s, W.shape[1])
    W64 = W.to(torch.float64)
    scaling = _fit_scaling(W64, stats, rank, method, opts)
    Ws = scaling.apply(W64)
    transpose = W64.shape[0] < W64.shape[1]
    eigenvalues, V = gram_eigh(Ws.mT if transpose else Ws)
    sigma = eigenvalues.sqrt()
    live = sigma > sigma[0] * torch.finfo(torch.float64).eps
    U = ((Ws.mT if transpose else Ws) @ V)[:, live] / sigma[live]  # thin left vectors of the live part
    V, sigma = V[:, live], sigma[live]
    if transpose:
        U, V = V, U
    # A = Uᵀ S_row⁻² U,  B = Vᵀ S_col⁻¹ G S_col⁻ᵀ V   (r × r each)
    U_back = scaling.unapply_left(U)
    A = U_back.mT @ U_back
    V_back = scaling.unapply_right(V.mT)  # (r, n) = Vᵀ S_col⁻¹
    curves = []
    for s in measured:
        gram = s.gram.to(device=W.device, dtype=torch.float64)
        reference = gram_error(W64, gram)
        if reference <= 0:
            raise ValueError("‖WX‖² is zero on these stats: the relative loss is undefined")
        B = V_back @ gram @ V_back.mT
        M = sigma[:, None] * sigma[None, :] * A * B
        suffix = M.flip((0, 1)).cumsum(0).cumsum(1).flip((0, 1))  # suffix[i, j] = Σ_{i'≥i, j'≥j} M
        tail = torch.zeros(min(W.shape) + 1, dtype=torch.float64, device=W.device)
        tail[: sigma.numel()] = suffix.diagonal().clamp_min(0)
        curves.append(tail / reference)
    return singular_values(Ws), curves


def learn_scaling(
    W: torch.Tensor,
    gram: torch.Tensor,
    abs_mean: torch.Tensor,
    rank: int,
    steps: int = 20,
    lr: float = 0.05,
    init: str = "whiten",
    alpha: float = 0.5,
    l2: float = 1e-4,
    seed: int = 0,
    init_noise: float = 0.0,
    shrink: float = 0.01,
    compute_dtype: str = "float64",
) -> Scaling:
    """SigmaScale: learn log-scales r (m), c (n) minimising ‖(W − W′)X‖²/‖WX‖² + l2·(mean r² + mean c²),
    W′ = diag(e⁻ʳ)·T_k(diag(eʳ) W diag(eᶜ))·diag(e⁻ᶜ), by Adam through the rank-k truncation.

    The loop runs in float32 on W's device with the loss in Gram form (cost independent of the token
    count) and the eigh-based truncation gradient. The gauge (r + t, c − t) leaves W′ unchanged, so t is
    fixed after every step to the value that minimises the L2 term. The returned scaling is the best
    iterate, checked in float64 against the initialisation, so the result is never worse than its start.

    init="whiten" learns the same diagonal scales on W̃ = W·L under the Gram G̃ = L⁻¹·G·L⁻ᵀ, L the
    whitening factor of shrunk_gram(G, shrink): ‖(W − W′)X‖² is unchanged by that change of variables,
    the start (r = c = 0) is svdllm's truncation (with the same shrink), and S_col = L·diag(eᶜ) stays
    lower-triangular. At shrink = 0, G̃ = I and whitening is already optimal; with shrink > 0 the scales
    recover part of what shrinking gave up on the calibration tokens. W̃ is formed in `compute_dtype`,
    G̃ (two triangular solves with L: conditioning) and the check in float64; a wide W (m < n) needs
    only W̃·G̃·W̃ᵀ = W·G·Wᵀ, so it skips the solves.
    """
    check_options(
        "sigmascale",
        {
            "steps": steps,
            "lr": lr,
            "init": init,
            "alpha": alpha,
            "l2": l2,
            "seed": seed,
            "init_noise": init_noise,
            "shrink": shrink,
            "compute_dtype": compute_dtype,
        },
    )
    dtype = FLOAT_DTYPES[compute_dtype]
    L, jitter, output_gram = None, 0.0, None
    if init == "whiten":
        gram = gram.to(device=W.device, dtype=torch.float64)
        L, jitter = whitening_factor(shrunk_gram(gram, shrink))
        if W.shape[0] < W.shape[1]:  # the loss reads only W̃·G̃·W̃ᵀ = W·G·Wᵀ: no solves with L (n³)
            W64 = W.to(torch.float64)
            output_gram = W64 @ gram @ W64.mT
            output_gram, gram = (output_gram + output_gram.mT) / 2, None
        else:
            Linv_G = torch.linalg.solve_triangular(L, gram, upper=False)  # L⁻¹·G
            gram = torch.linalg.solve_triangular(L, Linv_G.mT, upper=False)  # L⁻¹·(L⁻¹·G)ᵀ = L⁻¹·G·L⁻ᵀ
            gram = (gram + gram.mT) / 2
        W = W.to(dtype) @ L.to(dtype)  # W̃ = W·L
        init = "identity"
    with torch.inference_mode(False), torch.enable_grad():  # callable from under no_grad/inference_mode
        start, best = _adam_on_scales(
            W, gram, abs_mean, rank, steps, lr, init, alpha, l2, seed, init_noise, output_gram
        )
    if best is not start:
        exact = truncation_loss(W.to(torch.float64), _float64(gram), rank, _float64(output_gram))
        best = min((best, start), key=lambda rc: float(exact(rc[0].double(), rc[1].double())))
    row, col = best[0].double().exp(), best[1].double().exp()
    col = col if L is None else L * col  # L·diag(eᶜ)
    return Scaling(row=row, col=col, jitter=jitter, compute_dtype=dtype)


def choose_shrink(
    W: torch.Tensor,
    stats: ActivationStats,
    heldout: ActivationStats,
    rank: int,
    method: str = "svdllm",
    grid: tuple[float, ...] = SHRINK_GRID,
    **options: object,
) -> tuple[float, dict[float, float]]:
    """(λ, {λ: held-out loss}): the shrink of `grid` whose scaling, fitted on `stats`, loses least at
    `rank` on the `heldout` tokens (ties: the smaller λ). Whitening is the exact optimum on the tokens
    it was fitted on, so only other tokens can say how much shrinking it generalises better."""
    if not grid:
        raise ValueError("choose_shrink needs a non-empty grid of λ")
    learned_at = rank if method == "sigmascale" else None
    losses = {}
    for shrink in grid:
        curve = loss_curve(W, stats, method, learned_at, eval_stats=heldout, **{**options, "shrink": shrink})
        losses[float(shrink)] = float(curve[rank])
    return min(sorted(losses), key=losses.__getitem__), losses


def truncation_loss(
    W: torch.Tensor, gram: torch.Tensor | None, rank: int, output_gram: torch.Tensor | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """loss(r, c) = ‖(W − W′)X‖²/‖WX‖² of the rank-k scaled truncation, differentiable in the log-scales.

    W′ = diag(e⁻ʳ)·T_k(diag(eʳ) W diag(eᶜ))·diag(e⁻ᶜ) depends on the scaled matrix only through its
    kept subspace on W's smaller side, so the loss lives there. With P the projector onto the dropped
    part of that subspace (eigenvectors of S) and D_r = diag(eʳ), D_c = diag(eᶜ), G the Gram:
      m ≥ n:  tr(P·A·P·B),  S = D_c Wᵀ D_r² W D_c,  A = D_c WᵀW D_c,  B = D_c⁻¹ G D_c⁻¹;
      m < n:  tr(P·A·P·B),  S = D_r W D_c² Wᵀ D_r,  A = D_r W G Wᵀ D_r,  B = D_r⁻².
    One product of W's size per call (S) and the rest in min(m, n)³, where the explicit
    ‖(W − W′)X‖² costs several m·n·min(m, n) products forward and backward. For m < n the loss reads
    the Gram only through the outputs' Gram W·G·Wᵀ: pass it as `output_gram` (then `gram` may be None).
    """
    m, n = W.shape
    if m >= n:
        reference = gram_error(W, gram)
        WtW = W.mT @ W

        def loss(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            col = c.exp()
            S = col[:, None] * (W.mT @ ((2 * r).exp()[:, None] * W)) * col
            P = tail_projector(S, rank)
            A = col[:, None] * WtW * col
            return ((P @ A @ P) * (gram / col[:, None] / col)).sum() / reference

    else:
        WGWt = W @ gram @ W.mT if output_gram is None else output_gram
        reference = WGWt.diagonal().sum()  # ‖WX‖² = tr(W·G·Wᵀ)

        def loss(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            row = r.exp()
            S = row[:, None] * ((W * (2 * c).exp()) @ W.mT) * row
            P = tail_projector(S, rank)
            A = row[:, None] * WGWt * row
            return (((P @ A) * P).sum(1) * (-2 * r).exp()).sum() / reference  # B diagonal

    return loss


def _adam_on_scales(
    W: torch.Tensor,
    gram: torch.Tensor,
    abs_mean: torch.Tensor,
    rank: int,
    steps: int,
    lr: float,
    init: str,
    alpha: float,
    l2: float,
    seed: int,
    init_noise: float,
    output_gram: torch.Tensor | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The optimisation loop of `learn_scaling`: returns (start, best iterate) as (r, c) pairs; the
    loss from `gram`, or from `output_gram` for m < n (see truncation_loss)."""
    m, n = W.shape
    W32 = W.to(torch.float32).clone()

    def tame(G: torch.Tensor | None) -> torch.Tensor | None:  # float32, mean diagonal 1: tame fp32 sums
        if G is None:
            return None
        G32 = G.to(torch.float32).clone()
        G32 /= G32.diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny)
        return G32

    loss_of = truncation_loss(W32, tame(gram), rank, tame(output_gram))
    r = torch.zeros(m, dtype=torch.float32, device=W.device)
    c = torch.zeros(n, dtype=torch.float32, device=W.device)
    if init == "asvd":
        c = asvd_col_scale(abs_mean, alpha).log().to(torch.float32)
    if init_noise > 0:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        r = r + init_noise * torch.randn(m, generator=generator).to(W.device)
        c = c + init_noise * torch.randn(n, generator=generator).to(W.device)
    start = _fix_gauge(r, c)
    r, c = start[0].clone().requires_grad_(True), start[1].clone().requires_grad_(True)
    optimizer = torch.optim.Adam([r, c], lr=lr)
    # The best iterate is tracked on the device (torch.where, no .item()): a GPU never waits for the
    # host inside the loop. `moved` says whether any step beat the start.
    best_r, best_c = start[0].clone(), start[1].clone()
    best_loss = torch.full((), math.inf, dtype=torch.float32, device=W.device)
    moved = torch.zeros((), dtype=torch.bool, device=W.device)
    for step in range(steps + 1):  # pass `steps` only measures the last iterate
        loss = loss_of(r, c)
        improved = loss.detach() < best_loss
        best_loss = torch.where(improved, loss.detach(), best_loss)
        if step > 0:
            moved = moved | improved
            best_r = torch.where(improved, r.detach(), best_r)
            best_c = torch.where(improved, c.detach(), best_c)
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        (loss + l2 * (r.square().mean() + c.square().mean())).backward()
        optimizer.step()
        with torch.no_grad():
            r_fixed, c_fixed = _fix_gauge(r, c)
            r.copy_(r_fixed)
            c.copy_(c_fixed)
    return start, ((best_r, best_c) if bool(moved) else start)  # one host sync, after the loop


def _float64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float64)


def _fix_gauge(r: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r + t, c − t) with t = (Σc − Σr)/(m + n), the shift that minimises ‖r‖² + ‖c‖²."""
    t = (c.sum() - r.sum()) / (r.numel() + c.numel())
    return r + t, c - t


def scaled_matrix(
    W: torch.Tensor,
    stats: ActivationStats | None,
    method: str = "svd",
    rank: int | None = None,
    **options: object,
) -> torch.Tensor:
    """W_s = S_row·W·S_col, the matrix `method` truncates (float64): what its spectral diagnostics describe."""
    opts = _options(method, options)
    _check_inputs(W, stats, method)
    W64 = W.to(torch.float64)
    return _fit_scaling(W64, stats, rank, method, opts).apply(W64)
