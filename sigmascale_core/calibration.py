"""Calibration: stream the inputs of every target matrix into ActivationStats, one decoder layer at a time.

As in llm-awq: capture what enters the first decoder layer, then for each layer hook one module per
input group (q for q/k/v, o, gate for gate/up, down), run the layer on the captured batches, and feed
its outputs to the next layer. Memory holds the model, the hidden states of the calibration set and
one layer's statistics (moved to `stats_device` when the layer is done). The inputs are the *dense*
model's activations; `sequential=True` instead compresses each layer (by a callback) before its
outputs are computed, so later layers see the already-compressed earlier ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sigmascale_core.artifacts import cache_root, read_tensors, save_tensors_atomic
from sigmascale_core.models import (
    INPUT_GROUPS,
    decoder_layers,
    execution_device,
    get_module,
    target_matrices,
)
from sigmascale_core.progress import Progress
from sigmascale_core.stats import ActivationStats, resolve_gram_dtype

STATS_FORMAT = "1"  # bump when the layout of a stats file changes


def stats_key(layer: int, group: str) -> str:
    """Key of one shared input's statistics, e.g. '3.attn_in' (see models.INPUT_GROUPS)."""
    return f"{layer}.{group}"


class _Captured(Exception):
    """Raised by the catcher hook to stop a forward pass once layer 0's inputs are recorded."""


def _layer_inputs(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, dict]]:
    """(hidden_states, kwargs) entering decoder layer 0, one entry per batch of input_ids."""
    device = execution_device(model.get_input_embeddings())
    captured: list[tuple[torch.Tensor, dict]] = []

    def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    hook = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in input_ids.split(batch_size):
            with contextlib.suppress(_Captured):
                model(batch.to(device), use_cache=False)
    finally:
        hook.remove()
    return captured


def collect_stats(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int = 4,
    stats_device: torch.device | str = "cpu",
    progress: Progress | None = None,
    compress_layer: Callable[[int, dict[str, ActivationStats]], None] | None = None,
    gram_dtype: str = "float64",
) -> dict[str, ActivationStats]:
    """Statistics of every input group of every decoder layer on `input_ids` (n_samples, seq_len).

    Keys are stats_key(layer, group). With `compress_layer(i, stats_of_layer_i)` (the sequential
    variant), layer i is compressed in place right after its statistics are collected. `gram_dtype`
    ("float64" or "float32") is the Grams' storage (see stats.py).
    """
    stats: dict[str, ActivationStats] = {}
    steps = layer_stats_steps(model, {"": input_ids}, batch_size, stats_device, compress_layer, gram_dtype)
    for i, (_layer, by_split) in enumerate(steps):
        stats.update(by_split[""])
        if progress is not None:
            progress(i + 1, len(decoder_layers(model)), "calibration")
    return stats


def layer_stats_steps(
    model: nn.Module,
    splits: dict[str, torch.Tensor],
    batch_size: int = 4,
    stats_device: torch.device | str = "cpu",
    compress_layer: Callable[[int, dict[str, ActivationStats]], None] | None = None,
    gram_dtype: str = "float64",
) -> Iterator[tuple[int, dict[str, dict[str, ActivationStats]]]]:
    """One decoder layer per step: (layer, {split: {stats_key: stats}}) for several token sets at once.

    Every split's windows go through the model in one pass (batches never mix splits), so the
    calibration and held-out statistics cost one sweep; a caller can do other work between layers
    (the app's compute service shows each layer's spectra as soon as its statistics exist).
    """
    dtype = resolve_gram_dtype(gram_dtype)  # ValueError before any work
    for name, ids in splits.items():
        if ids.ndim != 2 or ids.numel() == 0:
            raise ValueError(f"input_ids {name!r} must be (n_samples, seq_len), got shape {tuple(ids.shape)}")
    layers = decoder_layers(model)
    refs = target_matrices(model)
    with torch.no_grad():
        batches = [
            (name, *batch) for name, ids in splits.items() for batch in _layer_inputs(model, ids, batch_size)
        ]
        active = [""]  # the split of the batch in flight, read by the hooks
        for i, layer in enumerate(layers):
            device = execution_device(layer)  # under a device map: the GPU it runs on, wherever it is kept
            layer_stats: dict[str, dict[str, ActivationStats]] = {}
            hooks = []
            for group, kinds in INPUT_GROUPS.items():
                reader = next(r for r in refs if r.layer == i and r.kind == kinds[0])  # one reader per input
                current = {
                    name: ActivationStats(reader.in_features, device=device, dtype=dtype) for name in splits
                }
                layer_stats[group] = current
                hooks.append(
                    get_module(model, reader.name).register_forward_pre_hook(
                        lambda _m, args, s=current, a=active: s[a[0]].update(args[0])
                    )
                )
            try:
                outputs = []
                for name, hidden, kwargs in batches:
                    active[0] = name
                    outputs.append(_hidden(layer(hidden, **kwargs)))
            finally:
                for hook in hooks:
                    hook.remove()
            if compress_layer is not None:  # the next layer must see this one compressed
                only = next(iter(splits))
                compress_layer(i, {group: s[only] for group, s in layer_stats.items()})
                outputs = [_hidden(layer(hidden, **kwargs)) for _, hidden, kwargs in batches]
            batches = [(name, out, kwargs) for out, (name, _, kwargs) in zip(outputs, batches, strict=True)]
            yield (
                i,
                {
                    name: {stats_key(i, group): s[name].to(stats_device) for group, s in layer_stats.items()}
                    for name in splits
                },
            )


def _hidden(output: Any) -> torch.Tensor:
    """A decoder layer returns a tensor (transformers 5) or a tuple starting with one (4.x)."""
    return output[0] if isinstance(output, tuple) else output


# ---------------------------------------------------------------------------------------------------
# On-disk cache: one safetensors file per (model, text, samples, seq len, seed, variant), written atomically.


def stats_cache_path(key: dict[str, object]) -> Path:
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=12).hexdigest()
    return cache_root() / "stats" / f"{digest}.safetensors"


def save_stats(stats: dict[str, ActivationStats], path: Path, key: dict[str, object]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, s in stats.items():
        tensors.update(s.tensors(prefix=f"{name}."))
    save_tensors_atomic(tensors, path, {"format": STATS_FORMAT, "key": json.dumps(key, sort_keys=True)})


def load_stats(
    path: Path, key: dict[str, object], only: Collection[str] | None = None
) -> dict[str, ActivationStats] | None:
    """The cached stats for `key` (only the stats keys in `only`, when given: a rank's shard), or None
    when the file is missing, corrupt (checksum), for another key, of another layout or without one of
    `only`: the caller recomputes. An interrupt while reading propagates."""
    keep = None if only is None else (lambda name: name.rsplit(".", 1)[0] in only)
    read = read_tensors(path, keep)
    if read is None:
        return None
    tensors, meta = read
    if meta.get("format") != STATS_FORMAT or meta.get("key") != json.dumps(key, sort_keys=True):
        return None
    names = sorted({name.rsplit(".", 1)[0] for name in tensors})
    if only is not None and set(only) - set(names):
        return None
    try:
        return {name: ActivationStats.from_tensors(tensors, prefix=f"{name}.") for name in names}
    except (KeyError, ValueError):  # a layout this version does not know: recompute
        return None
