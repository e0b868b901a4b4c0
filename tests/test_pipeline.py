import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from tiny import VOCAB, tiny_model

from sigmascale_core.calibration import collect_stats, load_stats, save_stats, stats_key
from sigmascale_core.metrics import activation_loss
from sigmascale_core.models import GROUP_OF_KIND, get_module, model_fingerprint, target_matrices
from sigmascale_core.perplexity import perplexity
from sigmascale_core.plan import CompressionPlan, MatrixPlan
from sigmascale_core.surgery import (
    LowRankLinear,
    compress,
    fit_factors,
    load_compressed,
    save_compressed,
    target_shapes,
)


def captured_inputs(model, ids):
    """Reference: every target's inputs from one plain full-model forward, hooks on all 7 matrices."""
    inputs, hooks = {}, []
    for ref in target_matrices(model):
        hooks.append(
            get_module(model, ref.name).register_forward_pre_hook(
                lambda _m, args, name=ref.name: inputs.setdefault(name, []).append(
                    args[0].reshape(-1, args[0].shape[-1])
                )
            )
        )
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {name: torch.cat(x).double() for name, x in inputs.items()}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_layerwise_stats_equal_full_forward_reference(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (5, 24), generator=torch.Generator().manual_seed(1))
    stats = collect_stats(model, ids, batch_size=2)
    assert len(stats) == 2 * 4  # four shared inputs per layer, not seven
    reference = captured_inputs(model, ids)
    for ref in target_matrices(model):
        s = stats[stats_key(ref.layer, GROUP_OF_KIND[ref.kind])]
        X = reference[ref.name]
        assert s.count == 5 * 24
        torch.testing.assert_close(s.gram, X.T @ X, rtol=1e-5, atol=1e-5 * (X.T @ X).abs().max().item())
        torch.testing.assert_close(s.abs_mean, X.abs().mean(0), rtol=1e-5, atol=1e-7)


def test_stats_cache_round_trip_and_corruption(tmp_path):
    model = tiny_model()
    stats = collect_stats(model, torch.randint(0, VOCAB, (2, 16)))
    key = {"model": "x", "samples": 2}
    path = tmp_path / "s.safetensors"
    save_stats(stats, path, key)
    loaded = load_stats(path, key)
    assert loaded.keys() == stats.keys()
    assert all(torch.equal(loaded[k].gram, stats[k].gram) for k in stats)
    assert load_stats(path, {"model": "y", "samples": 2}) is None  # another key: not trusted
    shard = load_stats(path, key, only={"1.mlp_in", "0.attn_in"})  # a distributed rank's part
    assert shard.keys() == {"1.mlp_in", "0.attn_in"}
    assert all(torch.equal(shard[k].gram, stats[k].gram) and shard[k].count == stats[k].count for k in shard)
    assert load_stats(path, key, only={"0.attn_in", "7.attn_in"}) is None  # one it lacks: recompute
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    assert load_stats(path, key) is None
    assert load_stats(tmp_path / "missing.safetensors", key) is None


def plan_for(model, retention=0.5, method="svdllm", **options):
    return CompressionPlan.uniform(target_shapes(model), retention, method, model_fingerprint(model), options)


def test_plan_accounting_and_break_even():
    shapes = {"a": (64, 64), "b": (32, 64)}
    plan = CompressionPlan.uniform(shapes, 0.5, "svd", "fp")
    assert plan.matrices["a"].rank == 16 and plan.matrices["b"].rank == math.floor(0.5 * 32 * 64 / 96)
    after = 16 * 128 + 10 * 96
    assert plan.parameter_retention() == pytest.approx(after / (64 * 64 + 32 * 64))
    assert plan.model_retention(10_000) == pytest.approx((10_000 - (6144 - after)) / 10_000)
    at_break_even = plan.with_ranks({"a": 32})  # 32·128 = 64·64: factors would be no smaller
    assert at_break_even.matrices["a"].is_dense and "a" not in at_break_even.compressed
    assert at_break_even.matrices["a"].params_after == 64 * 64


def test_plan_json_round_trip_and_bad_plans(tmp_path):
    plan = plan_for(tiny_model(), 0.6, "sigmascale", steps=5)
    path = tmp_path / "plan.json"
    plan.save(path)
    assert CompressionPlan.load(path) == plan
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid plan JSON"):
        CompressionPlan.load(path)
    data = plan.to_dict()
    for mutate, message in [
        (lambda d: d.update(version=99), "version"),
        (lambda d: d.update(method="pca"), "unknown method"),
        (lambda d: d.pop("matrices"), "malformed"),
        (lambda d: d["matrices"][next(iter(d["matrices"]))].update(rank=10_000), "rank must be"),
        (lambda d: d.update(options={"nope": 1}), "unknown option"),
    ]:
        bad = json.loads(json.dumps(data))
        mutate(bad)
        with pytest.raises(ValueError, match=message):
            CompressionPlan.from_dict(bad)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_compress_replaces_linears_and_matches_factors(family):
    model = tiny_model(family)
    ids = torch.randint(0, VOCAB, (4, 32))
    stats = collect_stats(model, ids)
    plan = plan_for(model, 0.5, "svdllm")
    dense = {ref.name: get_module(model, ref.name).weight.detach().clone() for ref in target_matrices(model)}
    factors = compress(model, plan, stats)
    assert len(factors) == len(plan.compressed) == 14
    for name, f in factors.items():
        module = get_module(model, name)
        assert isinstance(module, LowRankLinear) and module.rank == plan.matrices[name].rank
        x = torch.randn(3, module.in_features)
        torch.testing.assert_close(module(x), x @ f.to_dense().T)
        ref = next(r for r in target_matrices(model) if r.name == name)
        s = stats[stats_key(ref.layer, ref.group)]
        assert activation_loss(dense[name], f.to_dense(), s) < 1
    out = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_fit_is_separate_from_apply():
    model = tiny_model()
    stats = collect_stats(model, torch.randint(0, VOCAB, (2, 16)))
    fit_factors(model, plan_for(model), stats)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_save_and_load_round_trip_gives_identical_logits(tmp_path):
    model = tiny_model("llama")
    stats = collect_stats(model, torch.randint(0, VOCAB, (4, 32)))
    plan = plan_for(model, 0.5, "asvd")
    compress(model, plan, stats)
    out = save_compressed(model, plan, tmp_path / "out", report={"ok": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    reloaded, reloaded_plan = load_compressed(out)
    assert reloaded_plan == plan
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    with pytest.raises(ValueError, match="exists"):
        save_compressed(model, plan, out)


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model()
    plan = plan_for(model)
    stats = collect_stats(model, torch.randint(0, VOCAB, (2, 16)))
    compress(model, plan, stats)

    def boom(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CompressionPlan, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_compressed(model, plan, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_saves_leftover_folder_is_removed_by_the_next_save(tmp_path):
    """SIGKILL leaves the temp folder (no handler runs); the next save beside it removes it."""
    import subprocess

    from sigmascale_core.artifacts import temp_prefix

    dead = subprocess.Popen(["true"])
    dead.wait()
    prefix = temp_prefix(tmp_path / "out").replace(f"-{os.getpid()}.", f"-{dead.pid}.")
    leftover = tmp_path / f"{prefix}abcd1234.tmp"
    (leftover / "sub").mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"x" * 1000)
    model = tiny_model()
    plan = plan_for(model)
    compress(model, plan, collect_stats(model, torch.randint(0, VOCAB, (2, 16))))
    save_compressed(model, plan, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_plan_for_another_model_is_refused():
    model = tiny_model()
    plan = CompressionPlan(
        model_fingerprint(model), "svd", {}, {"model.layers.0.self_attn.q_proj": MatrixPlan((64, 65), 4)}
    )
    with pytest.raises(ValueError, match="does not match"):
        compress(model, plan, {})


def test_perplexity_matches_brute_force():
    model = tiny_model()
    tokens = torch.randint(0, VOCAB, (70,), generator=torch.Generator().manual_seed(3))
    result = perplexity(model, tokens, window=16, batch_size=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 70, 16):
            window = tokens[start : start + 16]
            if window.numel() < 2:
                continue
            logp = F.log_softmax(model(window[None]).logits[0].double(), -1)
            for t in range(1, window.numel()):
                total -= logp[t - 1, window[t]].item()
                count += 1
    assert result.tokens == count == 4 * 15 + 5
    assert result.windows == 5
    assert result.nll == pytest.approx(total / count, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_sequential_compression_equals_calibrating_after_each_compressed_layer(tmp_path):
    """Reference: the plain loop it shortcuts: compress layer 0 on the dense model's stats, then run the
    whole (partly compressed) model again for layer 1's stats and compress layer 1 with them."""
    import copy

    from sigmascale_core.models import LoadedModel
    from sigmascale_core.pipeline import CalibrationConfig, compress_sequential
    from sigmascale_core.text import calibration_batch

    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join(" ".join(f"w{(7 * i + j) % 97}" for j in range(60)) for i in range(30)))
    tokenizer = word_tokenizer([f"w{i}" for i in range(97)])
    model = tiny_model()
    reference = copy.deepcopy(model)
    loaded = LoadedModel(model, tokenizer, "tiny", "llama", model_fingerprint(model))
    plan = plan_for(model, 0.3, "svd")
    config = CalibrationConfig(text=f"file:{text}", samples=3, seq_len=16, batch_size=2)
    stats, info = compress_sequential(loaded, plan, config)
    assert info["sequential"] and info["tokens"] == 48

    ids = calibration_batch(tokenizer, "llama", config.text, 3, 16, 0)
    layer_of = {r.name: r.layer for r in target_matrices(reference)}
    for layer in (0, 1):
        layer_stats = collect_stats(reference, ids)
        compress(
            reference, plan.with_ranks({n: None for n in plan.matrices if layer_of[n] != layer}), layer_stats
        )
        for group in ("attn_in", "mlp_in"):
            key = stats_key(layer, group)
            # float32 forwards in other batches: entries ~50 agree to ~2e-5
            assert torch.allclose(stats[key].gram, layer_stats[key].gram, rtol=1e-5, atol=1e-4)
    for name in plan.matrices:
        ours, theirs = get_module(model, name), get_module(reference, name)
        assert isinstance(ours, LowRankLinear)
        assert torch.allclose(
            ours.left.weight @ ours.right.weight, theirs.left.weight @ theirs.right.weight, atol=1e-5
        )
    dense = collect_stats(tiny_model(), ids)
    assert not torch.allclose(stats["1.attn_in"].gram, dense["1.attn_in"].gram)  # layer 1 saw compression


def word_tokenizer(words):
    """A whitespace word-level tokenizer over `words` (ids 2..), with <unk> 0 and </s> 1."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


def test_a_model_saved_meanwhile_is_never_replaced_without_force(tmp_path, monkeypatch):
    """Two runs to one --out: the second to finish must refuse, and the first's model stays intact."""
    import sigmascale_core.surgery as surgery

    model = tiny_model()
    plan = plan_for(model)
    compress(model, plan, collect_stats(model, torch.randint(0, VOCAB, (2, 16))))
    out = tmp_path / "out"
    real_save_file = surgery.save_file

    def other_run_saves_first(state, path):
        out.mkdir()
        (out / "theirs").write_text("the other run's model")
        real_save_file(state, path)

    monkeypatch.setattr(surgery, "save_file", other_run_saves_first)
    with pytest.raises(ValueError, match="appeared while saving"):
        save_compressed(model, plan, out)
    assert sorted(p.name for p in out.iterdir()) == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # our temp folder is gone
    monkeypatch.setattr(surgery, "save_file", real_save_file)
    save_compressed(model, plan, out, force=True)  # replacing it is asked for
    assert load_compressed(out)[1] == plan


def test_an_unwritable_out_is_refused_before_anything(tmp_path):
    from sigmascale_core.surgery import check_output_dir

    with pytest.raises(ValueError, match="/dev/null is not a folder"):
        check_output_dir("/dev/null/x")
    (tmp_path / "exists").mkdir()
    with pytest.raises(ValueError, match="exists; pass --force"):
        check_output_dir(tmp_path / "exists")
    assert check_output_dir(tmp_path / "exists", force=True) == (tmp_path / "exists").resolve()
    assert check_output_dir(tmp_path / "a" / "b") == (tmp_path / "a" / "b").resolve()  # parents made later
