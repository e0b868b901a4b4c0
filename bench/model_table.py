"""Whole-model table on the bundled SmolLM2: dense first, then every retention × method × allocation
(× fine-tune), each with its perplexity on both evaluation texts (and zero-shot accuracy with --tasks)
and its wall time. Produces the README's results tables.

    # uniform retention, perplexity only (the model-pipeline table)
    python bench/model_table.py --out bench/results/model_table.json
    # uniform vs allocated ranks, with and without fine-tuning, zero-shot accuracy (the pipeline table)
    python bench/model_table.py --retentions 0.9,0.75,0.5 --allocations uniform,greedy \
        --finetune-steps 100 --tasks piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa \
        --limit 200 --out bench/results/results_table.json

Calibration (boolq:calibration, 32 samples × 512 tokens on CPU / 2048 on GPU, seed 0) is computed
once and shared (cached under cache/); allocated plans spend the uniform plan's parameter budget on a
perplexity probe of calibration-side text (cached; svdllm's for sigmascale plans, see
pipeline.probe_config_for); a fine-tuned row continues from the row above it (same compressed model,
then distilled). Each (retention, method, allocation) compresses a fresh copy of the dense model.
Evaluation texts are disjoint from calibration, probing and fine-tuning text (checked). The JSON is
rewritten after every row; `--deadline` stops starting rows after that many seconds.

A whole table takes hours on a CPU, so it can be built over several sittings: `--resume` reads --out,
keeps its rows and measures only the missing ones (a row is method, retention, allocation,
fine-tune steps). It refuses a file whose rows were measured with other settings (device, texts,
tokens, tasks, limit, probe, calibration): those would not be comparable. Without --resume an existing
--out is refused, never overwritten. `--show` prints the table in --out and measures nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from sigmascale_core.artifacts import write_json_atomic
from sigmascale_core.methods import METHODS
from sigmascale_core.models import load_model
from sigmascale_core.pipeline import (
    ALLOCATIONS,
    DEFAULT_EVALUATION_TEXTS,
    CalibrationConfig,
    FinetuneConfig,
    build_plan,
    calibrate,
    check_texts,
    default_device,
    evaluate_perplexity,
    finetune,
    parameter_count,
    peak_memory,
    probe_config_for,
)
from sigmascale_core.progress import tqdm_progress
from sigmascale_core.surgery import compress

SETTINGS = ("device", "texts", "max_eval_tokens", "tasks", "limit", "probe")  # what every row shares
CALIBRATION_SETTINGS = ("model", "tokenizer", "text", "samples", "seq_len", "seed", "tokens")


def names(text: str) -> list[str]:
    """A comma-separated option as a list (empty for "")."""
    return [name for name in text.split(",") if name]


def row_key(row: dict) -> tuple:
    """What a row measured: a table holds each at most once."""
    return (row["method"], row["retention"], row.get("allocation"), row.get("finetune_steps", 0))


def table_order(row: dict) -> tuple:
    """Dense first, then by retention (highest first), method, allocation, fine-tune steps."""
    if row["method"] == "dense":
        return (0,)
    allocation = row["allocation"]
    return (
        1,
        -row["retention"],
        METHODS.index(row["method"]),
        ALLOCATIONS.index(allocation) if allocation in ALLOCATIONS else len(ALLOCATIONS),
        row["finetune_steps"],
    )


def resumed_table(path: Path, args: argparse.Namespace, calibration: dict) -> dict:
    """An earlier run's table (rows, peak memory), after checking its rows were measured like this run's."""
    saved = json.loads(path.read_text())
    mismatched = [
        f"{name}: {saved['args'].get(name)} there, {getattr(args, name)} here"
        for name in SETTINGS
        if saved["args"].get(name) != str(getattr(args, name))
    ] + [
        f"calibration {name}: {saved['calibration'].get(name)} there, {calibration[name]} here"
        for name in CALIBRATION_SETTINGS
        if saved["calibration"].get(name) != calibration[name]
    ]
    if mismatched:
        raise SystemExit(f"--resume: {path} was measured with other settings; " + "; ".join(mismatched))
    return saved


def markdown(rows: list[dict], texts: list[str], tasks: list[str]) -> str:
    head = "| method | retention | allocation | fine-tune | " + " | ".join(f"ppl {t}" for t in texts)
    head += "".join(f" | {t}" for t in tasks) + (" | mean acc" if tasks else "") + " | row s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        cells = [f"{row['perplexity'][t]['perplexity']:.2f}" for t in texts]
        zero = row.get("zero_shot", {})
        cells += [f"{100 * zero['tasks'][t]['acc']:.1f}" for t in tasks]
        cells += [f"{100 * zero['mean_acc']:.1f}"] if tasks else []
        retention = f"{row['retention']:g}" + (
            f" ({row['parameter_retention']:.3f})" if "parameter_retention" in row else ""
        )
        lines.append(
            f"| {row['method']} | {retention} | {row.get('allocation', '—')} | {row.get('finetune_steps', 0)} | "
            + " | ".join(cells)
            + f" | {row['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--retentions", default="0.95,0.9,0.75,0.5")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--allocations", default="uniform", help=f"comma-separated, of {ALLOCATIONS}")
    parser.add_argument("--probe", choices=("perplexity", "proxy"), default="perplexity")
    parser.add_argument("--finetune-steps", type=int, default=0, help="also a fine-tuned row (0: none)")
    parser.add_argument("--texts", default=",".join(DEFAULT_EVALUATION_TEXTS))
    parser.add_argument("--max-eval-tokens", type=int, default=8192, help="tokens scored per text")
    parser.add_argument("--tasks", default="", help="zero-shot tasks, comma-separated (default: none)")
    parser.add_argument("--limit", type=int, default=None, help="zero-shot: the first N items per task")
    parser.add_argument("--deadline", type=float, default=None, help="start no row after this many s")
    parser.add_argument("--out", type=Path, default=Path("bench/results/model_table.json"))
    parser.add_argument("--no-dense", action="store_true", help="no dense row")
    parser.add_argument(
        "--resume", action="store_true", help="keep the rows already in --out, measure the missing ones"
    )
    parser.add_argument("--show", action="store_true", help="print the table in --out, measure nothing")
    args = parser.parse_args()
    if args.show:
        saved = json.loads(args.out.read_text())
        shown = saved["args"]
        print(markdown(sorted(saved["rows"], key=table_order), names(shown["texts"]), names(shown["tasks"])))
        return
    if args.out.exists() and not args.resume:  # hours of rows: never overwritten by accident
        parser.error(f"{args.out} exists: --resume continues that table, or delete it to start over")
    texts, tasks = names(args.texts), names(args.tasks)
    allocations = args.allocations.split(",")
    config = CalibrationConfig()
    check_texts(config.text, texts)
    began = time.perf_counter()
    loaded = load_model(device=args.device)
    dense = loaded.model
    start = time.perf_counter()
    stats, calibration = calibrate(loaded, config)
    calibration["seconds"] = time.perf_counter() - start
    print(
        f"device {args.device}: calibration {calibration['tokens']} tokens, {calibration['seconds']:.1f}s "
        f"(cached={calibration['cached']})",
        flush=True,
    )
    windows = (config.text, config.samples, int(calibration["seq_len"]), config.seed)
    before = resumed_table(args.out, args, calibration) if args.resume and args.out.exists() else {}
    rows: list[dict] = before.get("rows", [])
    done = {row_key(row) for row in rows}
    if rows:
        print(f"resuming {args.out}: {len(rows)} rows measured before", flush=True)
    skipped: list[str] = []

    def evaluate(row: dict) -> dict:
        row["perplexity"] = evaluate_perplexity(loaded, texts, max_tokens=args.max_eval_tokens)
        if tasks:
            from sigmascale_core.zeroshot import evaluate_tasks

            zero = evaluate_tasks(loaded.model, loaded.tokenizer, tasks, limit=args.limit)
            for task in zero["tasks"].values():
                task.pop("items", None)
            row["zero_shot"] = zero
        return row

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "calibration": calibration,
                "rows": rows,
                "skipped": skipped,
                **{k: max(v, before.get(k, 0.0)) for k, v in peak_memory().items()},  # of all sittings
            },
            args.out,
        )

    def record(row: dict, started: float) -> None:
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        print(markdown(rows[-1:], texts, tasks).splitlines()[-1], flush=True)
        save()

    dense_row = {"method": "dense", "retention": 1.0}
    if not args.no_dense and row_key(dense_row) not in done:
        started = time.perf_counter()
        record(evaluate(dense_row), started)
    total = parameter_count(dense)
    for retention in map(float, args.retentions.split(",")):
        for method in args.methods.split(","):
            for allocation in allocations:
                what = f"{method} {retention} {allocation}"
                measured = {"method": method, "retention": retention, "allocation": allocation}
                base = row_key({**measured, "finetune_steps": 0})
                tuned_key = row_key({**measured, "finetune_steps": args.finetune_steps})
                if base in done and (not args.finetune_steps or tuned_key in done):
                    continue
                if args.deadline is not None and time.perf_counter() - began > args.deadline:
                    skipped.append(what)
                    print(f"skipped (deadline): {what}", flush=True)
                    continue
                started = time.perf_counter()
                loaded.model = copy.deepcopy(dense)
                probe_config = probe_config_for(method, config.text, texts, args.probe == "proxy")
                plan, planning = build_plan(
                    loaded,
                    stats,
                    retention,
                    method,
                    None,
                    allocation,
                    probe_config,
                    windows,
                    tqdm_progress("probe"),
                )
                compress(loaded.model, plan, stats, progress=tqdm_progress("compress"))
                row = {
                    **measured,
                    "finetune_steps": 0,
                    "parameter_retention": plan.parameter_retention(),
                    "model_retention": plan.model_retention(total),
                    "probe_seconds": planning.get("probe", {}).get("seconds"),
                    "compress_seconds": time.perf_counter() - started,
                }
                if base not in done:
                    record(evaluate(row), started)
                if args.finetune_steps and tuned_key not in done:
                    started = time.perf_counter()
                    tuned = {**row, "finetune_steps": args.finetune_steps}
                    ft = FinetuneConfig(steps=args.finetune_steps, text=config.text)
                    tuned["finetune"] = finetune(loaded, dense, ft, texts, tqdm_progress("finetune"))
                    record(evaluate(tuned), started)
    save()  # the rows the deadline skipped
    print(markdown(sorted(rows, key=table_order), texts, tasks))
    print(json.dumps({"seconds": time.perf_counter() - began, **peak_memory()}))


if __name__ == "__main__":
    main()
