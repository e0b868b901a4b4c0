"""What the pages share: the session's configuration, the compute service, the plan state.

Thin glue between Streamlit and sigmascale_core: the service (one per server process and config,
shared by every tab; compute.py) computes in the background, and the pages draw its snapshot with a
status panel that refreshes on its own; every number comes from the core.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

import streamlit as st

from sigmascale_core.text import DEFAULT_CALIBRATION_TEXT, DEFAULT_HELDOUT_TEXT

DEFAULTS_ENV = "SIGMASCALE_APP_DEFAULTS"  # JSON object overriding AppConfig's defaults (tests, demos)
DEFAULT_RETENTION = 0.75  # the plan a session starts from: uniform at this retention
HISTORY = 50  # undo steps kept


def _default_device() -> str:
    from sigmascale_core.pipeline import default_device

    return default_device()


@dataclass(frozen=True)
class AppConfig:
    """The Model & data page's choices; every other page reads them."""

    model: str = "smollm2-135m"  # bundled model, a local folder / .gguf, or a hub id
    device: str = field(default_factory=_default_device)  # torch device
    dtype: str = "float32"  # weights dtype while working
    text: str = DEFAULT_CALIBRATION_TEXT  # calibration text spec
    samples: int = 32  # calibration sequences
    seq_len: int | None = None  # tokens per sequence; None: 512 on CPU, 2048 on GPU
    seed: int = 0  # calibration windows' seed
    heldout_text: str = DEFAULT_HELDOUT_TEXT  # held-out tokens for the held-out loss curves
    heldout_samples: int = 8  # held-out sequences (same seq len)
    evaluation: tuple[str, ...] = (DEFAULT_HELDOUT_TEXT,)  # a run's perplexity texts
    max_eval_tokens: int = 8192  # a run's perplexity budget per text

    def calibration(self):
        from sigmascale_core.pipeline import CalibrationConfig

        return CalibrationConfig(self.text, self.samples, self.seq_len, self.seed)

    def run_spec(self, kind: str, **fields):
        """A background run (jobs.RunSpec) of this model and calibration; `fields` set the rest."""
        from sigmascale_core.jobs import RunSpec

        common = ("model", "device", "dtype", "text", "samples", "seq_len", "seed")
        return RunSpec(kind=kind, **{name: getattr(self, name) for name in common}, **fields)

    def heldout(self):
        from sigmascale_core.pipeline import CalibrationConfig

        return CalibrationConfig(self.heldout_text, self.heldout_samples, self.seq_len, self.seed + 1)


def defaults() -> AppConfig:
    """AppConfig with $SIGMASCALE_APP_DEFAULTS applied (a bad value is reported, then ignored)."""
    raw = os.environ.get(DEFAULTS_ENV, "").strip()
    if not raw:
        return AppConfig()
    try:
        data = json.loads(raw)
        if "evaluation" in data:
            data["evaluation"] = tuple(data["evaluation"])
        return replace(AppConfig(), **data)
    except (ValueError, TypeError) as err:
        st.warning(f"ignoring ${DEFAULTS_ENV}: {err}")
        return AppConfig()


def config() -> AppConfig:
    if "config" not in st.session_state:
        st.session_state["config"] = defaults()
    return st.session_state["config"]


def set_config(cfg: AppConfig) -> None:
    st.session_state["config"] = cfg


# ---------------------------------------------------------------------------------------------------
# The compute service (one per model and calibration choice, shared by every tab of this server)


def service_config(cfg: AppConfig):
    from sigmascale_core.compute import ServiceConfig

    return ServiceConfig(cfg.model, cfg.device, cfg.dtype, cfg.calibration(), cfg.heldout())


def _stop_service(service) -> None:
    service.stop(timeout=0)  # evicted or cleared: the worker ends after its current task


@st.cache_resource(max_entries=4, show_spinner=False, on_release=_stop_service)
def _service(config):
    from sigmascale_core.compute import ComputeService

    return ComputeService(config).start()


def service(cfg: AppConfig | None = None):
    """The running ComputeService of the config (started on first use; never blocks)."""
    return _service(service_config(cfg or config()))


def progress_lines(snap) -> list[tuple[str, float, str]]:
    """(stage, fraction, text) for each stage of the service, as the status panel shows them."""
    from sigmascale_core.compute import STAGE_LABELS, STAGE_UNITS
    from sigmascale_core.progress import format_seconds

    lines = []
    for name, stage in snap.stages.items():
        if name == "model":
            text = (
                f"{STAGE_LABELS[name]}: done in {stage.seconds:.1f} s"
                if stage.complete
                else STAGE_LABELS[name] + "…"
            )
            lines.append((name, 1.0 if stage.complete else 0.0, text))
            continue
        total = stage.total or 1
        text = f"{STAGE_LABELS[name]}: {stage.done}/{stage.total} {STAGE_UNITS[name]}"
        if stage.complete:
            text += " ✓"
        elif stage.done:
            text += f" · about {format_seconds(stage.eta)} left"
        lines.append((name, min(stage.done / total, 1.0), text))
    return lines


def _current_stage(snap) -> str:
    """The first stage not complete (what the worker is busy with, in the order it finishes them)."""
    return next((name for name, stage in snap.stages.items() if not stage.complete), "learned")


def status_panel(watch=None, expanded: bool = False) -> None:
    """The service's progress, refreshed every second while it works; when `watch(snapshot)` changes
    (something the page draws became ready), the whole page reruns to draw it."""
    snap = service().snapshot()
    token = None if watch is None else watch(snap)

    @st.fragment(run_every=1.0 if snap.working else None)
    def panel() -> None:
        now = service().snapshot()
        if watch is not None and watch(now) != token:
            st.rerun()
        if now.state == "error":
            st.error(f"Background computation stopped: {now.error}")
            st.info("Check the choices on the **Model & data** page.")
            return
        if not now.working and not expanded:
            return
        title = {
            "loading": "Loading the model",
            "running": "Computing in the background",
            "waiting": "Another process computes these results; showing them as they land",
            "idle": "Everything is computed",
        }[now.state]
        lines = progress_lines(now)
        if now.working:  # the stage in progress, always in sight
            stage = _current_stage(now)
            _, fraction, text = next(line for line in lines if line[0] == stage)
            st.progress(fraction, text=f"{title}: {text}")
        with st.expander(f"{title}: {now.current}" if now.current else title, expanded=expanded):
            for _name, fraction, text in lines:
                st.progress(fraction, text=text)
            if now.requests:
                st.caption(f"{now.requests} SigmaScale relearns queued at ranks a plan moved to.")

    panel()


def show_error(err: BaseException, what: str) -> None:
    """One readable message, never a traceback: ValueError is the core's 'bad input'."""
    if isinstance(err, ValueError):
        st.error(f"{what}: {err}")
    else:
        st.error(f"{what}: {type(err).__name__}: {err}")


def ready_snapshot(watch=None):
    """The service's snapshot once its model is loaded (with the status panel drawn above the page),
    or None after saying what the page waits for."""
    status_panel(watch or (lambda s: (s.bank is not None, s.state == "error")))
    snap = service().snapshot()
    if snap.bank is None:
        if snap.state != "error":
            st.info("Loading the model: the page fills in as soon as it is ready.")
        return None
    return snap


def _probe_runs(cfg: AppConfig):
    """This model's probe runs (newest first) with the config's calibration text; the table inside is
    checked against the loaded model's fingerprint when read."""
    from sigmascale_core import jobs

    return [
        r
        for r in jobs.list_runs()
        if r.spec.get("kind") == "probe"
        and r.spec.get("model") == cfg.model
        and r.spec.get("text") == cfg.text
    ]


def probe_table(cfg: AppConfig):
    """The sensitivity table of the newest finished probe run for the loaded model, else None."""
    from sigmascale_core import jobs
    from sigmascale_core.sensitivity import SensitivityTable

    snap = service(cfg).snapshot()
    if snap.loaded is None:
        return None
    for record in _probe_runs(cfg):
        path = record.path / jobs.PROBE_TABLE
        if record.status == "done" and path.is_file():
            try:
                table = SensitivityTable.load(path)
            except ValueError:
                continue
            if table.model_fingerprint == snap.loaded.fingerprint:
                return table
    return None


def active_probe(cfg: AppConfig):
    """The RunRecord of a probe run still queued or running for this model, else None."""
    from sigmascale_core import jobs

    snap = service(cfg).snapshot()
    if snap.loaded is None:
        return None
    return next((r for r in _probe_runs(cfg) if r.status in jobs.ACTIVE), None)


def start_probe(cfg: AppConfig):
    """Start the perplexity probe as a background run (a process of its own: hours on a CPU)."""
    from sigmascale_core import jobs

    evaluation = tuple(dict.fromkeys((*cfg.evaluation, cfg.heldout_text)))
    return jobs.start_run(cfg.run_spec("probe", evaluation=evaluation, label="perplexity probe"))


# ---------------------------------------------------------------------------------------------------
# The session's plan: one CompressionPlan, with undo


def plan_state(snap) -> dict:
    """This session's plan for the snapshot's model: {"plan": CompressionPlan, "history": [...],
    "version": n}; a uniform sigmascale plan at DEFAULT_RETENTION the first time or for another model."""
    from sigmascale_core.plan import CompressionPlan
    from sigmascale_core.surgery import target_shapes

    state = st.session_state.get("plan")
    fingerprint = snap.loaded.fingerprint
    if state is None or state["plan"].model_fingerprint != fingerprint:
        shapes = target_shapes(snap.loaded.model)
        plan = CompressionPlan.uniform(shapes, DEFAULT_RETENTION, "sigmascale", fingerprint)
        state = {"plan": plan, "initial": plan, "history": [], "version": 0}
        st.session_state["plan"] = state
    return state


def set_plan(state: dict, plan) -> None:
    """Replace the session's plan (recording undo) and bump the version (fresh editor widgets)."""
    if plan != state["plan"]:
        state["history"] = [*state["history"], state["plan"]][-HISTORY:]
        state["plan"] = plan
    state["version"] += 1


def undo(state: dict) -> None:
    if state["history"]:
        state["plan"] = state["history"][-1]
        state["history"] = state["history"][:-1]
        state["version"] += 1
