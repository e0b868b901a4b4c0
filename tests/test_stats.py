from pathlib import Path

import pytest
import torch
from corrupt import flip_tensor_byte
from test_text import WORDS, word_tokenizer, write_docs
from tiny import tiny_model

from sigmascale_core import artifacts
from sigmascale_core.calibration import load_stats, save_stats, stats_key
from sigmascale_core.models import LoadedModel, model_fingerprint
from sigmascale_core.pipeline import CalibrationConfig, calibrate
from sigmascale_core.stats import ActivationStats


def test_update_matches_float64_recomputation_for_2d_and_3d_inputs():
    x = torch.randn(3, 50, 16, dtype=torch.float64)
    stats = ActivationStats(16)
    stats.update(x[:2])  # (batch, seq, n)
    stats.update(x[2])  # (tokens, n)
    flat = x.reshape(-1, 16).double()
    assert stats.count == 150
    assert stats.gram.dtype == torch.float64
    torch.testing.assert_close(stats.gram, flat.T @ flat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.abs_mean, flat.abs().mean(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_are_summed_in_float64(dtype):
    x = (torch.randn(9000, 8) * torch.logspace(-2, 2, 8)).to(dtype)  # several chunks, wide scales
    stats = ActivationStats.from_inputs(x)
    ref = x.double()
    assert stats.gram.dtype == stats.abs_sum.dtype == torch.float64
    # float32 chunk products: ~√2048·ε relative error per entry, far below what the losses notice
    torch.testing.assert_close(
        stats.gram, ref.T @ ref, rtol=1e-5, atol=1e-5 * ref.square().sum(0).max().item()
    )
    torch.testing.assert_close(stats.abs_mean, ref.abs().mean(0), rtol=1e-6, atol=0)


def test_merge_equals_stats_of_the_union():
    a, b = torch.randn(40, 8, dtype=torch.float64), torch.randn(70, 8, dtype=torch.float64)
    merged = ActivationStats.from_inputs(a).merge(ActivationStats.from_inputs(b))
    union = ActivationStats.from_inputs(torch.cat([a, b]))
    assert merged.count == union.count == 110
    torch.testing.assert_close(merged.gram, union.gram)
    torch.testing.assert_close(merged.abs_mean, union.abs_mean)


def test_save_load_round_trip(tmp_path):
    stats = ActivationStats.from_inputs(torch.randn(30, 12))
    path = tmp_path / "s.safetensors"
    stats.save(path)
    loaded = ActivationStats.load(path)
    assert loaded.count == 30 and loaded.in_features == 12
    assert torch.equal(loaded.gram, stats.gram) and torch.equal(loaded.abs_sum, stats.abs_sum)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temp file left behind


def test_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="cannot read activation stats"):
        ActivationStats.load(path)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.randn(5, 7), "width 7"),
        (torch.ones(5, 8, dtype=torch.int64), "floating point"),
        (torch.tensor([[float("nan")] * 8]), "NaN"),
    ],
)
def test_bad_inputs_raise(x, message):
    with pytest.raises(ValueError, match=message):
        ActivationStats(8).update(x)


def test_merge_of_different_widths_raises():
    with pytest.raises(ValueError, match="width"):
        ActivationStats(4).merge(ActivationStats(5))


# ---------------------------------------------------------------------------------------------------
# The stats cache (calibration.load_stats): checked on read, rebuilt when bad, interrupts pass


def stats_of_two_groups() -> dict[str, ActivationStats]:
    g = torch.Generator().manual_seed(3)
    return {
        stats_key(0, "attn_in"): ActivationStats.from_inputs(torch.randn(40, 6, generator=g)),
        stats_key(0, "mlp_out"): ActivationStats.from_inputs(torch.randn(40, 9, generator=g)),
    }


def test_cached_stats_with_a_flipped_byte_are_not_trusted(tmp_path):
    stats, key, path = stats_of_two_groups(), {"model": "m", "samples": 2}, tmp_path / "s.safetensors"
    save_stats(stats, path, key)
    loaded = load_stats(path, key)
    assert all(torch.equal(loaded[k].gram, stats[k].gram) for k in stats)
    flip_tensor_byte(path, "0.attn_in.gram", 0)  # lowest mantissa bit of gram[0, 0]: finite, plausible
    assert load_stats(path, key) is None


def test_calibrate_rebuilds_a_corrupt_stats_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path / "cache"))
    model = tiny_model()
    loaded = LoadedModel(model, word_tokenizer(), "tiny", "llama", model_fingerprint(model))
    docs = [" ".join(WORDS[(i + j) % 8] for j in range(9)) for i in range(20)]
    config = CalibrationConfig(text=write_docs(tmp_path / "cal.txt", docs), samples=2, seq_len=16)
    fresh, info = calibrate(loaded, config)
    assert not info["cached"]
    flip_tensor_byte(Path(info["cache"]), "1.mlp_out.abs_sum", -1, 0x04)  # an exponent bit: 4x or 1/4x
    rebuilt, info = calibrate(loaded, config)
    assert not info["cached"]
    assert all(torch.equal(rebuilt[k].gram, fresh[k].gram) for k in fresh)
    assert all(torch.equal(rebuilt[k].abs_sum, fresh[k].abs_sum) for k in fresh)
    again, info = calibrate(loaded, config)  # the rewritten entry is good again
    assert info["cached"] and all(torch.equal(again[k].abs_sum, fresh[k].abs_sum) for k in fresh)


@pytest.mark.parametrize("where", ["open", "checksum"])
def test_an_interrupt_while_reading_stats_propagates(tmp_path, monkeypatch, where):
    stats, key, path = stats_of_two_groups(), {"model": "m"}, tmp_path / "s.safetensors"
    save_stats(stats, path, key)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "safe_open" if where == "open" else "tensor_bytes", interrupt)
    with pytest.raises(KeyboardInterrupt):
        load_stats(path, key)
