"""Whole-model table on the bundled SmolLM2: dense first, then every retention × method × allocation
(× fine-tune), each with its perplexity on both evaluation texts (and zero-shot accuracy with --tasks)
and its wall time. Produces the README's results tables.

    # uniform retention, perplexity only (the model-pipeline table)
    python bench/model_table.py --out bench/results/model_table.json
    # uniform vs allocated ranks, with and without fine-tuning, zero-shot accuracy (the pipeline table)
    python bench/model_table.py --retentions 0.9,0.75,0.5 --allocations uniform,greedy \
        --finetune-steps 100 --tasks piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa \
        --limit 200 --out bench/results/results_table.json

Each row is one `pipeline.run_compression` (the CLI's compress) from the dense model: calibration
(boolq:calibration, 32 samples × 512 tokens on CPU / 2048 on GPU, seed 0) is computed once and then
read from cache/; allocated plans spend the uniform plan's parameter budget on a perplexity probe of
calibration-side text (cached; svdllm's for sigmascale plans, see pipeline.probe_config_for); a
fine-tuned row compresses the same way (deterministic: the model of the row above it), then distils.
Evaluation texts are disjoint from calibration, probing and fine-tuning text (checked). Each row's
model is saved to a temporary folder (zero-shot reads it back) and removed. The JSON is rewritten after
every row; `--deadline` stops starting rows after that many seconds.

A whole table takes hours on a CPU, so it can be built over several sittings: `--resume` reads --out,
keeps its rows and measures only the missing ones (a row is method, retention, allocation,
fine-tune steps). It refuses a file whose rows were measured with other settings (device, texts,
tokens, tasks, limit, probe, calibration): those would not be comparable. Without --resume an existing
--out is refused, never overwritten. `--show` prints the table in --out and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sigmascale_core.artifacts import write_json_atomic
from sigmascale_core.cli import tqdm_sink
from sigmascale_core.methods import METHODS
from sigmascale_core.models import BUNDLED_MODEL, load_model
from sigmascale_core.pipeline import (
    ALLOCATIONS,
    DEFAULT_EVALUATION_TEXTS,
    CalibrationConfig,
    CompressionConfig,
    calibrate,
    check_texts,
    default_device,
    evaluate_perplexity,
    peak_memory,
    run_compression,
)
from sigmascale_core.surgery import load_compressed

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
    args.out.parent.mkdir(parents=True, exist_ok=True)  # the table, and each row's temporary model
    texts, tasks = names(args.texts), names(args.tasks)
    allocations = args.allocations.split(",")
    config = CalibrationConfig()
    check_texts(config.text, texts)
    began = time.perf_counter()
    loaded = load_model(BUNDLED_MODEL, device=args.device)
    start = time.perf_counter()
    _, calibration = calibrate(loaded, config)  # once, for the resume check; rows read it from cache
    calibration["seconds"] = time.perf_counter() - start
    print(
        f"device {args.device}: calibration {calibration['tokens']} tokens, {calibration['seconds']:.1f}s "
        f"(cached={calibration['cached']})",
        flush=True,
    )
    before = resumed_table(args.out, args, calibration) if args.resume and args.out.exists() else {}
    rows: list[dict] = before.get("rows", [])
    done = {row_key(row) for row in rows}
    if rows:
        print(f"resuming {args.out}: {len(rows)} rows measured before", flush=True)
    skipped: list[str] = []
    tokenizer = loaded.tokenizer

    def zero_shot(model) -> dict:
        from sigmascale_core.zeroshot import evaluate_tasks

        zero = evaluate_tasks(model, tokenizer, tasks, limit=args.limit)
        for task in zero["tasks"].values():
            task.pop("items", None)
        return zero

    def compressed_row(measured: dict, finetune_steps: int) -> dict:
        """One run_compression of the dense model: the row's numbers from its report."""
        with tempfile.TemporaryDirectory(dir=args.out.parent, prefix=".model_table.") as scratch:
            config = CompressionConfig(
                out=str(Path(scratch) / "model"),
                model=BUNDLED_MODEL,
                device=args.device,
                method=measured["method"],
                retention=measured["retention"],
                allocation=measured["allocation"],
                probe=args.probe,
                finetune_steps=finetune_steps,
                evaluation=tuple(texts),
                max_eval_tokens=args.max_eval_tokens,
            )
            report = run_compression(config, tqdm_sink())
            row = {
                **measured,
                "finetune_steps": finetune_steps,
                "parameter_retention": report["parameter_retention"],
                "model_retention": report["model_retention"],
                "probe_seconds": report.get("probe", {}).get("seconds"),
                "compress_seconds": report["compress_seconds"],
                "perplexity": report["perplexity"],
            }
            if finetune_steps:
                row["finetune"] = report["finetune"]
            if tasks:
                row["zero_shot"] = zero_shot(load_compressed(config.out, device=args.device)[0])
        return row

    def save() -> None:
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
        dense_row["perplexity"] = evaluate_perplexity(loaded, texts, max_tokens=args.max_eval_tokens)
        if tasks:
            dense_row["zero_shot"] = zero_shot(loaded.model)
        record(dense_row, started)
    del loaded  # each row loads its own dense copy
    for retention in map(float, args.retentions.split(",")):
        for method in args.methods.split(","):
            for allocation in allocations:
                measured = {"method": method, "retention": retention, "allocation": allocation}
                for steps in dict.fromkeys((0, args.finetune_steps)):
                    what = f"{method} {retention} {allocation} fine-tune {steps}"
                    if row_key({**measured, "finetune_steps": steps}) in done:
                        continue
                    if args.deadline is not None and time.perf_counter() - began > args.deadline:
                        skipped.append(what)
                        print(f"skipped (deadline): {what}", flush=True)
                        continue
                    started = time.perf_counter()
                    record(compressed_row(measured, steps), started)
    save()  # the rows the deadline skipped
    print(markdown(sorted(rows, key=table_order), texts, tasks))
    print(json.dumps({"seconds": time.perf_counter() - began, **peak_memory()}))


if __name__ == "__main__":
    main()
