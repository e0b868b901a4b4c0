"""The compute service: everything the app shows is computed in the background, most wanted first.

One `ComputeService` per (model, calibration choice) runs a worker thread over a priority queue of
small tasks, each of which lands atomically in the disk cache (spectra.py, calibration.py):

  1. what a user looks at (`focus`): that matrix's layer, spectra and learned scaling, next;
  2. weights: σ(W) of every layer (no calibration needed: the overview appears within seconds);
  3. cheap: svd / asvd / svdllm spectra and loss curves of each layer whose statistics exist;
  4. calibration: one decoder layer of the statistics sweep (calibration and held-out tokens in one
     pass), so cheap spectra follow the sweep layer by layer;
  5. relearn requests: SigmaScale at a rank a plan moved to;
  6. learned: SigmaScale's scaling of every matrix at the reference plan's rank.

Each result's spectral diagnostics (WeightWatcher's numbers, spectra.py) follow it as a small task of
its layer ("diagnostics", ahead of 3–6): W's right after the weights, asvd's and svdllm's after the
cheap curves, SigmaScale's after the scaling learned at the reference rank. They are not a progress
stage (a few hundredths of a second per matrix); `Snapshot.bank.diagnostics` holds them.

Across processes (two app servers, a CLI run beside the app) a file lock per cache folder and key
elects one worker; the others read the results from disk as they land, and send their focus through
small per-process files. A restarted server reads every finished task back from the cache.
Nothing here imports Streamlit: pages read `snapshot()` and call `focus` / `request_learned`.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sigmascale_core import spectra
from sigmascale_core.artifacts import cache_root, write_json_atomic
from sigmascale_core.bank import SpectraBank, reference_rank
from sigmascale_core.calibration import layer_stats_steps, load_stats, save_stats, stats_cache_path, stats_key
from sigmascale_core.models import LoadedModel, MatrixRef, get_module, load_model, target_matrices
from sigmascale_core.pipeline import CalibrationConfig, calibration_key, parameter_count
from sigmascale_core.progress import ProgressEvent
from sigmascale_core.stats import ActivationStats
from sigmascale_core.text import DEFAULT_HELDOUT_TEXT, calibration_batch, check_disjoint

STAGES = ("model", "weights", "calibration", "cheap", "learned")
STAGE_LABELS = {
    "model": "loading the model",
    "weights": "spectra of W",
    "calibration": "calibration statistics",
    "cheap": "svd / asvd / svdllm curves",
    "learned": "learned SigmaScale scalings",
}
STAGE_UNITS = {
    "model": "",
    "weights": "layers",
    "calibration": "layers",
    "cheap": "matrices",
    "learned": "matrices",
}
FOCUS_KEPT = 8  # matrices remembered as looked at, newest first
POLL_S = 1.0  # how often a waiting worker looks for work, the lock or results from another process
WANTS_STALE_S = 600  # another process's focus older than this is ignored
HELDOUT = CalibrationConfig(DEFAULT_HELDOUT_TEXT, samples=8, seed=1)  # the app's held-out tokens
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ServiceConfig:
    """What the service computes: one model under one calibration choice."""

    model: str = "smollm2-135m"  # bundled model, a local folder / .gguf, or a hub id
    device: str = "cpu"  # torch device
    dtype: str = "float32"  # weights dtype while working
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)  # what the methods fit on
    heldout: CalibrationConfig = field(default_factory=lambda: HELDOUT)  # held-out curves
    reference_retention: float = 0.75  # SigmaScale is learned at the rank a uniform plan at this gives

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {sorted(DTYPES)}")
        if not 0 < self.reference_retention <= 1:
            raise ValueError(f"reference_retention must be in (0, 1], got {self.reference_retention!r}")
        if self.calibration.gram_dtype != self.heldout.gram_dtype:  # one sweep computes both
            raise ValueError(
                f"the calibration and held-out Grams must share a dtype, got {self.calibration.gram_dtype} "
                f"and {self.heldout.gram_dtype}"
            )

    def check(self) -> None:
        """ValueError if the calibration and held-out texts share documents (cheap; before any work)."""
        check_disjoint(calibration=self.calibration.text, heldout=self.heldout.text)


@dataclass
class Stage:
    """Progress of one kind of task: units done of total, and the seconds they took."""

    done: int = 0
    total: int = 0
    seconds: float = 0.0  # busy time spent on this stage's finished units
    detail: str = ""  # the last unit

    @property
    def eta(self) -> float | None:
        """Seconds left at this stage's mean time per unit (None before the first unit)."""
        if self.done <= 0 or self.total <= 0:
            return None
        return self.seconds / self.done * max(self.total - self.done, 0)

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.done >= self.total

    def event(self, name: str) -> ProgressEvent:
        return ProgressEvent(name, self.done, self.total, self.seconds, self.detail)


@dataclass
class Snapshot:
    """What a page shows: where each stage stands, what runs now, and the results so far."""

    state: str  # "loading", "running", "idle", "waiting" (another process computes), "error"
    stages: dict[str, Stage]
    current: str  # the task running now ("" when idle)
    error: str | None
    bank: SpectraBank | None  # None until the model is loaded
    loaded: LoadedModel | None
    stats_ready: bool  # calibration and held-out statistics complete
    requests: int = 0  # relearn requests queued

    @property
    def working(self) -> bool:
        return self.state in ("loading", "running", "waiting")


@dataclass
class _Wants:
    focus: list[str] = field(default_factory=list)  # newest first
    learn: list[tuple[str, int]] = field(default_factory=list)  # (matrix, rank) relearn requests, in order


class ComputeService:
    """Background computation of one model's spectra, curves and learned scalings (see the module doc)."""

    def __init__(
        self,
        config: ServiceConfig,
        loader: Callable[[ServiceConfig], LoadedModel] | None = None,
    ) -> None:
        self.config = config
        self._loader = loader or _load
        self._wants = _Wants()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards the fields below
        self.model_lock = threading.Lock()  # held while the worker runs the model (hooks are registered)
        self._thread: threading.Thread | None = None
        self._state = "loading"
        self._current = ""
        self._error: str | None = None
        self._stages = {name: Stage() for name in STAGES}
        self.loaded: LoadedModel | None = None
        self.bank: SpectraBank | None = None
        self.key: spectra.SpectraKey | None = None
        self._weights: dict[str, torch.Tensor] = {}
        self._stats: dict[str, dict[str, ActivationStats]] = {"calibration": {}, "heldout": {}}
        self._stats_layers: set[int] = set()
        self._sweep: Iterator | None = None
        self._lock_file = None
        self._wants_seen = 0.0
        self.computed: list[tuple[str, object]] = []  # every task this process ran (tests, benchmarks)

    # -- control -------------------------------------------------------------------------------------
    def start(self) -> ComputeService:
        """Start the worker thread (once); returns self."""
        with self._lock:
            if self._thread is None:
                _STARTED.add(self)
                self._thread = threading.Thread(target=self._run, name="sigmascale-compute", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Ask the worker to stop after its current task and wait for it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._release_lock()

    def focus(self, name: str) -> None:
        """A user looks at matrix `name`: its missing results are computed next."""
        with self._lock:
            if self._wants.focus[:1] == [name]:
                return
            self._wants.focus = [name, *[n for n in self._wants.focus if n != name]][:FOCUS_KEPT]
        self._publish_wants()
        self._wake.set()

    def request_learned(self, pairs: list[tuple[str, int]]) -> int:
        """Queue SigmaScale relearns at (matrix, rank); returns how many were new."""
        new = 0
        with self._lock:
            queued = set(self._wants.learn)
            for name, rank in pairs:
                pair = (name, int(rank))
                if pair not in queued and not self._has_learned(*pair):
                    self._wants.learn.append(pair)
                    queued.add(pair)
                    new += 1
        if new:
            self._publish_wants()
            self._wake.set()
        return new

    def snapshot(self) -> Snapshot:
        with self._lock:
            stages = {name: Stage(**asdict(stage)) for name, stage in self._stages.items()}
            return Snapshot(
                state=self._state,
                stages=stages,
                current=self._current,
                error=self._error,
                bank=self.bank,
                loaded=self.loaded,
                stats_ready=stages["calibration"].complete,
                requests=len(self._wants.learn),
            )

    def wait_until(self, predicate: Callable[[Snapshot], bool], timeout: float) -> Snapshot:
        """Poll until `predicate(snapshot)` holds or the service failed (TimeoutError after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            snap = self.snapshot()
            if predicate(snap) or snap.state == "error":
                return snap
            if time.monotonic() > deadline:
                raise TimeoutError(f"compute service: not there after {timeout} s ({snap.current})")
            time.sleep(0.05)

    def run_here(
        self, done: Callable[[SpectraBank], bool], progress: Callable[[ProgressEvent], None] | None = None
    ) -> Snapshot:
        """Run the worker's tasks in the calling thread until `done(bank)` or none is left: the CLI's
        synchronous path through the same tasks and cache; `progress` gets each finished task's stage.
        Where another process leads (an app server), its results are read from the cache instead."""
        self._prepare()
        try:
            while not done(self.bank):
                if not self._lead():
                    self._read_disk()
                    time.sleep(POLL_S)
                    continue
                task = self._next_task()
                if task is None:
                    break
                self._do(*task)
                if progress is not None and task[0] in self._stages:
                    progress(self.snapshot().stages[task[0]].event(task[0]))
        finally:
            self._release_lock()
        self._set(state="idle", current="")
        return self.snapshot()

    # -- the worker ----------------------------------------------------------------------------------
    def _run(self) -> None:
        # One OpenMP thread in the worker: beside the process's main-thread pool, a second multi-threaded
        # pool ran the learned fits 3.4x slower than the main thread on 2 cores; one thread, 2x faster.
        torch.set_num_threads(1)
        try:
            self._prepare()
            while not self._stop.is_set():
                if not self._lead():
                    self._set(state="waiting", current="")
                    self._read_disk()
                    self._read_status()
                    self._wake.wait(POLL_S)
                    self._wake.clear()
                    continue
                task = self._next_task()
                if task is None:
                    self._set(state="idle", current="")
                    self._write_status()
                    self._wake.wait(POLL_S)
                    self._wake.clear()
                    continue
                self._do(*task)
        except Exception as err:  # shown on every page; the service stays inspectable
            self._set(state="error", current="", error=f"{type(err).__name__}: {err}")
        finally:
            self._release_lock()

    def _set(self, **fields: object) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(self, f"_{name}", value)

    def _prepare(self) -> None:
        """Load the model, lay out the bank and read back everything already cached."""
        self.config.check()
        start = time.perf_counter()
        self._set(current=STAGE_LABELS["model"])
        loaded = self._loader(self.config)
        refs = target_matrices(loaded.model)
        key = spectra.SpectraKey.build(
            loaded.fingerprint,
            calibration_key(loaded, self.config.calibration),
            calibration_key(loaded, self.config.heldout),
        )
        bank = SpectraBank(refs, parameter_count(loaded.model))
        self._weights = {r.name: get_module(loaded.model, r.name).weight.detach() for r in refs}
        layers = len(spectra.layers_of(refs))
        with self._lock:
            self.loaded, self.key, self.bank = loaded, key, bank
            self._stages["model"] = Stage(1, 1, time.perf_counter() - start, loaded.source)
            self._stages["weights"].total = layers
            self._stages["calibration"].total = layers
            self._stages["cheap"].total = len(refs)
            self._stages["learned"].total = len(refs)
            self._state = "running"
        self._read_disk()

    def _refs(self) -> dict[int, list[MatrixRef]]:
        return spectra.layers_of(self.bank.refs)

    def _read_disk(self) -> None:
        """Fill the bank from the cache (results of earlier runs, or of the worker in another process)."""
        bank, key = self.bank, self.key
        fingerprint = self.loaded.fingerprint
        for _layer, refs in self._refs().items():
            if refs[0].name not in bank.weights_sigma:
                sigmas = spectra.load_weights_layer(fingerprint, refs)
                for name, sigma in (sigmas or {}).items():
                    bank.set_weights(name, sigma)
            if refs[0].name not in bank.cheap:
                cheap = spectra.load_layer(key, refs)
                for name, by_method in (cheap or {}).items():
                    bank.set_cheap(name, by_method)
            if not bank.has_diagnostics(refs[0].name, "svd"):
                found = spectra.load_weights_diagnostics(fingerprint, refs)
                for name, values in (found or {}).items():
                    bank.set_diagnostics(name, "svd", values)
            if not bank.has_diagnostics(refs[0].name, spectra.SCALED_METHODS[0]):
                found = spectra.load_layer_diagnostics(key, refs)
                for name, by_method in (found or {}).items():
                    for method, values in by_method.items():
                        bank.set_diagnostics(name, method, values)
        present = spectra.learned_files(key)
        diagnosed = spectra.learned_files(key, spectra.diagnostics_dir())
        for ref in bank.refs:
            for rank in present.get(spectra.slug(ref.name), ()):
                if not self._has_learned(ref.name, rank):
                    spectrum = spectra.load_sigmascale(key, ref, rank)
                    if spectrum is not None:
                        bank.set_learned(ref.name, spectrum)
            rank = self._reference_rank(ref)
            if rank in diagnosed.get(spectra.slug(ref.name), ()) and not bank.has_diagnostics(
                ref.name, "sigmascale"
            ):
                values = spectra.load_sigmascale_diagnostics(key, ref, rank)
                if values is not None:
                    bank.set_diagnostics(ref.name, "sigmascale", values)
        if not self._stats_layers:
            self._load_cached_stats()
        self._count()

    def _load_cached_stats(self) -> None:
        """Whole-model statistics from the calibration cache (the same files `pipeline.calibrate` uses)."""
        for split, config in self._splits().items():
            key = calibration_key(self.loaded, config)
            cached = load_stats(stats_cache_path(key), key)
            if cached is not None:
                self._stats[split] = cached
        if all(self._stats.values()):
            self._stats_layers = set(self._refs())

    def _splits(self) -> dict[str, CalibrationConfig]:
        return {"calibration": self.config.calibration, "heldout": self.config.heldout}

    def _count(self) -> None:
        bank = self.bank
        with self._lock:
            self._stages["weights"].done = sum(
                1 for refs in self._refs().values() if refs[0].name in bank.weights_sigma
            )
            self._stages["calibration"].done = len(self._stats_layers)
            self._stages["cheap"].done = len(bank.cheap)
            self._stages["learned"].done = sum(
                1 for r in bank.refs if self._has_learned(r.name, self._reference_rank(r))
            )

    def _reference_rank(self, ref: MatrixRef) -> int:
        return reference_rank(ref.shape, self.config.reference_retention)

    def _has_learned(self, name: str, rank: int) -> bool:
        return self.bank is not None and rank in self.bank.learned.get(name, {})

    # -- choosing the next task ----------------------------------------------------------------------
    def _next_task(self) -> tuple[str, object] | None:
        bank = self.bank
        wants = self._merged_wants()
        by_name = {r.name: r for r in bank.refs}
        sweep_first = False
        for name in wants.focus:
            ref = by_name.get(name)
            if ref is None:
                continue
            if name not in bank.weights_sigma:
                return "weights", ref.layer
            due = self._diagnostics_due(ref.layer)
            if due is not None:
                return "diagnostics", due
            if ref.layer not in self._stats_layers:  # once every σ(W) is in: the sweep, until it gets here
                sweep_first = True
                continue
            if name not in bank.cheap:
                return "cheap", ref.layer
            rank = self._reference_rank(ref)
            if not self._has_learned(name, rank):
                return "learned", (name, rank)
        for layer, refs in self._refs().items():
            if refs[0].name not in bank.weights_sigma:
                return "weights", layer
        if sweep_first:
            return "calibration", None
        for layer in self._refs():
            due = self._diagnostics_due(layer)
            if due is not None:
                return "diagnostics", due
        for layer in sorted(self._stats_layers):
            if any(r.name not in bank.cheap for r in self._refs()[layer]):
                return "cheap", layer
        if len(self._stats_layers) < len(self._refs()):
            return "calibration", None
        for name, rank in wants.learn:
            if name in by_name and not self._has_learned(name, rank):
                return "learned", (name, rank)
        for ref in bank.refs:
            if not self._has_learned(ref.name, self._reference_rank(ref)):
                return "learned", (ref.name, self._reference_rank(ref))
        return None

    def _do(self, kind: str, target: object) -> None:
        label = {
            "weights": lambda: f"σ(W) of layer {target}",
            "cheap": lambda: f"svd / asvd / svdllm curves of layer {target}",
            "calibration": lambda: f"calibration statistics of layer {len(self._stats_layers)}",
            "learned": lambda: f"learning SigmaScale for {target[0]} at rank {target[1]}",
            "diagnostics": lambda: (
                f"spectral diagnostics of {target[1] if target[0] == 'learned' else f'layer {target[1]}'}"
                f" ({target[0]})"
            ),
        }[kind]()
        self._set(current=label)
        start = time.perf_counter()
        getattr(self, f"_do_{kind}")(target)
        elapsed = time.perf_counter() - start
        self.computed.append((kind, target))
        with self._lock:
            if kind in self._stages:  # diagnostics are no stage of their own
                self._stages[kind].seconds += elapsed
                self._stages[kind].detail = label
        self._count()
        self._write_status()

    def _do_weights(self, layer: int) -> None:
        refs = self._refs()[layer]
        for name, sigma in spectra.compute_weights_layer(
            self.loaded.fingerprint, refs, self._weights
        ).items():
            self.bank.set_weights(name, sigma)

    def _do_cheap(self, layer: int) -> None:
        refs = self._refs()[layer]
        cal, held = self._stats["calibration"], self._stats["heldout"]
        for name, by_method in spectra.compute_layer(self.key, refs, self._weights, cal, held).items():
            self.bank.set_cheap(name, by_method)

    def _do_learned(self, target: tuple[str, int]) -> None:
        name, rank = target
        ref = self.bank.refs[self.bank.index[name]]
        sk = stats_key(ref.layer, ref.group)
        cal, held = self._stats["calibration"][sk], self._stats["heldout"][sk]
        spectrum = spectra.learn_sigmascale(self.key, ref, self._weights[name], cal, held, rank)
        self.bank.set_learned(name, spectrum)
        with self._lock:
            self._wants.learn = [p for p in self._wants.learn if p != (name, rank)]

    def _diagnostics_due(self, layer: int) -> tuple[str, object] | None:
        """The first result of `layer` that is ready while its diagnostics are not: ("weights", layer),
        ("cheap", layer) or ("learned", matrix name); None when there is none."""
        bank, refs = self.bank, self._refs()[layer]
        first = refs[0].name  # weights and cheap results land a whole layer at a time
        if first in bank.weights_sigma and not bank.has_diagnostics(first, "svd"):
            return "weights", layer
        if first in bank.cheap and not bank.has_diagnostics(first, spectra.SCALED_METHODS[0]):
            return "cheap", layer
        for ref in refs:
            learned = self._has_learned(ref.name, self._reference_rank(ref))
            if learned and not bank.has_diagnostics(ref.name, "sigmascale"):
                return "learned", ref.name
        return None

    def _do_diagnostics(self, target: tuple[str, object]) -> None:
        """The diagnostics of one result (`_diagnostics_due`), written atomically beside its spectra."""
        kind, what = target
        bank = self.bank
        if kind == "weights":
            refs = self._refs()[what]
            sigmas = {r.name: bank.weights_sigma[r.name] for r in refs}
            found = spectra.compute_weights_diagnostics(self.loaded.fingerprint, refs, sigmas, self._weights)
            for name, values in found.items():
                bank.set_diagnostics(name, "svd", values)
        elif kind == "cheap":
            refs = self._refs()[what]
            cheap = {r.name: bank.cheap[r.name] for r in refs}
            for name, by_method in spectra.compute_layer_diagnostics(self.key, refs, cheap).items():
                for method, values in by_method.items():
                    bank.set_diagnostics(name, method, values)
        else:
            ref = bank.refs[bank.index[what]]
            spectrum = bank.learned[what][self._reference_rank(ref)]
            bank.set_diagnostics(
                what, "sigmascale", spectra.compute_sigmascale_diagnostics(self.key, ref, spectrum)
            )

    def _do_calibration(self, _target: None) -> None:
        """One decoder layer of the statistics sweep over the splits not cached yet."""
        if self._sweep is None:
            missing = {s: c for s, c in self._splits().items() if not self._stats[s]}
            loaded = self.loaded
            device = next(loaded.model.parameters()).device
            ids = {
                split: calibration_batch(
                    loaded.tokenizer, loaded.family, c.text, c.samples, c.resolved_seq_len(device), c.seed
                )
                for split, c in missing.items()
            }
            self._sweep_splits = list(missing)
            calibration = self.config.calibration
            self._sweep = layer_stats_steps(
                loaded.model, ids, calibration.batch_size, gram_dtype=calibration.gram_dtype
            )
        with self.model_lock:
            layer, by_split = next(self._sweep)
        for split in self._sweep_splits:
            self._stats[split].update(by_split[split])
        self._stats_layers.add(layer)
        if len(self._stats_layers) == len(self._refs()):
            self._sweep = None
            for split in self._sweep_splits:  # the whole-model cache `pipeline.calibrate` reads too
                key = calibration_key(self.loaded, self._splits()[split])
                save_stats(self._stats[split], stats_cache_path(key), key)

    # -- across processes ----------------------------------------------------------------------------
    def _paths(self) -> dict[str, Path]:
        base = cache_root() / "service"
        digest = self.key.digest
        return {
            "lock": base / f"{digest}.lock",
            "status": base / f"{digest}-status.json",
            "wants": base / f"{digest}-wants-{os.getpid()}.json",
            "wants_glob": base,
        }

    def _lead(self) -> bool:
        """Whether this process runs the worker for this cache folder and key (a non-blocking flock)."""
        if self._lock_file is not None:
            return True
        path = self._paths()["lock"]
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")  # noqa: SIM115 - held for the service's lifetime
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            return False
        self._lock_file = fh
        self._set(state="running")
        self._read_disk()  # what the previous leader finished
        return True

    def _release_lock(self) -> None:
        with self._lock:
            fh, self._lock_file = self._lock_file, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def _publish_wants(self) -> None:
        if self.key is None:
            return
        with self._lock:
            data = {"focus": self._wants.focus, "learn": self._wants.learn}
        with contextlib.suppress(OSError):
            write_json_atomic(data, self._paths()["wants"])

    def _merged_wants(self) -> _Wants:
        """This process's wants, then those other live processes published (newest focus first)."""
        with self._lock:
            merged = _Wants(list(self._wants.focus), list(self._wants.learn))
        own = self._paths()["wants"]
        now = time.time()
        for path in sorted(own.parent.glob(f"{self.key.digest}-wants-*.json")):
            if path == own:
                continue
            try:
                if now - path.stat().st_mtime > WANTS_STALE_S:
                    continue
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            merged.focus += [n for n in data.get("focus", []) if isinstance(n, str)]
            merged.learn += [(str(n), int(r)) for n, r in data.get("learn", []) if isinstance(r, int)]
        return merged

    def _write_status(self) -> None:
        with self._lock:
            data = {
                "current": self._current,
                "state": self._state,
                "stages": {name: asdict(stage) for name, stage in self._stages.items()},
            }
        with contextlib.suppress(OSError):
            write_json_atomic(data, self._paths()["status"])

    def _read_status(self) -> None:
        """The leader's status (what runs, the calibration sweep's progress) for a waiting process."""
        try:
            data = json.loads(self._paths()["status"].read_text())
            calibration = Stage(**data["stages"]["calibration"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        with self._lock:
            self._current = str(data.get("current", ""))
            self._stages["calibration"] = calibration
            if calibration.complete and not self._stats_layers:
                self._load_cached_stats()


_STARTED: weakref.WeakSet[ComputeService] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Let every worker finish its task before the interpreter goes: a thread killed inside torch at
    exit aborts the process (status 134)."""
    for service in list(_STARTED):
        service.stop(timeout=60)


def _load(config: ServiceConfig) -> LoadedModel:
    return load_model(config.model, device=config.device, dtype=DTYPES[config.dtype])
