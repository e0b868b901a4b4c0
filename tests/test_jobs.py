"""jobs.py: background runs as detached CLI processes, their status files, cancel, crash, history."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from tiny import save_tiny_model, write_text

from sigmascale_core import jobs
from sigmascale_core.models import model_fingerprint
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.surgery import is_compressed_dir, target_shapes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with the bundled tokenizer, two disjoint texts, and a plan for it."""
    root = tmp_path_factory.mktemp("jobs")
    model = save_tiny_model(root / "tiny")
    plan = CompressionPlan.uniform(target_shapes(model), 0.5, "svd", model_fingerprint(model))
    return {
        "model": str(root / "tiny"),
        "cal": write_text(root / "cal.txt", 1),
        "eval": write_text(root / "eval.txt", 2),
        "plan": plan,
    }


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGMASCALE_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


def spec(tiny, **kw):
    base = dict(
        kind="compress",
        model=tiny["model"],
        text=tiny["cal"],
        samples=2,
        seq_len=32,
        evaluation=(tiny["eval"],),
        max_eval_tokens=256,
    )
    return jobs.RunSpec(**{**base, **kw})


def wait(run_dir: Path, timeout: float = 180.0) -> jobs.RunRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = jobs.read_run(run_dir)
        if record.status in jobs.FINAL:
            return record
        time.sleep(0.3)
    raise AssertionError(f"run {run_dir.name} still {record.status} after {timeout} s:\n{record.log()}")


def test_steps_are_the_cli_commands(tmp_path):
    s = jobs.RunSpec(
        kind="compress", model="m", evaluation=("boolq:evaluation",), tasks=("piqa",), task_limit=5
    )
    steps = jobs.build_steps(s, tmp_path)
    assert [step.name for step in steps] == ["compress", "zero_shot"]
    compress = steps[0].argv
    assert compress[:4] == [sys.executable, "-m", "sigmascale_core.cli", "compress"]
    assert compress[compress.index("--plan") + 1] == str(tmp_path / "plan.json")
    assert compress[compress.index("--out") + 1] == str(tmp_path / "model")
    assert compress[compress.index("--eval") + 1] == "boolq:evaluation"
    assert compress[compress.index("--max-eval-tokens") + 1] == "8192"
    zero = steps[1].argv
    assert zero[zero.index("--model") + 1] == str(tmp_path / "model")
    assert zero[zero.index("--tasks") + 1] == "piqa" and zero[zero.index("--limit") + 1] == "5"
    dense = jobs.build_steps(jobs.RunSpec(kind="dense", model="m", tasks=("piqa",)), tmp_path)
    argv = dense[0].argv
    assert argv[3] == "eval" and argv[argv.index("--tasks") + 1] == "ppl,piqa"
    assert "--finetune-steps" not in compress
    tuned = jobs.build_steps(jobs.RunSpec(kind="compress", model="m", finetune_steps=7), tmp_path)[0].argv
    assert tuned[tuned.index("--finetune-steps") + 1] == "7"
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="finetune_steps"):
            jobs.RunSpec(kind="compress", model="m", finetune_steps=bad)
    with pytest.raises(ValueError, match="samples"):
        jobs.RunSpec(kind="compress", model="m", samples=0)
    with pytest.raises(ValueError, match="needs a plan"):
        jobs.start_run(jobs.RunSpec(kind="compress", model="m"), None, tmp_path)


def test_run_ids_are_unique_even_when_the_clock_collides(runs, monkeypatch):
    ids = iter(["20250101-000000-aaaaaa", "20250101-000000-aaaaaa", "20250101-000000-bbbbbb"])
    monkeypatch.setattr(jobs, "new_run_id", lambda: next(ids))

    class Fake:
        pid = 999_999_999

        def wait(self):
            return 0

    monkeypatch.setattr(jobs.subprocess, "Popen", lambda *a, **k: Fake())
    s = jobs.RunSpec(kind="dense", model="m")
    first, second = jobs.start_run(s), jobs.start_run(s)
    assert (first.name, second.name) == ("20250101-000000-aaaaaa", "20250101-000000-bbbbbb")
    # the fake runner never ran: its pid is not alive, so the run reads as failed, with a reason
    record = jobs.read_run(first)
    assert record.status == "failed" and "without recording a result" in record.meta["error"]


def test_a_run_compresses_evaluates_and_records_everything(tiny, runs):
    run_dir = jobs.start_run(spec(tiny, label="svd half"), tiny["plan"])
    assert run_dir.parent == runs.resolve()
    record = wait(run_dir)
    assert record.status == "done", record.meta.get("error")
    assert CompressionPlan.load(run_dir / "plan.json") == tiny["plan"]
    assert is_compressed_dir(run_dir / "model")
    report = record.report
    assert report["parameter_retention"] == pytest.approx(tiny["plan"].parameter_retention())
    assert report["perplexity"][tiny["eval"]]["tokens"] == 255
    assert report["timing"]["compress"] > 0
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["label"] == "svd half" and meta["started"] <= meta["finished"]
    assert [s["status"] for s in meta["steps"]] == ["done"]
    assert not list(run_dir.glob(".*tmp*"))
    assert [r.id for r in jobs.list_runs()] == [run_dir.name]
    assert record.seconds > 0 and record.model_dir == run_dir / "model"
    last = record.progress()  # the CLI's --progress-json events: the last is the evaluation's end
    assert last.stage == "perplexity" and last.done == last.total > 0


def test_a_failing_run_keeps_a_readable_error_and_nothing_half_written(tiny, runs):
    shapes = {name: m.shape for name, m in tiny["plan"].matrices.items()}
    foreign = CompressionPlan.uniform(shapes, 0.5, "svd", "not-this-model")
    record = wait(jobs.start_run(spec(tiny), foreign))
    assert record.status == "failed"
    assert "exited with status 2" in record.meta["error"]
    assert "the plan was made for model not-this-model" in record.meta["error"]
    assert not (record.path / "model").exists() and not list(record.path.glob(".model*"))
    assert record.report is None


def step_processes(run_dir: Path) -> list[int]:
    """Pids of live CLI steps of a run (found by the run folder in their command line)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "sigmascale_core.cli" in cmdline and str(run_dir) in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_cancel_stops_the_run_and_keeps_no_model(tiny, runs):
    run_dir = jobs.start_run(spec(tiny), tiny["plan"])
    wait_for(lambda: step_processes(run_dir), 60, "the compress step to start")
    jobs.cancel_run(run_dir)
    record = wait(run_dir, timeout=60)
    assert record.status == "cancelled"
    assert not step_processes(run_dir)  # recorded only once the step is gone
    time.sleep(2.0)  # nothing saves a model afterwards
    assert not (run_dir / "model").exists() and not list(run_dir.glob(".model*"))


def test_a_killed_runner_takes_its_step_with_it(tiny, runs):
    run_dir = jobs.start_run(spec(tiny), tiny["plan"])
    wait_for(lambda: step_processes(run_dir), 60, "the compress step to start")
    pid = json.loads((run_dir / "pid.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)  # the runner only, not its group: the step must die with it
    wait_for(lambda: not step_processes(run_dir), 10, "the orphaned step to die")
    record = wait(run_dir, timeout=30)
    assert record.status == "failed"
    assert "ended without recording a result" in record.meta["error"]
    time.sleep(2.0)
    assert not (run_dir / "model").exists() and not list(run_dir.glob(".model*"))
    # the verdict is written once, atomically: reading again gives the same record
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "failed"


def test_runs_beyond_the_limit_wait_queued(tiny, runs, monkeypatch):
    monkeypatch.setenv(jobs.MAX_RUNS_ENV, "1")
    first = jobs.start_run(spec(tiny), tiny["plan"])
    second = jobs.start_run(spec(tiny), tiny["plan"])
    records = [wait(first), wait(second)]
    assert [r.status for r in records] == ["done", "done"]
    a, b = sorted((r.meta for r in records), key=lambda m: m["started"])
    assert a["finished"] <= b["started"]  # one at a time: the second ran after the first ended
    monkeypatch.setenv(jobs.MAX_RUNS_ENV, "0")
    with pytest.raises(ValueError, match=jobs.MAX_RUNS_ENV):
        jobs.max_runs()


def test_a_bad_device_is_a_one_line_error(tiny, runs):
    record = wait(jobs.start_run(spec(tiny, device="foo"), tiny["plan"]))
    assert record.status == "failed"
    error = record.meta["error"]
    assert "\n" not in error and "--device 'foo'" in error and "exited with status 2" in error
    assert "Traceback" not in record.log()


def test_progress_is_the_last_event_of_progress_jsonl(tmp_path):
    from sigmascale_core.progress import ProgressEvent

    record = jobs.RunRecord(tmp_path, {"status": "running"})
    assert record.progress() is None
    events = [ProgressEvent("calibration", 1, 2, 0.5), ProgressEvent("compress", 3, 14, 26.0, "q_proj")]
    (tmp_path / jobs.PROGRESS_FILE).write_text("".join(e.to_json() + "\n" for e in events) + '{"stage": "co')
    assert record.progress() == events[-1]  # a line being written is skipped
    assert jobs.tail_lines("a\rb\n\nc\rd\n", 5) == "b\nd"


def test_the_dense_baseline_is_the_newest_finished_dense_run_evaluated_alike(tmp_path):
    def record(name, kind, report=True, **spec):
        base = {"model": "m", "max_eval_tokens": 8192, "task_limit": 100}
        return jobs.RunRecord(tmp_path / name, {"kind": kind}, {**base, **spec}, {} if report else None)

    compressed = record("c", "compress")
    newest_other_budget = record("d3", "dense", max_eval_tokens=256)
    unfinished = record("d2", "dense", report=False)
    alike = record("d1", "dense")
    older = record("d0", "dense")
    records = [newest_other_budget, unfinished, alike, older]  # newest first, as list_runs gives them
    assert jobs.dense_baseline(compressed, records) is alike
    assert jobs.dense_baseline(alike, records) is None  # a dense run has no baseline
    assert jobs.dense_baseline(record("c2", "compress", model="other"), records) is None
