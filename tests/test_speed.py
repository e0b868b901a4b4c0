"""Time break-even and keep_dense_if_slower, decided by synthetic speed-ups (no test depends on timing)."""

import json

import pytest
import torch
from tiny import save_tiny_model

from sigmascale_core.plan import CompressionPlan, MatrixPlan
from sigmascale_core.speed import keep_dense_where_slower, matmul_speedup, time_break_even_rank


def slow_factors(slowdown: float, overhead: float = 0.0):
    """Seconds ∝ multiply-adds; factors pay `slowdown` per multiply-add and a fixed `overhead`."""

    def speedup(m, n, rank, tokens):
        return m * n * tokens / (slowdown * rank * (m + n) * tokens + overhead)

    return speedup


def counting(measure):
    calls = []

    def counted(*args):
        calls.append(args)
        return measure(*args)

    return counted, calls


def brute_force_break_even(m, n, tokens, speedup):
    return max((k for k in range(1, min(m, n) + 1) if speedup(m, n, k, tokens) > 1), default=0)


@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576), (576, 1536), (7, 3), (1, 5)])
@pytest.mark.parametrize(
    "speedup",
    [
        slow_factors(1.0),  # the parameter break-even, exclusive
        slow_factors(2.0, overhead=1000.0),
        slow_factors(0.1),  # factors always faster: min(m, n)
        slow_factors(1.0, overhead=1e12),  # never faster: 0
    ],
)
def test_break_even_rank_is_the_brute_force_scans_in_log_many_measurements(shape, speedup):
    counted, calls = counting(speedup)
    assert time_break_even_rank(*shape, 8, counted) == brute_force_break_even(*shape, 8, speedup)
    assert len(calls) <= min(shape).bit_length() + 1  # min(m, n), then bisection


def plan_of(ranks: dict[str, tuple[tuple[int, int], int | None]], **fields) -> CompressionPlan:
    matrices = {name: MatrixPlan(shape, rank) for name, (shape, rank) in ranks.items()}
    return CompressionPlan("fp", "svdllm", {}, matrices, 0.5, "greedy", **fields)


def test_keep_dense_where_slower_against_a_hand_computed_plan():
    # factors twice as slow per multiply-add: faster only while 2k(m+n) < mn, i.e. k ≤ 143 for
    # 576×576 (mn/(2(m+n)) = 144) and k ≤ 71 for 192×576 (= 72)
    plan = plan_of(
        {
            "a": ((576, 576), 100),
            "b": ((576, 576), 200),
            "c": ((192, 576), 71),
            "d": ((192, 576), 72),
            "e": ((192, 576), None),
        }
    )
    kept, report = keep_dense_where_slower(plan, tokens=4, speedup=slow_factors(2.0))
    assert {name: m.rank for name, m in kept.matrices.items()} == {
        "a": 100,
        "b": None,
        "c": 71,
        "d": None,
        "e": None,
    }
    assert report["kept_dense"] == {"b": 200, "d": 72}
    # b: 576·576 − 200·1152 = 101,376; d: 192·576 − 72·768 = 55,296
    assert report["parameters_cost"] == 101_376 + 55_296
    assert report["shapes"] == {
        "192x576": {"time_break_even_rank": 71, "parameter_break_even_rank": 144.0},
        "576x576": {"time_break_even_rank": 143, "parameter_break_even_rank": 288.0},
    }
    assert report["parameter_retention_after"] - report["parameter_retention_before"] == pytest.approx(
        156_672 / (2 * 576 * 576 + 3 * 192 * 576)
    )
    assert (kept.method, kept.allocation, kept.target_retention) == ("svdllm", "greedy", 0.5)


def test_nothing_is_kept_dense_where_factors_are_faster():
    plan = plan_of({"a": ((576, 576), 287), "b": ((192, 576), 1)})
    kept, report = keep_dense_where_slower(plan, speedup=slow_factors(1.0))
    assert kept == plan and report["kept_dense"] == {} and report["parameters_cost"] == 0


def test_the_flag_survives_json_and_every_plan_edit(tmp_path):
    from sigmascale_core.allocation import allocate, damage_curve

    plan = plan_of({"a": ((576, 576), 100), "b": ((192, 576), 50)}, keep_dense_if_slower=True)
    plan.save(tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["keep_dense_if_slower"] is True
    assert CompressionPlan.load(tmp_path / "plan.json") == plan
    assert plan.with_ranks({"a": 10}).keep_dense_if_slower
    assert plan.edited({"a": 10}, "table").keep_dense_if_slower
    assert plan.with_method("asvd").keep_dense_if_slower
    curves = {name: damage_curve(m.shape, [1, 50], [1.0, 0.5]) for name, m in plan.matrices.items()}
    assert allocate(plan, curves, 0.5).keep_dense_if_slower


def test_plan_json_from_before_the_flag_loads_and_a_non_bool_is_refused():
    data = plan_of({"a": ((576, 576), 100)}).to_dict()
    del data["keep_dense_if_slower"]
    assert CompressionPlan.from_dict(data).keep_dense_if_slower is False
    with pytest.raises(ValueError, match="keep_dense_if_slower must be true or false, got 'yes'"):
        CompressionPlan.from_dict({**data, "keep_dense_if_slower": "yes"})
    with pytest.raises(ValueError, match="keep_dense_if_slower must be true or false, got 1"):
        plan_of({"a": ((576, 576), 100)}, keep_dense_if_slower=1)


def test_matmul_speedup_is_a_positive_ratio():
    assert matmul_speedup(8, 6, 3, tokens=4, repeats=2, min_seconds=0.001) > 0


def test_pipeline_keeps_the_slow_shapes_dense_and_reports_the_cost(tmp_path, monkeypatch):
    """The tiny Llama at 0.5: q/o 64×64 (rank 16), k/v 32×64 (10), gate/up 96×64 (19), down 64×96 (19).
    Only 96×64 factors are slower than dense: gate and up of both layers stay dense."""
    from sigmascale_core.pipeline import CompressionConfig, run_compression
    from sigmascale_core.surgery import LowRankLinear, load_compressed

    save_tiny_model(tmp_path / "tiny")  # (the bundled tokenizer, from the shared cache)
    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path / "cache"))

    def speedup(m, n, rank, tokens):
        return 0.5 if (m, n) == (96, 64) else 2.0

    config = CompressionConfig(
        out=str(tmp_path / "out"),
        model=str(tmp_path / "tiny"),
        method="svd",
        retention=0.5,
        samples=2,
        seq_len=32,
        keep_dense_if_slower=True,
    )
    report = run_compression(config, speedup=speedup)
    speed = report["keep_dense_if_slower"]
    slow = {f"model.layers.{i}.mlp.{kind}_proj" for i in (0, 1) for kind in ("gate", "up")}
    assert speed["kept_dense"] == dict.fromkeys(slow, 19)
    assert speed["parameters_cost"] == 4 * (96 * 64 - 19 * 160)
    assert speed["shapes"]["96x64"]["time_break_even_rank"] == 0
    assert speed["shapes"]["64x64"]["time_break_even_rank"] == 64
    model, plan = load_compressed(tmp_path / "out")
    assert plan.keep_dense_if_slower and set(plan.matrices) - set(plan.compressed) == slow
    for name, module in model.named_modules():
        if name in slow:
            assert isinstance(module, torch.nn.Linear)
        elif name in plan.matrices:
            assert isinstance(module, LowRankLinear)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["keep_dense_if_slower"] == speed


def test_a_non_bool_config_flag_is_refused_before_loading(tmp_path):
    from sigmascale_core.pipeline import CompressionConfig, check_config

    config = CompressionConfig(out=str(tmp_path / "out"), retention=0.5, keep_dense_if_slower="no")
    with pytest.raises(ValueError, match="keep_dense_if_slower must be true or false"):
        check_config(config)


def test_cli_flag_reaches_the_config():
    from sigmascale_core.cli import build_parser, compression_config

    argv = ["compress", "--retention", "0.5", "--out", "x"]
    assert not compression_config(build_parser().parse_args(argv)).keep_dense_if_slower
    args = build_parser().parse_args([*argv, "--keep-dense-if-slower"])
    assert compression_config(args).keep_dense_if_slower
