"""Background runs and their history: a run is a folder under runs/ and a detached process.

Starting a run writes runs/<id>/plan.json, spec.json and meta.json, then spawns a runner
(`python -m sigmascale_core.jobs runs/<id>`) in its own session, so it outlives the app's reruns, page
switches and closed tabs. The runner waits for one of SIGMASCALE_MAX_RUNS slots (default 1; the run
stays "queued" meanwhile), then executes the run's steps, each a `sigmascale` CLI command whose stdout
goes to a file in the folder, whose stderr (bars, errors) is appended to log.txt and whose progress
events go to progress.jsonl (--progress-json); it is the only writer of meta.json while it lives.
Every file is written atomically, and the CLI writes the compressed model atomically, so a crash or a
cancel leaves nothing half-written.

    runs/<id>/
      spec.json        what was asked (RunSpec)
      plan.json        the CompressionPlan (compress runs)
      meta.json        status queued|running|done|failed|cancelled, timestamps, steps, error
      log.txt          the steps' stderr, in order
      progress.jsonl   the steps' ProgressEvents, one JSON line each
      <step>.json      each step's JSON report
      report.json      the merged report (when done)
      model/           the compressed model (compress runs that are done)

Cancel = a `cancel` marker plus SIGINT to the runner's process group: the CLI exits cleanly (130), the
runner waits for the step to exit (killing it after CANCEL_GRACE_S), removes any model and records
`cancelled`. A step dies with its runner (PR_SET_PDEATHSIG on Linux), and a runner that vanished
without a final status (killed, machine restarted) has its process group killed and is recorded as
failed when next read; a run that is not done never shows a model.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sigmascale_core.artifacts import write_json_atomic
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.progress import ProgressEvent

RUNS_ENV = "SIGMASCALE_RUNS"  # where runs live; default ./runs
MAX_RUNS_ENV = "SIGMASCALE_MAX_RUNS"  # how many runs may compute at once; default 1, the rest wait queued
PROGRESS_FILE = "progress.jsonl"  # the steps' ProgressEvents, one JSON line each (the CLI's --progress-json)
ACTIVE = ("queued", "running")
FINAL = ("done", "failed", "cancelled")
KINDS = ("compress", "dense", "probe")  # compress a plan / evaluate the dense model / sensitivity probe
PROBE_TABLE = "probe.json"  # a probe run's sensitivity table, in its folder
CANCEL_GRACE_S = 15.0  # after a cancel, how long a step may take to exit before it is killed
ERROR_LINES = 20  # lines of stderr kept in a failed run's error


def runs_root() -> Path:
    return Path(os.environ.get(RUNS_ENV, "runs")).resolve()


@dataclass(frozen=True)
class RunSpec:
    """What a run does; the steps (CLI commands) are derived from it by `build_steps`."""

    kind: str  # "compress" (the plan), "dense" (the uncompressed model: the baseline) or "probe" (sensitivity)
    model: str  # model source, as the CLI's --model
    device: str = "cpu"  # torch device
    dtype: str = "float32"  # weights dtype while working
    text: str = "boolq:calibration"  # calibration text spec
    samples: int = 32  # calibration sequences
    seq_len: int | None = None  # tokens per calibration sequence (None: the CLI's default)
    seed: int = 0  # calibration windows' seed
    evaluation: tuple[str, ...] = ("boolq:evaluation",)  # perplexity texts
    max_eval_tokens: int | None = 8192  # perplexity: score the first N tokens of each text
    tasks: tuple[str, ...] = ()  # zero-shot tasks (piqa, hellaswag, ...)
    task_limit: int | None = 100  # zero-shot: the first N items of each task
    finetune_steps: int = 0  # distillation steps on the factors after compressing (0: none)
    label: str = ""  # free text shown in the history

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown run kind {self.kind!r}; choose one of {KINDS}")
        if (
            isinstance(self.finetune_steps, bool)
            or not isinstance(self.finetune_steps, int)
            or self.finetune_steps < 0
        ):
            raise ValueError(f"finetune_steps must be a non-negative int, got {self.finetune_steps!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be a positive int, got {self.samples!r}")
        for name in ("seq_len", "max_eval_tokens", "task_limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if self.kind == "dense" and not (self.evaluation or self.tasks):
            raise ValueError("a dense baseline run needs evaluation texts or zero-shot tasks")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunSpec:
        data = dict(data)
        for name in ("evaluation", "tasks"):
            data[name] = tuple(data.get(name) or ())
        return cls(**data)


@dataclass(frozen=True)
class Step:
    name: str  # compress, zero_shot, evaluate
    argv: list[str]  # the command
    report: str  # file (in the run folder) that holds its JSON report


def _cli() -> list[str]:
    return [sys.executable, "-m", "sigmascale_core.cli"]


def build_steps(spec: RunSpec, run_dir: Path) -> list[Step]:
    """The CLI commands of a run, in order. Fine-tuning happens inside the compress command (it needs the
    dense teacher in memory), before that command's perplexity; zero-shot reads the saved, final model."""
    model_args = ["--model", spec.model, "--device", spec.device, "--dtype", spec.dtype]
    model_args += ["--progress-json", str(run_dir / PROGRESS_FILE)]
    max_tokens = [] if spec.max_eval_tokens is None else ["--max-eval-tokens", str(spec.max_eval_tokens)]
    limit = [] if spec.task_limit is None else ["--limit", str(spec.task_limit)]
    calibration = ["--text", spec.text, "--samples", str(spec.samples), "--seed", str(spec.seed)]
    if spec.seq_len is not None:
        calibration += ["--seq-len", str(spec.seq_len)]
    if spec.kind == "probe":  # perplexity with one matrix truncated at a time; checked against `evaluation`
        argv = [*_cli(), "probe", *model_args, *calibration, "--eval", ",".join(spec.evaluation)]
        argv += ["--out", str(run_dir / PROBE_TABLE), "--report", str(run_dir / "probe_report.json")]
        return [Step("probe", argv, "probe_report.json")]
    if spec.kind == "dense":
        tasks = (["ppl"] if spec.evaluation else []) + list(spec.tasks)
        argv = [*_cli(), "eval", *model_args, "--tasks", ",".join(tasks)]
        if spec.evaluation:
            argv += ["--text", ",".join(spec.evaluation), *max_tokens]
        argv += [*limit, "--report", str(run_dir / "evaluate.json")]
        return [Step("evaluate", argv, "evaluate.json")]
    argv = [*_cli(), "compress", *model_args, *calibration, "--plan", str(run_dir / "plan.json")]
    argv += ["--out", str(run_dir / "model")]
    if spec.finetune_steps:
        argv += ["--finetune-steps", str(spec.finetune_steps)]
    if spec.evaluation:
        argv += ["--eval", ",".join(spec.evaluation), *max_tokens]
    steps = [Step("compress", argv, "compress.json")]
    if spec.tasks:
        zero_shot = [*_cli(), "eval", "--model", str(run_dir / "model"), "--device", spec.device]
        zero_shot += ["--progress-json", str(run_dir / PROGRESS_FILE)]
        zero_shot += ["--tasks", ",".join(spec.tasks), *limit, "--report", str(run_dir / "zero_shot.json")]
        steps.append(Step("zero_shot", zero_shot, "zero_shot.json"))
    return steps


# ---------------------------------------------------------------------------------------------------
# Starting, cancelling, reading


def new_run_id() -> str:
    """Time-ordered and unique across tabs and processes: UTC timestamp + 6 random hex digits."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def _now() -> float:
    return round(time.time(), 3)


def start_run(spec: RunSpec, plan: CompressionPlan | None = None, root: Path | None = None) -> Path:
    """Create the run folder and spawn its detached runner; returns the folder."""
    if spec.kind == "compress" and plan is None:
        raise ValueError("a compress run needs a plan")
    root = (root or runs_root()).resolve()
    root.mkdir(parents=True, exist_ok=True)
    while True:  # mkdir is the uniqueness check: two tabs can never share a folder
        run_dir = root / new_run_id()
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            continue
    steps = build_steps(spec, run_dir)
    write_json_atomic(spec.to_dict(), run_dir / "spec.json")
    if plan is not None:
        plan.save(run_dir / "plan.json")
    meta = {
        "id": run_dir.name,
        "kind": spec.kind,
        "label": spec.label,
        "status": "queued",
        "created": _now(),
        "started": None,
        "finished": None,
        "pid": None,
        "steps": [{"name": s.name, "argv": s.argv, "report": s.report, "status": "pending"} for s in steps],
        "error": None,
    }
    write_json_atomic(meta, run_dir / "meta.json")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        with open(run_dir / "runner.log", "ab") as runner_log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sigmascale_core.jobs", str(run_dir)],
                stdin=subprocess.DEVNULL,
                stdout=runner_log,
                stderr=runner_log,
                start_new_session=True,  # own process group: survives the app, cancellable as a group
                env=env,
                cwd=os.getcwd(),
            )
    except OSError as err:
        write_json_atomic(
            {**meta, "status": "failed", "finished": _now(), "error": str(err)}, run_dir / "meta.json"
        )
        return run_dir
    write_json_atomic({"pid": proc.pid}, run_dir / "pid.json")
    # reap it when it ends, so it never lingers as a zombie of the app's process
    threading.Thread(target=proc.wait, daemon=True, name=f"reap-{run_dir.name}").start()
    return run_dir


def _pid(run_dir: Path) -> int | None:
    for name in ("pid.json", "meta.json"):
        with contextlib.suppress(Exception):
            pid = json.loads((run_dir / name).read_text()).get("pid")
            if isinstance(pid, int):
                return pid
    return None


def _alive(pid: int | None, run_dir: Path) -> bool:
    """Whether `pid` is this run's runner and still running (not a zombie, not a reused pid)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
        return state != "Z" and run_dir.name in cmdline
    return True


def cancel_run(run_dir: Path) -> None:
    """Ask a run to stop: a marker file, then SIGINT to its process group (the CLI exits cleanly)."""
    run_dir = Path(run_dir)
    marker = run_dir / "cancel"
    if not marker.exists():
        marker.write_text(f"{_now()}\n")
    pid = _pid(run_dir)
    if _alive(pid, run_dir):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGINT)


def tail_lines(text: str, lines: int) -> str:
    """The last `lines` non-empty lines, each cut to what follows its last carriage return (tqdm)."""
    out = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]  # not splitlines: it splits at \r
    return "\n".join([line for line in out if line.strip()][-lines:])


def read_text(path: Path, limit: int = 200_000) -> str:
    """The last `limit` bytes of a text file ('' when missing)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


@dataclass
class RunRecord:
    """What the app shows about one run."""

    path: Path
    meta: dict
    spec: dict = field(default_factory=dict)
    report: dict | None = None

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        return self.meta.get("status", "unknown")

    @property
    def seconds(self) -> float | None:
        start, end = (
            self.meta.get("started"),
            self.meta.get("finished") or (time.time() if self.status in ACTIVE else None),
        )
        return None if start is None or end is None else end - start

    @property
    def model_dir(self) -> Path | None:
        model = self.path / "model"
        return model if model.is_dir() else None

    def log(self, limit: int = 200_000) -> str:
        return read_text(self.path / "log.txt", limit)

    def progress(self) -> ProgressEvent | None:
        """The last progress event of the run's steps (None before the first, or if unreadable)."""
        lines = read_text(self.path / PROGRESS_FILE, 4_000).splitlines()
        for line in reversed(lines):  # the first may be cut: from_json refuses it
            with contextlib.suppress(ValueError):
                return ProgressEvent.from_json(line)
        return None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_run(run_dir: Path) -> RunRecord:
    """A run's record. A run whose runner died without a final status is recorded as failed (or
    cancelled, when a cancel was asked); a runner deaf to a cancel past CANCEL_GRACE_S is killed."""
    run_dir = Path(run_dir)
    meta = _read_json(run_dir / "meta.json")
    if meta is None:
        meta = {"id": run_dir.name, "status": "failed", "error": "meta.json is missing or unreadable"}
    if meta.get("status") in ACTIVE:
        pid = _pid(run_dir)
        marker = run_dir / "cancel"
        alive = _alive(pid, run_dir)
        if alive and marker.exists() and time.time() - marker.stat().st_mtime > CANCEL_GRACE_S:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            time.sleep(0.2)
            alive = _alive(pid, run_dir)
        if not alive and pid is not None:
            meta = _read_json(run_dir / "meta.json") or meta  # it may have finished just now
            if meta.get("status") in ACTIVE:
                cancelled = marker.exists()
                error = (
                    None
                    if cancelled
                    else (
                        "the run's process ended without recording a result (killed, or the machine "
                        "restarted)\n" + tail_lines(read_text(run_dir / "log.txt", 20_000), ERROR_LINES)
                    ).strip()
                )
                meta = {
                    **meta,
                    "status": "cancelled" if cancelled else "failed",
                    "finished": _now(),
                    "error": error,
                }
                _kill_group(pid)  # a step the dead runner left behind must not save a model later
                _cleanup(run_dir, model=True)
                write_json_atomic(meta, run_dir / "meta.json")
    spec = _read_json(run_dir / "spec.json") or {}
    report = _read_json(run_dir / "report.json") if meta.get("status") == "done" else None
    return RunRecord(run_dir, meta, spec, report)


def list_runs(root: Path | None = None) -> list[RunRecord]:
    """Every run under `root`, newest first."""
    root = (root or runs_root()).resolve()
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and (p / "meta.json").exists()]
    return [read_run(p) for p in sorted(dirs, key=lambda p: p.name, reverse=True)]


def _cleanup(run_dir: Path, model: bool = False) -> None:
    """Remove what an interrupted step may have left: the CLI's temp model folders, and with `model`
    the model itself (a run that did not finish shows none, even if its step saved one at the end)."""
    for leftover in run_dir.glob(".model.*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if model:
        shutil.rmtree(run_dir / "model", ignore_errors=True)


def _kill_group(pid: int | None) -> None:
    """SIGKILL the process group a runner led (its steps stay in it), if any member is left."""
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """preexec_fn of a step: the kernel SIGKILLs it when the runner dies (Linux prctl PR_SET_PDEATHSIG),
    so a killed runner never leaves a step that saves a model into a run recorded as failed."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the runner died before prctl took effect
        os._exit(1)


def max_runs() -> int:
    """How many runs may compute at once (SIGMASCALE_MAX_RUNS, default 1)."""
    text = os.environ.get(MAX_RUNS_ENV, "1")
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{MAX_RUNS_ENV}={text!r}: expected a positive integer") from None
    if value < 1:
        raise ValueError(f"{MAX_RUNS_ENV}={value}: expected a positive integer")
    return value


def _wait_for_slot(run_dir: Path, cancelled: threading.Event) -> object | None:
    """Block until one of max_runs() slots under the runs root is free; returns its open lock file (held
    until this process exits: the kernel releases it even on SIGKILL), or None if cancelled meanwhile."""
    slots = run_dir.parent / ".slots"
    slots.mkdir(exist_ok=True)
    while True:
        for i in range(max_runs()):
            handle = open(slots / f"{i}.lock", "a")  # noqa: SIM115 (held for the runner's life)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle
            except BlockingIOError:
                handle.close()
        if cancelled.is_set() or (run_dir / "cancel").exists():
            return None
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------------
# The runner (the detached process)


class _Cancelled(Exception):
    pass


def _run_step(step: Step, run_dir: Path, cancelled: threading.Event) -> int:
    """Run one CLI step to completion (or cancellation); returns its exit status."""
    with open(run_dir / "log.txt", "ab") as log, open(run_dir / f"{step.name}.stdout", "wb") as out:
        log.write(f"\n== {step.name}: {' '.join(step.argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            step.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=log, preexec_fn=_die_with_parent
        )
        asked = None
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            if cancelled.is_set() or (run_dir / "cancel").exists():
                cancelled.set()
                if asked is None:  # SIGINT: the CLI removes its temp files and exits (130)
                    asked = time.monotonic()
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGINT)
                elif time.monotonic() - asked > CANCEL_GRACE_S:
                    proc.kill()


def _merge_reports(run_dir: Path, steps: list[dict], timing: dict[str, float]) -> dict:
    report: dict = {"timing": timing}
    for step in steps:
        data = _read_json(run_dir / step["report"]) or {}
        if step["name"] == "compress":
            report.update({k: v for k, v in data.items() if k != "perplexity"})
            if "perplexity" in data:
                report["perplexity"] = data["perplexity"]
        elif step["name"] in ("zero_shot", "evaluate"):
            if "perplexity" in data:
                report["perplexity"] = data["perplexity"]
            if "zero_shot" in data:
                report["zero_shot"] = data["zero_shot"]
            report.setdefault("model", data.get("model"))
    return report


def run(run_dir: Path) -> int:
    """Execute a prepared run folder's steps; the runner process's main."""
    run_dir = Path(run_dir).resolve()
    meta = _read_json(run_dir / "meta.json")
    if meta is None:
        print(f"error: {run_dir} has no readable meta.json", file=sys.stderr)
        return 2
    cancelled = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: cancelled.set())
    signal.signal(signal.SIGTERM, lambda *_: cancelled.set())
    meta.update(pid=os.getpid())
    write_json_atomic(meta, run_dir / "meta.json")
    timing: dict[str, float] = {}
    try:
        slot = _wait_for_slot(run_dir, cancelled)  # held until this process exits
        if slot is None:
            raise _Cancelled
        meta.update(status="running", started=_now())
        write_json_atomic(meta, run_dir / "meta.json")
        for step in meta["steps"]:
            if cancelled.is_set() or (run_dir / "cancel").exists():
                raise _Cancelled
            step.update(status="running", started=_now())
            write_json_atomic(meta, run_dir / "meta.json")
            start = time.perf_counter()
            code = _run_step(Step(step["name"], step["argv"], step["report"]), run_dir, cancelled)
            timing[step["name"]] = time.perf_counter() - start
            step.update(finished=_now(), returncode=code, seconds=timing[step["name"]])
            if cancelled.is_set():
                step["status"] = "cancelled"
                raise _Cancelled
            if code != 0:
                step["status"] = "failed"
                log = read_text(run_dir / "log.txt", 50_000).rsplit(f"\n== {step['name']}:", 1)[-1]
                tail = tail_lines(log.split("\n", 1)[-1], ERROR_LINES)
                refusals = [line for line in tail.splitlines() if line.startswith("error: ")]
                if code == 2 and refusals:  # the CLI refused an input: its one line says why
                    raise RuntimeError(f"step {step['name']} exited with status 2: {refusals[-1]}")
                raise RuntimeError(f"step {step['name']} exited with status {code}\n{tail}".strip())
            step["status"] = "done"
            stdout = read_text(run_dir / f"{step['name']}.stdout")
            if step["name"] == "compress" and stdout.strip():  # compress prints its report on stdout
                with contextlib.suppress(ValueError):
                    write_json_atomic(json.loads(stdout), run_dir / step["report"])
            write_json_atomic(meta, run_dir / "meta.json")
        write_json_atomic(_merge_reports(run_dir, meta["steps"], timing), run_dir / "report.json")
        meta.update(status="done", finished=_now())
    except _Cancelled:
        _cleanup(run_dir, model=True)  # the step has exited: a model it saved last second goes too
        meta.update(status="cancelled", finished=_now())
    except BaseException as err:  # the runner itself must always leave a readable status
        _cleanup(run_dir)
        message = str(err) if isinstance(err, RuntimeError) else f"runner error: {type(err).__name__}: {err}"
        meta.update(status="failed", finished=_now(), error=message)
    write_json_atomic(meta, run_dir / "meta.json")
    return 0 if meta["status"] == "done" else 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m sigmascale_core.jobs RUN_DIR  (started by jobs.start_run)", file=sys.stderr)
        return 2
    return run(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
