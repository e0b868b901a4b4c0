"""Per-matrix spectra and loss curves, and their disk cache (what the compute service fills).

Three kinds of result, each computed once and cached:
- weights: σ(W) of every matrix, per decoder layer; needs no calibration (model fingerprint only);
- cheap: for svd, asvd and svdllm, σ of the scaled matrix and the relative activation loss at every
  rank on the calibration and the held-out tokens, per decoder layer (one fit and one
  eigendecomposition per method: `methods.method_curves`);
- learned: SigmaScale's scaling learned at one rank of one matrix, applied at every rank.

Files: cache_root()/spectra/<model>-L<layer>-weights.safetensors, <digest>-L<layer>.safetensors and
<digest>-<matrix>-sigmascale-r<rank>.safetensors, where the digest covers the model fingerprint, both
stats cache keys and the methods' options; written atomically with a content checksum, and an
unreadable, corrupt or foreign file is recomputed. The spectral diagnostics (WeightWatcher's) of each
file's matrices go to a file of the same name in spectra/diagnostics/, keyed by the same metadata.

Nothing here imports Streamlit; the app calls these functions (through compute.py) and draws the results.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sigmascale_core.artifacts import cache_root, read_tensors, save_tensors_atomic
from sigmascale_core.calibration import STATS_FORMAT, stats_key
from sigmascale_core.diagnostics import FIELDS, FLAGS, diagnostics
from sigmascale_core.methods import METHOD_OPTIONS, method_curves
from sigmascale_core.models import MatrixRef
from sigmascale_core.spectral import singular_values
from sigmascale_core.stats import ActivationStats

SPECTRA_FORMAT = "2"  # bump when the layout of a spectra file changes
CHEAP_METHODS = ("svd", "asvd", "svdllm")  # computed for every matrix
SPLITS = ("calibration", "heldout")  # which tokens a loss curve is measured on


# ---------------------------------------------------------------------------------------------------
# Keys and paths


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


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", name)


def sigmascale_path(key: SpectraKey, name: str, rank: int) -> Path:
    return spectra_dir() / f"{key.digest}-{slug(name)}-sigmascale-r{rank}.safetensors"


def weights_path(fingerprint: str, layer: int) -> Path:
    return spectra_dir() / f"{fingerprint}-L{layer:03d}-weights.safetensors"


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
    sigma, (calibration, held) = method_curves(W, stats, method, rank, (stats, heldout))
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
    """The arrays of a spectra file, or None when it is missing, corrupt or written for another key."""
    read = read_tensors(path)
    if read is None:
        return None
    tensors, meta = read
    if meta.get("format") != SPECTRA_FORMAT or meta.get("key") != meta_key:
        return None
    return {name: t.numpy() for name, t in tensors.items()}


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


def _weights_meta_key(fingerprint: str, layer: int, refs: Sequence[MatrixRef]) -> str:
    return json.dumps({"model": fingerprint, "layer": layer, "shapes": {r.kind: r.shape for r in refs}})


def load_weights_layer(fingerprint: str, refs: Sequence[MatrixRef]) -> dict[str, np.ndarray] | None:
    """{matrix name: σ(W)} of one layer, or None if not (validly) cached."""
    layer = refs[0].layer
    arrays = _read(weights_path(fingerprint, layer), _weights_meta_key(fingerprint, layer, refs))
    if arrays is None:
        return None
    out = {}
    for ref in refs:
        sigma = arrays.get(ref.kind)
        if sigma is None or sigma.shape != (min(ref.shape),) or not np.isfinite(sigma).all():
            return None
        out[ref.name] = sigma
    return out


def compute_weights_layer(
    fingerprint: str, refs: Sequence[MatrixRef], weights: dict[str, torch.Tensor]
) -> dict[str, np.ndarray]:
    """σ(W) of one layer's matrices (float64), saved atomically to the layer's weights file."""
    out = {ref.name: singular_values(weights[ref.name].to(torch.float64)).cpu().numpy() for ref in refs}
    tensors = {ref.kind: torch.from_numpy(np.ascontiguousarray(out[ref.name])) for ref in refs}
    layer = refs[0].layer
    meta = {"format": SPECTRA_FORMAT, "key": _weights_meta_key(fingerprint, layer, refs)}
    save_tensors_atomic(tensors, weights_path(fingerprint, layer), meta)
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


def learned_files(key: SpectraKey, folder: Path | None = None) -> dict[str, list[int]]:
    """{matrix slug: ranks} of the learned SigmaScale files of `key` present in the cache (one listing;
    the files are validated when read); `folder=diagnostics_dir()` lists their diagnostics instead."""
    prefix, suffix = f"{key.digest}-", ".safetensors"
    out: dict[str, list[int]] = {}
    folder = spectra_dir() if folder is None else folder
    if not folder.is_dir():
        return out
    for entry in os.scandir(folder):
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(suffix) and "-sigmascale-r" in name):
            continue
        slug, _, rank = name[len(prefix) : -len(suffix)].rpartition("-sigmascale-r")
        if rank.isdigit():
            out.setdefault(slug, []).append(int(rank))
    return out


# ---------------------------------------------------------------------------------------------------
# Spectral diagnostics (diagnostics.py) of W and of each method's scaled matrix, cached beside the spectra
#
# "svd" stands for W itself and alone gets the shuffled-W numbers (correlation traps): shuffling W·S
# would spread the scaling's loud columns over every column and measure the scaling, not the training.
# The scaled matrices' diagnostics need only their σ, which the spectra files already hold.

DIAGNOSTICS_FORMAT = "1"  # bump when the diagnostics' definitions change
SCALED_METHODS = ("asvd", "svdllm")  # the cheap methods whose scaled matrix is not W


def diagnostics_dir() -> Path:
    return spectra_dir() / "diagnostics"


def diagnostics_path(spectra_file: Path) -> Path:
    """Where the diagnostics of a spectra file's matrices go: the same name, in `diagnostics_dir()`."""
    return diagnostics_dir() / spectra_file.name


def _diagnostics_meta_key(spectra_meta_key: str) -> str:
    return json.dumps({"diagnostics": DIAGNOSTICS_FORMAT, "fields": FIELDS, "spectra": spectra_meta_key})


def _save_diagnostics(path: Path, spectra_meta_key: str, entries: dict[str, dict[str, float]]) -> None:
    """One float64 vector per entry, in `FIELDS` order (flags as 0/1), checksummed and atomic."""
    tensors = {
        entry: torch.tensor([float(values[f]) for f in FIELDS], dtype=torch.float64)
        for entry, values in entries.items()
    }
    meta = {"format": SPECTRA_FORMAT, "key": _diagnostics_meta_key(spectra_meta_key)}
    save_tensors_atomic(tensors, path, meta)


def _load_diagnostics(
    path: Path, spectra_meta_key: str, entries: Sequence[str]
) -> dict[str, dict[str, float]] | None:
    """{entry: diagnostics dict} as `Diagnostics.to_dict` gives it, or None unless every entry is there."""
    arrays = _read(path, _diagnostics_meta_key(spectra_meta_key))
    if arrays is None:
        return None
    out = {}
    for entry in entries:
        vector = arrays.get(entry)
        if vector is None or vector.shape != (len(FIELDS),):
            return None
        out[entry] = {
            f: bool(x) if f in FLAGS else float(x) for f, x in zip(FIELDS, vector.tolist(), strict=True)
        }
    return out


def compute_weights_diagnostics(
    fingerprint: str,
    refs: Sequence[MatrixRef],
    sigmas: dict[str, np.ndarray],
    weights: dict[str, torch.Tensor],
) -> dict[str, dict[str, float]]:
    """{matrix name: diagnostics of W} of one layer (with the shuffled-W comparison), saved atomically."""
    out = {
        r.name: diagnostics(
            sigmas[r.name], r.shape, W=weights[r.name].to(torch.float64).cpu().numpy()
        ).to_dict()
        for r in refs
    }
    layer = refs[0].layer
    path = diagnostics_path(weights_path(fingerprint, layer))
    _save_diagnostics(path, _weights_meta_key(fingerprint, layer, refs), {r.kind: out[r.name] for r in refs})
    return out


def load_weights_diagnostics(
    fingerprint: str, refs: Sequence[MatrixRef]
) -> dict[str, dict[str, float]] | None:
    layer = refs[0].layer
    path = diagnostics_path(weights_path(fingerprint, layer))
    read = _load_diagnostics(path, _weights_meta_key(fingerprint, layer, refs), [r.kind for r in refs])
    return None if read is None else {r.name: read[r.kind] for r in refs}


def compute_layer_diagnostics(
    key: SpectraKey, refs: Sequence[MatrixRef], cheap: dict[str, dict[str, MethodSpectrum]]
) -> dict[str, dict[str, dict[str, float]]]:
    """{matrix name: {method: diagnostics}} of asvd's and svdllm's scaled matrices of one layer, saved."""
    out = {
        r.name: {m: diagnostics(cheap[r.name][m].sigma, r.shape).to_dict() for m in SCALED_METHODS}
        for r in refs
    }
    layer = refs[0].layer
    entries = {f"{r.kind}.{m}": out[r.name][m] for r in refs for m in SCALED_METHODS}
    _save_diagnostics(diagnostics_path(layer_path(key, layer)), _layer_meta_key(key, layer, refs), entries)
    return out


def load_layer_diagnostics(
    key: SpectraKey, refs: Sequence[MatrixRef]
) -> dict[str, dict[str, dict[str, float]]] | None:
    layer = refs[0].layer
    names = [f"{r.kind}.{m}" for r in refs for m in SCALED_METHODS]
    read = _load_diagnostics(
        diagnostics_path(layer_path(key, layer)), _layer_meta_key(key, layer, refs), names
    )
    return (
        None if read is None else {r.name: {m: read[f"{r.kind}.{m}"] for m in SCALED_METHODS} for r in refs}
    )


def compute_sigmascale_diagnostics(
    key: SpectraKey, ref: MatrixRef, spectrum: MethodSpectrum
) -> dict[str, float]:
    """Diagnostics of the matrix SigmaScale's scaling (learned at `spectrum.rank`) makes, saved."""
    out = diagnostics(spectrum.sigma, ref.shape).to_dict()
    path = diagnostics_path(sigmascale_path(key, ref.name, spectrum.rank))
    _save_diagnostics(path, _sigmascale_meta_key(key, ref, spectrum.rank), {"sigmascale": out})
    return out


def load_sigmascale_diagnostics(key: SpectraKey, ref: MatrixRef, rank: int) -> dict[str, float] | None:
    path = diagnostics_path(sigmascale_path(key, ref.name, rank))
    read = _load_diagnostics(path, _sigmascale_meta_key(key, ref, rank), ["sigmascale"])
    return None if read is None else read["sigmascale"]


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
