"""KV-cache bytes per token and decode speed with and without the latent KV cache.

    OMP_NUM_THREADS=1 SIGMASCALE_CACHE=/tmp/cache python bench/bench_kv_cache.py \
        --out bench/results/kv_cache.json

The bundled SmolLM2-135M (30 layers, GQA: K and V are 3 heads × 64 = 192 wide, fp32 here) compressed
by a uniform svdllm plan (8 × 256 calibration tokens) at each --retentions, saved and loaded twice: with
the plain DynamicCache and with the latent one (load_compressed(latent_kv=True)). For each prompt length:
the cache's bytes per token after a generation, counted from the tensors it holds, and the decode
tokens/s of both (generate of --new-tokens minus a 1-token generate, so prefill is left out), measured
alternately in this process, --repeats times, median; the speed is reported as the ratio latent/plain.
Exactness: the largest |logit| difference of each generation to one uncached forward pass over the
generated sequence (the plain cache's own difference is float32's floor for this model). Then the same bytes per
token for a Llama-3.1-8B-shaped model on paper (no weights): 32 layers, K/V 8 heads × 128 = 1024 wide,
hidden 4096, bf16, plus the multiply-adds per decoded token the latent cache adds there (K rebuilt; V
attended as r-wide latents).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sigmascale_core.artifacts import write_json_atomic
from sigmascale_core.metrics import rank_for_retention
from sigmascale_core.models import load_model
from sigmascale_core.pipeline import CalibrationConfig, calibrate, uniform_plan
from sigmascale_core.surgery import compress, load_compressed, save_compressed

POSITION_BYTES = (
    8  # the latent cache keeps one int64 position per token and layer (K is rotated after rebuild)
)
LLAMA_8B = dict(layers=32, hidden=4096, heads=32, head_dim=128, kv_width=8 * 128, dtype_bytes=2)  # bf16


def cache_bytes_per_token(cache) -> float:
    """Bytes the cache holds (keys, values and, in the latent cache, positions) per cached token."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values, getattr(layer, "positions", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    batch = cache.layers[0].keys.shape[0]
    return total / (batch * cache.get_seq_length())


def generate(model, ids: torch.Tensor, new_tokens: int):
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )


def decode_seconds_per_token(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Wall time of the `new_tokens - 1` decode steps after the first token (prefill excluded)."""
    start = time.perf_counter()
    generate(model, ids, 1)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    generate(model, ids, new_tokens)
    return (time.perf_counter() - start - prefill) / (new_tokens - 1)


def measure(models: dict, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    outputs = {name: generate(model, ids, new_tokens) for name, model in models.items()}  # also warms up
    seconds = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():  # alternate, so drifting machine load hits both alike
            seconds[name].append(decode_seconds_per_token(model, ids, new_tokens))
    plain, latent = outputs["plain"], outputs["latent"]
    with torch.no_grad():  # one pass over the whole sequence without a cache: the reference logits
        uncached = models["plain"](plain.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
    tokens_per_s = {name: 1 / statistics.median(s) for name, s in seconds.items()}
    return {
        "prompt_tokens": ids.shape[1],
        "new_tokens": new_tokens,
        "kv_bytes_per_token": {name: cache_bytes_per_token(o.cache) for name, o in outputs.items()},
        "decode_tokens_per_s": tokens_per_s,
        "decode_speed_latent_over_plain": tokens_per_s["latent"] / tokens_per_s["plain"],
        "same_tokens": bool(torch.equal(plain.sequences, latent.sequences)),
        "max_abs_logit_difference_to_uncached": {
            name: (torch.stack(o.logits, dim=1) - uncached).abs().max().item() for name, o in outputs.items()
        },
        "max_abs_logit": uncached.abs().max().item(),
    }


def llama_8b_on_paper(retention: float, context: int) -> dict:
    """Bytes per token of a Llama-3.1-8B-shaped KV cache, plain and latent, at a uniform retention, and
    what the latent cache adds per decoded token at `context` cached tokens, in multiply-adds: K rebuilt
    from the latents, and V's attention over r-wide latents instead of 128-wide heads."""
    layers, hidden, width, size = (LLAMA_8B[k] for k in ("layers", "hidden", "kv_width", "dtype_bytes"))
    heads, head_dim = LLAMA_8B["heads"], LLAMA_8B["head_dim"]
    rank = rank_for_retention(width, hidden, retention)  # k_proj and v_proj are (1024, 4096)
    plain = layers * 2 * width * size
    latent = layers * (2 * rank * size + POSITION_BYTES)
    weights_macs = 8.0e9  # ≈ parameters: the dense model's multiply-adds per token
    k_rebuild = layers * context * rank * width  # K = latent (T, r) · leftᵀ (r, 1024)
    v_extra = layers * heads * context * (rank - head_dim)  # softmax · Z (T, r) instead of · V (T, 128)
    return {
        "retention": retention,
        "kv_rank": rank,
        "kv_bytes_per_token": {"plain": plain, "latent": latent},
        "latent_over_plain": latent / plain,
        "context": context,
        "extra_macs_per_decoded_token": {"k_rebuild": k_rebuild, "v_latent_attention": v_extra},
        "extra_macs_over_dense_weights_macs": (k_rebuild + v_extra) / weights_macs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--prompts", type=int, nargs="+", default=[128, 512], help="prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for retention in args.retentions:
        loaded = load_model()
        stats, _ = calibrate(loaded, CalibrationConfig(samples=8, seq_len=256))
        plan = uniform_plan(loaded, retention, "svdllm")
        compress(loaded.model, plan, stats)
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_compressed(loaded.model, plan, Path(tmp) / "out")
            models = {
                "plain": load_compressed(folder)[0],
                "latent": load_compressed(folder, latent_kv=True)[0],
            }
        k_proj = models["latent"].model.layers[0].self_attn.k_proj
        ids_all = torch.randint(100, loaded.model.config.vocab_size, (1, max(args.prompts)))
        for length in args.prompts:
            row = {"retention": retention, "kv_rank": k_proj.rank, "kv_width": k_proj.out_features}
            row.update(measure(models, ids_all[:, :length], args.new_tokens, args.repeats))
            rows.append(row)
            print(json.dumps(row))
    paper = [llama_8b_on_paper(r, c) for r in args.retentions for c in (1024, 8192)]
    for row in paper:
        print(json.dumps(row))
    result = {
        "command": "OMP_NUM_THREADS=1 python bench/bench_kv_cache.py --out bench/results/kv_cache.json",
        "device": "cpu, 1 thread",
        "torch_threads": torch.get_num_threads(),
        "smollm2_135m_fp32": rows,
        "llama_3.1_8b_shape_bf16_on_paper": paper,
    }
    if args.out:
        write_json_atomic(result, args.out)


if __name__ == "__main__":
    main()
