"""Inference speed of the bundled SmolLM2-135M, dense against compressed: prefill and KV-cache decode.

    OMP_NUM_THREADS=1 python bench/bench_inference.py --json bench/results/inference.json

Variants: dense; svdllm at uniform retention 0.9 / 0.75 / 0.5; svdllm greedy-allocated at 0.75
(allocation.allocate on each matrix's svdllm loss curve from the same statistics: no perplexity probe).
Speed depends on the ranks only, so the statistics are a small calibration (8 × 256 tokens of
boolq:calibration). Per dtype and batch size: prefill (one forward of `--prompt-tokens` random tokens,
use_cache=True) and decode (`--new-tokens` greedy steps of one token through the KV cache), tokens/s
and the ratio to dense measured in the same process, the variants interleaved repeat by repeat so that
load drifts hit them alike, after a short warm-up of each; the median of `--repeats`.

Memory: per row the weights and the KV cache after decoding (MiB, counted from the tensors); on CUDA
also torch.cuda.max_memory_allocated over each timed run (reset before it). On CPU no per-variant peak
can be measured in one process holding every variant (freed blocks are reused, the resident set only
grows), so the JSON gives the process's peak resident set (ru_maxrss) over the whole run.

The same script runs unchanged on a GPU (`--device cuda`): torch.cuda.synchronize before every clock
read there, nowhere else.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from sigmascale_core.allocation import allocate, damage_curve, max_rank
from sigmascale_core.artifacts import write_json_atomic
from sigmascale_core.calibration import stats_key
from sigmascale_core.methods import loss_curve
from sigmascale_core.models import GROUP_OF_KIND, get_module, load_model, target_matrices
from sigmascale_core.pipeline import DTYPES, CalibrationConfig, calibrate, check_device, uniform_plan
from sigmascale_core.surgery import compress


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_and_decode(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Seconds of the prefill forward over `ids` (batch, T) and of `new_tokens` greedy steps through the
    KV cache, and the cache's size at the end (MiB)."""
    device = ids.device
    synchronize(device)
    start = time.perf_counter()
    out = model(ids, use_cache=True)
    synchronize(device)
    prefill = time.perf_counter() - start
    cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)  # (batch, 1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    decode = time.perf_counter() - start
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return {"prefill": prefill, "decode": decode, "kv_cache_mib": kv / 2**20}


def svdllm_curves(loaded, stats) -> dict:
    """Each matrix's svdllm activation loss as a DamageCurve (measured at every 8th rank)."""
    curves = {}
    for ref in target_matrices(loaded.model):
        weight = get_module(loaded.model, ref.name).weight.detach()
        loss = loss_curve(weight, stats[stats_key(ref.layer, GROUP_OF_KIND[ref.kind])], "svdllm")
        ranks = list(range(8, max_rank(ref.shape) + 1, 8))
        curves[ref.name] = damage_curve(ref.shape, ranks, [float(loss[k]) for k in ranks])
    return curves


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.processor() or "cpu"


def measure(models: dict, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, dict]:
    """Per variant: the median prefill and decode seconds of `repeats` interleaved runs, KV cache size,
    and on CUDA the allocator's peak over a run."""
    device = ids.device
    for model in models.values():  # kernels and allocator warmed up on a short prompt
        prefill_and_decode(model, ids[:, :16], 2)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    peaks: dict[str, float] = {}
    for _ in range(repeats):
        for name, model in models.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runs[name].append(prefill_and_decode(model, ids, new_tokens))
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20
    out = {}
    for name, model in models.items():
        out[name] = {
            "prefill_seconds": statistics.median(r["prefill"] for r in runs[name]),
            "decode_seconds": statistics.median(r["decode"] for r in runs[name]),
            "parameters": sum(p.numel() for p in model.parameters()),  # tied weights once
            "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
            "kv_cache_mib": runs[name][-1]["kv_cache_mib"],
            **({"peak_cuda_allocated_mib": peaks[name]} if name in peaks else {}),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--retentions", default="0.9,0.75,0.5", help="uniform svdllm plans")
    parser.add_argument("--allocated", default="0.75", help="greedy-allocated svdllm plans ('': none)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the results here (default: stdout)")
    args = parser.parse_args()
    device = check_device(args.device)

    def floats(text: str) -> list[float]:
        return [float(x) for x in text.split(",") if x]

    loaded = load_model(device=str(device), dtype=torch.float32)
    stats, _ = calibrate(loaded, CalibrationConfig(samples=8, seq_len=256))
    plans = {f"uniform {r}": uniform_plan(loaded, r, "svdllm") for r in floats(args.retentions)}
    if floats(args.allocated):
        curves = svdllm_curves(loaded, stats)
        for r in floats(args.allocated):
            plans[f"greedy {r}"] = allocate(uniform_plan(loaded, r, "svdllm"), curves, r, "greedy")
    models = {"dense": loaded.model}
    for name, plan in plans.items():
        models[name] = copy.deepcopy(loaded.model)
        compress(models[name], plan, stats)
    del stats

    rows = []
    for dtype_name in args.dtypes.split(","):
        for model in models.values():
            model.to(DTYPES[dtype_name])
        for batch in (int(b) for b in args.batches.split(",")):
            ids = torch.randint(0, loaded.model.config.vocab_size, (batch, args.prompt_tokens), device=device)
            measured = measure(models, ids, args.new_tokens, args.repeats)
            dense = measured["dense"]
            for name, m in measured.items():
                row = {
                    "variant": name,
                    "dtype": dtype_name,
                    "batch": batch,
                    "prefill_tokens_per_s": batch * args.prompt_tokens / m["prefill_seconds"],
                    "decode_tokens_per_s": batch * args.new_tokens / m["decode_seconds"],
                    "prefill_vs_dense": dense["prefill_seconds"] / m["prefill_seconds"],
                    "decode_vs_dense": dense["decode_seconds"] / m["decode_seconds"],
                    **m,
                }
                rows.append(row)
                print(
                    f"{dtype_name} batch {batch} {name:>12}: prefill {row['prefill_tokens_per_s']:8.1f} tok/s "
                    f"({row['prefill_vs_dense']:.2f}x), decode {row['decode_tokens_per_s']:7.1f} tok/s "
                    f"({row['decode_vs_dense']:.2f}x)",
                    flush=True,
                )
    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {**vars(args), "json": None if args.json is None else str(args.json)},
        "plans": {
            name: {"parameter_retention": plan.parameter_retention(), "factorised": len(plan.compressed)}
            for name, plan in plans.items()
        },
        "rows": rows,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,  # the whole process
    }
    if args.json:
        write_json_atomic(result, args.json)
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
