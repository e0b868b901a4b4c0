"""Checked tensor files and progress events."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sigmascale_core import artifacts
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


def dead_pid() -> int:
    """A pid that no process has: a child that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_writers_remove_temps_of_dead_writers_and_keep_live_ones(tmp_path):
    host = artifacts._HOST
    dead = tmp_path / f".stats.safetensors.{host}-{dead_pid()}.abcd1234.tmp"
    live = tmp_path / f".stats.safetensors.{host}-{os.getpid()}.efgh5678.tmp"
    other_host = (
        tmp_path / f".stats.safetensors.{'0' if host != '000000' else '1'}00000-{dead_pid()}.ijkl9012.tmp"
    )
    old_style = tmp_path / ".out.json.mnop3456.tmp"  # written before temps named their writer
    ancient = tmp_path / f".old.json.{host}-{os.getpid()}.qrst7890.tmp"
    user_file = tmp_path / ".notes.tmp"  # not a name our writers make
    dead_dir = tmp_path / f".model.{host}-{dead_pid()}.uvwx1234.tmp"
    for p in (dead, live, other_host, old_style, ancient, user_file):
        p.write_bytes(b"x" * 10)
    (dead_dir / "sub").mkdir(parents=True)
    day_ago = time.time() - 25 * 3600
    for p in (old_style, ancient, user_file):
        os.utime(p, (day_ago, day_ago))
    save_tensors_atomic({"a": torch.zeros(2)}, tmp_path / "new.safetensors")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"new.safetensors", live.name, other_host.name, user_file.name}
    artifacts.write_json_atomic({"k": 1}, tmp_path / "x.json")  # the JSON writer cleans up too
    live.unlink()
    (tmp_path / f".y.{host}-{dead_pid()}.aaaa1111.tmp").write_text("x")
    artifacts.write_json_atomic({"k": 2}, tmp_path / "x.json")
    assert {p.name for p in tmp_path.iterdir()} == {
        "new.safetensors",
        "x.json",
        other_host.name,
        user_file.name,
    }


def test_temp_names_carry_the_writers_pid(tmp_path, monkeypatch):
    seen = []
    real_publish = artifacts._publish

    def spy(tmp, path):
        seen.append(Path(tmp).name)
        real_publish(tmp, path)

    monkeypatch.setattr(artifacts, "_publish", spy)
    save_tensors_atomic({"a": torch.zeros(2)}, tmp_path / "t.safetensors")
    (name,) = seen
    assert name.startswith(f".t.safetensors.{artifacts._HOST}-{os.getpid()}.") and name.endswith(".tmp")


def test_read_tensors_keeps_a_subset_yet_checks_every_tensor(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"a.gram": torch.arange(6.0).reshape(2, 3), "b.gram": torch.ones(4)}  # stored a, then b
    save_tensors_atomic(tensors, path, {"k": "v"})
    kept, meta = read_tensors(path, keep=lambda name: name.startswith("a."))
    assert kept.keys() == {"a.gram"} and torch.equal(kept["a.gram"], tensors["a.gram"])
    assert meta == {"k": "v"}
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a bit of the last tensor's data ("b.gram", not kept) flipped
    path.write_bytes(bytes(data))
    assert read_tensors(path, keep=lambda name: name.startswith("a.")) is None
