"""bench/model_table.py's resumable table: rows of another measurement setup are refused, rows are
keyed and ordered as the README shows them."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("model_table", ROOT / "bench" / "model_table.py")
model_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model_table)

CALIBRATION = {
    "model": "m",
    "tokenizer": "t",
    "text": "boolq:calibration",
    "samples": 32,
    "seq_len": 512,
    "seed": 0,
    "tokens": 16384,
}


def settings(**changes) -> argparse.Namespace:
    values = {
        "device": "cpu",
        "texts": "boolq:evaluation,lambada",
        "max_eval_tokens": 8192,
        "tasks": "piqa",
        "limit": 50,
        "probe": "perplexity",
    }
    return argparse.Namespace(**{**values, **changes})


def row(method: str, retention: float, allocation: str | None = None, steps: int = 0) -> dict:
    return {"method": method, "retention": retention, "allocation": allocation, "finetune_steps": steps}


def test_a_table_resumes_only_under_the_same_settings(tmp_path):
    path = tmp_path / "table.json"
    rows = [row("dense", 1.0), row("svdllm", 0.75, "greedy")]
    args = {k: str(v) for k, v in vars(settings()).items()}
    path.write_text(json.dumps({"args": args, "calibration": CALIBRATION, "rows": rows}))
    assert model_table.resumed_table(path, settings(), CALIBRATION)["rows"] == rows
    with pytest.raises(SystemExit, match="limit: 50 there, 20 here"):
        model_table.resumed_table(path, settings(limit=20), CALIBRATION)
    with pytest.raises(SystemExit, match="calibration seq_len: 512 there, 2048 here"):
        model_table.resumed_table(path, settings(), {**CALIBRATION, "seq_len": 2048})


def test_rows_are_keyed_by_what_they_measured_and_shown_in_table_order():
    rows = [
        row("sigmascale", 0.5, "greedy", 50),
        row("svdllm", 0.75, "greedy"),
        row("sigmascale", 0.9, "uniform"),
        row("svd", 0.75, "greedy"),
        row("svdllm", 0.75, "uniform"),
        row("dense", 1.0),
        row("sigmascale", 0.5, "greedy"),
    ]
    assert model_table.row_key(rows[0]) == ("sigmascale", 0.5, "greedy", 50)
    assert len({model_table.row_key(r) for r in rows}) == len(rows)
    ordered = [model_table.row_key(r) for r in sorted(rows, key=model_table.table_order)]
    assert ordered == [
        ("dense", 1.0, None, 0),
        ("sigmascale", 0.9, "uniform", 0),
        ("svd", 0.75, "greedy", 0),
        ("svdllm", 0.75, "uniform", 0),
        ("svdllm", 0.75, "greedy", 0),
        ("sigmascale", 0.5, "greedy", 0),
        ("sigmascale", 0.5, "greedy", 50),
    ]
