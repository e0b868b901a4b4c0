"""compute.py: the background service fills the bank in priority order, resumes from the cache, and its
numbers equal a direct recomputation (pipeline.calibrate + methods.loss_curve)."""

import numpy as np
import pytest
import torch
from tiny import save_tiny_model, write_text

from sigmascale_core import compute, spectra
from sigmascale_core.bank import reference_rank
from sigmascale_core.calibration import stats_key
from sigmascale_core.diagnostics import FIELDS, diagnostics
from sigmascale_core.methods import loss_curve, scaled_matrix, scaled_spectrum
from sigmascale_core.models import get_module, load_model
from sigmascale_core.pipeline import CalibrationConfig, calibrate


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("compute")
    save_tiny_model(root / "tiny")
    return compute.ServiceConfig(
        model=str(root / "tiny"),
        calibration=CalibrationConfig(write_text(root / "cal.txt", 1), samples=4, seq_len=32),
        heldout=CalibrationConfig(write_text(root / "held.txt", 2), samples=2, seq_len=32, seed=1),
    )


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def finished(snap):
    return snap.state == "idle"


def run_to_end(config):
    service = compute.ComputeService(config).start()
    snap = service.wait_until(finished, timeout=300)
    assert snap.error is None, snap.error
    return service, snap


def test_service_numbers_equal_a_direct_recomputation(config, cache):
    service, snap = run_to_end(config)
    service.stop()
    bank = snap.bank
    assert all(stage.complete for stage in snap.stages.values())
    loaded = load_model(config.model)
    cal, _ = calibrate(loaded, config.calibration, use_cache=False)  # one split per sweep, not from cache
    held, _ = calibrate(loaded, config.heldout, use_cache=False)
    for name in (bank.names[0], bank.names[-1]):
        ref = bank.refs[bank.index[name]]
        W = get_module(loaded.model, name).weight.detach()
        sk = stats_key(ref.layer, ref.group)
        for method in spectra.CHEAP_METHODS:
            s = bank.spectrum(name, method)
            np.testing.assert_allclose(s.sigma, scaled_spectrum(W, cal[sk], method).numpy(), rtol=1e-9)
            expected = loss_curve(W, cal[sk], method, eval_stats=held[sk]).numpy()
            np.testing.assert_allclose(s.loss["heldout"], expected, rtol=1e-8, atol=1e-12)
    # the sigmascale numbers of a plan are sigmascale's own curve, learned at the plan's rank
    ranks = np.array([reference_rank(tuple(s), config.reference_retention) for s in bank.shapes])
    numbers = bank.evaluate(ranks, "sigmascale")
    assert numbers.ready.all() and not numbers.approximate.any()
    for i in (0, len(bank.names) - 1):
        ref = bank.refs[i]
        W = get_module(loaded.model, ref.name).weight.detach()
        sk = stats_key(ref.layer, ref.group)
        curve = loss_curve(W, cal[sk], "sigmascale", rank=int(numbers.ranks[i])).numpy()
        assert numbers.loss["calibration"][i] == pytest.approx(curve[numbers.ranks[i]], rel=1e-6)


def vector(values: dict) -> np.ndarray:
    return np.array([float(values[f]) for f in FIELDS])


def test_cached_diagnostics_equal_a_direct_call_on_the_scaled_matrix(config, cache):
    service, snap = run_to_end(config)
    service.stop()
    bank = snap.bank
    assert all(set(bank.diagnostics[n]) == {"svd", "asvd", "svdllm", "sigmascale"} for n in bank.names)
    loaded = load_model(config.model)
    cal, _ = calibrate(loaded, config.calibration, use_cache=False)
    for name in (bank.names[0], bank.names[-1]):
        ref = bank.refs[bank.index[name]]
        W = get_module(loaded.model, name).weight.detach()
        stats = cal[stats_key(ref.layer, ref.group)]
        W64 = W.to(torch.float64)
        # W: with the shuffled-W comparison; the scaled matrices from their σ alone
        expected = {"svd": diagnostics(torch.linalg.svdvals(W64).numpy(), ref.shape, W=W64.numpy())}
        for method, rank in (
            ("asvd", None),
            ("svdllm", None),
            ("sigmascale", reference_rank(ref.shape, 0.75)),
        ):
            Ws = scaled_matrix(W, stats, method, rank=rank)
            expected[method] = diagnostics(torch.linalg.svdvals(Ws).numpy(), ref.shape)
        for method, direct in expected.items():
            cached = bank.diagnostics[name][method]
            np.testing.assert_allclose(vector(cached), vector(direct.to_dict()), rtol=1e-7, equal_nan=True)
            assert cached["under_trained"] is direct.under_trained
        assert np.isfinite(bank.diagnostics[name]["svd"]["rand_lambda_max"])
        assert bank.diagnostics[name]["svdllm"]["num_traps"] == -1  # no shuffled comparison of W·S
    alpha = bank.diagnostic("alpha", "svdllm")
    assert alpha.shape == (len(bank.names),) and np.isfinite(alpha).all()
    rows = bank.diagnostic_rows(["svd", "sigmascale"])
    assert len(rows) == 2 * len(bank.names) and {"matrix", "method", "alpha", "warning"} <= set(rows[0])


def test_focus_jumps_the_queue_and_nothing_stands_in_for_pending_rows(config, cache):
    service = compute.ComputeService(config)
    service.start()
    snap = service.wait_until(lambda s: s.bank is not None, timeout=120)
    last = snap.bank.names[-1]  # a matrix of the last layer
    service.focus(last)
    snap = service.wait_until(lambda s: last in s.bank.learned, timeout=300)
    learned = [target[0] for kind, target in service.computed if kind == "learned"]
    assert learned[0] == last  # before any other matrix's scaling
    # while other matrices are pending, sigmascale's totals cover the learned rows only, never ASVD's
    numbers = snap.bank.evaluate(snap.bank.full_rank // 2, "sigmascale")
    assert numbers.ready.sum() == len(learned) < len(snap.bank.names)
    assert np.isnan(numbers.loss["calibration"][~numbers.ready]).all()
    service.stop()


def test_a_restart_resumes_from_the_cache_without_recomputing(config, cache):
    first = compute.ComputeService(config).start()
    # layer 0's seven matrices and their diagnostics (a task of its own, right after)
    first.wait_until(lambda s: ("diagnostics", ("cheap", 0)) in first.computed, timeout=300)
    first.stop()
    done_before = {(k, t) for k, t in first.computed if k in ("weights", "cheap", "learned", "diagnostics")}
    assert ("diagnostics", ("weights", 0)) in done_before and ("diagnostics", ("cheap", 0)) in done_before
    second, snap = run_to_end(config)
    second.stop()
    assert done_before and not done_before & set(second.computed)
    assert snap.bank.ready("svdllm").all()
    # a third start computes nothing at all (the diagnostics come back from the cache too); a corrupt
    # file is recomputed, alone
    for path in (
        spectra.layer_path(second.key, 0),
        spectra.diagnostics_path(spectra.layer_path(second.key, 1)),
    ):
        raw = bytearray(path.read_bytes())
        raw[-9] ^= 0x01
        path.write_bytes(bytes(raw))
    third, snap = run_to_end(config)
    third.stop()
    assert sorted(third.computed) == [("cheap", 0), ("diagnostics", ("cheap", 1))]
    assert all(len(snap.bank.diagnostics[n]) == 4 for n in snap.bank.names)
    fourth, snap = run_to_end(config)
    fourth.stop()
    assert fourth.computed == []
    assert snap.bank.diagnostics == third.bank.diagnostics or all(
        np.allclose(vector(snap.bank.diagnostics[n][m]), vector(third.bank.diagnostics[n][m]), equal_nan=True)
        for n in snap.bank.names
        for m in snap.bank.diagnostics[n]
    )


def test_a_second_process_waits_and_reads_what_the_first_computes(config, cache):
    leader = compute.ComputeService(config).start()
    leader.wait_until(lambda s: s.bank is not None and s.state == "running", timeout=120)
    follower = compute.ComputeService(config).start()  # its own lock file handle: excluded like a process
    snap = follower.wait_until(lambda s: s.state == "waiting", timeout=120)
    assert snap.state == "waiting"
    leader.wait_until(finished, timeout=300)
    snap = follower.wait_until(lambda s: s.bank.ready("sigmascale").all(), timeout=60)
    assert follower.computed == []
    assert snap.bank.ready("svdllm").all()
    leader.stop()
    follower.stop()


def test_a_relearn_at_a_new_rank_serves_plans_near_it(config, cache):
    service, snap = run_to_end(config)
    bank = snap.bank
    i = 0
    name = bank.names[i]
    learned_at = next(iter(bank.learned[name]))
    new_rank = max(1, learned_at // 4)
    ranks = bank.ranks_for_retention(0.75)
    ranks[i] = new_rank
    assert bank.evaluate(ranks, "sigmascale").approximate[i]  # far from where it was learned
    assert service.request_learned([(name, new_rank)]) == 1
    assert service.request_learned([(name, new_rank)]) == 0  # queued once
    service.wait_until(lambda s: new_rank in s.bank.learned[name], timeout=120)
    numbers = bank.evaluate(ranks, "sigmascale")
    assert numbers.learned_rank[i] == new_rank and not numbers.approximate[i]
    service.stop()


def test_a_killed_server_resumes_without_recomputing_finished_matrices(config, cache):
    """SIGKILL a process mid-way (no handler runs, its lock dies with it): a new one reads every
    finished task back from the cache and computes only the rest."""
    import json
    import os
    import signal
    import subprocess
    import sys

    child = f"""
import json, sys, time
from sigmascale_core.compute import ComputeService, ServiceConfig
from sigmascale_core.pipeline import CalibrationConfig
c = json.loads({json.dumps(json.dumps(_config_dict(config)))})
config = ServiceConfig(model=c["model"], calibration=CalibrationConfig(**c["calibration"]),
                       heldout=CalibrationConfig(**c["heldout"]))
service = ComputeService(config).start()
service.wait_until(lambda s: s.stages["cheap"].done >= 7, timeout=300)
print(json.dumps([list(t) for t in service.computed]), flush=True)
time.sleep(600)
"""
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, env=os.environ)
    try:
        done_before = {(kind, json.dumps(target)) for kind, target in json.loads(proc.stdout.readline())}
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert ("cheap", "0") in done_before
    second, snap = run_to_end(config)
    second.stop()
    again = {(kind, json.dumps(list(t) if isinstance(t, tuple) else t)) for kind, t in second.computed}
    finished = {t for t in done_before if t[0] in ("weights", "cheap", "learned")}
    assert finished and not finished & again
    assert snap.bank.ready("sigmascale").all()


def _config_dict(config):
    from dataclasses import asdict

    return {
        "model": config.model,
        "calibration": asdict(config.calibration),
        "heldout": asdict(config.heldout),
    }
