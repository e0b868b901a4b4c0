"""Compression sharded across processes: `torchrun --nproc-per-node 2 ... compress --distributed` (gloo on
the CPU) saves a model bit-identical to the one-process run, from the same cached statistics."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import decaying_matrix
from safetensors.torch import load_file

from sigmascale_core.cli import main
from sigmascale_core.distributed import factors_from_bytes, factors_to_bytes, fit_cost, shard_by_cost
from sigmascale_core.methods import decompose
from sigmascale_core.models import load_model
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.stats import ActivationStats
from sigmascale_core.surgery import PLAN_FILE, input_stats_keys, target_shapes

REPO = Path(__file__).resolve().parents[1]


def test_lpt_shards_cover_every_matrix_once_and_balance_the_cost():
    shapes = {
        f"l{i}.{k}": s for i in range(8) for k, s in {"q": (64, 64), "k": (32, 64), "up": (96, 64)}.items()
    }
    for world in (1, 2, 3, 5):
        shards = shard_by_cost(shapes, world)
        assert sorted(n for shard in shards for n in shard) == sorted(shapes)
        loads = [sum(fit_cost(shapes[n]) for n in shard) for shard in shards]
        assert max(loads) - min(loads) <= max(fit_cost(s) for s in shapes.values())  # LPT's bound
        assert shards == shard_by_cost(dict(reversed(shapes.items())), world)  # order-free, deterministic


def test_factors_survive_the_byte_round_trip_exactly(layer):
    W, _, stats = layer
    factors = {
        "a": decompose(W, stats, 8, "sigmascale", steps=3),
        "b": decompose(W.float(), ActivationStats.from_inputs(decaying_matrix(40, 32, 1)), 5, "svdllm"),
    }
    back = factors_from_bytes(factors_to_bytes(factors))
    assert back.keys() == factors.keys()
    for name, f in factors.items():
        g = back[name]
        assert (g.method, g.jitter) == (f.method, f.jitter)
        for field in ("left", "right", "scaled_singular_values", "row_scale", "col_scale"):
            a, b = getattr(f, field), getattr(g, field)
            assert (a is None and b is None) or (torch.equal(a, b) and a.dtype == b.dtype)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny import save_tiny_model

    directory = tmp_path_factory.mktemp("tiny")
    save_tiny_model(directory)
    return directory


def _args(model_dir: Path, method: str, out: Path) -> list[str]:
    return [
        "compress", "--model", str(model_dir), "--device", "cpu", "--samples", "4", "--seq-len", "32",
        "--method", method, "--retention", "0.5", "--option" if method == "sigmascale" else "",
        "steps=5" if method == "sigmascale" else "", "--out", str(out),
    ]  # fmt: skip


def test_distributed_without_torchrun_or_with_what_it_cannot_shard_is_refused(tiny_dir, tmp_path, capsys):
    args = [a for a in _args(tiny_dir, "svdllm", tmp_path / "o") if a]
    assert main([*args, "--distributed"]) == 2
    assert "needs torchrun" in capsys.readouterr().err
    assert main([*args, "--distributed", "--sequential"]) == 2
    assert "cannot run --sequential" in capsys.readouterr().err
    assert main([*args, "--distributed", "--allocation", "greedy"]) == 2
    assert "perplexity probe" in capsys.readouterr().err
    assert main([*args, "--distributed", "--keep-dense-if-slower"]) == 2
    assert "cannot keep dense" in capsys.readouterr().err
    plan = tmp_path / "plan.json"  # the flag inside a plan file is refused alike
    loaded = load_model(str(tiny_dir))
    uniform = CompressionPlan.uniform(target_shapes(loaded.model), 0.5, "svdllm", loaded.fingerprint)
    dataclasses.replace(uniform, keep_dense_if_slower=True).save(plan)
    plan_args = [a for a in args if a not in ("--retention", "0.5")]
    assert main([*plan_args, "--plan", str(plan), "--distributed"]) == 2
    assert "cannot keep dense" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["svdllm", "sigmascale"])
def test_torchrun_two_ranks_save_the_single_process_model_bit_for_bit(
    method, tiny_dir, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SIGMASCALE_CACHE", str(cache))
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1): the same kernels
    try:
        assert main([a for a in _args(tiny_dir, method, single) if a]) == 0  # also caches the stats
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SIGMASCALE_CACHE": str(cache)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [
        "-m",
        "sigmascale_core.cli",
        *[a for a in _args(tiny_dir, method, sharded) if a],
        "--distributed",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = load_file(sharded / "model.safetensors"), load_file(single / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    report = json.loads((sharded / "report.json").read_text())
    assert report["distributed"]["world_size"] == 2 and report["distributed"]["backend"] == "gloo"
    assert sum(report["distributed"]["matrices_per_rank"]) == 14
    assert min(report["distributed"]["matrices_per_rank"]) >= 1
    assert report["calibration"]["cached"]  # rank 0 read the statistics the single run had saved
    # each rank held only the statistics of its shard's inputs (read from the cache one at a time)
    loaded = load_model(str(tiny_dir))
    plan = CompressionPlan.load(sharded / PLAN_FILE)
    shards = shard_by_cost({name: tuple(m.shape) for name, m in plan.compressed.items()}, 2)
    needed = [len(set(input_stats_keys(loaded.model, shard).values())) for shard in shards]
    assert report["distributed"]["stats_per_rank"] == needed
