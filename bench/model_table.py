"""Whole-model table: dense and every method × retention on the bundled SmolLM2, perplexity on both
evaluation texts, wall time per row. Produces the README's results table.

    python bench/model_table.py --max-eval-tokens 8192 --out bench/results/model_table.json

Calibration (boolq:calibration, 32 × 512 tokens, seed 0) is computed once and shared (cached under
cache/); each row compresses a fresh copy of the dense model. Evaluation texts are disjoint from the
calibration text (checked).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from sigmascale_core.methods import METHODS
from sigmascale_core.models import load_model
from sigmascale_core.pipeline import (
    DEFAULT_EVALUATION_TEXTS,
    CalibrationConfig,
    calibrate,
    check_texts,
    evaluate_perplexity,
    parameter_count,
    peak_memory,
    uniform_plan,
)
from sigmascale_core.surgery import compress


def markdown(rows: list[dict], texts: list[str]) -> str:
    head = "| method | retention | " + " | ".join(f"ppl {t}" for t in texts) + " | compress s | row s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        ppl = " | ".join(f"{row['perplexity'][t]['perplexity']:.2f}" for t in texts)
        lines.append(
            f"| {row['method']} | {row['retention']} | {ppl} | {row.get('compress_seconds', 0):.1f} | "
            f"{row['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--retentions", default="0.95,0.9,0.75,0.5")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--texts", default=",".join(DEFAULT_EVALUATION_TEXTS))
    parser.add_argument("--max-eval-tokens", type=int, default=8192, help="tokens scored per text")
    parser.add_argument("--out", type=Path, default=Path("bench/results/model_table.json"))
    parser.add_argument("--no-dense", action="store_true", help="skip the dense row (resuming a table)")
    args = parser.parse_args()
    texts = args.texts.split(",")
    config = CalibrationConfig()
    check_texts(config.text, texts)
    loaded = load_model()
    dense = loaded.model
    start = time.perf_counter()
    stats, calibration = calibrate(loaded, config)
    calibration["seconds"] = time.perf_counter() - start
    print(
        f"calibration: {calibration['tokens']} tokens, {calibration['seconds']:.1f}s (cached={calibration['cached']})"
    )
    rows = []
    if not args.no_dense:
        start = time.perf_counter()
        ppl = evaluate_perplexity(loaded, texts, max_tokens=args.max_eval_tokens)
        rows.append(
            {"method": "dense", "retention": 1.0, "perplexity": ppl, "seconds": time.perf_counter() - start}
        )
        print(markdown(rows, texts), flush=True)
    total = parameter_count(dense)
    for retention in map(float, args.retentions.split(",")):
        for method in args.methods.split(","):
            start = time.perf_counter()
            loaded.model = copy.deepcopy(dense)
            plan = uniform_plan(loaded, retention, method)
            compress(loaded.model, plan, stats)
            compress_seconds = time.perf_counter() - start
            row = {
                "method": method,
                "retention": retention,
                "parameter_retention": plan.parameter_retention(),
                "model_retention": plan.model_retention(total),
                "compress_seconds": compress_seconds,
                "perplexity": evaluate_perplexity(loaded, texts, max_tokens=args.max_eval_tokens),
            }
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            print(markdown(rows[-1:], texts).splitlines()[-1], flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps({"calibration": calibration, "rows": rows, **peak_memory()}, indent=2)
            )
    print(markdown(rows, texts))
    print(json.dumps(peak_memory()))


if __name__ == "__main__":
    main()
