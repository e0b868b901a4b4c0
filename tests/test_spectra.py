"""spectra.py and bank.py: the cached spectra/loss curves and the live plan numbers, against direct
recomputation."""

import numpy as np
import pytest
import torch
from tiny import VOCAB, tiny_model

from sigmascale_core import spectra
from sigmascale_core.allocation import allocate_ranks, max_rank
from sigmascale_core.bank import SpectraBank, reference_rank
from sigmascale_core.calibration import collect_stats, stats_key
from sigmascale_core.methods import decompose, loss_curve, scaled_spectrum
from sigmascale_core.metrics import activation_loss, effective_rank, participation_ratio
from sigmascale_core.models import get_module, target_matrices
from sigmascale_core.plan import CompressionPlan, MatrixPlan


@pytest.fixture(scope="module")
def setup():
    """A tiny model, its calibration and held-out stats (different random tokens), its weights."""
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    stats = collect_stats(model, torch.randint(0, VOCAB, (6, 32), generator=g))
    heldout = collect_stats(model, torch.randint(0, VOCAB, (3, 32), generator=g))
    refs = target_matrices(model)
    weights = {r.name: get_module(model, r.name).weight.detach() for r in refs}
    key = spectra.SpectraKey.build("fp-tiny", {"text": "a"}, {"text": "b"})
    total = sum(p.numel() for p in model.parameters())
    return model, stats, heldout, refs, weights, key, total


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def build_bank(setup):
    _, stats, heldout, refs, weights, key, total = setup
    bank = SpectraBank(refs, total)
    for group in spectra.layers_of(refs).values():
        for name, by_method in spectra.compute_layer(key, group, weights, stats, heldout).items():
            bank.set_cheap(name, by_method)
    return bank


def test_layer_files_are_cached_and_corrupt_or_foreign_ones_are_not_trusted(setup, cache):
    _, stats, heldout, refs, weights, key, _ = setup
    groups = spectra.layers_of(refs)
    first = {
        n: s
        for g in groups.values()
        for n, s in spectra.compute_layer(key, g, weights, stats, heldout).items()
    }
    files = sorted((cache / "spectra").glob("*.safetensors"))
    assert [f.name for f in files] == [f"{key.digest}-L000.safetensors", f"{key.digest}-L001.safetensors"]
    again = spectra.load_layer(key, groups[0])
    for name in again:
        for method in spectra.CHEAP_METHODS:
            np.testing.assert_array_equal(first[name][method].sigma, again[name][method].sigma)
    # a truncated file, a flipped bit and a file written for another key are all refused
    other = spectra.SpectraKey.build("fp-other", {"text": "a"}, {"text": "b"})
    assert spectra.load_layer(other, groups[0]) is None
    raw = bytearray(files[1].read_bytes())
    raw[-3] ^= 0x04
    files[1].write_bytes(bytes(raw))
    assert spectra.load_layer(key, groups[1]) is None
    files[0].write_bytes(files[0].read_bytes()[:-50])
    assert spectra.load_layer(key, groups[0]) is None


def test_weights_spectra_need_no_statistics(setup, cache):
    _, _, _, refs, weights, _, _ = setup
    group = spectra.layers_of(refs)[1]
    sigmas = spectra.compute_weights_layer("fp-tiny", group, weights)
    for ref in group:
        np.testing.assert_allclose(
            sigmas[ref.name], scaled_spectrum(weights[ref.name], None, "svd").numpy(), rtol=1e-12
        )
    assert spectra.load_weights_layer("fp-tiny", group).keys() == sigmas.keys()
    assert spectra.load_weights_layer("fp-other", group) is None


def test_diagnostics_files_round_trip_and_bad_ones_are_refused(setup, cache):
    _, stats, heldout, refs, weights, key, _ = setup
    group = spectra.layers_of(refs)[0]
    sigmas = spectra.compute_weights_layer("fp-tiny", group, weights)
    found = spectra.compute_weights_diagnostics("fp-tiny", group, sigmas, weights)
    assert spectra.load_weights_diagnostics("fp-tiny", group) == found  # NaN-free for W: plain equality
    assert all(np.isfinite(d["rand_lambda_max"]) and d["num_traps"] >= 0 for d in found.values())
    assert spectra.load_weights_diagnostics("fp-other", group) is None
    cheap = spectra.compute_layer(key, group, weights, stats, heldout)
    by_method = spectra.compute_layer_diagnostics(key, group, cheap)
    again = spectra.load_layer_diagnostics(key, group)
    ref = group[2]
    assert set(again[ref.name]) == set(spectra.SCALED_METHODS)
    assert again[ref.name]["svdllm"]["alpha"] == by_method[ref.name]["svdllm"]["alpha"]
    assert again[ref.name]["svdllm"]["num_traps"] == -1 and np.isnan(
        again[ref.name]["svdllm"]["rand_softrank"]
    )
    # the diagnostics sit beside the spectra under the same name, where `learned_files` does not look
    path = spectra.diagnostics_path(spectra.layer_path(key, 0))
    assert path.name == spectra.layer_path(key, 0).name and path.parent == spectra.diagnostics_dir()
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x02
    path.write_bytes(bytes(raw))
    assert spectra.load_layer_diagnostics(key, group) is None
    learned = spectra.learn_sigmascale(
        key, ref, weights[ref.name], stats[stats_key(0, ref.group)], heldout[stats_key(0, ref.group)], 8
    )
    values = spectra.compute_sigmascale_diagnostics(key, ref, learned)
    assert spectra.load_sigmascale_diagnostics(key, ref, 8)["alpha"] == values["alpha"]
    assert spectra.load_sigmascale_diagnostics(key, ref, 9) is None
    assert spectra.learned_files(key) == {spectra.slug(ref.name): [8]}
    assert spectra.learned_files(key, spectra.diagnostics_dir()) == {spectra.slug(ref.name): [8]}


def test_cached_spectra_and_curves_equal_the_engine(setup, cache):
    _, stats, heldout, refs, weights, _, _ = setup
    bank = build_bank(setup)
    for ref in refs[::3]:
        s, h = stats[stats_key(ref.layer, ref.group)], heldout[stats_key(ref.layer, ref.group)]
        W = weights[ref.name]
        for method in spectra.CHEAP_METHODS:
            got = bank.spectrum(ref.name, method)
            np.testing.assert_allclose(got.sigma, scaled_spectrum(W, s, method).numpy(), rtol=1e-10)
            np.testing.assert_allclose(got.loss["calibration"], loss_curve(W, s, method).numpy(), atol=1e-12)
            np.testing.assert_allclose(
                got.loss["heldout"], loss_curve(W, s, method, eval_stats=h).numpy(), atol=1e-12
            )


def test_live_numbers_match_an_independent_recomputation(setup, cache):
    _, stats, heldout, refs, weights, _, total = setup
    bank = build_bank(setup)
    rng = np.random.default_rng(0)
    ranks = bank.normalise(rng.integers(1, bank.full_rank + 1))
    for method in spectra.CHEAP_METHODS:
        numbers = bank.evaluate(ranks, method)
        plan = CompressionPlan(
            "fp",
            method,
            {},
            {
                r.name: MatrixPlan(r.shape, None if ranks[i] >= min(r.shape) else int(ranks[i]))
                for i, r in enumerate(refs)
            },
        )
        assert numbers.parameter_retention == pytest.approx(plan.parameter_retention(), rel=1e-12)
        assert numbers.model_retention == pytest.approx(plan.model_retention(total), rel=1e-12)
        for i, ref in enumerate(refs):
            W, k = weights[ref.name], int(ranks[i])
            s, h = stats[stats_key(ref.layer, ref.group)], heldout[stats_key(ref.layer, ref.group)]
            sigma = scaled_spectrum(W, s, method)
            if numbers.dense[i]:
                assert numbers.loss["calibration"][i] == 0.0
                continue
            # brute force: decompose at the rank, measure the loss of the dense reconstruction
            W_hat = decompose(W.double(), s, k, method).to_dense()
            assert numbers.loss["calibration"][i] == pytest.approx(activation_loss(W, W_hat, s), abs=1e-9)
            assert numbers.loss["heldout"][i] == pytest.approx(activation_loss(W, W_hat, h), abs=1e-9)
            assert numbers.effective_rank[i] == pytest.approx(effective_rank(sigma[:k]), rel=1e-9)
            assert numbers.energy[i] == pytest.approx(float(sigma[:k].square().sum() / sigma.square().sum()))


def test_full_spectrum_measures(setup, cache):
    _, stats, _, refs, weights, _, _ = setup
    bank = build_bank(setup)
    er, pr = bank.effective_ranks("asvd"), bank.participation_ratios("asvd")
    for i, ref in enumerate(refs):
        sigma = scaled_spectrum(weights[ref.name], stats[stats_key(ref.layer, ref.group)], "asvd")
        assert er[i] == pytest.approx(effective_rank(sigma), rel=1e-9)
        assert pr[i] == pytest.approx(participation_ratio(sigma), rel=1e-9)


def test_uniform_ranks_agree_with_the_plan(setup, cache):
    _, _, _, refs, _, _, _ = setup
    bank = build_bank(setup)
    for retention in (0.1, 0.33, 0.75, 1.0):
        plan = CompressionPlan.uniform({r.name: r.shape for r in refs}, retention, "svd", "fp")
        expected = [
            min(r.shape) if plan.matrices[r.name].is_dense else plan.matrices[r.name].rank for r in refs
        ]
        assert bank.ranks_for_retention(retention).tolist() == expected
        assert bank.evaluate(bank.ranks_for_retention(retention), "svd").parameter_retention == pytest.approx(
            plan.parameter_retention()
        )


def test_loss_curves_feed_the_allocator(setup, cache):
    bank = build_bank(setup)
    curves = bank.damage_curves("svdllm")
    i = 3
    name = bank.names[i]
    k_max = max_rank(tuple(int(x) for x in bank.shapes[i]))
    # every rank below break-even is a measured point: the damage is the curve's monotone envelope
    raw = bank.curves["svdllm", "calibration"][i, 1 : k_max + 1]
    np.testing.assert_allclose(curves[name].damage[1:].numpy(), np.maximum.accumulate(raw[::-1])[::-1])
    for retention in (0.3, 0.6):
        uniform = bank.ranks_for_retention(retention)
        allocated = bank.ranks_of(allocate_ranks(curves, retention, "greedy"))
        assert bank.ranks_after(allocated).sum() <= retention * bank.params_before.sum()
        u, a = bank.evaluate(uniform, "svdllm"), bank.evaluate(allocated, "svdllm")
        assert a.loss["calibration"].sum() <= u.loss["calibration"].sum() + 1e-12
        assert a.parameter_retention > retention - 0.02  # the budget is spent, not wasted


def test_sigmascale_is_learned_per_matrix_cached_and_never_stands_in_for_another_method(setup, cache):
    _, stats, heldout, refs, weights, key, _ = setup
    bank = build_bank(setup)
    ref = refs[0]
    rank = reference_rank(ref.shape, 0.75)
    ranks = bank.ranks_for_retention(0.5)
    before = bank.evaluate(ranks, "sigmascale")
    assert not before.ready.any() and np.isnan(before.loss["calibration"]).all()
    assert bank.spectrum(ref.name, "sigmascale") is None
    s, h = stats[stats_key(ref.layer, ref.group)], heldout[stats_key(ref.layer, ref.group)]
    learned = spectra.learn_sigmascale(key, ref, weights[ref.name], s, h, rank)
    assert spectra.sigmascale_path(key, ref.name, rank).is_file()
    assert spectra.learned_files(key) == {spectra.slug(ref.name): [rank]}
    np.testing.assert_array_equal(spectra.load_sigmascale(key, ref, rank).sigma, learned.sigma)
    # the learned curve at its own rank is the loss of SigmaScale's factors there, never worse than ASVD's
    factors = decompose(weights[ref.name].double(), s, rank, "sigmascale")
    assert learned.loss["calibration"][rank] == pytest.approx(
        activation_loss(weights[ref.name], factors.to_dense(), s), abs=1e-9
    )
    assert (
        learned.loss["calibration"][rank] <= bank.spectrum(ref.name, "asvd").loss["calibration"][rank] + 1e-12
    )
    bank.set_learned(ref.name, learned)
    after = bank.evaluate(ranks, "sigmascale")
    assert after.ready.tolist() == [True] + [False] * (len(refs) - 1)
    assert after.loss["calibration"][0] == pytest.approx(learned.loss["calibration"][ranks[0]])
    assert after.mean_loss("calibration") == pytest.approx(learned.loss["calibration"][ranks[0]])
    # a second variant learned at another rank serves the plans near it
    other_rank = max(1, rank // 4)
    second = spectra.learn_sigmascale(key, ref, weights[ref.name], s, h, other_rank)
    bank.set_learned(ref.name, second)
    near = ranks.copy()
    near[0] = other_rank
    numbers = bank.evaluate(near, "sigmascale")
    assert numbers.learned_rank[0] == other_rank
    assert numbers.loss["calibration"][0] == pytest.approx(second.loss["calibration"][other_rank])
    far = ranks.copy()
    far[0] = rank
    assert not bank.evaluate(far, "sigmascale").approximate[0]
    far[0] = min(int(bank.full_rank[0]) - 1, rank * 3)
    if not bank.evaluate(far, "sigmascale").dense[0]:
        assert bank.evaluate(far, "sigmascale").approximate[0]


def test_downsampling_keeps_both_ends():
    assert spectra.downsample_indices(100).tolist() == list(range(100))
    idx = spectra.downsample_indices(5000, 256)
    assert idx[0] == 0 and idx[-1] == 4999 and len(idx) <= 256
    assert np.all(np.diff(idx) > 0)
    assert {4999, 4998, 4997, 4996, 0, 1, 2, 3} <= set(idx.tolist())  # the ends stay dense
    assert np.diff(idx).max() < 5000 / 40  # and the middle is covered


def test_cumulative_energy():
    sigma = np.array([3.0, 2.0, 1.0])
    np.testing.assert_allclose(spectra.cumulative_energy(sigma), [9 / 14, 13 / 14, 1.0])
