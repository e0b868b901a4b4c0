"""Checked tensor files and progress events."""

import json

import pytest
import torch

from sigmascale_core.artifacts import read_tensors, save_tensors_atomic, tensors_checksum
from sigmascale_core.progress import ProgressEvent, format_seconds, tracked


def test_read_tensors_round_trip_and_rejects_a_flipped_bit(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.arange(1000, dtype=torch.float64), "b": torch.ones(3, 4, dtype=torch.bfloat16)}
    save_tensors_atomic(tensors, path, {"key": "k"})
    read = read_tensors(path)
    assert read is not None
    got, meta = read
    assert meta == {"key": "k"}
    assert torch.equal(got["a"], tensors["a"]) and torch.equal(got["b"], tensors["b"])
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10  # a bit inside the last tensor's data: the file still parses
    path.write_bytes(bytes(raw))
    assert read_tensors(path) is None
    assert read_tensors(tmp_path / "missing.safetensors") is None


def test_checksum_sees_names_dtypes_and_every_element():
    a = torch.zeros(100_000)
    base = tensors_checksum({"x": a})
    b = a.clone()
    b[-1] = 1e-30
    assert tensors_checksum({"x": b}) != base
    assert tensors_checksum({"y": a}) != base
    assert tensors_checksum({"x": a.double()}) != base
    assert tensors_checksum({"x": a.clone()}) == base


def test_progress_events_time_and_estimate():
    now = [100.0]
    events = []
    update = tracked(events.append, "spectra", clock=lambda: now[0])
    now[0] = 110.0
    update(1, 4, "layer 0")
    now[0] = 130.0
    update(2, 4, "layer 1")
    assert events[-1].elapsed == 30.0 and events[-1].eta == pytest.approx(30.0)  # 15 s a unit, 2 left
    assert ProgressEvent.from_json(events[-1].to_json()) == events[-1]
    assert json.loads(events[-1].to_json())["eta"] == pytest.approx(30.0)
    assert ProgressEvent("x", 0, 4, 1.0).eta is None
    with pytest.raises(ValueError, match="not a progress event"):
        ProgressEvent.from_json('{"stage": 1}')
    assert format_seconds(3725) == "1 h 02 min" and format_seconds(61) == "1 min 01 s"
