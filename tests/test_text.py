"""Text specs, the BoolQ split, token streams, calibration windows and the overlap guard."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from corrupt import flip_tensor_byte
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from sigmascale_core import text
from sigmascale_core.artifacts import read_tensors
from sigmascale_core.text import (
    calibration_batch,
    check_disjoint,
    documents,
    evaluation_tokens,
    normalize_text,
    text_key,
    token_stream,
    window_starts,
)

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
BOS, EOS = 1, 2
USER_CACHE = os.environ.get("SIGMASCALE_CACHE")  # before the autouse fixture below redirects it


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    """Fast tests write their token caches into a temp dir, never the repository's cache/."""
    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word of WORDS (others are <unk>), with BOS/EOS defined."""
    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def write_docs(path, docs: list[str]) -> str:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return f"file:{path}"


# ---------------------------------------------------------------------------------------------------
# Documents and the BoolQ split


def test_normalised_identity_ignores_case_width_and_whitespace():
    assert normalize_text("  The\tCat\n\nsat ") == "the cat sat"
    assert text_key("The Cat sat") == text_key("the  cat\nSAT") != text_key("the cat sat.")
    assert text_key("ＡＢＣ") == text_key("abc")  # NFKC folds full-width forms
    # stable across runs and Python versions: a fixed digest, not hash()
    assert text_key("SigmaScale") == "5caabab693768130add89588001d4d2d"


def test_boolq_halves_are_disjoint_complete_and_deterministic():
    calibration, evaluation = documents("boolq:calibration"), documents("boolq:evaluation")
    keys_c, keys_e = {text_key(d) for d in calibration}, {text_key(d) for d in evaluation}
    assert len(keys_c) == len(calibration) and len(keys_e) == len(evaluation)  # de-duplicated
    assert not keys_c & keys_e
    assert len(calibration) + len(evaluation) == 2938  # unique passages of BoolQ validation (3,270 rows)
    assert 0.45 < len(calibration) / 2938 < 0.55
    text._boolq_passages.cache_clear()  # re-read from disk: same split
    assert documents("boolq:calibration") == calibration
    # membership is a property of each passage alone, so it can never drift with the corpus
    assert text._half("The quick brown fox.") == "calibration"
    assert text._half("SigmaScale") == "evaluation"


def test_lambada_passages():
    docs = documents("lambada")
    assert len(docs) == 5151  # 5,153 requests, two passages repeated
    assert docs[0].startswith("In my palm is a clear stone") and docs[0].endswith("I don't care about signs")


def test_file_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("first doc\r\nstill first\r\n\r\nsecond\n \n\n\nthird ünïcode\n".encode())
    assert documents(f"file:{path}") == ["first doc\nstill first", "second", "third ünïcode"]
    with pytest.raises(ValueError, match="no such file"):
        documents(f"file:{tmp_path / 'absent.txt'}")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        documents(f"file:{tmp_path / 'latin1.txt'}")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no text"):
        documents(f"file:{tmp_path / 'blank.txt'}")


def test_unknown_and_malformed_specs_are_explained():
    with pytest.raises(ValueError, match=r"unknown text spec 'boolq'.*boolq:calibration.*file:PATH"):
        documents("boolq")
    with pytest.raises(ValueError, match="hf:NAME:CONFIG:SPLIT"):
        documents("hf:wikitext")


def test_hf_spec_without_datasets_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ValueError, match=r"needs the `datasets` library"):
        documents("hf:wikitext:wikitext-2-raw-v1:test")


# ---------------------------------------------------------------------------------------------------
# Overlap guard


def test_check_disjoint(tmp_path):
    check_disjoint("boolq:calibration", "boolq:evaluation", probing="lambada")
    check_disjoint(calibration="boolq:calibration", evaluation=None)
    with pytest.raises(
        ValueError, match=r"appear in both calibration \(lambada\) and evaluation \(lambada\)"
    ):
        check_disjoint("lambada", "lambada")
    # a user's file that contains one evaluation passage (re-wrapped, different case) among others
    passage = documents("boolq:evaluation")[7]
    spec = write_docs(
        tmp_path / "mine.txt", ["alpha beta", "  " + passage.upper().replace(". ", ".\n"), "gamma"]
    )
    with pytest.raises(ValueError, match=r"1 document\(s\) appear in both calibration .*mine.txt"):
        check_disjoint(spec, "boolq:evaluation")
    check_disjoint(spec, "lambada")
    with pytest.raises(ValueError, match=r"probing .* and holdout"):
        check_disjoint(probing=spec, holdout="boolq:evaluation")


# ---------------------------------------------------------------------------------------------------
# Token streams and windows


def test_stream_layout_bos_per_document_eos_between(tmp_path):
    spec = write_docs(tmp_path / "t.txt", ["alpha beta", "gamma", "delta epsilon zeta"])
    tok = word_tokenizer()
    assert token_stream(tok, "llama", spec).tolist() == [1, 3, 4, 2, 1, 5, 2, 1, 6, 7, 8]
    assert token_stream(tok, "qwen3", spec).tolist() == [3, 4, 2, 5, 2, 6, 7, 8]
    assert evaluation_tokens(tok, "mistral", spec).tolist() == [1, 3, 4, 2, 1, 5, 2, 1, 6, 7, 8]
    assert evaluation_tokens(tok, "llama", spec).dtype == torch.long
    with pytest.raises(ValueError, match="unknown family"):
        token_stream(tok, "gpt2", spec)


def test_stream_cache_is_used_and_survives_corruption(tmp_path, tmp_cache, monkeypatch):
    spec = write_docs(tmp_path / "t.txt", ["alpha beta gamma"] * 3)
    tok = word_tokenizer()
    fresh = token_stream(tok, "llama", spec)
    (cached,) = (tmp_cache / "tokens").iterdir()

    def refuse(*args, **kwargs):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(text, "encode_documents", refuse)
    assert torch.equal(token_stream(tok, "llama", spec), fresh)
    monkeypatch.undo()
    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_cache))
    cached.write_bytes(b"garbage")
    assert torch.equal(token_stream(tok, "llama", spec), fresh)
    # a changed file is a different text: new cache entry, new tokens
    write_docs(tmp_path / "t.txt", ["alpha beta"])
    assert token_stream(tok, "llama", spec).tolist() == [1, 3, 4]


@pytest.mark.parametrize(
    ("index", "mask"),
    [(0, 0x01), (-1, 0x40)],  # id 1 -> 0 (a wrong token, plausible); a high bit (an id past the vocab)
)
def test_a_corrupt_token_cache_is_rebuilt_not_trusted(tmp_path, tmp_cache, index, mask):
    spec = write_docs(tmp_path / "t.txt", ["alpha beta gamma", "delta"])
    tok = word_tokenizer()
    fresh = token_stream(tok, "llama", spec)
    (cached,) = (tmp_cache / "tokens").iterdir()
    flip_tensor_byte(cached, "ids", index, mask)
    assert torch.equal(token_stream(tok, "llama", spec), fresh)
    tensors, _ = read_tensors(cached)  # rewritten, and whole again
    assert tensors["ids"].tolist() == fresh.tolist() == [1, 3, 4, 5, 2, 1, 6]


def test_calibration_batch_shape_determinism_and_provenance(tmp_path):
    docs = [" ".join(WORDS[(i + j) % 8] for j in range(5 + i % 7)) for i in range(60)]
    spec = write_docs(tmp_path / "cal.txt", docs)
    tok = word_tokenizer()
    stream = evaluation_tokens(tok, "llama", spec)
    batch = calibration_batch(tok, "llama", spec, n_samples=8, seq_len=16, seed=3)
    assert batch.shape == (8, 16) and batch.dtype == torch.long
    assert torch.equal(batch, calibration_batch(tok, "llama", spec, 8, 16, seed=3))
    assert not torch.equal(batch, calibration_batch(tok, "llama", spec, 8, 16, seed=4))
    windows = stream.unfold(0, 16, 1)  # every window of the stream
    for row in batch:
        assert (windows == row).all(dim=1).any()


def test_too_short_text_says_how_many_tokens_were_found_and_needed(tmp_path):
    spec = write_docs(tmp_path / "short.txt", ["alpha beta gamma", "delta"])  # 1+3 +1+ 1+1 = 7 tokens
    with pytest.raises(ValueError, match=r"short.txt'.*has 7 tokens; 2 windows of 4 tokens need 8"):
        calibration_batch(word_tokenizer(), "llama", spec, n_samples=2, seq_len=4, seed=0)
    assert calibration_batch(word_tokenizer(), "llama", spec, n_samples=1, seq_len=7, seed=0).shape == (1, 7)


@settings(max_examples=200, deadline=None, database=None)  # no .hypothesis/ dir in the checkout
@given(
    n_samples=st.integers(1, 40),
    seq_len=st.integers(1, 50),
    slack=st.integers(0, 500),
    seed=st.integers(0, 2**31),
)
def test_window_starts_never_overlap_and_stay_inside(n_samples, seq_len, slack, seed):
    n_tokens = n_samples * seq_len + slack
    starts = window_starts(n_tokens, n_samples, seq_len, seed)
    assert starts.shape == (n_samples,)
    ordered = starts.sort().values
    assert ordered[0] >= 0 and ordered[-1] + seq_len <= n_tokens
    assert (ordered.diff() >= seq_len).all()
    assert torch.equal(starts, window_starts(n_tokens, n_samples, seq_len, seed))


def test_window_starts_spread_over_the_text():
    starts = window_starts(100_000, 50, 100, seed=0)
    assert starts.min() < 10_000 and starts.max() > 90_000  # not bunched at one end
    with pytest.raises(ValueError, match="positive"):
        window_starts(100, 0, 10, seed=0)


# ---------------------------------------------------------------------------------------------------
# The real texts with the bundled model's tokenizer (slow: needs the converted bundled model)


@pytest.mark.slow
def test_real_token_counts_with_the_bundled_tokenizer(monkeypatch):
    # the user's cache, not the temp one: reuse the converted model and token caches
    if USER_CACHE is None:
        monkeypatch.delenv("SIGMASCALE_CACHE")
    else:
        monkeypatch.setenv("SIGMASCALE_CACHE", USER_CACHE)
    from sigmascale_core.models import bundled_model_dir

    tok = PreTrainedTokenizerFast.from_pretrained(bundled_model_dir())
    counts = {spec: evaluation_tokens(tok, "llama", spec).numel() for spec in text.SPEC_FORMATS[:3]}
    expected = {"boolq:calibration": 195_110, "boolq:evaluation": 187_631, "lambada": 412_532}
    for spec, n in expected.items():
        assert abs(counts[spec] - n) < 0.01 * n, counts
    stream = evaluation_tokens(tok, "llama", "boolq:calibration")
    assert stream[0] == tok.bos_token_id and (stream == tok.eos_token_id).sum() == 1482 - 1
    batch = calibration_batch(tok, "llama", "boolq:calibration", n_samples=64, seq_len=2048, seed=0)
    assert batch.shape == (64, 2048)
    with pytest.raises(ValueError, match=r"has \d+ tokens; 128 windows of 2048 tokens need 262144"):
        calibration_batch(tok, "llama", "boolq:calibration", n_samples=128, seq_len=2048, seed=0)
