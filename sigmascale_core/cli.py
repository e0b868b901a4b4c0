"""`sigmascale`: the command line. argparse lives here only; every command calls the engine's functions.

Exit status 0 on success, 2 with a one-line `error: ...` on bad input, 130 when interrupted (outputs
are written atomically, so an interrupted run leaves nothing half-written).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sigmascale_core.methods import METHODS, decompose, loss_curve, scaled_spectrum
from sigmascale_core.metrics import (
    activation_loss,
    effective_rank,
    participation_ratio,
    rank_for_retention,
)
from sigmascale_core.progress import EventSink, Progress, ProgressEvent, tracked
from sigmascale_core.stats import ActivationStats

if TYPE_CHECKING:
    from sigmascale_core.pipeline import CompressionConfig

# --------------------------------------------------------------------------------------------------
# helpers


def _retention(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"retention must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"retention must be in (0, 1], got {value}")
    return value


def _write_json(obj: object, path: Path | None) -> None:
    from sigmascale_core.artifacts import write_json_atomic

    if path is None:
        print(json.dumps(obj, indent=2))
    else:
        write_json_atomic(obj, path)
        print(f"wrote {path}", file=sys.stderr)


def _load(args: argparse.Namespace):
    from sigmascale_core.models import load_model
    from sigmascale_core.pipeline import DTYPES, check_device

    device_map = getattr(args, "device_map", None)
    if device_map is None:
        check_device(args.device)
        return load_model(args.model, device=args.device, dtype=DTYPES[args.dtype])
    return load_model(
        args.model, dtype=DTYPES[args.dtype], device_map=device_map, offload_folder=args.offload_folder
    )


def _device_map(text: str) -> str | dict:
    """--device-map: accelerate's "auto", "balanced", … as given, or a {module: device} JSON (inline or a
    .json file; "cpu" and "disk" offload)."""
    if text.endswith(".json"):
        try:
            return json.loads(Path(text).read_text())
        except (OSError, ValueError) as err:
            raise argparse.ArgumentTypeError(f"cannot read the device map {text}: {err}") from None
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"--device-map is not valid JSON: {err}") from None
    return text


def tqdm_sink() -> EventSink:
    """Draws each stage's ProgressEvents as a tqdm bar on stderr."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def draw(event: ProgressEvent) -> None:
        bar = bars.get(event.stage)
        if bar is None or bar.total != event.total:
            if bar is not None:
                bar.close()
            bar = bars[event.stage] = tqdm(total=event.total, desc=event.stage, leave=False, file=sys.stderr)
        bar.n = event.done
        bar.set_postfix_str(event.detail, refresh=False)
        bar.refresh()
        if event.done >= event.total:
            bar.close()
            del bars[event.stage]

    return draw


def _json_sink(target: str, stack: contextlib.ExitStack) -> EventSink:
    """Writes ProgressEvents as JSON lines to `target` (a file, appended, opened at the first event, so
    a refused run writes nothing) or to stderr for "-"; each line flushed as it is written."""
    streams: list = []

    def write(event: ProgressEvent) -> None:
        if not streams:
            streams.append(sys.stderr if target == "-" else stack.enter_context(open(target, "a")))  # noqa: SIM115
        streams[0].write(event.to_json() + "\n")
        streams[0].flush()

    return write


def _events(args: argparse.Namespace, stack: contextlib.ExitStack) -> EventSink:
    """tqdm bars on stderr, and with --progress-json the events as JSON lines (no bars for "-")."""
    target = getattr(args, "progress_json", None)
    if target is None:
        return tqdm_sink()
    sinks = [_json_sink(target, stack)] + ([] if target == "-" else [tqdm_sink()])

    def both(event: ProgressEvent) -> None:
        for sink in sinks:
            sink(event)

    return both


def _progress(args: argparse.Namespace, stage: str) -> Progress:
    return tracked(args.events, stage)


def _calibration_config(args: argparse.Namespace):
    from sigmascale_core.pipeline import CalibrationConfig

    return CalibrationConfig(
        args.text, args.samples, args.seq_len, args.seed, args.batch_size, args.gram_dtype
    )


# --------------------------------------------------------------------------------------------------
# commands


def cmd_demo(args: argparse.Namespace) -> None:
    """The four methods on one weight-like matrix with LLM-like inputs: no model needed."""
    from sigmascale_core.synthetic import synthetic_layer

    m, n = args.shape
    W, X = synthetic_layer(m, n, tokens=4 * n, seed=args.seed)
    stats = ActivationStats.from_inputs(X)
    rank = rank_for_retention(m, n, args.retention)
    print(f"W {m}x{n}, inputs with outlier channels; retention {args.retention} -> rank {rank}")
    print(f"{'method':<11}{'rel. loss':>11}{'eff. rank':>11}{'part. ratio':>13}{'seconds':>9}")
    for method in METHODS:
        start = time.perf_counter()
        factors = decompose(W, stats, rank, method)
        seconds = time.perf_counter() - start
        loss = activation_loss(W, factors.to_dense(), stats)
        s = factors.scaled_singular_values
        print(
            f"{method:<11}{loss:>11.5f}{effective_rank(s):>11.1f}{participation_ratio(s):>13.1f}{seconds:>9.2f}"
        )
    print("rel. loss = ‖(W−W')X‖²/‖WX‖²; eff. rank of the spectrum each method truncates (lower = steeper)")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from sigmascale_core.pipeline import calibrate

    config = _calibration_config(args)
    loaded = _load(args)
    stats, info = calibrate(loaded, config, progress=_progress(args, "calibration"))
    info["groups"] = len(stats)
    _write_json(info, args.report)


def _probe_config(args: argparse.Namespace, method: str, evaluation: list[str]):
    from sigmascale_core.pipeline import probe_config_for

    return probe_config_for(method, args.text, evaluation, args.probe == "proxy", args.probe_method)


def _calibration_windows(args: argparse.Namespace, info: dict) -> tuple[str, int, int, int]:
    """(text, samples, seq_len, seed) of the statistics' windows, for the probe's overlap report."""
    return (args.text, args.samples, int(info["seq_len"]), args.seed)


def cmd_probe(args: argparse.Namespace) -> None:
    from sigmascale_core.pipeline import calibrate, peak_memory
    from sigmascale_core.probing import probe

    evaluation = [t for t in args.eval.split(",") if t]
    config = _probe_config(args, args.probe_method or "svdllm", evaluation)
    calibration = _calibration_config(args)
    loaded = _load(args)
    stats, info = calibrate(loaded, calibration, progress=_progress(args, "calibration"))
    table, probe_info = probe(
        loaded, stats, config, calibration=_calibration_windows(args, info), progress=_progress(args, "probe")
    )
    if args.out is not None:
        table.save(args.out)
        print(f"wrote the sensitivity table to {args.out}", file=sys.stderr)
    _write_json({"calibration": info, "probe": probe_info, **peak_memory()}, args.report)


def compression_config(args: argparse.Namespace) -> CompressionConfig:
    """The parsed `compress` arguments as the pipeline's config."""
    from sigmascale_core.pipeline import CompressionConfig
    from sigmascale_core.plan import parse_options

    return CompressionConfig(
        out=args.out,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        method=args.method,
        retention=args.retention,
        plan=None if args.plan is None else str(args.plan),
        options=parse_options(args.option, args.method),
        allocation=args.allocation,
        probe=args.probe,
        probe_method=args.probe_method,
        sequential=args.sequential,
        text=args.text,
        samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        batch_size=args.batch_size,
        gram_dtype=args.gram_dtype,
        finetune_steps=args.finetune_steps,
        finetune_lr=args.finetune_lr,
        finetune_seq_len=args.finetune_seq_len,
        evaluation=tuple(t for t in (args.eval or "").split(",") if t),
        window=args.window,
        max_eval_tokens=args.max_eval_tokens,
        force=args.force,
        keep_dense_if_slower=args.keep_dense_if_slower,
    )


def cmd_compress(args: argparse.Namespace) -> None:
    from sigmascale_core.pipeline import run_compression

    config = compression_config(args)
    if args.distributed:
        _compress_distributed(config, args.events)
        return
    report = run_compression(config, args.events)
    print(json.dumps(report, indent=2))
    print(f"saved the compressed model to {Path(config.out).resolve()}", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> None:
    from sigmascale_core.surgery import export_compressed

    out = export_compressed(args.model, args.out, force=args.force, latent_kv=args.latent_kv)
    print(f"exported to {out}: AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) loads it")


def _compress_distributed(config: CompressionConfig, events: EventSink) -> None:
    """One rank of `torchrun ... compress --distributed`: rank 0 shows progress, prints and saves."""
    from sigmascale_core.distributed import check_distributable, distributed_session
    from sigmascale_core.pipeline import check_config, run_compression

    plan = check_config(config)  # refused before joining the group, on every rank alike
    check_distributable(config, plan)
    with distributed_session() as group:
        report = run_compression(config, events if group.is_main else None, group=group)
    if group.is_main:
        print(json.dumps(report, indent=2))
        print(f"saved the compressed model to {Path(config.out).resolve()}", file=sys.stderr)


def cmd_eval(args: argparse.Namespace) -> None:
    from sigmascale_core.pipeline import check_positive, evaluate_perplexity, peak_memory

    check_positive("--batch-size", args.batch_size)
    for flag in ("limit", "window", "max_eval_tokens"):
        check_positive(f"--{flag.replace('_', '-')}", getattr(args, flag), optional=True)
    tasks = [t for t in args.tasks.split(",") if t]
    zero_shot = [t for t in tasks if t != "ppl"]
    if zero_shot:
        from sigmascale_core.zeroshot import resolve_task_names

        resolve_task_names(zero_shot)  # unknown names fail before the model loads
    loaded = _load_any(args)
    report: dict[str, object] = {"model": args.model}
    if "ppl" in tasks:
        texts = [t for t in args.text.split(",") if t]
        report["perplexity"] = evaluate_perplexity(
            loaded,
            texts,
            args.window,
            args.max_eval_tokens,
            args.batch_size,
            progress=_progress(args, "perplexity"),
        )
    if zero_shot:
        if args.backend == "lm-eval":
            from sigmascale_core.lm_eval_backend import evaluate_with_lm_eval

            results = evaluate_with_lm_eval(loaded.model, loaded.tokenizer, zero_shot, limit=args.limit)
        else:
            from sigmascale_core.zeroshot import evaluate_tasks

            results = evaluate_tasks(
                loaded.model,
                loaded.tokenizer,
                zero_shot,
                limit=args.limit,
                progress=_progress(args, "zero-shot"),
            )
        if not args.items:
            for task in results["tasks"].values():
                task.pop("items", None)
        report["zero_shot"] = {"backend": args.backend, "limit": args.limit, **results}
    report.update(peak_memory())
    _write_json(report, args.report)


def _load_any(args: argparse.Namespace):
    """A compressed output folder or anything load_model takes."""
    from sigmascale_core.models import LoadedModel, model_family, model_fingerprint
    from sigmascale_core.pipeline import check_device
    from sigmascale_core.surgery import is_compressed_dir, load_compressed

    if is_compressed_dir(args.model):
        from transformers import AutoTokenizer

        check_device(args.device)
        model, _plan = load_compressed(args.model, device=args.device)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        return LoadedModel(model, tokenizer, args.model, model_family(model), model_fingerprint(model))
    return _load(args)


def cmd_spectra(args: argparse.Namespace) -> None:
    if args.diagnostics:
        _spectra_diagnostics(args)
        return
    if args.layer is None or args.matrix is None:
        raise ValueError("--layer and --matrix choose the matrix (or pass --diagnostics for the whole model)")
    from sigmascale_core.calibration import stats_key
    from sigmascale_core.models import get_module, target_matrices
    from sigmascale_core.pipeline import calibrate

    config = _calibration_config(args)
    loaded = _load(args)
    refs = [r for r in target_matrices(loaded.model) if r.layer == args.layer and r.kind == args.matrix]
    if not refs:
        n_layers = max(r.layer for r in target_matrices(loaded.model)) + 1
        raise ValueError(f"no matrix {args.matrix!r} in layer {args.layer} (the model has {n_layers} layers)")
    ref = refs[0]
    stats, _ = calibrate(loaded, config, progress=_progress(args, "calibration"))
    W = get_module(loaded.model, ref.name).weight.detach().float()
    layer_stats = stats[stats_key(ref.layer, ref.group)]
    rank = rank_for_retention(*ref.shape, args.retention)
    rows, summary = [], {"matrix": ref.name, "shape": list(ref.shape), "rank": rank, "methods": {}}
    for method in args.methods.split(","):
        sigma = scaled_spectrum(W, layer_stats, method, rank=rank)
        curve = loss_curve(W, layer_stats, method, rank=rank)
        summary["methods"][method] = {
            "effective_rank": effective_rank(sigma),
            "participation_ratio": participation_ratio(sigma),
            "relative_loss_at_rank": float(curve[rank]),
        }
        rows += [(method, i, float(s), float(curve[i + 1])) for i, s in enumerate(sigma)]
    if args.format == "json":
        summary["spectra"] = [
            dict(zip(("method", "index", "singular_value", "loss_keeping_index"), r, strict=True))
            for r in rows
        ]
        _write_json(summary, args.out)
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["method", "index", "singular_value", "relative_loss_keeping_through_index"])
    writer.writerows(rows)
    _write_text(buffer.getvalue(), args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "spectra"}, indent=2), file=sys.stderr)


def _spectra_diagnostics(args: argparse.Namespace) -> None:
    """The Spectra page's diagnostics table, through the app's compute service and cache (synchronously)."""
    from sigmascale_core.compute import HELDOUT, ComputeService, ServiceConfig
    from sigmascale_core.diagnostics import FIELDS, model_averages
    from sigmascale_core.pipeline import CalibrationConfig, check_device

    check_device(args.device)
    methods = _diagnosed_methods(args.methods)
    calibration = _calibration_config(args)
    # the app's held-out convention (same length, next seed), so both share one cache key
    heldout = CalibrationConfig(
        HELDOUT.text,
        HELDOUT.samples,
        calibration.seq_len,
        calibration.seed + 1,
        gram_dtype=calibration.gram_dtype,  # the service sweeps both in one dtype
    )
    config = ServiceConfig(args.model, args.device, args.dtype, calibration, heldout, args.retention)
    config.check()
    service = ComputeService(config)
    chosen: list[str] = []

    def done(bank) -> bool:
        if not chosen:  # the model is laid out: pick the matrices once
            chosen.extend(
                r.name for r in bank.refs if args.layer in (None, r.layer) and args.matrix in (None, r.kind)
            )
            if not chosen:
                n_layers = int(bank.layers.max()) + 1
                raise ValueError(
                    f"no matrix {args.matrix or 'of any kind'!r} in layer {args.layer} "
                    f"(the model has {n_layers} layers)"
                )
            for name in reversed(chosen[:8]):  # a few named matrices jump the queue, as a page's focus
                service.focus(name)
        return all(bank.has_diagnostics(n, m) for n in chosen for m in methods)

    snap = service.run_here(done, args.events)
    bank = snap.bank
    rows = [row for row in bank.diagnostic_rows(methods) if row["matrix"] in set(chosen)]
    averages = {m: model_averages([r for r in rows if r["method"] == m]) for m in methods}
    if args.format == "json":  # strict JSON: NaN (a number that does not apply) as null
        clean = lambda d: {k: None if isinstance(v, float) and v != v else v for k, v in d.items()}  # noqa: E731
        averages = {m: clean(a) for m, a in averages.items()}
        _write_json(
            {"methods": methods, "averages": averages, "matrices": [clean(r) for r in rows]}, args.out
        )
        return
    columns = ["matrix", "layer", "kind", "method", *FIELDS, "warning"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(rows)
    _write_text(buffer.getvalue(), args.out)
    print(json.dumps({"matrices": len(chosen), "averages": averages}, indent=2), file=sys.stderr)


def _diagnosed_methods(text: str) -> list[str]:
    methods = [m for m in text.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return methods


def _write_text(text: str, path: Path | None) -> None:
    if path is None:
        sys.stdout.write(text)
        return
    from sigmascale_core.artifacts import write_text_atomic

    write_text_atomic(text, path)
    print(f"wrote {path}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# parser


def _model_args(p: argparse.ArgumentParser) -> None:
    from sigmascale_core.pipeline import default_device

    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="smollm2-135m (bundled), a local HF folder, a .gguf file or a hub id (default: %(default)s)",
    )
    p.add_argument("--device", default=default_device(), help="torch device (default: %(default)s)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weights dtype while working (default: %(default)s)",
    )
    p.add_argument(
        "--progress-json",
        metavar="FILE",
        help="also write progress events as JSON lines to FILE (appended), or to stderr for - "
        "(instead of the bars)",
    )


def _calibration_args(p: argparse.ArgumentParser) -> None:
    from sigmascale_core.pipeline import DEFAULT_CALIBRATION_TEXT
    from sigmascale_core.stats import FLOAT_DTYPES

    p.add_argument(
        "--text",
        default=DEFAULT_CALIBRATION_TEXT,
        help="calibration text: boolq:calibration, file:PATH or hf:NAME:CONFIG:SPLIT (default: %(default)s)",
    )
    p.add_argument("--samples", type=int, default=32, help="calibration sequences (default: %(default)s)")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence (default: 512 on CPU, 2048 on GPU, as the paper)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the windows drawn from the text (default: 0)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default: 4)")
    p.add_argument(
        "--gram-dtype",
        choices=tuple(FLOAT_DTYPES),
        default="float64",
        help="storage of the activation Grams: float32 halves their memory and cache (Llama-3.1-8B: 30.5 "
        "instead of 61 GiB); the methods still whiten and measure the loss in float64 (default: %(default)s)",
    )


def _probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--probe",
        choices=("perplexity", "proxy"),
        default="perplexity",
        help="sensitivity: perplexity on calibration-side text with one matrix truncated at a time (the "
        "paper's; cached and resumable, minutes on a GPU, hours on a CPU for the bundled model), or "
        "proxy: each matrix's relative activation loss from its loss curve (instant) (default: %(default)s)",
    )
    p.add_argument(
        "--probe-method",
        choices=METHODS,
        default=None,
        help="decomposition that truncates the probed matrices (default: the plan's method, svdllm for "
        "sigmascale)",
    )


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--window", type=int, default=None, help="perplexity window (default: min(2048, model max))"
    )
    p.add_argument(
        "--max-eval-tokens",
        type=int,
        default=None,
        help="score only the first N tokens of each evaluation text (default: all)",
    )


def build_parser() -> argparse.ArgumentParser:
    from sigmascale_core.pipeline import ALLOCATIONS, DEFAULT_EVALUATION_TEXTS

    parser = argparse.ArgumentParser(
        prog="sigmascale", description="Compress LLMs by truncated SVD with learned scaling."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the four methods on one synthetic matrix (no model needed)")
    p.add_argument("--shape", type=int, nargs=2, default=(576, 576), metavar=("M", "N"), help="matrix shape")
    p.add_argument("--retention", type=_retention, default=0.75, help="parameter retention (default: 0.75)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("calibrate", help="collect (and cache) activation statistics")
    _model_args(p)
    _calibration_args(p)
    p.add_argument(
        "--device-map",
        type=_device_map,
        help="place a model larger than one GPU through accelerate instead of --device: auto, balanced, or "
        "a {module: device} JSON (inline or a .json file) with cpu/disk offload; each layer is calibrated "
        "on the device it runs on. Pass the same --dtype and --seq-len to compress, so it finds these "
        "statistics in the cache",
    )
    p.add_argument("--offload-folder", help="where --device-map's disk offload keeps its weights")
    p.add_argument("--report", type=Path, help="write the JSON report here (default: stdout)")
    p.set_defaults(run=cmd_calibrate)

    p = sub.add_parser("compress", help="calibrate, compress by a plan, save (and optionally evaluate)")
    _model_args(p)
    _calibration_args(p)
    p.add_argument(
        "--method", choices=METHODS, default="sigmascale", help="decomposition (default: %(default)s)"
    )
    p.add_argument("--retention", type=_retention, help="uniform parameter retention in (0, 1]")
    p.add_argument("--plan", type=Path, help="a CompressionPlan JSON (from the app) instead of --retention")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. steps=40 (repeatable; see METHOD_OPTIONS)",
    )
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="one rank of a torchrun job: fits sharded across the ranks (NCCL, cuda:LOCAL_RANK, where CUDA "
        "is available, else gloo on the CPU), saved by rank 0; launch with torchrun --nproc-per-node N "
        "-m sigmascale_core.cli compress ... --distributed",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="calibrate each layer on the outputs of the already-compressed layers before it "
        "(default: every layer sees the dense model's activations)",
    )
    p.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        default="uniform",
        help="uniform: --retention for every matrix; sensitivity (ASVD's binary search) or greedy (our "
        "optimiser): the same parameter budget spent where a sensitivity probe says it hurts least "
        "(default: %(default)s)",
    )
    _probe_args(p)
    p.add_argument(
        "--keep-dense-if-slower",
        action="store_true",
        help="keep dense the matrices whose factors are slower than the dense matmul at their rank, "
        "timed per shape on --device (costs parameters; the report says how many)",
    )
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="after compressing, distil the dense model into the factors for N AdamW steps on "
        "calibration-side text (holds a dense copy in memory; default: 0, no fine-tune)",
    )
    p.add_argument(
        "--finetune-lr", type=float, default=1e-4, help="peak fine-tune learning rate (default: 1e-4)"
    )
    p.add_argument(
        "--finetune-seq-len",
        type=int,
        default=None,
        help="tokens per fine-tune sequence; --samples sequences (+4 held out) of --text, other windows "
        "than the calibration's (default: the calibration's sequence length)",
    )
    p.add_argument(
        "--eval", default="", help="comma-separated evaluation texts, e.g. boolq:evaluation,lambada"
    )
    _eval_args(p)
    p.set_defaults(run=cmd_compress)

    p = sub.add_parser(
        "probe", help="per-matrix sensitivity: perplexity with one matrix truncated at a time (cached)"
    )
    _model_args(p)
    _calibration_args(p)
    _probe_args(p)
    p.add_argument(
        "--eval",
        default="",
        help="further evaluation texts the probing text must not touch (boolq:evaluation and lambada always)",
    )
    p.add_argument("--out", type=Path, help="write the SensitivityTable JSON here")
    p.add_argument("--report", type=Path, help="write the JSON report here (default: stdout)")
    p.set_defaults(run=cmd_probe)

    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a dense or compressed model")
    _model_args(p)
    p.add_argument(
        "--tasks",
        default="ppl",
        help="comma-separated: ppl (perplexity on --text), piqa, hellaswag, winogrande, arc_easy, "
        "arc_challenge, openbookqa (default: %(default)s)",
    )
    p.add_argument(
        "--text", default=",".join(DEFAULT_EVALUATION_TEXTS), help="comma-separated evaluation texts for ppl"
    )
    p.add_argument("--limit", type=int, default=None, help="zero-shot: the first N items of each task")
    p.add_argument(
        "--backend",
        choices=("sigmascale", "lm-eval"),
        default="sigmascale",
        help="zero-shot scorer: ours, or lm-evaluation-harness on the same files (default: ours)",
    )
    p.add_argument("--items", action="store_true", help="zero-shot: keep per-item predictions in the report")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: 1)")
    _eval_args(p)
    p.add_argument("--report", type=Path, help="write the JSON report here (default: stdout)")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser(
        "export",
        help="rewrite a compressed folder (also an older one) so plain transformers loads it",
        description="Writes --out with the same weights, plan, tokenizer and report as --model, plus "
        "modeling_sigmascale.py and a config whose auto_map names it: AutoModelForCausalLM."
        "from_pretrained(OUT, trust_remote_code=True) then loads the compressed model without SigmaScale.",
    )
    p.add_argument("--model", required=True, type=Path, help="a folder written by `sigmascale compress`")
    p.add_argument("--out", required=True, type=Path, help="the new folder")
    p.add_argument(
        "--latent-kv",
        action="store_true",
        help="cache the rank-r K/V latents by default (smaller KV cache; K and V rebuilt at each step)",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser(
        "spectra",
        help="singular values and effective ranks of one matrix, before/after scaling; with --diagnostics, "
        "WeightWatcher's spectral diagnostics of every matrix",
        description="Without --diagnostics: one matrix's singular values and loss curve per method "
        "(--layer and --matrix required). With --diagnostics: one row per matrix and method with "
        "WeightWatcher's diagnostics (alpha, stable rank, log norms, MP bulk and spikes, soft rank, rank "
        "loss, under/over-trained warning) of the matrix the method truncates: W for svd (with the "
        "shuffled-W correlation traps), W·S for asvd, svdllm and sigmascale (learned at the rank a uniform "
        "plan at --retention gives). The whole model, or the matrices --layer/--matrix select; computed "
        "by the app's compute service into the same cache (an app running on the same cache computes "
        "them instead, and a second call only reads them back). sigmascale learns a scaling per "
        "matrix: leave it out of --methods for a quick look.",
    )
    _model_args(p)
    _calibration_args(p)
    p.add_argument("--layer", type=int, help="decoder layer index (--diagnostics: default every layer)")
    from sigmascale_core.models import MATRIX_KINDS

    p.add_argument(
        "--matrix",
        choices=MATRIX_KINDS,
        help="matrix kind (--diagnostics: default every kind)",
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument(
        "--retention",
        type=_retention,
        default=0.75,
        help="rank cut for the loss column; with --diagnostics, the retention sigmascale is learned at",
    )
    p.add_argument(
        "--diagnostics",
        action="store_true",
        help="write the spectral diagnostics table (CSV: one row per matrix and method; JSON: with the "
        "model averages) instead of one matrix's spectra",
    )
    p.add_argument("--format", choices=("csv", "json"), default="csv")
    p.add_argument("--out", type=Path, help="write here (default: stdout)")
    p.set_defaults(run=cmd_spectra)
    return parser


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    args = build_parser().parse_args(argv)
    hf_logging.disable_progress_bar()  # our events show progress; loader bars would bury a refusal
    try:
        with contextlib.ExitStack() as stack:
            args.events = _events(args, stack)
            args.run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing half-written was left behind", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
