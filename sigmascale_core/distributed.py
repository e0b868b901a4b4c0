"""Compression across processes and machines, on torch.distributed (launched by torchrun).

Given the statistics, every matrix's fit is independent: the matrices are sharded across ranks by
cost (longest-processing-time first), each rank fits its shard on its own device (cuda:LOCAL_RANK
with NCCL, the CPU with gloo; the model itself stays where --device put it, the host for a 70B), and sends its factors to rank 0 as safetensors bytes in a uint8 tensor
(never a pickle); rank 0 applies them and saves once. Each fit is the single-process computation on
the same inputs, so the factors are bit-identical to a one-process run on the same kind of device.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from sigmascale_core.methods import LowRankFactors
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.progress import Progress
from sigmascale_core.stats import ActivationStats
from sigmascale_core.surgery import fit_factors

if TYPE_CHECKING:
    from sigmascale_core.pipeline import CompressionConfig


@dataclass(frozen=True)
class Group:
    """This process's place in the torchrun job."""

    rank: int  # global rank; 0 gathers and saves
    world: int  # number of processes
    device: torch.device  # where this rank's fits run: cuda:LOCAL_RANK under NCCL, else the CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def init_group() -> Group:
    """Join the torchrun job: NCCL with each rank's fits on cuda:LOCAL_RANK where CUDA is available,
    else gloo on the CPU. ValueError outside torchrun."""
    if not launched_by_torchrun():
        raise ValueError(
            "--distributed needs torchrun: torchrun --nproc-per-node N -m sigmascale_core.cli compress "
            "... --distributed"
        )
    if torch.cuda.is_available():
        where, backend = torch.device("cuda", int(os.environ["LOCAL_RANK"])), "nccl"
        torch.cuda.set_device(where)
    else:
        where, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=where if backend == "nccl" else None)
    return Group(dist.get_rank(), dist.get_world_size(), where)


@contextlib.contextmanager
def distributed_session() -> Iterator[Group]:
    """init_group, and the process group torn down on the way out (also after an error)."""
    group = init_group()
    try:
        yield group
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def main_rank_first(group: Group | None) -> Iterator[None]:
    """Rank 0 runs the block first (it fills a cache), then the others (they read it); no-op alone."""
    if group is not None and not group.is_main:
        dist.barrier()
    yield
    if group is not None and group.is_main:
        dist.barrier()


def check_distributable(config: CompressionConfig, plan: CompressionPlan | None = None) -> None:
    """ValueError for what a sharded run cannot honour: each needs the whole model in one process, or
    (keep_dense_if_slower) one timing that every rank agrees on."""
    if config.keep_dense_if_slower or (plan is not None and plan.keep_dense_if_slower):
        raise ValueError(
            "--distributed cannot keep dense the matrices found slower (keep_dense_if_slower): each rank "
            "would time its own matmuls and the ranks could disagree on the plan; run it in one process"
        )
    if config.sequential:
        raise ValueError(
            "--distributed cannot run --sequential: each layer's stats need the layers before it compressed"
        )
    if config.finetune_steps:
        raise ValueError(
            "--distributed cannot fine-tune (--finetune-steps): run it after, on the saved model"
        )
    if config.allocation != "uniform" and config.probe == "perplexity":
        raise ValueError(
            "--distributed cannot run a perplexity probe for --allocation: pass --probe proxy, or make the "
            "plan first (sigmascale probe, then --plan)"
        )


def fit_cost(shape: tuple[int, int]) -> float:
    """Relative cost of one fit: its products are m·n·min(m, n), its eigendecompositions min(m, n)³."""
    m, n = shape
    return m * n * min(m, n) + min(m, n) ** 3


def shard_by_cost(shapes: dict[str, tuple[int, int]], world: int) -> list[list[str]]:
    """Names per rank, by LPT: the costliest matrix first, each to the least-loaded rank (ties: the name,
    the lower rank). Deterministic, so every rank computes the same split without talking."""
    if world < 1:
        raise ValueError(f"world size must be ≥ 1, got {world}")
    shards: list[list[str]] = [[] for _ in range(world)]
    load = [0.0] * world
    for name in sorted(shapes, key=lambda name: (-fit_cost(shapes[name]), name)):
        target = min(range(world), key=lambda r: (load[r], r))
        shards[target].append(name)
        load[target] += fit_cost(shapes[name])
    return shards


def shard_of(plan: CompressionPlan, group: Group) -> list[str]:
    """The compressed matrices this rank fits (shard_by_cost over the plan: the same on every rank)."""
    shapes = {name: tuple(m.shape) for name, m in plan.compressed.items()}
    return shard_by_cost(shapes, group.world)[group.rank]


def factors_to_bytes(factors: dict[str, LowRankFactors]) -> bytes:
    """One safetensors blob: each matrix's tensors under `name.field`, method and jitter in metadata."""
    tensors, meta = {}, {}
    for name, f in factors.items():
        for field in ("left", "right", "scaled_singular_values", "row_scale", "col_scale"):
            value = getattr(f, field)
            if value is not None:
                tensors[f"{name}.{field}"] = value.detach().cpu().contiguous()
        meta[name] = {"method": f.method, "jitter": f.jitter}
    return save_safetensors(tensors, metadata={"factors": json.dumps(meta)})


def factors_from_bytes(blob: bytes) -> dict[str, LowRankFactors]:
    """The inverse of factors_to_bytes (CPU tensors)."""
    tensors = load_safetensors(blob)
    out = {}
    for name, record in _metadata(blob).items():
        out[name] = LowRankFactors(
            left=tensors[f"{name}.left"],
            right=tensors[f"{name}.right"],
            scaled_singular_values=tensors[f"{name}.scaled_singular_values"],
            method=record["method"],
            row_scale=tensors.get(f"{name}.row_scale"),
            col_scale=tensors.get(f"{name}.col_scale"),
            jitter=float(record["jitter"]),
        )
    return out


def _metadata(blob: bytes) -> dict:
    """The `factors` entry of a safetensors blob's header (8-byte length, then JSON)."""
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + length])
    return json.loads(header["__metadata__"]["factors"])


def _send_bytes(blob: bytes, dst: int, device: torch.device) -> None:
    payload = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    dist.send(torch.tensor([payload.numel()], dtype=torch.int64, device=device), dst)
    dist.send(payload, dst)


def _recv_bytes(src: int, device: torch.device) -> bytes:
    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(size, src)
    payload = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.recv(payload, src)
    return payload.cpu().numpy().tobytes()


def fit_distributed(
    model: nn.Module,
    plan: CompressionPlan,
    stats: dict[str, ActivationStats],
    group: Group,
    progress: Progress | None = None,
) -> tuple[dict[str, LowRankFactors] | None, dict]:
    """Fit this rank's shard of the plan; rank 0 returns every matrix's factors (CPU), the others None.

    Also returns what each rank did (matrices, share of the cost, statistics held), the same on every
    rank."""
    shapes = {name: tuple(m.shape) for name, m in plan.compressed.items()}
    shards = shard_by_cost(shapes, group.world)
    mine = set(shards[group.rank])  # = shard_of(plan, group), what the pipeline read statistics for
    shard_plan = plan.with_ranks({name: None for name in plan.compressed if name not in mine})
    factors = fit_factors(model, shard_plan, stats, progress, device=group.device)
    total = sum(fit_cost(s) for s in shapes.values()) or 1.0
    held = [torch.zeros(1, dtype=torch.int64, device=group.device) for _ in range(group.world)]
    dist.all_gather(held, torch.tensor([len(stats)], dtype=torch.int64, device=group.device))
    info = {
        "world_size": group.world,
        "backend": dist.get_backend(),
        "matrices_per_rank": [len(s) for s in shards],
        "cost_share_per_rank": [sum(fit_cost(shapes[n]) for n in s) / total for s in shards],
        "stats_per_rank": [int(h) for h in held],  # input statistics each rank held (of len(stats) all)
    }
    if not group.is_main:
        _send_bytes(factors_to_bytes(factors), 0, group.device)
        return None, info
    gathered = factors_from_bytes(factors_to_bytes(factors))  # on the CPU, as the received ones
    for src in range(1, group.world):
        gathered.update(factors_from_bytes(_recv_bytes(src, group.device)))
    return {name: gathered[name] for name in plan.compressed}, info  # the plan's order
