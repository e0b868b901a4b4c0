"""Time break-even against parameter break-even, per matrix shape, and what keep_dense_if_slower costs.

    OMP_NUM_THREADS=1 python bench/bench_break_even.py --json bench/results/break_even.json
    OMP_NUM_THREADS=1 python bench/bench_break_even.py --models Llama-3.1-8B --dtypes float32 \
        --tokens 1 --repeats 9 --json bench/results/break_even_llama.json

Shapes (out, in) of the bundled SmolLM2-135M (30 layers) and of Llama-3.1-8B (32 layers). For each
shape, dtype and token count (1: a decode step; 512: a prefill): the largest rank at which x Rᵀ Lᵀ is
faster than x Wᵀ (speed.time_break_even_rank: bisection on speed.matmul_speedup, the median ratio of
`--repeats` alternated timings) next to the parameter break-even mn/(m+n); the speed-up (dense time /
factorised time) at the ranks of uniform retention 0.9 / 0.75 / 0.5 (below 1: the factors are
slower); and, per model and retention, what speed.keep_dense_where_slower keeps dense and the
parameters that costs (the same measurements, reused). Llama's shapes run at 1 token only on this CPU:
a 512-token product of 14336×4096 takes seconds, and a bisection needs ~15 of them, 5 pairs each.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
from bench_inference import device_name

from sigmascale_core.artifacts import write_json_atomic
from sigmascale_core.metrics import rank_for_retention
from sigmascale_core.pipeline import DTYPES, check_device
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.speed import (
    keep_dense_where_slower,
    matmul_speedups,
    parameter_break_even,
    time_break_even_rank,
)

# (layers, {kind: (out, in)}) of each model's target matrices
MODELS = {
    "SmolLM2-135M": (
        30,
        {
            "q": (576, 576),
            "k": (192, 576),
            "v": (192, 576),
            "o": (576, 576),
            "gate": (1536, 576),
            "up": (1536, 576),
            "down": (576, 1536),
        },
    ),
    "Llama-3.1-8B": (
        32,
        {
            "q": (4096, 4096),
            "k": (1024, 4096),
            "v": (1024, 4096),
            "o": (4096, 4096),
            "gate": (14336, 4096),
            "up": (14336, 4096),
            "down": (4096, 14336),
        },
    ),
}
RETENTIONS = (0.9, 0.75, 0.5)


def memoised(speedup):
    """The measurement, each (m, n, rank, tokens) once: keep_dense_where_slower reuses the search's."""
    seen: dict[tuple, float] = {}

    def measured(m, n, rank, tokens):
        key = (m, n, rank, tokens)
        if key not in seen:
            seen[key] = speedup(m, n, rank, tokens)
        return seen[key]

    return measured


def model_plan(model: str, retention: float) -> CompressionPlan:
    layers, kinds = MODELS[model]
    shapes = {f"layers.{i}.{kind}": shape for i in range(layers) for kind, shape in kinds.items()}
    return CompressionPlan.uniform(shapes, retention, "svdllm", model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--tokens", default="1,512")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here (default: stdout)")
    args = parser.parse_args()
    device = check_device(args.device)
    shapes_rows, costs = [], []
    for dtype_name in args.dtypes.split(","):
        speedup = memoised(matmul_speedups(DTYPES[dtype_name], device, args.repeats))
        for tokens in (int(t) for t in args.tokens.split(",")):
            for model in args.models.split(","):
                for m, n in dict.fromkeys(MODELS[model][1].values()):
                    k_time = time_break_even_rank(m, n, tokens, speedup)
                    row = {
                        "model": model,
                        "shape": f"{m}x{n}",
                        "dtype": dtype_name,
                        "tokens": tokens,
                        "time_break_even_rank": k_time,
                        "parameter_break_even_rank": parameter_break_even(m, n),
                        "speedup_at_retention": {
                            str(r): speedup(m, n, rank_for_retention(m, n, r), tokens) for r in RETENTIONS
                        },
                    }
                    shapes_rows.append(row)
                    print(json.dumps(row), flush=True)
                for retention in RETENTIONS:
                    plan = model_plan(model, retention)
                    _, report = keep_dense_where_slower(plan, tokens, speedup, DTYPES[dtype_name], device)
                    cost = {
                        "model": model,
                        "dtype": dtype_name,
                        "tokens": tokens,
                        "retention": retention,
                        "kept_dense": len(report["kept_dense"]),
                        "of": len(plan.compressed),
                        "parameters_cost": report["parameters_cost"],
                        "parameter_retention_before": report["parameter_retention_before"],
                        "parameter_retention_after": report["parameter_retention_after"],
                    }
                    costs.append(cost)
                    print(json.dumps(cost), flush=True)
    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {**vars(args), "json": None if args.json is None else str(args.json)},
        "shapes": shapes_rows,
        "keep_dense_if_slower": costs,
    }
    if args.json:
        write_json_atomic(result, args.json)
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
