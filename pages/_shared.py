"""What the pages share: the session's configuration, the cached model/stats/spectra, the plan state.

Thin glue between Streamlit and sigmascale_core: caching (st.cache_resource, per server process and
shared by every tab), progress bars and error display live here; every number comes from the core.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import streamlit as st

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
    text: str = "boolq:calibration"  # calibration text spec
    samples: int = 32  # calibration sequences
    seq_len: int | None = None  # tokens per sequence; None: 512 on CPU, 2048 on GPU
    seed: int = 0  # calibration windows' seed
    heldout_text: str = "boolq:evaluation"  # held-out tokens for the held-out loss curves
    heldout_samples: int = 8  # held-out sequences (same seq len)
    evaluation: tuple[str, ...] = ("boolq:evaluation",)  # a run's perplexity texts
    max_eval_tokens: int = 8192  # a run's perplexity budget per text

    def calibration(self):
        from sigmascale_core.pipeline import CalibrationConfig

        return CalibrationConfig(self.text, self.samples, self.seq_len, self.seed)

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


def show_error(err: BaseException, what: str) -> None:
    """One readable message, never a traceback: ValueError is the core's 'bad input'."""
    if isinstance(err, ValueError):
        st.error(f"{what}: {err}")
    else:
        st.error(f"{what}: {type(err).__name__}: {err}")


# ---------------------------------------------------------------------------------------------------
# Cached resources (shared by all sessions of this server process)


@st.cache_resource(max_entries=2, show_spinner=False)
def _load_model(source: str, device: str, dtype: str):
    import torch

    from sigmascale_core.models import load_model

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(dtypes)}")
    return load_model(source, device=device, dtype=dtypes[dtype])


@st.cache_resource(max_entries=32, show_spinner=False)
def _box(*key: str) -> dict:
    """A per-key mutable holder (with a lock) for things computed once and shared across sessions."""
    return {"lock": threading.Lock()}


def model(cfg: AppConfig):
    """The LoadedModel of the config (ValueError with a readable message when it cannot load)."""
    with st.spinner(f"Loading {cfg.model} on {cfg.device}…"):
        return _load_model(cfg.model, cfg.device, cfg.dtype)


def model_facts(loaded) -> dict:
    """Key facts about the loaded model, computed once per model (tokenizer hashing included)."""
    box = _box("facts", loaded.fingerprint, loaded.source)
    with box["lock"]:
        if "facts" not in box:
            from sigmascale_core.models import target_matrices, tokenizer_fingerprint
            from sigmascale_core.pipeline import parameter_count

            refs = target_matrices(loaded.model)
            box["facts"] = {
                "refs": refs,
                "parameters": parameter_count(loaded.model),
                "tokenizer": tokenizer_fingerprint(loaded.tokenizer),
                "layers": len({r.layer for r in refs}),
            }
    return box["facts"]


def _progress_callback(label: str):
    bar = st.progress(0.0, text=label)

    def update(done: int, total: int, what: str) -> None:
        bar.progress(min(done / max(total, 1), 1.0), text=f"{label}: {what} {done}/{total}")

    return bar, update


def stats(loaded, calibration, label: str):
    """Calibration stats (from memory, else the disk cache, else computed with a progress bar)."""
    box = _box("stats", loaded.fingerprint, json.dumps(asdict(calibration), sort_keys=True))
    with box["lock"]:
        if "stats" in box:
            return box["stats"], {**box["info"], "source": "memory"}
        from sigmascale_core.pipeline import calibrate

        bar, update = _progress_callback(label)
        box["stats"], info = calibrate(loaded, calibration, progress=update)
        box["info"] = {**info, "source": "disk cache" if info.get("cached") else "computed"}
        bar.empty()
        return box["stats"], box["info"]


def spectra_key(loaded, cfg: AppConfig):
    """The SpectraKey of the config, computed once per model and calibration choice: hashing the
    tokenizer (inside calibration_key) costs ~0.1 s, too much for every rerun of an edit."""
    from sigmascale_core.spectra import SpectraKey, calibration_key

    configs = json.dumps([asdict(cfg.calibration()), asdict(cfg.heldout())], sort_keys=True)
    box = _box("spectra_key", loaded.fingerprint, loaded.source, configs)
    with box["lock"]:
        if "key" not in box:
            box["key"] = SpectraKey.build(
                loaded.fingerprint,
                calibration_key(loaded, cfg.calibration()),
                calibration_key(loaded, cfg.heldout()),
            )
    return box["key"]


def check_texts(cfg: AppConfig) -> None:
    """ValueError if the calibration and held-out texts share documents."""
    from sigmascale_core.text import check_disjoint

    check_disjoint(calibration=cfg.text, heldout=cfg.heldout_text)


def bank(cfg: AppConfig):
    """The SpectraBank of the config: read from the spectra cache, computing what is missing
    (calibration + cheap spectra, with progress bars). Shared by all sessions."""
    from sigmascale_core import spectra

    loaded = model(cfg)
    key = spectra_key(loaded, cfg)
    box = _box("bank", key.digest)
    if "bank" in box:
        return box["bank"]
    with box["lock"]:
        if "bank" in box:
            return box["bank"]
        facts = model_facts(loaded)
        refs = facts["refs"]
        missing = spectra.missing_layers(key, refs)
        weights, cal, held = {}, {}, {}
        if missing:
            check_texts(cfg)
            cal, _ = stats(loaded, cfg.calibration(), "Calibrating")
            held, _ = stats(loaded, cfg.heldout(), "Held-out statistics")
            from sigmascale_core.models import get_module

            weights = {r.name: get_module(loaded.model, r.name).weight.detach() for r in refs}
        bar, update = _progress_callback(f"Spectra and loss curves ({len(missing)} layers to compute)")
        computed = spectra.precompute(key, refs, weights, cal, held, progress=update)
        bar.empty()
        result = spectra.SpectraBank(refs, computed, facts["parameters"])
        for ref in refs:
            learned = spectra.load_sigmascale(key, ref, spectra.reference_rank(ref.shape))
            if learned is not None:
                result.add_sigmascale(ref.name, learned)
        box["bank"] = result
    return result


def learn_sigmascale(cfg: AppConfig, bank_, names: list[str]) -> None:
    """Learn SigmaScale's scaling (at the reference rank) for `names`, with a progress bar."""
    from sigmascale_core import spectra
    from sigmascale_core.calibration import stats_key
    from sigmascale_core.models import get_module

    loaded = model(cfg)
    key = spectra_key(loaded, cfg)
    todo = [n for n in names if n not in bank_.learned]
    if not todo:
        return
    cal, _ = stats(loaded, cfg.calibration(), "Calibrating")
    held, _ = stats(loaded, cfg.heldout(), "Held-out statistics")
    bar, update = _progress_callback("Learning SigmaScale scalings")
    for done, name in enumerate(todo, start=1):
        ref = bank_.refs[bank_.index[name]]
        sk = stats_key(ref.layer, ref.group)
        W = get_module(loaded.model, name).weight.detach()
        rank = spectra.reference_rank(ref.shape)
        bank_.add_sigmascale(name, spectra.learn_sigmascale(key, ref, W, cal[sk], held[sk], rank))
        update(done, len(todo), name)
    bar.empty()


def probe_table(cfg: AppConfig, run: bool = False):
    """The perplexity sensitivity table (sigmascale_core.probing) of the config's model: from memory,
    else (when `run`) from probing's disk cache or probed now with a progress bar; None if not run."""
    loaded = model(cfg)
    box = _box("probe", loaded.fingerprint, json.dumps(asdict(cfg.calibration()), sort_keys=True))
    with box["lock"]:
        if "table" not in box and run:
            from sigmascale_core.probing import ProbeConfig, probe

            cal, info = stats(loaded, cfg.calibration(), "Calibrating")
            config = ProbeConfig(text=cfg.text, evaluation=(*cfg.evaluation, cfg.heldout_text))
            bar, update = _progress_callback("Probing: perplexity with one matrix truncated at a time")
            calibration = (cfg.text, cfg.samples, info["seq_len"], cfg.seed)
            box["table"], box["info"] = probe(loaded, cal, config, calibration=calibration, progress=update)
            bar.empty()
    return box.get("table")


def ready_bank():
    """The bank for the session's config, or None after showing why it is not available."""
    cfg = config()
    try:
        return bank(cfg)
    except Exception as err:  # a page must show the problem, never a traceback
        show_error(err, f"Cannot prepare {cfg.model}")
        st.info("Check the choices on the **Model & data** page.")
        return None


# ---------------------------------------------------------------------------------------------------
# The session's plan: ranks per matrix (numpy), with undo


def plan_state(bank_) -> dict:
    """This session's plan for `bank_` (a uniform plan at DEFAULT_RETENTION the first time, or when the
    model/config changed)."""
    state = st.session_state.get("plan")
    if state is None or state["names"] != bank_.names:
        ranks = bank_.ranks_for_retention(DEFAULT_RETENTION)
        state = {
            "names": bank_.names,
            "ranks": ranks,
            "initial": ranks.copy(),
            "method": "sigmascale",
            "allocation": "uniform",
            "target_retention": DEFAULT_RETENTION,
            "history": [],
            "version": 0,
        }
        st.session_state["plan"] = state
    return state


def set_ranks(state: dict, ranks: np.ndarray, allocation: str, target: float | None = None) -> None:
    """Replace the plan's ranks (recording undo) and bump the version (fresh editor widgets)."""
    if not np.array_equal(ranks, state["ranks"]):
        state["history"] = [
            *state["history"],
            (state["ranks"], state["allocation"], state["target_retention"]),
        ]
        state["history"] = state["history"][-HISTORY:]
    state.update(ranks=np.asarray(ranks), allocation=allocation, target_retention=target)
    state["version"] += 1


def undo(state: dict) -> None:
    if state["history"]:
        ranks, allocation, target = state["history"][-1]
        state["history"] = state["history"][:-1]
        state.update(ranks=ranks, allocation=allocation, target_retention=target)
        state["version"] += 1


def to_plan(bank_, state: dict, fingerprint: str):
    """The session's plan as the CompressionPlan the CLI takes."""
    from sigmascale_core.plan import CompressionPlan, MatrixPlan

    ranks = bank_.normalise(state["ranks"])
    matrices = {
        name: MatrixPlan(
            tuple(int(x) for x in bank_.shapes[i]), None if ranks[i] >= bank_.full_rank[i] else int(ranks[i])
        )
        for i, name in enumerate(bank_.names)
    }
    return CompressionPlan(
        fingerprint, state["method"], {}, matrices, state["target_retention"], state["allocation"]
    )


def from_plan(bank_, plan, fingerprint: str) -> np.ndarray:
    """Ranks from a loaded CompressionPlan; ValueError unless it was made for this model."""
    if plan.model_fingerprint != fingerprint:
        raise ValueError(
            f"the plan was made for model {plan.model_fingerprint}, the loaded model is {fingerprint}"
        )
    unknown = sorted(set(plan.matrices) - set(bank_.names))
    missing = sorted(set(bank_.names) - set(plan.matrices))
    if unknown or missing:
        raise ValueError(
            f"the plan's matrices differ from the model's (unknown {unknown[:3]}, missing {missing[:3]})"
        )
    ranks = []
    for i, name in enumerate(bank_.names):
        matrix = plan.matrices[name]
        if tuple(matrix.shape) != tuple(int(x) for x in bank_.shapes[i]):
            raise ValueError(
                f"{name}: the plan says shape {matrix.shape}, the model has {tuple(bank_.shapes[i])}"
            )
        ranks.append(bank_.full_rank[i] if matrix.rank is None else matrix.rank)
    return bank_.normalise(np.array(ranks))
