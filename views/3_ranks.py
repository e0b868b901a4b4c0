"""Ranks: the plan as an editable table; every edit updates the totals from the cached loss curves."""

import json

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from sigmascale_core.allocation import allocate_ranks, damage_curves
from sigmascale_core.methods import METHODS
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.progress import format_seconds
from views import _shared as shared

st.title("Ranks")
snap = shared.ready_snapshot()
if snap is None:
    st.stop()
bank, svc = snap.bank, shared.service()
state = shared.plan_state(snap)
layers, kinds, _ = bank.grid(np.zeros(len(bank.names)))


def _plan_ranks() -> np.ndarray:
    return bank.rank_array(state["plan"])


def _edit(ranks: np.ndarray, allocation: str, target: float | None = None) -> None:
    shared.set_plan(state, state["plan"].edited(bank.plan_ranks(ranks), allocation, target))


# -- callbacks (run before the rerun that follows a click) ---------------------------------------------
def _set_method() -> None:
    shared.set_plan(state, state["plan"].with_method(st.session_state["plan_method"]))


def _uniform() -> None:
    retention = float(st.session_state["uniform_retention"])
    _edit(bank.ranks_for_retention(retention), "uniform", retention)


PROXY, PROBE = "loss curves (proxy, instant)", "perplexity probe"


def _allocate() -> None:
    """Same budget as the uniform retention, spent by allocation.allocate_ranks (greedy) on the chosen
    sensitivity: the cached loss curves of the plan's method, or the perplexity probe when it was run."""
    retention = float(st.session_state["uniform_retention"])
    try:
        if st.session_state.get("sensitivity_source") == PROBE:
            curves = damage_curves(shared.probe_table(shared.config()))
        else:
            curves = bank.damage_curves(state["plan"].method)
        ranks = bank.ranks_of(allocate_ranks(curves, retention, "greedy"))
    except Exception as err:  # shown on the next run, never a traceback
        st.session_state["preset_error"] = f"{type(err).__name__}: {err}"
        return
    _edit(ranks, "greedy", retention)


def _undo() -> None:
    shared.undo(state)


def _reset() -> None:
    shared.set_plan(state, state["initial"])


def _layer_retention(layer: int, after: np.ndarray) -> float:
    """A layer's parameter retention as its slider shows it (two decimals, within the slider's range),
    from the parameters each matrix keeps (`bank.ranks_after` of the plan's ranks)."""
    rows = bank.layers == layer
    return round(min(max(float(after[rows].sum() / bank.params_before[rows].sum()), 0.01), 1.0), 2)


def _layer_slider(layer: int, key: str, version: int) -> None:
    """Sets every matrix of the layer to the slider's retention. The browser reports values of sliders
    it drew for an older plan (a collapsed expander's sliders keep their old value) and a fresh slider's
    own drawn value: neither is a move by the user, and neither changes anything."""
    if version != state["version"]:  # drawn before the plan last changed: a stale report
        return
    value = float(st.session_state[key])
    ranks = _plan_ranks()
    if abs(value - _layer_retention(layer, bank.ranks_after(ranks))) < 0.005:
        return
    rows = bank.layers == layer
    ranks[rows] = bank.ranks_for_retention(value)[rows]
    _edit(ranks, "table")


def _number(x: float, fmt: str = ".5f") -> str:
    return "pending" if not np.isfinite(x) else format(x, fmt)


# -- the live part: edits rerun only this fragment --------------------------------------------------------
def _cell_rank(i: int, unit: str, value: object) -> int:
    """The rank a table cell asks for; ValueError with the cell's name when it is not usable."""
    name = f"layer {bank.layers[i]} {bank.kinds[i]}"
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is not a number") from None
    if not np.isfinite(x):
        raise ValueError(f"{name}: {value!r} is not a number")
    if unit == "retention":
        if not 0 < x <= 1:
            raise ValueError(f"{name}: retention must be in (0, 1], got {x:g}")
        return int(bank.ranks_for_retention(x)[i])
    if x != int(x) or not 1 <= x <= bank.full_rank[i]:
        raise ValueError(f"{name}: rank must be a whole number in [1, {bank.full_rank[i]}], got {x:g}")
    return int(x)


def _apply_edits(unit: str, key: str) -> None:
    edits = (st.session_state.get(key) or {}).get("edited_rows") or {}
    if not edits:
        return
    ranks, errors = _plan_ranks(), []
    for row, cells in edits.items():
        for kind, value in cells.items():
            try:
                i = bank.find(layers[int(row)], kind)
                ranks[i] = _cell_rank(i, unit, value)
            except (ValueError, IndexError) as err:
                errors.append(str(err))
    st.session_state.pop(key, None)
    if errors:
        st.session_state["edit_errors"] = errors
    _edit(ranks, "table")


def controls() -> None:
    """Method, presets, undo and reset: inside the fragment, so Undo enables with the edit that made it."""
    plan = state["plan"]
    top = st.columns([2, 3, 2, 2, 1, 1], vertical_alignment="bottom")
    top[0].selectbox(
        "Method",
        METHODS,
        index=METHODS.index(plan.method),
        key="plan_method",
        on_change=_set_method,
        help="the decomposition the run will use; the totals read this method's own loss curves",
    )
    top[1].slider("Uniform retention", 0.05, 1.0, shared.DEFAULT_RETENTION, 0.01, key="uniform_retention")
    top[2].button(
        "Uniform",
        on_click=_uniform,
        key="preset_uniform",
        width="stretch",
        help="every matrix keeps this retention",
    )
    top[3].button(
        "Allocate",
        on_click=_allocate,
        key="preset_sensitivity",
        width="stretch",
        help="the uniform retention's parameter budget (within one rank), spent where the sensitivity "
        "(below) says it buys the most: allocation.allocate_ranks, greedy",
    )
    top[4].button("Undo", on_click=_undo, key="undo", disabled=not state["history"], width="stretch")
    top[5].button("Reset", on_click=_reset, key="reset", width="stretch")


def pending_note(numbers, method: str) -> str:
    """Says how many matrices the totals cover, and queues relearns where sigmascale is read far away."""
    note = ""
    if numbers.pending:
        what = "learned" if method == "sigmascale" else "computed"
        note = (
            f" **{method} curves {what} for {len(bank.names) - numbers.pending}/{len(bank.names)} matrices, "
            f"{numbers.pending} pending**: the losses and ranks above cover the ready ones only."
        )
    if method == "sigmascale":
        far = numbers.approximate
        if far.any():
            svc.request_learned([(bank.names[i], int(numbers.ranks[i])) for i in np.flatnonzero(far)])
            note += (
                f" {int(far.sum())} matrices sit far from the rank their scaling was learned at: their "
                "curves are an approximation there, and relearns at the new ranks are queued."
            )
    return note


def _pending() -> bool:
    """Whether the plan's method still has curves to come (then the numbers refresh on their own)."""
    return not bank.ready(state["plan"].method).all()


@st.fragment(run_every=2.0 if _pending() else None)
def totals() -> None:
    """The plan's totals, refreshed on their own while curves are still coming: a fragment of their own,
    holding no widget, so the timer never redraws the table or the sliders under the user's hand."""
    if _pending() == _drawn_complete:  # the last curves landed, or another method was chosen: one full
        st.rerun()  # rerun starts or stops the timer
    plan = state["plan"]
    numbers = bank.evaluate(_plan_ranks(), plan.method)
    cols = st.columns(6)
    cols[0].metric(
        "Params kept",
        f"{numbers.parameter_retention:.2%}",
        help="parameter retention: target linears after / before",
    )
    cols[1].metric(
        "Model kept",
        f"{numbers.model_retention:.2%}",
        help="whole-model retention: embeddings and norms included",
    )
    cols[2].metric(
        "Loss (calib.)",
        _number(numbers.mean_loss("calibration")),
        help="mean relative loss on calibration tokens",
    )
    cols[3].metric(
        "Loss (held-out)", _number(numbers.mean_loss("heldout")), help="mean relative loss on held-out tokens"
    )
    cols[4].metric(
        "Eff. rank kept",
        _number(numbers.mean(numbers.effective_rank), ".1f"),
        help="mean effective rank of the kept singular values",
    )
    cols[5].metric("Energy kept", _number(numbers.mean(numbers.energy), ".4f"), help="mean share of Σσ² kept")
    note = pending_note(numbers, plan.method)
    st.caption(
        f"{int((~numbers.dense).sum())} of {len(bank.names)} matrices compressed, "
        f"{int(numbers.dense.sum())} dense; allocation: {plan.allocation}. Relative loss "
        f"‖(W−W′)X‖²/‖WX‖² per matrix from the cached loss curves, nothing recomputed.{note}"
    )


@st.fragment
def live() -> None:
    # the table's edits first, so everything drawn below (Undo included) reflects them
    unit = st.session_state.get("unit", "retention")
    _apply_edits(unit, f"editor_{state['version']}_{unit}")
    controls()
    if message := st.session_state.pop("preset_error", None):
        st.error(f"Cannot allocate: {message}")
    unit = st.radio("Edit as", ["retention", "rank"], horizontal=True, key="unit")
    for message in st.session_state.pop("edit_errors", []):
        st.error(f"Edit ignored — {message}")
    plan = state["plan"]
    ranks = _plan_ranks()
    numbers = bank.evaluate(ranks, plan.method)

    totals()

    values = numbers.retention if unit == "retention" else numbers.ranks.astype(float)
    _, _, grid = bank.grid(values)
    table = pd.DataFrame(grid, index=pd.Index(layers, name="layer"), columns=kinds)
    if unit == "retention":
        config = {
            k: st.column_config.NumberColumn(k, min_value=0.01, max_value=1.0, step=0.01, format="%.3f")
            for k in kinds
        }
    else:
        table = table.astype("Int64")
        config = {k: st.column_config.NumberColumn(k, min_value=1, step=1, format="%d") for k in kinds}
    st.download_button(
        "Save plan (JSON)",
        json.dumps(plan.to_dict(), indent=2),
        file_name="sigmascale_plan.json",
        mime="application/json",
        key="save_plan",
        help="the CompressionPlan the CLI takes: sigmascale compress --plan sigmascale_plan.json",
    )
    st.data_editor(table, column_config=config, key=f"editor_{state['version']}_{unit}", width="stretch")

    with st.expander("Per-layer sliders (set every matrix of a layer to one retention)"):
        per_layer = st.columns(3)
        after = bank.ranks_after(ranks)
        for j, layer in enumerate(layers):
            key = f"layer_{state['version']}_{layer}"  # a fresh slider for each version of the plan
            per_layer[j % 3].slider(
                f"layer {layer}",
                0.01,
                1.0,
                _layer_retention(layer, after),
                0.01,
                key=key,
                on_change=_layer_slider,
                args=(layer, key, state["version"]),
            )

    chart_data = pd.DataFrame(
        {
            "layer": bank.layers,
            "matrix": bank.kinds,
            "retention": numbers.retention,
            "rank": numbers.ranks,
            "loss": numbers.loss["calibration"],
        }
    )
    left, right = st.columns(2)
    left.markdown("**Allocation** (parameter retention per matrix)")
    left.altair_chart(
        alt.Chart(chart_data)
        .mark_rect()
        .encode(
            x=alt.X("matrix:N", sort=kinds, title=None, axis=alt.Axis(labelAngle=0)),
            y=alt.Y("layer:O"),
            color=alt.Color("retention:Q", scale=alt.Scale(domain=[0, 1], scheme="blues")),
            tooltip=[
                "layer",
                "matrix",
                "rank",
                alt.Tooltip("retention:Q", format=".3f"),
                alt.Tooltip("loss:Q", format=".4g"),
            ],
        )
        .properties(height=alt.Step(12 if len(layers) > 8 else 28)),
        width="stretch",
    )
    right.markdown("**Relative loss per matrix** (calibration)")
    right.altair_chart(
        alt.Chart(chart_data)
        .mark_bar()
        .encode(
            x=alt.X("layer:O"),
            y=alt.Y("sum(loss):Q", title="Σ relative loss"),
            color=alt.Color("matrix:N", sort=kinds),
            tooltip=["layer", "matrix", alt.Tooltip("loss:Q", format=".4g")],
        )
        .properties(height=300),
        width="stretch",
    )
    with st.expander("Per-matrix numbers"):
        st.dataframe(
            pd.DataFrame(
                {
                    "matrix": bank.names,
                    "shape": [f"{m}×{n}" for m, n in bank.shapes],
                    "rank": numbers.ranks,
                    "dense": numbers.dense,
                    "retention": numbers.retention,
                    "rel. loss (calibration)": numbers.loss["calibration"],
                    "rel. loss (held-out)": numbers.loss["heldout"],
                    "eff. rank kept": numbers.effective_rank,
                    "energy kept": numbers.energy,
                }
            ),
            hide_index=True,
            width="stretch",
        )


_drawn_complete = not _pending()
live()

# -- load a plan, sensitivity source ------------------------------------------------------------------------
probe = shared.probe_table(shared.config())
sources = [PROXY] + ([PROBE] if probe is not None else [])
with st.expander("Sensitivity for the allocated preset"):
    st.selectbox("Sensitivity from", sources, key="sensitivity_source")
    st.caption(
        "The proxy reads each matrix's cached relative-loss curve (every matrix counts the same). The "
        "perplexity probe truncates one matrix at a time and measures the model's perplexity on a "
        "calibration-side text: slow on CPU (hours for the bundled model), cached and resumable."
    )
    running = shared.active_probe(shared.config())
    if running is not None:
        progress = running.progress()
        st.progress(
            progress.fraction if progress else 0.0,
            text=f"Probing in the background ({running.status}): "
            + (
                f"{progress.stage} {progress.done}/{progress.total}, about {format_seconds(progress.eta)} left"
                if progress
                else "starting"
            )
            + " — follow or cancel it on the Run page.",
        )
    elif probe is None and st.button("Run the perplexity probe in the background", key="run_probe"):
        try:
            shared.start_probe(shared.config())
            st.rerun()
        except ValueError as err:
            shared.show_error(err, "Cannot start the probe")

upload = st.file_uploader("Load a plan (JSON)", type=["json"], key="plan_upload")
if upload is not None and st.session_state.get("plan_loaded_from") != upload.file_id:
    st.session_state["plan_loaded_from"] = upload.file_id
    try:
        loaded_plan = CompressionPlan.from_dict(json.loads(upload.getvalue().decode("utf-8")))
        fingerprint = snap.loaded.fingerprint
        if loaded_plan.model_fingerprint != fingerprint:
            raise ValueError(
                f"the plan was made for model {loaded_plan.model_fingerprint}, the loaded model is {fingerprint}"
            )
        bank.rank_array(loaded_plan)  # the matrices and shapes must be this model's
    except (ValueError, UnicodeDecodeError) as err:
        st.error(f"Cannot load {upload.name}: {err}")
    else:
        shared.set_plan(state, loaded_plan)
        st.session_state.pop("plan_method", None)
        st.success(
            f"Loaded {upload.name}: {loaded_plan.method}, {loaded_plan.parameter_retention():.2%} retention."
        )
        st.rerun()
