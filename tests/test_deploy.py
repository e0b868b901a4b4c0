"""Deploying a compressed folder: plain transformers loads it without sigmascale_core, `sigmascale export`
upgrades older folders, and the latent KV cache reproduces the uncached model."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import FAMILIES, VOCAB, tiny_model
from transformers import AutoTokenizer

from sigmascale_core.calibration import collect_stats
from sigmascale_core.cli import main
from sigmascale_core.modeling_sigmascale import (
    LatentKVLayer,
    LowRankLinear,
    enable_latent_kv,
    latent_kv_attention,
)
from sigmascale_core.models import bundled_model_dir, model_fingerprint
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.surgery import (
    MODELING_FILE,
    compress,
    load_compressed,
    save_compressed,
    target_shapes,
)

# Run by `python -I` (no PYTHONPATH, no user site, no script folder on the path): sigmascale_core stays
# unimportable even though the editable install would find it, so only the folder's own code can load it.
PLAIN_TRANSFORMERS = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoSigmaScale(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "sigmascale_core":
                raise ImportError("sigmascale_core is blocked in this test")

    sys.meta_path.insert(0, NoSigmaScale())
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, ids_file, out_file = sys.argv[1:4]
    ids = load_file(ids_file)["ids"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    results = {"encoded": tokenizer("the model", return_tensors="pt").input_ids}
    for latent in (False, True):
        model = AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=True, sigmascale_latent_kv=latent
        ).eval()
        with torch.no_grad():
            results[f"logits_{latent}"] = model(ids).logits
        out = model.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
        results[f"generated_{latent}"] = out.sequences
        layer_cache = type(out.cache.layers[0]).__name__
        assert layer_cache == ("LatentKVLayer" if latent else "DynamicLayer"), layer_cache
    assert not any(name.startswith("sigmascale_core") for name in sys.modules), "our package was imported"
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    save_file({k: v.contiguous() for k, v in results.items()}, out_file)
    """
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(bundled_model_dir())


def compressed_model(family, tokenizer=None, retention=0.5):
    """A tiny random model of the family, compressed by svdllm at `retention` (and its plan)."""
    model = tiny_model(family)
    if tokenizer is not None:
        model.resize_token_embeddings(len(tokenizer))
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    plan = CompressionPlan.uniform(target_shapes(model), retention, "svdllm", model_fingerprint(model))
    compress(model, plan, collect_stats(model, ids))
    return model, plan


def plain_and_latent(family, tmp_path):
    """A compressed tiny model of the family, saved and loaded back with the plain and the latent KV cache."""
    model, plan = compressed_model(family)
    out = save_compressed(model, plan, tmp_path / "out")
    return load_compressed(out)[0], load_compressed(out, latent_kv=True)[0]


def prompt(batch=2, length=10, seed=2):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_transformers_loads_the_folder_without_sigmascale(family, tokenizer, tmp_path):
    model, plan = compressed_model(family, tokenizer)
    out = save_compressed(model, plan, tmp_path / "out", tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_sigmascale.SigmaScale")
    assert config["sigmascale_ranks"] == {name: m.rank for name, m in plan.compressed.items()}
    assert (out / MODELING_FILE).is_file() and (out / "generation_config.json").is_file()

    ids = prompt()
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-I", "-c", PLAIN_TRANSFORMERS, str(out), str(tmp_path / "ids.safetensors"),
         str(tmp_path / "plain.safetensors")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    plain = load_file(tmp_path / "plain.safetensors")

    ours, _ = load_compressed(out)
    with torch.no_grad():
        reference = ours(ids).logits
    torch.testing.assert_close(plain["logits_False"], reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain["logits_True"], reference, atol=1e-5, rtol=0)
    generated = ours.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(plain["generated_False"], generated)
    assert torch.equal(plain["generated_True"], generated)
    assert torch.equal(plain["encoded"], tokenizer("the model", return_tensors="pt").input_ids)


def old_format_folder(family, tokenizer, directory):
    """A folder as save_compressed wrote it before this change: weights, base config, plan, tokenizer,
    report; no modeling file, no auto_map, no generation config."""
    model, plan = compressed_model(family, tokenizer)
    out = save_compressed(model, plan, directory, tokenizer, report={"method": "svdllm"})
    (out / MODELING_FILE).unlink()
    (out / "generation_config.json").unlink()
    config = json.loads((out / "config.json").read_text())
    for key in ("auto_map", "sigmascale_ranks", "sigmascale_latent_kv"):
        del config[key]
    (out / "config.json").write_text(json.dumps(config))
    return model, plan


def test_export_upgrades_an_old_folder(tokenizer, tmp_path):
    model, plan = old_format_folder("qwen2", tokenizer, tmp_path / "old")
    old, _ = load_compressed(tmp_path / "old")  # old folders keep loading
    assert main(["export", "--model", str(tmp_path / "old"), "--out", str(tmp_path / "new")]) == 0
    new = tmp_path / "new"
    assert (new / MODELING_FILE).is_file()
    config = json.loads((new / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_sigmascale.SigmaScaleQwen2ForCausalLM"}
    assert config["sigmascale_latent_kv"] is False
    assert json.loads((new / "report.json").read_text()) == {"method": "svdllm"}
    assert AutoTokenizer.from_pretrained(new)("the model").input_ids == tokenizer("the model").input_ids
    exported, exported_plan = load_compressed(new)
    assert exported_plan == plan
    ids = prompt()
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, model(ids).logits)
        assert torch.equal(old(ids).logits, model(ids).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old"]  # no temp folder left

    assert main(["export", "--model", str(new), "--out", str(tmp_path / "latent"), "--latent-kv"]) == 0
    assert json.loads((tmp_path / "latent" / "config.json").read_text())["sigmascale_latent_kv"] is True
    latent, _ = load_compressed(tmp_path / "latent")  # the folder's default
    assert latent.model.layers[0].self_attn.forward.func is latent_kv_attention


def test_export_refuses_bad_input(tokenizer, tmp_path, capsys):
    old_format_folder("llama", tokenizer, tmp_path / "old")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["export", "--model", str(tmp_path / "old"), "--out", str(tmp_path / "taken")]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    args = ["export", "--model", str(tmp_path / "old"), "--out", str(tmp_path / "taken"), "--force"]
    assert main(args) == 0
    assert (tmp_path / "taken" / MODELING_FILE).is_file() and not (tmp_path / "taken" / "keep.txt").exists()

    dense = tmp_path / "dense"
    tiny_model("llama").save_pretrained(dense)
    assert main(["export", "--model", str(dense), "--out", str(tmp_path / "x")]) == 2
    assert "not a SigmaScale output folder" in capsys.readouterr().err
    old = str(tmp_path / "old")
    assert main(["export", "--model", old, "--out", old, "--force"]) == 2
    assert "must differ" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def uncached_logits(model, sequences, prompt_length):
    """Logits predicting every generated token, from one forward pass over the whole sequence, no cache."""
    with torch.no_grad():
        logits = model(sequences, use_cache=False).logits
    return logits[:, prompt_length - 1 : -1]


def generate_logits(model, ids, new_tokens, **kwargs):
    out = model.generate(
        ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        output_logits=True, return_dict_in_generate=True, **kwargs,
    )  # fmt: skip
    return out.sequences, torch.stack(out.logits, dim=1), out.cache


@pytest.mark.parametrize("family", FAMILIES)
def test_latent_kv_cache_matches_the_uncached_model_over_256_tokens(family, tmp_path):
    dense_cache, latent = plain_and_latent(family, tmp_path)
    ids = prompt(batch=1, length=8)
    sequences, logits, cache = generate_logits(latent, ids, 256)
    assert all(isinstance(layer, LatentKVLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 8 + 255
    torch.testing.assert_close(logits, uncached_logits(dense_cache, sequences, 8), atol=1e-4, rtol=0)
    torch.testing.assert_close(uncached_logits(latent, sequences, 8), logits, atol=1e-4, rtol=0)
    assert torch.equal(
        sequences, dense_cache.generate(ids, max_new_tokens=256, min_new_tokens=256, do_sample=False)
    )

    # the cache holds rank-r latents, not K and V: fewer bytes per token
    k_proj = latent.model.layers[0].self_attn.k_proj
    assert cache.layers[0].keys.shape == (1, 1, 8 + 255, k_proj.rank) and k_proj.rank < k_proj.out_features


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_latent_kv_cache_keeps_positions_under_left_padding(family, tmp_path):
    plain, latent = plain_and_latent(family, tmp_path)
    ids = prompt(batch=2, length=12)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0  # the second prompt is 7 tokens, left-padded
    padded = dict(attention_mask=mask, pad_token_id=0)
    seq_latent, logits_latent, _ = generate_logits(latent, ids, 40, **padded)
    seq_plain, logits_plain, _ = generate_logits(plain, ids, 40, **padded)
    assert torch.equal(seq_latent, seq_plain)
    torch.testing.assert_close(logits_latent, logits_plain, atol=1e-4, rtol=0)
    # the padded row is the short prompt alone: its cached keys were rotated at positions 0.., not 5..
    _, logits_alone, _ = generate_logits(latent, ids[1:, 5:], 40)
    torch.testing.assert_close(logits_latent[1:], logits_alone, atol=1e-4, rtol=0)


def test_latent_kv_is_refused_for_sliding_window_attention():
    model, _plan = compressed_model("mistral")
    model.config.sliding_window = 4096
    with pytest.raises(ValueError, match="sliding-window"):
        enable_latent_kv(model)


def test_low_rank_linear_from_weights():
    left, right, bias = torch.randn(6, 2), torch.randn(2, 5), torch.randn(6)
    module = LowRankLinear.from_weights(left, right, bias)
    x = torch.randn(3, 5)
    torch.testing.assert_close(module(x), x @ (left @ right).T + bias)
    with pytest.raises(ValueError, match="do not chain"):
        LowRankLinear.from_weights(left, torch.randn(3, 5))


def test_latent_kv_cache_with_eager_attention(tmp_path):
    model, plan = compressed_model("qwen2")  # biases on v_proj: added after the latent-space attention
    out = save_compressed(model, plan, tmp_path / "out")
    latent, _ = load_compressed(out, latent_kv=True)
    latent.set_attn_implementation("eager")
    assert latent.config._attn_implementation == "eager"
    ids = prompt(batch=2, length=8)
    sequences, logits, _ = generate_logits(latent, ids, 24)
    torch.testing.assert_close(logits, uncached_logits(model, sequences, 8), atol=1e-4, rtol=0)


def test_latent_kv_cache_beside_dense_layers(tmp_path):
    """A plan that keeps layer 1's v_proj dense: layer 1 keeps the plain cache, layer 0 the latent one."""
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    plan = CompressionPlan.uniform(target_shapes(model), 0.5, "svdllm", model_fingerprint(model))
    plan = plan.with_ranks({"model.layers.1.self_attn.v_proj": None})
    compress(model, plan, collect_stats(model, ids))
    latent, _ = load_compressed(save_compressed(model, plan, tmp_path / "out"), latent_kv=True)
    sequences, logits, cache = generate_logits(latent, prompt(length=8), 24)
    assert [type(layer).__name__ for layer in cache.layers] == ["LatentKVLayer", "DynamicLayer"]
    torch.testing.assert_close(logits, uncached_logits(model, sequences, 8), atol=1e-4, rtol=0)
