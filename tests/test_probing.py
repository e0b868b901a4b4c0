"""Sensitivity probing: values against real single-matrix compression, the model left intact, the
loss-curve proxy, the text policy (never evaluation text), the cache and its resumable checkpoints."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny import VOCAB, tiny_model
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from sigmascale_core import methods, probing
from sigmascale_core.calibration import collect_stats, stats_key
from sigmascale_core.methods import fit_scaling, truncate
from sigmascale_core.metrics import activation_loss
from sigmascale_core.models import LoadedModel, get_module, model_fingerprint
from sigmascale_core.perplexity import perplexity
from sigmascale_core.pipeline import probe_config_for
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.probing import ProbeConfig, probe, probe_sensitivity, proxy_sensitivity
from sigmascale_core.sensitivity import SensitivityTable, probe_ranks
from sigmascale_core.surgery import compress, target_shapes
from sigmascale_core.text import (
    calibration_batch,
    calibration_side_batch,
    shared_token_fraction,
    token_stream,
    window_starts,
)

MATRICES = ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj")
GRID = (0.25, 0.6)


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    """Probe tables and token streams go to a temp dir, never the repository's cache/."""
    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    stats = collect_stats(model, torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0)))
    tokens = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    return model, stats, tokens


def reference_perplexity(model, stats, tokens, name, rank, method, options):
    """Independent path: a copy of the model with that one matrix really replaced by a LowRankLinear
    (surgery), scored by perplexity() over the same windows. SigmaScale's probe learns its scaling
    once per matrix (at the grid's median rank), so its reference truncates under that scaling."""
    compressed = copy.deepcopy(model)
    shapes = target_shapes(model)
    if method == "sigmascale":
        W = get_module(compressed, name).weight.detach()
        learned_at = probing.learning_rank(probe_ranks(shapes[name], GRID))
        scaling = fit_scaling(W, stats[matrix_stats_key(name)], method, learned_at, **options)
        get_module(compressed, name).weight.data = truncate(W, scaling, rank, method).to_dense()
    else:
        dense = CompressionPlan.uniform(shapes, 1.0, method, "fp", options)  # every matrix at break-even
        plan = dense.with_ranks({n: rank if n == name else None for n in shapes})
        compress(compressed, plan, stats)
    return perplexity(compressed, tokens.reshape(-1), window=tokens.shape[1], batch_size=2).perplexity


def matrix_stats_key(name: str) -> str:
    layer = int(name.split(".")[2])
    return stats_key(layer, "mlp_out" if name.endswith("down_proj") else "attn_in")


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("method", "options"), [("svdllm", {}), ("sigmascale", {"steps": 2})])
def test_probe_equals_compressing_that_one_matrix(setup, method, options):
    model, stats, tokens = setup
    before = state(model)
    table = probe_sensitivity(model, stats, tokens, method, GRID, options, batch_size=2, matrices=MATRICES)
    assert table.info["tail_forward"]  # the fast path passed its self-check on this family
    dense = perplexity(model, tokens.reshape(-1), window=tokens.shape[1]).perplexity
    assert table.dense == pytest.approx(dense, rel=1e-6)
    assert set(table.values) == set(MATRICES)
    for name in MATRICES:
        assert table.ranks[name] == probe_ranks(table.shapes[name], GRID)
        for rank, value in zip(table.ranks[name], table.values[name], strict=True):
            expected = reference_perplexity(model, stats, tokens, name, rank, method, options)
            assert value == pytest.approx(expected, rel=1e-5), (name, rank)
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing left truncated


def test_full_forward_fallback_gives_the_same_values(setup, monkeypatch):
    model, stats, tokens = setup
    fast = probe_sensitivity(model, stats, tokens, "svdllm", GRID, batch_size=3, matrices=MATRICES[1:])
    monkeypatch.setattr(probing._TailScorer, "_tail_nll", lambda self, start: 123.0)  # a broken fast path
    slow = probe_sensitivity(model, stats, tokens, "svdllm", GRID, batch_size=3, matrices=MATRICES[1:])
    assert not slow.info["tail_forward"]
    for a, b in zip(fast.values[MATRICES[1]], slow.values[MATRICES[1]], strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def test_weights_are_restored_when_probing_fails(setup, monkeypatch):
    model, stats, tokens = setup
    before = state(model)
    calls = {"n": 0}
    real = probing._TailScorer.nll

    def failing(self, start):
        calls["n"] += 1
        if calls["n"] == 2:  # mid-matrix: the weight is swapped right now
            raise KeyboardInterrupt
        return real(self, start)

    monkeypatch.setattr(probing._TailScorer, "nll", failing)
    with pytest.raises(KeyboardInterrupt):
        probe_sensitivity(model, stats, tokens, "svd", GRID, matrices=MATRICES)
    after = state(model)
    assert calls["n"] == 2 and all(torch.equal(before[k], after[k]) for k in before)
    assert len(list(model.model.layers)) == 2  # the layer list is whole again


def test_probe_ranks_stay_below_break_even():
    assert probe_ranks((64, 64), (0.2, 0.5, 0.9)) == (6, 16, 28)
    assert probe_ranks((64, 64), (0.999, 1.0)) == (31,)  # ⌊0.999·32⌋; rank 32 = break-even is left out
    assert probe_ranks((1, 50), (0.2, 0.9)) == ()  # no rank pays: the matrix can only stay dense
    assert probe_ranks((8, 8), (0.01, 0.02)) == (1,)  # never rank 0


@pytest.mark.parametrize(("method", "options"), [("svdllm", {}), ("asvd", {}), ("sigmascale", {"steps": 2})])
def test_proxy_is_the_relative_activation_loss_at_each_rank(setup, method, options):
    model, stats, _ = setup
    table = proxy_sensitivity(model, stats, method, GRID, options, matrices=MATRICES)
    assert table.metric == "relative_loss" and table.dense == 0.0
    for ref_name in MATRICES:
        s = stats[matrix_stats_key(ref_name)]
        W = get_module(model, ref_name).weight.detach()
        learned_at = probing.learning_rank(table.ranks[ref_name]) if method == "sigmascale" else None
        scaling = fit_scaling(W, s, method, learned_at, **options)  # sigmascale: learned once per matrix
        for rank, value in zip(table.ranks[ref_name], table.values[ref_name], strict=True):
            expected = activation_loss(W, truncate(W, scaling, rank, method).to_dense(), s)
            assert value == pytest.approx(expected, rel=1e-4, abs=1e-7), (ref_name, rank)
        assert list(table.values[ref_name]) == sorted(table.values[ref_name], reverse=True)


@pytest.mark.parametrize("proxy", [False, True])
def test_sigmascale_probe_learns_once_per_matrix(setup, monkeypatch, proxy):
    model, stats, tokens = setup
    calls = []
    real = methods.learn_scaling

    def counting(W, gram, abs_mean, rank, **options):
        calls.append(rank)
        return real(W, gram, abs_mean, rank, **options)

    monkeypatch.setattr(methods, "learn_scaling", counting)
    grid = (0.2, 0.4, 0.6, 0.8)
    if proxy:
        table = proxy_sensitivity(model, stats, "sigmascale", grid, {"steps": 2}, matrices=MATRICES)
    else:
        table = probe_sensitivity(model, stats, tokens, "sigmascale", grid, {"steps": 2}, matrices=MATRICES)
    assert all(len(table.ranks[name]) == 4 for name in MATRICES)
    assert calls == [sorted(table.ranks[name])[2] for name in MATRICES]  # one fit each, at the median rank


def test_probe_takes_the_plans_options_where_its_method_does():
    whiten = {"init": "whiten", "shrink": 0.1, "steps": 3}
    assert probe_config_for("sigmascale", options=whiten).options == {"shrink": 0.1}  # svdllm's probe
    assert probe_config_for("sigmascale", options=whiten, probe_method="sigmascale").options == whiten
    assert probe_config_for("svdllm", options={"shrink": 0.2}).options == {"shrink": 0.2}
    assert probe_config_for("asvd", options={"alpha": 0.3}).options == {"alpha": 0.3}


def test_table_json_round_trip_and_validation(setup, tmp_path):
    model, stats, _ = setup
    table = proxy_sensitivity(model, stats, "svdllm", GRID, matrices=MATRICES)
    table.save(tmp_path / "t.json")
    assert SensitivityTable.load(tmp_path / "t.json") == table
    data = table.to_dict()
    data["matrices"][MATRICES[0]]["ranks"] = [999]
    data["matrices"][MATRICES[0]]["values"] = [0.5]
    with pytest.raises(ValueError, match="break-even"):
        SensitivityTable.from_dict(data)
    with pytest.raises(ValueError, match="version"):
        SensitivityTable.from_dict({**table.to_dict(), "version": 99})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SensitivityTable.load(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------------------
# Text policy and the cached job

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def write_docs(path, seed: int, n: int = 12) -> str:
    g = torch.Generator().manual_seed(seed)
    docs = [" ".join(WORDS[i] for i in torch.randint(0, 8, (20,), generator=g).tolist()) for _ in range(n)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return f"file:{path}"


def test_probing_text_must_not_overlap_evaluation_text(tmp_path):
    tok = word_tokenizer()
    calibration = write_docs(tmp_path / "cal.txt", 0)
    evaluation = write_docs(tmp_path / "eval.txt", 1)
    batch = calibration_side_batch(tok, "llama", calibration, 2, 16, seed=1, evaluation=(evaluation,))
    assert batch.shape == (2, 16)
    with pytest.raises(ValueError, match="and probing"):
        calibration_side_batch(tok, "llama", evaluation, 2, 16, seed=1, evaluation=(evaluation,))
    with pytest.raises(ValueError, match="evaluation texts"):
        calibration_side_batch(tok, "llama", calibration, 2, 16, seed=1, evaluation=())
    with pytest.raises(ValueError, match="and finetuning"):
        calibration_side_batch(tok, "llama", evaluation, 2, 16, 1, (calibration, evaluation), "finetuning")


def test_default_evaluation_texts_are_refused_for_probing():
    for spec in ("boolq:evaluation", "lambada"):
        with pytest.raises(ValueError, match="and probing"):
            calibration_side_batch(None, "llama", spec, 2, 16, seed=1)  # refused before tokenising


def test_shared_token_fraction_against_index_sets():
    n_tokens, a, b = 500, (4, 30, 1), (5, 40, 0)
    covered = {s + i for s in window_starts(n_tokens, *b).tolist() for i in range(b[1])}
    probe_tokens = [s + i for s in window_starts(n_tokens, *a).tolist() for i in range(a[1])]
    expected = sum(t in covered for t in probe_tokens) / len(probe_tokens)
    assert shared_token_fraction(n_tokens, a, b) == pytest.approx(expected)
    assert shared_token_fraction(n_tokens, a, a) == 1.0


def test_probe_job_caches_and_resumes_after_an_interrupt(setup, tmp_path):
    model, stats, _ = setup
    tok = word_tokenizer()
    calibration = write_docs(tmp_path / "cal.txt", 0)
    evaluation = write_docs(tmp_path / "eval.txt", 1)
    loaded = LoadedModel(model, tok, "tiny", "llama", model_fingerprint(model))
    config = ProbeConfig(
        text=calibration,
        samples=2,
        seq_len=16,
        seed=1,
        method="svdllm",
        retentions=GRID,
        evaluation=(evaluation,),
        matrices=MATRICES,
    )
    with pytest.raises(ValueError, match="and probing"):
        probe(loaded, stats, ProbeConfig(text=evaluation, evaluation=(evaluation,), matrices=MATRICES))
    reference, _ = probe(loaded, stats, config, use_cache=False)

    first_matrix_probes = len(reference.ranks[MATRICES[0]])

    def interrupt(done, total, what):
        if done > first_matrix_probes:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        probe(loaded, stats, config, calibration=(calibration, 4, 16, 0), progress=interrupt)
    table, info = probe(loaded, stats, config, calibration=(calibration, 4, 16, 0))
    assert not info["cached"] and info["resumed_matrices"] == 1
    n_tokens = token_stream(tok, "llama", calibration).numel()  # the reference: index sets of windows
    covered = {s + i for s in window_starts(n_tokens, 4, 16, 0).tolist() for i in range(16)}
    probed = [s + i for s in window_starts(n_tokens, 2, 16, 1).tolist() for i in range(16)]
    assert info["shared_with_stats"] == pytest.approx(sum(t in covered for t in probed) / len(probed))
    assert table.values == reference.values and table.dense == pytest.approx(reference.dense)
    assert table.info["text"] == calibration
    again, info = probe(loaded, stats, config)
    assert info["cached"] and again == table
    cache_file = info["cache"]
    assert json.loads(Path(cache_file).read_text())["table"] == table.to_dict()
    assert not list((tmp_path / "cache" / "probes").glob("*.partial.json"))  # cleaned up when done
    other, info = probe(loaded, stats, ProbeConfig(**{**config.__dict__, "seed": 2}))
    assert not info["cached"] and info["cache"] != cache_file  # another probing batch, another entry
    proxy, info = probe(loaded, stats, ProbeConfig(**{**config.__dict__, "proxy": True}))
    assert proxy.metric == "relative_loss" and not info["cached"]
    seed2 = calibration_batch(tok, "llama", calibration, 2, 16, 2)  # the dense model on those windows
    assert other.dense == pytest.approx(perplexity(model, seed2.reshape(-1), window=16).perplexity, rel=1e-5)
    assert other.dense != pytest.approx(table.dense, rel=1e-3)
