"""Registry, fingerprints, BOS policy and loading; fast tests use tiny random models, no network."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from corrupt import flip_tensor_byte
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForSequenceClassification,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from sigmascale_core import models
from sigmascale_core.models import (
    BUNDLED_MODEL,
    INPUT_GROUPS,
    MATRIX_KINDS,
    encode,
    get_module,
    load_model,
    model_fingerprint,
    resolve_family,
    set_module,
    target_matrices,
)

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 64, 128, 4, 2, 64


def tiny_config(family: str):
    """Two-layer GQA config of the family; Qwen3 gets head_dim != hidden/heads to catch shape slips."""
    common = dict(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    return Qwen3Config(**common, head_dim=32)


def tiny_model(family: str = "llama", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


def tiny_tokenizer(bos_by_default: bool) -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose default call adds BOS (Llama-2 style) or not (SmolLM2/Qwen style)."""
    words = ["hello", "world", "the", "cat", "sat", "on", "mat"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_by_default:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# ---------------------------------------------------------------------------------------------------
# Registry


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_target_matrices_enumerates_seven_per_layer_with_gqa_shapes(family):
    model = tiny_model(family)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or HIDDEN // HEADS
    q_out, kv_out = HEADS * head_dim, KV_HEADS * head_dim
    expected = {
        "q": (q_out, HIDDEN),
        "k": (kv_out, HIDDEN),
        "v": (kv_out, HIDDEN),
        "o": (HIDDEN, q_out),
        "gate": (INTER, HIDDEN),
        "up": (INTER, HIDDEN),
        "down": (HIDDEN, INTER),
    }
    refs = target_matrices(model)
    assert len(refs) == 2 * len(MATRIX_KINDS)
    assert [(r.layer, r.kind) for r in refs] == [(i, k) for i in range(2) for k in MATRIX_KINDS]
    for ref in refs:
        assert ref.shape == expected[ref.kind], ref
        assert tuple(get_module(model, ref.name).weight.shape) == ref.shape
        assert ref.name.startswith(f"model.layers.{ref.layer}.")
        assert "lm_head" not in ref.name and "embed" not in ref.name
    assert {r.name for r in refs} <= {name for name, _ in model.named_modules()}
    # kinds sharing an input share its width, so one ActivationStats per group and layer suffices
    groups = {(r.layer, r.group) for r in refs}
    assert len(groups) == 2 * len(INPUT_GROUPS) == 8
    for layer, group in groups:
        assert len({r.in_features for r in refs if (r.layer, r.group) == (layer, group)}) == 1


def test_input_groups_partition_the_kinds():
    kinds = [k for group in INPUT_GROUPS.values() for k in group]
    assert sorted(kinds) == sorted(MATRIX_KINDS) and len(kinds) == len(set(kinds))


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(ValueError, match=r"'gpt2'.*supported model_types: llama, mistral, qwen2, qwen3"):
        target_matrices(gpt2)
    with pytest.raises(ValueError, match=r"'bert'.*BertForMaskedLM"):
        resolve_family(BertConfig(architectures=["BertForMaskedLM"]))


def test_non_causal_model_is_named():
    config = tiny_config("llama")
    classifier = LlamaForSequenceClassification(config)
    with pytest.raises(ValueError, match=r"LlamaForSequenceClassification.*not a causal LM"):
        target_matrices(classifier)
    config.architectures = ["LlamaForSequenceClassification"]
    with pytest.raises(ValueError, match=r"LlamaForSequenceClassification.*ForCausalLM"):
        resolve_family(config)


def test_set_module_replaces_by_name_and_returns_the_old_one():
    model = tiny_model()
    name = target_matrices(model)[0].name
    new = nn.Linear(HIDDEN, HIDDEN, bias=False)
    old = set_module(model, name, new)
    assert isinstance(old, nn.Linear) and old is not new
    assert get_module(model, name) is new
    with pytest.raises(ValueError, match="no module"):
        get_module(model, "model.layers.9.self_attn.q_proj")


# ---------------------------------------------------------------------------------------------------
# Fingerprint


def test_fingerprint_depends_on_content_not_on_the_object_or_its_origin():
    a, b = tiny_model(seed=0), tiny_model(seed=0)  # built independently: equal content, other objects
    assert all(pa is not pb for pa, pb in zip(a.parameters(), b.parameters(), strict=True))
    b.config._name_or_path = "/somewhere/else"
    assert model_fingerprint(a) == model_fingerprint(b)
    assert len(model_fingerprint(a)) == 16 and int(model_fingerprint(a), 16) >= 0


def test_fingerprint_changes_with_one_weight_dtype_or_config():
    model = tiny_model()
    before = model_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[37, 91] += 1e-3
    after = model_fingerprint(model)
    assert after != before
    assert model_fingerprint(tiny_model(seed=1)) != before
    assert model_fingerprint(tiny_model().to(torch.bfloat16)) != before
    other = tiny_model()
    other.config.rms_norm_eps = 1e-3
    assert model_fingerprint(other) != before


def test_fingerprint_sees_the_last_element_of_a_large_tensor():
    # A stride sample of 64k values misses most elements of a tensor this size; every byte must count.
    model, twin = nn.Linear(512, 512, bias=False), nn.Linear(512, 512, bias=False)
    with torch.no_grad():
        twin.weight.copy_(model.weight)
        twin.weight.view(-1)[-1] = torch.nextafter(twin.weight.view(-1)[-1], torch.tensor(9.0))
    assert model.weight.numel() > 100_000
    assert model_fingerprint(model) != model_fingerprint(twin)
    with torch.no_grad():
        twin.weight.copy_(model.weight)
    assert model_fingerprint(model) == model_fingerprint(twin)


# ---------------------------------------------------------------------------------------------------
# BOS policy


def test_bos_policy_ignores_the_tokenizers_own_default():
    adds, plain = tiny_tokenizer(bos_by_default=True), tiny_tokenizer(bos_by_default=False)
    assert adds("the cat").input_ids != plain("the cat").input_ids  # the defaults really differ
    for family, bos in [("llama", [1]), ("mistral", [1]), ("qwen2", []), ("qwen3", [])]:
        ids = encode(adds, "the cat sat", family=family)
        assert ids == encode(plain, "the cat sat", family=family) == [*bos, 5, 6, 7]
    assert encode(plain, "the cat", add_bos=True) == [1, 5, 6]
    assert encode(adds, "the cat", family="llama", add_bos=False) == [5, 6]


def test_bos_policy_needs_a_family_and_a_bos_token():
    tok = tiny_tokenizer(False)
    with pytest.raises(ValueError, match="family"):
        encode(tok, "the cat")
    with pytest.raises(ValueError, match="unknown family 'gpt2'"):
        encode(tok, "the cat", family="gpt2")
    tok.bos_token = None  # a Qwen-like tokenizer has none: nothing to prepend
    assert encode(tok, "the cat", family="llama") == [5, 6]


# ---------------------------------------------------------------------------------------------------
# Loading


def save_tiny(directory: Path, family: str = "llama") -> nn.Module:
    model = tiny_model(family)
    model.save_pretrained(directory)
    tiny_tokenizer(False).save_pretrained(directory)
    return model


def test_load_model_from_a_local_directory(tmp_path):
    saved = save_tiny(tmp_path / "m", "qwen3")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.family == "qwen3" and loaded.source == str(tmp_path / "m")
    assert not loaded.model.training
    assert loaded.fingerprint == model_fingerprint(loaded.model) == model_fingerprint(saved)
    assert loaded.tokenizer.bos_token_id == 1
    half = load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16 and half.fingerprint != loaded.fingerprint


def test_load_model_errors_name_what_was_found(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no such file or directory"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no such file or directory"):
        load_model("weights/model.Q4.gguf")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no config.json.*notes.txt"):
        load_model(str(tmp_path / "empty"))
    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"'bert'.*BertForMaskedLM.*llama, mistral, qwen2, qwen3"):
        load_model(str(tmp_path / "bert"))
    broken = tmp_path / "broken"
    save_tiny(broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot load"):
        load_model(str(broken))
    # a hub id, offline and not cached: a clear error, and no network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"'nobody/no-such-model'.*HF_HUB_OFFLINE"):
        load_model("nobody/no-such-model")


# ---------------------------------------------------------------------------------------------------
# The converted copy: integrity check and atomic replacement, with a fake converter (no GGUF needed)


@pytest.fixture
def fake_gguf(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def test_copy_validity_detects_truncation_and_other_sources(tmp_path, fake_gguf):
    copy = tmp_path / "copy"
    save_tiny(copy)
    models._write_manifest(copy, fake_gguf)
    assert models._copy_is_valid(copy, fake_gguf)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    assert not models._copy_is_valid(copy, other)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert not models._copy_is_valid(copy, fake_gguf)
    (copy / models._MANIFEST).unlink()
    assert not models._copy_is_valid(copy, fake_gguf)
    assert not models._copy_is_valid(tmp_path / "absent", fake_gguf)


def test_copy_validity_checks_every_byte_of_the_weights(tmp_path, fake_gguf):
    copy = tmp_path / "copy"
    save_tiny(copy)
    models._write_manifest(copy, fake_gguf)
    assert models._copy_is_valid(copy, fake_gguf)
    flip_tensor_byte(copy / "model.safetensors", "model.layers.1.mlp.down_proj.weight", -1, 0x01)
    assert not models._copy_is_valid(copy, fake_gguf)


def test_a_damaged_bundled_copy_is_reconverted_on_load(tmp_path, fake_gguf, monkeypatch):
    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "bundled_gguf_path", lambda: fake_gguf)
    conversions = []
    monkeypatch.setattr(models, "_convert_into", lambda gguf, d: conversions.append(save_tiny(d)))
    first = load_model(BUNDLED_MODEL)
    expected = model_fingerprint(conversions[0])  # the model as saved (save_pretrained adds architectures)
    assert first.fingerprint == expected and len(conversions) == 1
    assert load_model(BUNDLED_MODEL).fingerprint == expected and len(conversions) == 1  # reused
    weights = models.bundled_model_dir() / "model.safetensors"
    flip_tensor_byte(weights, "model.layers.0.self_attn.q_proj.weight", 0, 0x01)  # lowest mantissa bit
    loaded = load_model(BUNDLED_MODEL)
    assert len(conversions) == 2
    assert loaded.fingerprint == expected
    reference = tiny_model().state_dict()
    assert all(torch.equal(t, reference[n]) for n, t in loaded.model.state_dict().items())


def test_convert_gguf_replaces_a_corrupt_copy_atomically(tmp_path, fake_gguf, monkeypatch):
    monkeypatch.setattr(models, "_convert_into", lambda gguf, d: save_tiny(d))
    target = tmp_path / "models" / "tiny"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half a file")
    models.convert_gguf(fake_gguf, target)
    assert models._copy_is_valid(target, fake_gguf)
    assert os.listdir(target.parent) == ["tiny"]  # no temp or trash dirs left behind

    def crash(gguf, d):
        (d / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models, "_convert_into", crash)
    manifest = (target / models._MANIFEST).read_text()
    with pytest.raises(RuntimeError):
        models.convert_gguf(fake_gguf, target)
    assert (target / models._MANIFEST).read_text() == manifest and models._copy_is_valid(target, fake_gguf)
    assert os.listdir(target.parent) == ["tiny"]


# ---------------------------------------------------------------------------------------------------
# The real bundled model (slow: converts once, ~30 s, into cache_root(); CI runs these)


@pytest.mark.slow
def test_bundled_model_loads_generates_and_is_reused():
    first = load_model(BUNDLED_MODEL)
    directory = models.bundled_model_dir()
    manifest = (directory / models._MANIFEST).stat()
    start = time.perf_counter()
    loaded = load_model()
    seconds = time.perf_counter() - start
    assert seconds < 20, f"second load took {seconds:.1f} s: the fp32 copy is not being reused"
    assert (directory / models._MANIFEST).stat().st_mtime_ns == manifest.st_mtime_ns
    assert loaded.fingerprint == first.fingerprint
    assert json.loads((directory / "config.json").read_text())["model_type"] == "llama"
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())

    model, tok = loaded.model, loaded.tokenizer
    cfg = model.config
    assert loaded.family == "llama" and not model.training and model.dtype == torch.float32
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    refs = target_matrices(model)
    assert len(refs) == 30 * 7
    assert {r.kind: r.shape for r in refs[:7]} == {
        "q": (576, 576),
        "k": (192, 576),
        "v": (192, 576),
        "o": (576, 576),
        "gate": (1536, 576),
        "up": (1536, 576),
        "down": (576, 1536),
    }
    # SmolLM2-Instruct's GGUF: BOS is <|im_start|> (1), EOS <|im_end|> (2), <|endoftext|> (0) is unk
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == (
        "<|im_start|>",
        1,
        "<|im_end|>",
        2,
    )
    ids = encode(tok, "The capital of France is", family=loaded.family)
    assert ids[0] == 1 and ids[1:] == tok("The capital of France is").input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
        assert logits.shape == (1, len(ids), cfg.vocab_size) and torch.isfinite(logits).all()
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, len(ids) :])
