"""float32 Gram storage (issue 18): half the memory, the same truncations to float64 rounding."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import REPO, _args
from test_text import WORDS, word_tokenizer, write_docs
from tiny import save_tiny_model, tiny_model

from sigmascale_core.calibration import load_stats, save_stats, stats_cache_path
from sigmascale_core.cli import _calibration_config, build_parser, compression_config, main
from sigmascale_core.compute import ServiceConfig
from sigmascale_core.methods import decompose, loss_curve
from sigmascale_core.metrics import activation_loss, rank_for_retention
from sigmascale_core.models import LoadedModel, model_fingerprint, tokenizer_fingerprint
from sigmascale_core.pipeline import (
    CalibrationConfig,
    CompressionConfig,
    calibrate,
    calibration_key,
    check_config,
)
from sigmascale_core.stats import ActivationStats


def llm_like_inputs(tokens: int, n: int, energy_span: float, seed: int) -> torch.Tensor:
    """float32 inputs whose channel energies span 10^energy_span (LLM activations: ~1e6), correlated."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, energy_span / 2, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    mixing = (
        torch.eye(n, dtype=torch.float64) + 0.5 * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    )
    return ((torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mixing) * scales).float()


def exact_stats(x: torch.Tensor) -> ActivationStats:
    """The float64 reference: the Gram of the same inputs recomputed in float64 in one product."""
    x64 = x.double()
    return ActivationStats(x.shape[1], gram=x64.T @ x64, abs_sum=x64.abs().sum(0), count=x.shape[0])


# -- (a) storage ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("energy_span", [0, 6])
def test_float32_gram_equals_the_float64_reference_to_float32_rounding(energy_span):
    x = llm_like_inputs(9000, 64, energy_span, seed=1)  # 5 chunks: sums across chunks in float32
    reference = exact_stats(x)
    stats = ActivationStats.from_inputs(x, dtype="float32")
    assert stats.gram.dtype == torch.float32 and stats.dtype == torch.float32
    assert stats.abs_sum.dtype == torch.float64  # n floats: stays float64
    # entrywise: a few float32 ulps (ε = 6e-8) of the entry's own scale, on every channel's scale
    scale = reference.gram.diagonal().sqrt()
    relative = (stats.gram.double() - reference.gram) / (scale[:, None] * scale[None, :])
    assert relative.abs().max() < 1e-6
    torch.testing.assert_close(stats.abs_sum, reference.abs_sum, rtol=1e-6, atol=0)


def test_default_stays_float64_and_a_given_gram_keeps_its_dtype():
    x = torch.randn(100, 8)
    assert ActivationStats.from_inputs(x).gram.dtype == torch.float64
    g32 = ActivationStats.from_inputs(x, dtype=torch.float32).gram
    assert ActivationStats(8, gram=g32).gram.dtype == torch.float32  # no silent widening
    assert ActivationStats(8, gram=g32.double()).gram.dtype == torch.float64
    asked = ActivationStats(8, gram=g32.double(), dtype="float32")  # the dtype asked for wins
    assert asked.gram.dtype == torch.float32 and torch.equal(asked.gram, g32)


@pytest.mark.parametrize(
    "kwargs",
    [{"dtype": torch.float16}, {"dtype": "bfloat16"}, {"gram": torch.zeros(8, 8, dtype=torch.float16)}],
)
def test_other_gram_dtypes_are_refused(kwargs):
    with pytest.raises(ValueError, match="float32"):
        ActivationStats(8, **kwargs)


def test_float32_stats_save_load_merge_and_move_as_float32(tmp_path):
    a, b = torch.randn(300, 12), torch.randn(500, 12)
    sa, sb = (ActivationStats.from_inputs(t, dtype="float32") for t in (a, b))
    merged = sa.merge(sb)
    assert merged.gram.dtype == torch.float32 and merged.count == 800
    torch.testing.assert_close(
        merged.gram.double(), exact_stats(torch.cat([a, b])).gram, rtol=1e-5, atol=1e-3
    )
    assert sa.to("cpu").gram.dtype == torch.float32
    assert sa.tensors()["gram"].dtype == torch.float32
    sa.save(tmp_path / "s.safetensors")
    loaded = ActivationStats.load(tmp_path / "s.safetensors")
    assert loaded.gram.dtype == torch.float32 and torch.equal(loaded.gram, sa.gram)
    assert torch.equal(loaded.abs_sum, sa.abs_sum)
    save_stats({"0.attn_in": sa}, tmp_path / "many.safetensors", {"k": 1})
    assert load_stats(tmp_path / "many.safetensors", {"k": 1})["0.attn_in"].gram.dtype == torch.float32
    with pytest.raises(ValueError, match="float64"):  # mixing storages is a mistake, not a cast
        sa.merge(ActivationStats.from_inputs(b))


# -- (b) the methods on float32 statistics -------------------------------------------------------------

# Measured (this test's layers, retentions 0.25-0.75): svdllm's loss on float32 statistics differs from its
# loss on float64 ones by ≤ 2e-15 relative (the whitened truncation is optimal for the Gram it is given, so
# the Gram's ~6e-8 rounding enters the loss only to second order), sigmascale's by ≤ 1e-10 (its float32
# Adam loop turns the rounding into first-order noise). The bounds leave ~500x and ~10x headroom.
TOLERANCE = {"svdllm": 1e-12, "sigmascale": 1e-9}


@pytest.mark.parametrize("energy_span", [0, 6])
@pytest.mark.parametrize("method", ["svdllm", "sigmascale"])
def test_methods_on_float32_stats_lose_what_they_lose_on_float64_stats(method, energy_span):
    m, n = 96, 64
    x = llm_like_inputs(9000, n, energy_span, seed=2)
    reference = exact_stats(x)  # the loss is measured on the float64 Gram, in float64
    stats64 = ActivationStats.from_inputs(x)
    stats32 = ActivationStats.from_inputs(x, dtype="float32")
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64) / n**0.5
    for retention in (0.25, 0.75):
        rank = rank_for_retention(m, n, retention)
        loss64 = activation_loss(W, decompose(W, stats64, rank, method).to_dense(), reference)
        loss32 = activation_loss(W, decompose(W, stats32, rank, method).to_dense(), reference)
        assert abs(loss32 - loss64) <= TOLERANCE[method] * loss64, (retention, loss64, loss32)


def test_activation_loss_of_float32_stats_is_computed_in_float64():
    x = llm_like_inputs(3000, 32, 6, seed=4)
    W = torch.randn(40, 32, dtype=torch.float64)
    W_hat = W + 1e-3 * torch.randn(40, 32, dtype=torch.float64)
    loss64 = activation_loss(W, W_hat, ActivationStats.from_inputs(x))
    loss32 = activation_loss(W, W_hat, ActivationStats.from_inputs(x, dtype="float32"))
    assert loss32 == pytest.approx(loss64, rel=1e-6)


def test_loss_curves_of_float32_stats_match_float64_stats():
    x = llm_like_inputs(3000, 32, 6, seed=5)
    W = torch.randn(48, 32, dtype=torch.float64)
    for method in ("svdllm", "sigmascale"):
        curve64 = loss_curve(W, ActivationStats.from_inputs(x), method, rank=8)
        curve32 = loss_curve(W, ActivationStats.from_inputs(x, dtype="float32"), method, rank=8)
        torch.testing.assert_close(curve32, curve64, rtol=1e-6, atol=1e-12)


# -- (c) the cache key ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path / "cache"))
    model = tiny_model()
    loaded = LoadedModel(model, word_tokenizer(), "tiny", "llama", model_fingerprint(model))
    docs = [" ".join(WORDS[(i + j) % 8] for j in range(9)) for i in range(20)]
    return loaded, CalibrationConfig(text=write_docs(tmp_path / "cal.txt", docs), samples=2, seq_len=16)


def test_float64_cache_key_is_the_one_before_the_option_and_float32_has_its_own(tiny_loaded):
    loaded, config = tiny_loaded
    before = {  # the dict pipeline.calibrate built before gram_dtype existed
        "model": loaded.fingerprint,
        "tokenizer": tokenizer_fingerprint(loaded.tokenizer),
        "text": config.text,
        "samples": 2,
        "seq_len": 16,
        "seed": 0,
    }
    assert calibration_key(loaded, config) == before
    float32 = calibration_key(loaded, dataclasses.replace(config, gram_dtype="float32"))
    assert float32 == {**before, "gram_dtype": "float32"}
    assert stats_cache_path(float32) != stats_cache_path(before)


def test_calibrate_caches_float32_and_float64_statistics_apart(tiny_loaded):
    loaded, config = tiny_loaded
    config32 = dataclasses.replace(config, gram_dtype="float32")
    stats32, info = calibrate(loaded, config32)
    assert not info["cached"] and info["gram_dtype"] == "float32"
    assert all(s.gram.dtype == torch.float32 for s in stats32.values())
    stats64, info64 = calibrate(loaded, config)
    assert not info64["cached"] and info64["cache"] != info["cache"]  # not the float32 file
    assert all(s.gram.dtype == torch.float64 for s in stats64.values())
    for key, s in stats32.items():
        torch.testing.assert_close(s.gram.double(), stats64[key].gram, rtol=1e-5, atol=1e-5)
    again, info = calibrate(loaded, config32)
    assert info["cached"] and all(torch.equal(again[k].gram, stats32[k].gram) for k in stats32)


def test_the_app_sweeps_calibration_and_heldout_in_one_gram_dtype():
    with pytest.raises(ValueError, match="share a dtype"):
        ServiceConfig(calibration=CalibrationConfig(gram_dtype="float32"))


# -- (d) the command line ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["calibrate", "probe", "spectra"])
def test_gram_dtype_flag_reaches_the_calibration_config(command):
    parser = build_parser()
    assert _calibration_config(parser.parse_args([command])).gram_dtype == "float64"
    assert (
        _calibration_config(parser.parse_args([command, "--gram-dtype", "float32"])).gram_dtype == "float32"
    )


def test_gram_dtype_flag_reaches_compress():
    args = build_parser().parse_args(
        ["compress", "--retention", "0.5", "--out", "o", "--gram-dtype", "float32"]
    )
    assert compression_config(args).calibration.gram_dtype == "float32"


def test_bad_gram_dtype_exits_2_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--gram-dtype", "float16"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--gram-dtype" in err and "float32" in err and "float64" in err


def test_bad_gram_dtype_in_a_config_is_refused():
    with pytest.raises(ValueError, match="--gram-dtype must be one of float64, float32"):
        CalibrationConfig(gram_dtype="float16")


def test_compression_config_carries_gram_dtype_through_its_json_twin(tmp_path):
    config = CompressionConfig(out=str(tmp_path / "o"), retention=0.5, gram_dtype="float32")
    again = CompressionConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.calibration.gram_dtype == "float32"
    with pytest.raises(ValueError, match="--gram-dtype"):
        check_config(dataclasses.replace(config, gram_dtype="float16"))


@pytest.mark.slow
def test_torchrun_ranks_fit_float32_statistics_as_one_process(tmp_path, monkeypatch):
    tiny_dir = tmp_path / "tiny"
    save_tiny_model(tiny_dir)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SIGMASCALE_CACHE", str(cache))
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    args = [*[a for a in _args(tiny_dir, "svdllm", single) if a], "--gram-dtype", "float32"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1): the same kernels
    try:
        assert main(args) == 0  # caches the float32 stats
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SIGMASCALE_CACHE": str(cache)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    sharded_args = [*[a for a in _args(tiny_dir, "svdllm", sharded) if a], "--gram-dtype", "float32"]
    done = subprocess.run(
        [*command, "-m", "sigmascale_core.cli", *sharded_args, "--distributed"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((sharded / "report.json").read_text())
    assert report["calibration"]["gram_dtype"] == "float32" and report["calibration"]["cached"]
    ours, theirs = load_file(sharded / "model.safetensors"), load_file(single / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], t) for k, t in theirs.items())
