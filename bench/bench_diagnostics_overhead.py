"""What the spectral diagnostics add to the compute service's work, per layer, on a cached model.

    OMP_NUM_THREADS=1 SIGMASCALE_CACHE=/tmp/cache python bench/bench_diagnostics_overhead.py

Reads every σ the service has cached for the model (run `sigmascale spectra --diagnostics` or the app
first, same calibration options), then times the three diagnostics tasks of each layer (written to a
temporary cache, the real one is left alone) next to the σ(W) task they follow.

Measured (SmolLM2-135M, 30 layers × 7 matrices, ≤ 576 singular values, 1 thread, CPU): σ(W) task
0.22 s per layer; diagnostics of W 0.20 s per layer (the shuffled-W ESD is most of it: 0.09 s per layer
with an SVD per matrix before it used the smaller Gram's eigenvalues, 3× faster), of asvd + svdllm
0.05 s, of SigmaScale 0.03 s (7 matrices). Together ≈ 0.28 s per layer against ≈ 21 s of the
service's other work per layer (σ(W) 0.2, calibration 5.1, cheap curves 5.7, learned 10.8): 1.3 %.
The W diagnostics of all layers run before the calibration sweep and delay it by ≈ 6 s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from sigmascale_core import spectra
from sigmascale_core.compute import ComputeService, ServiceConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    service = ComputeService(ServiceConfig(args.model))
    bank = service.run_here(lambda bank: True).bank  # lays the model out and reads the cache only
    rank_of = service._reference_rank
    os.environ["SIGMASCALE_CACHE"] = tempfile.mkdtemp()
    times: dict[str, list[float]] = {"weights σ(W)": [], "W": [], "asvd+svdllm": [], "sigmascale": []}
    for layer, refs in spectra.layers_of(bank.refs).items():
        start = time.perf_counter()
        sigmas = spectra.compute_weights_layer("bench", refs, service._weights)
        times["weights σ(W)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        spectra.compute_weights_diagnostics("bench", refs, sigmas, service._weights)
        times["W"].append(time.perf_counter() - start)
        if all(r.name in bank.cheap for r in refs):
            start = time.perf_counter()
            spectra.compute_layer_diagnostics(service.key, refs, {r.name: bank.cheap[r.name] for r in refs})
            times["asvd+svdllm"].append(time.perf_counter() - start)
        learned = [
            (r, bank.learned[r.name][rank_of(r)]) for r in refs if rank_of(r) in bank.learned.get(r.name, {})
        ]
        if len(learned) == len(refs):
            start = time.perf_counter()
            for ref, spectrum in learned:
                spectra.compute_sigmascale_diagnostics(service.key, ref, spectrum)
            times["sigmascale"].append(time.perf_counter() - start)
        print(
            f"layer {layer}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items() if len(v) > layer)
        )
    for kind, values in times.items():
        if values:
            print(
                f"{kind:>14}: {np.mean(values):.3f} s per layer (max {np.max(values):.3f}, {len(values)} layers)"
            )


if __name__ == "__main__":
    main()
