"""float32 against float64 calibration Grams (issue 18) on the bundled SmolLM2-135M, svdllm at retention 0.75.

    OMP_NUM_THREADS=1 SIGMASCALE_CACHE=/work/cache-shared python bench/bench_gram_dtype.py \
        --json bench/results/gram_dtype.json

The README tables' calibration (32 × 512 tokens of boolq:calibration, seed 0) is swept twice in this
process on the same tokens, once per Gram dtype (`--gram-dtype`), so both Grams sum bit-identical
activations and differ only by their storage (neither is read from the cache, which may hold files made
under another thread count).
All 210 matrices are fitted by svdllm on each, as `compress` does (factors in the model's float32), and
each matrix's relative activation loss ‖(W−W′)X‖²/‖WX‖² is measured in float64 on the float64 Gram.
Reported: max and median over the matrices of |loss₃₂ − loss₆₄| / loss₆₄, with the factors in float32
(what a saved model holds) and in float64 (the Gram's storage alone), next to the noise floor of
rounding the factors to float32; the Grams' bytes; and the perplexity of both compressed models (and
of the dense one) on the first `--eval-tokens` tokens of boolq:evaluation. About 5 minutes on one thread.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import statistics
import time
from pathlib import Path

import torch

from sigmascale_core.artifacts import write_json_atomic
from sigmascale_core.calibration import stats_key
from sigmascale_core.methods import decompose
from sigmascale_core.metrics import activation_loss
from sigmascale_core.models import GROUP_OF_KIND, get_module, load_model, target_matrices
from sigmascale_core.pipeline import CalibrationConfig, calibrate, evaluate_perplexity, uniform_plan
from sigmascale_core.surgery import apply_factors, fit_factors

CALIBRATION = CalibrationConfig(samples=32, seq_len=512, seed=0)  # the README tables' statistics
EVALUATION = "boolq:evaluation"


def relative(value: float, reference: float) -> float:
    return abs(value - reference) / reference


def spread(rows: list[dict], field: str) -> dict:
    """Max (and which matrix) and median of one column over the matrices."""
    values = [r[field] for r in rows]
    worst = max(rows, key=lambda r: r[field])
    return {"max": max(values), "median": statistics.median(values), "worst_matrix": worst["matrix"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retention", type=float, default=0.75)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="perplexity on this many tokens")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    loaded = load_model(device="cpu")
    plan = uniform_plan(loaded, args.retention, "svdllm")
    dense = copy.deepcopy(loaded.model)
    stats, factors, seconds = {}, {}, {}
    for dtype in ("float32", "float64"):
        start = time.perf_counter()
        config = dataclasses.replace(CALIBRATION, gram_dtype=dtype)
        stats[dtype], _ = calibrate(loaded, config, use_cache=False)
        seconds[f"calibrate_{dtype}"] = time.perf_counter() - start
        start = time.perf_counter()
        factors[dtype] = fit_factors(loaded.model, plan, stats[dtype])
        seconds[f"fit_{dtype}"] = time.perf_counter() - start

    rows = []
    for ref in target_matrices(loaded.model):
        W = get_module(loaded.model, ref.name).weight.detach()
        key = stats_key(ref.layer, GROUP_OF_KIND[ref.kind])
        measured = stats["float64"][key]
        rank = plan.compressed[ref.name].rank
        loss = {d: activation_loss(W, factors[d][ref.name].to_dense(), measured) for d in factors}
        exact = {  # the same fits with float64 factors: the Grams' own effect, without the factors' rounding
            d: activation_loss(W, decompose(W.double(), stats[d][key], rank, "svdllm").to_dense(), measured)
            for d in stats
        }
        rows.append(
            {
                "matrix": ref.name,
                "loss_float64": loss["float64"],
                "loss_float32": loss["float32"],
                "relative_difference": relative(loss["float32"], loss["float64"]),
                "relative_difference_float64_factors": relative(exact["float32"], exact["float64"]),
                "factor_rounding": relative(loss["float64"], exact["float64"]),
            }
        )
    gram_bytes = {d: sum(s.gram.numel() * s.gram.element_size() for s in stats[d].values()) for d in stats}

    perplexities = {}
    for name in ("dense", "float64", "float32"):
        model = copy.deepcopy(dense)
        if name != "dense":
            apply_factors(model, factors[name])
        result = evaluate_perplexity(
            dataclasses.replace(loaded, model=model), [EVALUATION], window=1024, max_tokens=args.eval_tokens
        )
        perplexities[name] = result[EVALUATION]["perplexity"]

    report = {
        "model": loaded.source,
        "method": "svdllm",
        "retention": args.retention,
        "calibration": {"text": CALIBRATION.text, "samples": 32, "seq_len": 512, "seed": 0},
        "matrices": len(rows),
        # |loss(float32 Gram) − loss(float64 Gram)| / loss(float64 Gram), factors in the model's float32
        "relative_loss_difference": spread(rows, "relative_difference"),
        # the same with float64 factors: what the Gram's storage alone changes
        "relative_loss_difference_float64_factors": spread(rows, "relative_difference_float64_factors"),
        # the noise floor: float64-Gram factors rounded to float32 against the same in float64
        "factor_rounding": spread(rows, "factor_rounding"),
        "loss_float64": {
            "median": statistics.median(r["loss_float64"] for r in rows),
            "max": max(r["loss_float64"] for r in rows),
        },
        "gram_gib": {d: b / 2**30 for d, b in gram_bytes.items()},
        "perplexity": {"text": EVALUATION, "tokens": args.eval_tokens, "window": 1024, **perplexities},
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "per_matrix": rows,
    }
    summary = {k: v for k, v in report.items() if k != "per_matrix"}
    print(summary)
    if args.json is not None:
        write_json_atomic(report, args.json)


if __name__ == "__main__":
    main()
