"""Calibration of a model placed by an accelerate device map (layers offloaded to the host and to disk):
the same statistics and the same fingerprint as the model loaded whole, so the cache is shared."""

import pytest
import torch

pytest.importorskip("accelerate")

from sigmascale_core.calibration import collect_stats
from sigmascale_core.cli import main
from sigmascale_core.models import execution_device, load_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny import save_tiny_model

    directory = tmp_path_factory.mktemp("tiny")
    save_tiny_model(directory)
    return directory


OFFLOADED = {  # layer 1 and the final norm on disk, the rest on the host
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "disk",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def test_offloaded_model_calibrates_to_the_plain_models_statistics(tiny_dir, tmp_path):
    plain = load_model(str(tiny_dir))
    placed = load_model(str(tiny_dir), device_map=OFFLOADED, offload_folder=str(tmp_path / "offload"))
    layer1 = placed.model.model.layers[1]
    assert layer1.self_attn.q_proj.weight.is_meta  # really offloaded: the weight is not in memory
    assert execution_device(layer1) == torch.device("cpu")
    assert placed.fingerprint == plain.fingerprint  # offloaded weights are hashed from their store
    ids = torch.randint(0, 1000, (3, 24), generator=torch.Generator().manual_seed(0))
    ours, theirs = (
        collect_stats(placed.model, ids, batch_size=2),
        collect_stats(plain.model, ids, batch_size=2),
    )
    assert ours.keys() == theirs.keys() and len(ours) == 8
    for key, s in theirs.items():
        assert ours[key].count == s.count
        assert torch.equal(ours[key].gram, s.gram) and torch.equal(ours[key].abs_sum, s.abs_sum), key


def test_calibrate_cli_with_a_device_map_fills_the_plain_runs_cache(tiny_dir, tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path / "cache"))
    args = ["calibrate", "--model", str(tiny_dir), "--samples", "2", "--seq-len", "32"]
    placed = [*args, "--device-map", json.dumps(OFFLOADED), "--offload-folder", str(tmp_path / "off")]
    assert main(placed) == 0
    first = json.loads(capsys.readouterr().out)
    assert main([*args, "--device", "cpu"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert not first["cached"] and second["cached"] and first["cache"] == second["cache"]
