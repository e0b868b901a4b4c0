"""compute_dtype="float32" against the float64 default: loss on real weights, time at Llama-8B shapes.

    python bench/bench_compute_dtype.py --json bench/results/compute_dtype.json
    python bench/bench_compute_dtype.py --shapes k/v,q/o --json out.json     # fewer 8B shapes
    python bench/bench_compute_dtype.py --skip-bundled --shapes down --update --json J  # redo rows of J
    python bench/bench_compute_dtype.py --table bench/results/compute_dtype.json      # the README table

1. SmolLM2 (the bundled model, its README calibration statistics: 32 × 512 tokens): every one of the 210
   matrices at retention 0.75 by svdllm in float64, in float32 (`compute_dtype="float32"`: one float32
   SVD of W·L) and by the rejected float32 route (the Gram's eigh, float64's algorithm, run in float32),
   each loss ‖(W−W′)X‖²/‖WX‖² recomputed in float64 from the float64 Gram; sigmascale (the default
   options, 20 steps) in both dtypes on every third layer.
2. Llama-3.1-8B shapes with random weights and synthetic statistics (bench_scale.py's): svdllm and
   sigmascale's fixed part (steps=0: Cholesky, W·L, the whitened Gram, the truncation) timed in both
   dtypes alternately in one process, as a ratio; their losses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import SHAPES, synthetic_problem

from sigmascale_core import activation_loss, decompose, rank_for_retention
from sigmascale_core.artifacts import write_text_atomic
from sigmascale_core.calibration import stats_key
from sigmascale_core.methods import fit_scaling
from sigmascale_core.models import GROUP_OF_KIND, get_module, load_model, target_matrices
from sigmascale_core.pipeline import CalibrationConfig, calibrate
from sigmascale_core.spectral import gram_eigh

RETENTION = 0.75
CALIBRATION = CalibrationConfig(samples=32, seq_len=512, seed=0)  # the README tables' statistics


def gram_route_float32(W: torch.Tensor, stats, rank: int) -> torch.Tensor:
    """svdllm's W′ through float64's algorithm run in float32 (eigh of (W·L)ᵀ(W·L), λ ≤ n·ε·λ₀ cut)."""
    scaling = fit_scaling(W, stats, "svdllm")
    L = scaling.col.float()
    Ws = W.float() @ L
    side = Ws if Ws.shape[0] >= Ws.shape[1] else Ws.mT
    eigenvalues, V = gram_eigh(side)
    live = eigenvalues[:rank] > side.shape[1] * torch.finfo(torch.float32).eps * eigenvalues[0]
    V_k = V[:, :rank][:, live]
    kept = side @ V_k @ V_k.mT
    kept = kept if Ws.shape[0] >= Ws.shape[1] else kept.mT
    return torch.linalg.solve_triangular(L, kept, upper=False, left=False)


def bundled_rows(sigmascale_every: int) -> list[dict]:
    loaded = load_model()
    stats, _ = calibrate(loaded, CALIBRATION)
    rows = []
    for ref in target_matrices(loaded.model):
        W = get_module(loaded.model, ref.name).weight.detach().double()
        s = stats[stats_key(ref.layer, GROUP_OF_KIND[ref.kind])]
        rank = rank_for_retention(*W.shape, RETENTION)
        row = {"matrix": ref.name, "rank": rank}
        for label, options in (("svdllm64", {}), ("svdllm32", {"compute_dtype": "float32"})):
            row[label] = activation_loss(W, decompose(W, s, rank, "svdllm", **options).to_dense(), s)
        row["svdllm32_gram_route"] = activation_loss(W, gram_route_float32(W, s, rank), s)
        if ref.layer % sigmascale_every == 0:
            for label, options in (("sigmascale64", {}), ("sigmascale32", {"compute_dtype": "float32"})):
                factors = decompose(W, s, rank, "sigmascale", **options)
                row[label] = activation_loss(W, factors.to_dense(), s)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def ratio_summary(rows: list[dict], label: str, reference: str) -> dict:
    ratios = [row[label] / row[reference] for row in rows if label in row]
    return {
        "matrices": len(ratios),
        "median": statistics.median(ratios),
        "max": max(ratios),
        "min": min(ratios),
    }


def shape_rows(kinds: list[str], device: torch.device) -> list[dict]:
    rows = []
    for i, (kind, (m, n)) in enumerate(SHAPES.items()):
        if kind not in kinds:
            continue
        W, stats = synthetic_problem(m, n, device, seed=i)
        rank = rank_for_retention(m, n, RETENTION)
        row: dict = {"shape": kind, "m": m, "n": n, "rank": rank}
        for method, options in (("svdllm", {}), ("sigmascale", {"steps": 0})):
            for dtype in ("float64", "float32"):  # alternately, so both see the same machine load
                start = time.perf_counter()
                factors = decompose(W, stats, rank, method, compute_dtype=dtype, **options)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                row[f"{method}_{dtype}_s"] = time.perf_counter() - start
                row[f"{method}_{dtype}_loss"] = activation_loss(W, factors.to_dense(), stats)
            row[f"{method}_float32_speedup"] = row[f"{method}_float64_s"] / row[f"{method}_float32_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(result: dict) -> str:
    """The README's 8B-shape table from a results JSON."""
    lines = [
        "| shape | rank | svdllm float64 s | float32 s | float64 / float32 time | sigmascale fixed part float64 s "
        "| float32 s | float64 / float32 time | loss float32 / float64 − 1 (svdllm, sigmascale) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["shapes_8b"]:
        drift = [r[f"{m}_float32_loss"] / r[f"{m}_float64_loss"] - 1 for m in ("svdllm", "sigmascale")]
        lines.append(
            f"| {r['shape']} {r['m']}×{r['n']} | {r['rank']} | {r['svdllm_float64_s']:.1f} | "
            f"{r['svdllm_float32_s']:.1f} | {r['svdllm_float32_speedup']:.2f}× | "
            f"{r['sigmascale_float64_s']:.1f} | {r['sigmascale_float32_s']:.1f} | "
            f"{r['sigmascale_float32_speedup']:.2f}× | {drift[0]:.1e}, {drift[1]:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"8B shapes to time, of {list(SHAPES)}")
    parser.add_argument("--sigmascale-every", type=int, default=3, help="sigmascale on every N-th layer")
    parser.add_argument("--skip-bundled", action="store_true", help="only the 8B shapes")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--update", action="store_true", help="keep what --json holds; replace only the rows measured now"
    )
    parser.add_argument("--table", type=Path, help="only print the README table of this results JSON")
    args = parser.parse_args()
    if args.table is not None:
        print(markdown(json.loads(args.table.read_text())))
        return
    result: dict = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "retention": RETENTION,
    }
    if args.update and args.json is not None and args.json.exists():
        result = {**json.loads(args.json.read_text()), **result}
    if not args.skip_bundled:
        rows = bundled_rows(args.sigmascale_every)
        result["bundled"] = {
            "svdllm32_over_64": ratio_summary(rows, "svdllm32", "svdllm64"),
            "gram_route32_over_64": ratio_summary(rows, "svdllm32_gram_route", "svdllm64"),
            "sigmascale32_over_64": ratio_summary(rows, "sigmascale32", "sigmascale64"),
            "rows": rows,
        }
    measured = shape_rows(args.shapes.split(","), torch.device(args.device))
    rows = {row["shape"]: row for row in [*result.get("shapes_8b", []), *measured]}  # measured rows win
    result["shapes_8b"] = [rows[kind] for kind in SHAPES if kind in rows]
    text = json.dumps(result, indent=2) + "\n"
    if args.json is not None:
        write_text_atomic(text, args.json)
    print(json.dumps({k: v for k, v in result.get("bundled", {}).items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
