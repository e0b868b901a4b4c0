"""The whole pipeline on the real bundled SmolLM2-135M (slow: runs in CI, a minute or so)."""

import pytest
import torch

from sigmascale_core.models import load_model, target_matrices
from sigmascale_core.pipeline import CalibrationConfig, calibrate, evaluate_perplexity, uniform_plan
from sigmascale_core.surgery import LowRankLinear, compress, load_compressed, save_compressed

pytestmark = pytest.mark.slow


def test_bundled_model_compresses_saves_and_reloads(tmp_path):
    loaded = load_model()
    assert len(target_matrices(loaded.model)) == 30 * 7
    stats, info = calibrate(loaded, CalibrationConfig(samples=8, seq_len=256))
    assert len(stats) == 30 * 4 and info["tokens"] == 2048
    _, again = calibrate(loaded, CalibrationConfig(samples=8, seq_len=256))
    assert again["cached"]
    dense = evaluate_perplexity(loaded, ["boolq:evaluation"], window=1024, max_tokens=2048)[
        "boolq:evaluation"
    ]
    plan = uniform_plan(loaded, 0.9, "svdllm")
    compress(loaded.model, plan, stats)
    assert sum(isinstance(m, LowRankLinear) for m in loaded.model.modules()) == 210
    compressed = evaluate_perplexity(loaded, ["boolq:evaluation"], window=1024, max_tokens=2048)[
        "boolq:evaluation"
    ]
    # whitening at 0.9 stays within a small factor of dense on this model (see the README's table)
    assert dense["perplexity"] < compressed["perplexity"] < 10 * dense["perplexity"]
    out = save_compressed(loaded.model, plan, tmp_path / "out", loaded.tokenizer)
    reloaded, _ = load_compressed(out)
    ids = torch.randint(0, 1000, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, loaded.model(ids).logits, rtol=0, atol=0)
