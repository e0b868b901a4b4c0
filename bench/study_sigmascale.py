"""Issue 19: how much of the gap between SigmaScale's learned scaling and whitening (svdllm) can the
learned-scaling idea close on the bundled SmolLM2? Rows, each written to --out as it finishes
(atomically; a rerun skips the rows already there, so the study resumes after an interrupt):

    matrix:NAME:CONFIG   one matrix at uniform 0.75's rank: calibration and held-out loss, seconds
                         (optimiser budget 20/60/200 steps, learning rate, init, shrink)
    shrink:svdllm        λ chosen per matrix by held-out loss (methods.choose_shrink) on a layer subset;
                         the λ with the lowest mean held-out loss over them is the whole-model rows' λ
    model:NAME           whole model: plan (uniform, or greedy on a loss-curve proxy probe), compress,
                         mean per-matrix calibration / held-out loss, perplexity on both evaluation texts

    python bench/study_sigmascale.py --out bench/results/study_sigmascale.json

Calibration as the README's whole-model tables (boolq:calibration, 32 × 512 tokens, seed 0; perplexity
on the first 8,192 tokens of boolq:evaluation and lambada). Held-out tokens for the per-matrix losses
and the choice of λ are calibration-side (boolq:calibration, 8 × 512, seed 1): λ is never chosen on an
evaluation text. --rows limits the run to rows whose name starts with one of the given prefixes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sigmascale_core.artifacts import write_json_atomic
from sigmascale_core.calibration import stats_key
from sigmascale_core.methods import SHRINK_GRID, choose_shrink, fit_scaling, truncate
from sigmascale_core.metrics import activation_loss, rank_for_retention
from sigmascale_core.models import BUNDLED_MODEL, GROUP_OF_KIND, get_module, load_model, target_matrices
from sigmascale_core.pipeline import (
    CalibrationConfig,
    build_plan,
    calibrate,
    compress_sequential,
    evaluate_perplexity,
    probe_config_for,
    uniform_plan,
)
from sigmascale_core.surgery import compress
from sigmascale_core.text import DEFAULT_EVALUATION_TEXTS, shared_token_fraction, token_stream

CALIBRATION = CalibrationConfig(samples=32, seq_len=512, seed=0)  # the README tables' statistics
HELDOUT = CalibrationConfig(samples=8, seq_len=512, seed=1)  # calibration-side, other windows
MAX_EVAL_TOKENS = 8192
MATRICES = (
    "model.layers.10.self_attn.q_proj",
    "model.layers.10.self_attn.k_proj",
    "model.layers.10.mlp.gate_proj",
    "model.layers.10.mlp.down_proj",
)  # as bench_methods.py
SHRINK_LAYERS = (0, 5, 10, 15, 20, 25)  # the layers whose matrices choose λ (all 7 kinds each)
WHITEN = {"init": "whiten"}
SCOPE = (  # what the issue asked for and this CPU budget left out
    "shrunk from the issue's ~4 CPU hours to under 1 h of a shared 2-core CPU: four matrices in the"
    " per-matrix rows, the loss-curve proxy instead of the perplexity probe (> 1 h here); the row"
    " 'model:sigmascale whiten-init uniform 0.75' not run"
)

ASVD = {"init": "asvd"}  # the diagonal fit, sigmascale's default before this study
# name -> (method, options without the chosen shrink, uses the chosen λ)
MATRIX_CONFIGS: dict[str, tuple[str, dict, bool]] = {
    "svdllm": ("svdllm", {}, False),
    "svdllm+shrink": ("svdllm", {}, True),
    "sigmascale asvd-init 20 steps": ("sigmascale", {**ASVD, "steps": 20}, False),
    "sigmascale asvd-init 60 steps": ("sigmascale", {**ASVD, "steps": 60}, False),
    "sigmascale asvd-init 200 steps": ("sigmascale", {**ASVD, "steps": 200}, False),
    "sigmascale asvd-init 60 steps lr 0.02": ("sigmascale", {**ASVD, "steps": 60, "lr": 0.02}, False),
    "sigmascale asvd-init 60 steps lr 0.15": ("sigmascale", {**ASVD, "steps": 60, "lr": 0.15}, False),
    "sigmascale identity-init 60 steps": ("sigmascale", {"steps": 60, "init": "identity"}, False),
    "sigmascale whiten-init 20 steps": ("sigmascale", {**WHITEN, "shrink": 0.0, "steps": 20}, False),
    "sigmascale whiten+shrink 20 steps": ("sigmascale", {**WHITEN, "steps": 20}, True),
    "sigmascale whiten+shrink 60 steps": ("sigmascale", {**WHITEN, "steps": 60}, True),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Study:
    """The model, its statistics and the results file; each row is measured at most once."""

    def __init__(self, out: Path, prefixes: list[str]) -> None:
        self.out = out
        self.prefixes = prefixes
        self.results = json.loads(out.read_text()) if out.exists() else {"settings": {}, "rows": {}}
        self.loaded = load_model(BUNDLED_MODEL)
        self.stats, info = calibrate(self.loaded, CALIBRATION)
        self.heldout, held_info = calibrate(self.loaded, HELDOUT)
        n_tokens = token_stream(self.loaded.tokenizer, self.loaded.family, CALIBRATION.text).numel()
        windows = [(c.samples, c.seq_len, c.seed) for c in (HELDOUT, CALIBRATION)]
        self.results["settings"] = {
            "calibration": dataclasses.asdict(CALIBRATION),
            "heldout": dataclasses.asdict(HELDOUT),
            "heldout_tokens_shared_with_calibration": shared_token_fraction(n_tokens, *windows),
            "evaluation": list(DEFAULT_EVALUATION_TEXTS),
            "max_eval_tokens": MAX_EVAL_TOKENS,
            "torch_threads": torch.get_num_threads(),
            "calibration_seconds": info["seconds"] + held_info["seconds"],
            "scope": SCOPE,
        }
        self.refs = {ref.name: ref for ref in target_matrices(self.loaded.model)}

    def row(self, name: str, measure: Callable[[], dict]) -> dict | None:
        rows = self.results["rows"]
        if name in rows:
            return rows[name]
        if self.prefixes and not any(name.startswith(p) for p in self.prefixes):
            return None
        log(f"measuring {name}")
        started = time.perf_counter()
        rows[name] = {**measure(), "row_seconds": time.perf_counter() - started}
        write_json_atomic(self.results, self.out)
        log(f"{name}: {json.dumps(rows[name])[:300]}")
        return rows[name]

    def matrix_inputs(self, name: str) -> tuple[torch.Tensor, object, object]:
        ref = self.refs[name]
        key = stats_key(ref.layer, GROUP_OF_KIND[ref.kind])
        return get_module(self.loaded.model, name).weight.detach(), self.stats[key], self.heldout[key]

    def losses(self, name: str, W_hat: torch.Tensor) -> tuple[float, float]:
        W, cal, held = self.matrix_inputs(name)
        return activation_loss(W, W_hat, cal), activation_loss(W, W_hat, held)

    # -- rows ---------------------------------------------------------------------------------------
    def matrix_row(self, name: str, config: str, shrink: float) -> dict:
        method, options, shrunk = MATRIX_CONFIGS[config]
        options = {**options, "shrink": shrink} if shrunk else options
        W, cal, _ = self.matrix_inputs(name)
        rank = rank_for_retention(*W.shape, 0.75)
        started = time.perf_counter()
        factors = truncate(W, fit_scaling(W, cal, method, rank, **options), rank, method)
        seconds = time.perf_counter() - started
        calibration, heldout = self.losses(name, factors.to_dense())
        return {
            "method": method,
            "options": options,
            "rank": rank,
            "seconds": seconds,
            "calibration_loss": calibration,
            "heldout_loss": heldout,
        }

    def matrix_shrink(self, name: str) -> dict:
        W, cal, held = self.matrix_inputs(name)
        rank = rank_for_retention(*W.shape, 0.75)
        chosen, losses = choose_shrink(W, cal, held, rank)
        return {"rank": rank, "chosen": chosen, "heldout_loss": {str(k): v for k, v in losses.items()}}

    def shrink_choice(self) -> dict:
        per_matrix = {}
        for name, ref in self.refs.items():
            if ref.layer in SHRINK_LAYERS:
                per_matrix[name] = self.matrix_shrink(name)
        ratio = {  # mean over matrices of held-out loss(λ) / held-out loss(0)
            str(lam): statistics.fmean(
                m["heldout_loss"][str(lam)] / m["heldout_loss"]["0.0"] for m in per_matrix.values()
            )
            for lam in SHRINK_GRID
        }
        chosen = min(SHRINK_GRID, key=lambda lam: ratio[str(lam)])
        counts = {str(lam): sum(m["chosen"] == lam for m in per_matrix.values()) for lam in SHRINK_GRID}
        return {
            "chosen": chosen,
            "mean_heldout_ratio": ratio,
            "chosen_counts": counts,
            "matrices": per_matrix,
        }

    def plan(self, method: str, options: dict, retention: float, probe_method: str) -> tuple:
        """(greedy plan on the loss-curve proxy of `probe_method`, planning info): no forward pass (the
        perplexity probe takes > 1 h on this CPU); probe tables are cached, so a second call is cheap."""
        config = probe_config_for(method, proxy=True, probe_method=probe_method, options=options)
        return build_plan(self.loaded, self.stats, retention, method, options, "greedy", config)

    def plan_comparison(self, method: str, options: dict, retention: float) -> dict:
        own, _ = self.plan(method, options, retention, method)
        other, _ = self.plan(method, options, retention, "svdllm")
        delta = [abs((own.matrices[n].rank or 0) - (other.matrices[n].rank or 0)) for n in own.matrices]
        return {
            "matrices_with_other_rank": sum(d > 0 for d in delta),
            "mean_abs_rank_difference": statistics.fmean(delta),
            "max_abs_rank_difference": max(delta),
        }

    def model_row(
        self, method: str, options: dict, retention: float, allocation: str, probe_method: str | None = None
    ) -> dict:
        """allocation: uniform, greedy (on `probe_method`'s proxy) or sequential (uniform ranks, each
        layer calibrated on the compressed layers before it, with CALIBRATION's windows). The losses are
        on the dense model's statistics either way."""
        loaded = dataclasses.replace(self.loaded, model=copy.deepcopy(self.loaded.model))
        started = time.perf_counter()
        if allocation in ("uniform", "sequential"):
            plan, planning = uniform_plan(loaded, retention, method, options), {}
        else:
            plan, planning = self.plan(method, options, retention, probe_method or method)
        plan_seconds = time.perf_counter() - started
        started = time.perf_counter()
        if allocation == "sequential":
            compress_sequential(loaded, plan, CALIBRATION)
            fitted = {name: get_module(loaded.model, name) for name in plan.compressed}
            dense = {name: m.left.weight @ m.right.weight for name, m in fitted.items()}
        else:
            dense = {name: f.to_dense() for name, f in compress(loaded.model, plan, self.stats).items()}
        compress_seconds = time.perf_counter() - started
        losses = {name: self.losses(name, W_hat.detach()) for name, W_hat in dense.items()}
        perplexity = evaluate_perplexity(loaded, list(DEFAULT_EVALUATION_TEXTS), None, MAX_EVAL_TOKENS)
        return {
            "method": method,
            "options": options,
            "retention": retention,
            "allocation": allocation,
            "probe": None
            if not planning
            else {k: planning["probe"].get(k) for k in ("method", "options", "seconds")},
            "parameter_retention": plan.parameter_retention(),
            "ranks": {name: m.rank for name, m in plan.matrices.items()},
            "mean_calibration_loss": statistics.fmean(c for c, _ in losses.values()),
            "mean_heldout_loss": statistics.fmean(h for _, h in losses.values()),
            "perplexity": {spec: r["perplexity"] for spec, r in perplexity.items()},
            "plan_seconds": plan_seconds,
            "compress_seconds": compress_seconds,
        }


def markdown(results: dict) -> str:
    """The README table: one line per measured row (perplexities, mean per-matrix losses, seconds)."""
    lines = [
        "| row | ppl boolq:evaluation | ppl lambada | calibration loss | held-out loss | s |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results["rows"].items():
        if name.startswith("shrink:"):
            if "matrices" in row:
                lines.append(
                    f"| {name} (λ chosen: {row['chosen']}; per matrix {row['chosen_counts']}) "
                    f"| | | | mean ratio to λ=0 {row['mean_heldout_ratio']} | {row['row_seconds']:.0f} |"
                )
            continue
        if name.startswith("plan:"):
            lines.append(
                f"| {name}: {row['matrices_with_other_rank']} matrices ranked differently, mean |Δrank| "
                f"{row['mean_abs_rank_difference']:.1f}, max {row['max_abs_rank_difference']} | | | | | |"
            )
            continue
        if name.startswith("matrix:"):
            lines.append(
                f"| {name} (rank {row['rank']}) | | | {row['calibration_loss']:.5f} "
                f"| {row['heldout_loss']:.5f} | {row['seconds']:.1f} |"
            )
            continue
        ppl = row["perplexity"]
        lines.append(
            f"| {name} ({row['parameter_retention']:.3f}) | {ppl['boolq:evaluation']:.2f} | {ppl['lambada']:.2f} "
            f"| {row['mean_calibration_loss']:.5f} | {row['mean_heldout_loss']:.5f} "
            f"| {row['row_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/study_sigmascale.json"))
    parser.add_argument("--rows", default="", help="comma-separated row-name prefixes to run (default: all)")
    parser.add_argument("--show", action="store_true", help="print the table in --out, measure nothing")
    args = parser.parse_args()
    if args.show:
        print(markdown(json.loads(args.out.read_text())))
        return
    study = Study(args.out, [p for p in args.rows.split(",") if p])

    shrink_row = study.row("shrink:svdllm", study.shrink_choice)
    lam = SHRINK_GRID[2] if shrink_row is None else shrink_row["chosen"]
    whiten = {**WHITEN, "shrink": lam}
    for name in MATRICES:
        own = study.row(f"shrink:{name}", lambda n=name: study.matrix_shrink(n))
        chosen = lam if own is None else own["chosen"]
        for config in MATRIX_CONFIGS:
            study.row(f"matrix:{name}:{config}", lambda n=name, c=config, s=chosen: study.matrix_row(n, c, s))
    models = {  # in order of priority: the CPU budget may stop the run before the last ones
        "model:svdllm+shrink uniform 0.75": ("svdllm", {"shrink": lam}, 0.75, "uniform", None),
        "model:sigmascale whiten+shrink uniform 0.75": ("sigmascale", whiten, 0.75, "uniform", None),
        "model:svdllm proxy-greedy 0.75": ("svdllm", {}, 0.75, "greedy", "svdllm"),
    }
    for name, spec in models.items():
        study.row(name, lambda s=spec: study.model_row(*s))
    study.row(
        "plan:sigmascale whiten+shrink 0.75 own vs svdllm proxy",
        lambda: study.plan_comparison("sigmascale", whiten, 0.75),
    )
    later = {
        "model:sigmascale whiten+shrink own-proxy-greedy 0.75": (
            "sigmascale",
            whiten,
            0.75,
            "greedy",
            "sigmascale",
        ),
        "model:sigmascale whiten+shrink uniform 0.9": ("sigmascale", whiten, 0.9, "uniform", None),
        "model:sigmascale whiten+shrink sequential uniform 0.75": (
            "sigmascale",
            whiten,
            0.75,
            "sequential",
            None,
        ),
        "model:sigmascale whiten-init uniform 0.75": (
            "sigmascale",
            {**WHITEN, "shrink": 0.0},
            0.75,
            "uniform",
            None,
        ),
    }
    for name, spec in later.items():
        study.row(name, lambda s=spec: study.model_row(*s))
    log("done")


if __name__ == "__main__":
    main()
