"""Spectra: where each matrix's singular values fall, before and after each method's scaling.

Everything is drawn from what the compute service has ready; the rest shows as pending and fills in
on its own. The matrix on screen is computed first (`service.focus`)."""

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from pages import _shared as shared
from sigmascale_core import spectra
from sigmascale_core.metrics import effective_rank, participation_ratio

LABELS = {
    "svd": "W (plain SVD)",
    "asvd": "ASVD scaling",
    "svdllm": "whitening (SVD-LLM)",
    "sigmascale": "learned (SigmaScale)",
}
PALETTE = {"svd": "#555555", "asvd": "#1f77b4", "svdllm": "#2ca02c", "sigmascale": "#d62728"}
LOG_AXIS = alt.Axis(format="~e")  # one format on every log axis

st.title("Spectra")
svc = shared.service()


def _watch(snap):
    """What this page draws: the overview's coverage and the chosen matrix's results."""
    bank = snap.bank
    if bank is None:
        return (snap.state,)
    name = st.session_state.get("spectra_name")
    ready = () if name not in bank.index else (name in bank.cheap, len(bank.learned.get(name, {})))
    return snap.state, len(bank.weights_sigma), len(bank.cheap) // 7, len(bank.learned) // 21, ready


snap = shared.ready_snapshot(_watch)
if snap is None:
    st.stop()
bank = snap.bank
state = shared.plan_state(snap)
plan = state["plan"]
ranks = bank.rank_array(plan)
numbers = bank.evaluate(ranks, plan.method)
kinds_order = bank.kind_order()

# -- overview heatmap ---------------------------------------------------------------------------------
st.subheader("Overview: layers × matrices")
metrics = {
    "effective rank of W / min(m, n)": lambda: bank.effective_ranks("svd") / bank.full_rank,
    "effective rank of W": lambda: bank.effective_ranks("svd"),
    "effective rank after whitening / min(m, n)": lambda: bank.effective_ranks("svdllm") / bank.full_rank,
    "effective rank after learned scaling / min(m, n)": lambda: (
        bank.effective_ranks("sigmascale") / bank.full_rank
    ),
    f"relative loss at the plan ({plan.method}, calibration)": lambda: numbers.loss["calibration"],
    f"relative loss at the plan ({plan.method}, held-out)": lambda: numbers.loss["heldout"],
    "parameter retention of the plan": lambda: numbers.retention,
}
metric = st.selectbox("Colour by", list(metrics), key="heatmap_metric")
values = metrics[metric]()
ready = np.isfinite(values)
heat = pd.DataFrame(
    {
        "layer": bank.layers,
        "matrix": bank.kinds,
        "value": np.where(ready, values, np.nan),
        "shape": [f"{m}×{n}" for m, n in bank.shapes],
    }
)
heatmap = (
    alt.Chart(heat)
    .mark_rect()
    .encode(
        x=alt.X("matrix:N", sort=kinds_order, title=None, axis=alt.Axis(labelAngle=0, orient="top")),
        y=alt.Y("layer:O", title="layer"),
        color=alt.Color("value:Q", title=None, scale=alt.Scale(scheme="viridis")),
        tooltip=["layer", "matrix", "shape", alt.Tooltip("value:Q", format=".4g", title="value")],
    )
    .properties(height=alt.Step(16 if len(set(bank.layers.tolist())) > 8 else 28))
)
st.altair_chart(heatmap, width="stretch")
if not ready.all():
    st.caption(
        f"{int(ready.sum())} of {len(ready)} matrices ready; the blank cells fill in as they are computed."
    )

# -- one matrix -----------------------------------------------------------------------------------------
st.subheader("One matrix")
layers = sorted(set(bank.layers.tolist()))
pick_layer, pick_kind = st.columns([2, 3])
layer = pick_layer.selectbox("Layer", layers, key="spectra_layer")
kind = pick_kind.segmented_control("Matrix", kinds_order, default=kinds_order[0], key="spectra_kind")
kind = kind or kinds_order[0]
i = bank.find(layer, kind)
name = bank.names[i]
st.session_state["spectra_name"] = name
svc.focus(name)
m, n = (int(x) for x in bank.shapes[i])
rank = int(numbers.ranks[i])
st.caption(
    f"`{name}` — {m}×{n}; the plan keeps rank **{rank}**{' (dense)' if numbers.dense[i] else ''} of "
    f"{min(m, n)} ({numbers.retention[i]:.0%} of its parameters). The dashed line marks that rank."
)

learned = bank.spectrum(name, "sigmascale", rank)
available = [x for x in ("svd", "asvd", "svdllm", "sigmascale") if bank.sigma(name, x) is not None]
pending = [LABELS[x] for x in LABELS if x not in available]
if pending:
    st.info(f"Computing next (this matrix jumps the queue): {', '.join(pending)}.")
if not available:
    st.stop()  # the status panel reruns the page as soon as this matrix's first spectrum lands
if learned is not None:
    st.caption(
        f"SigmaScale learned its scaling for this matrix at rank {learned.rank}, then applies it unchanged "
        "at every rank"
        + (" — an approximation at the plan's rank; a relearn is queued." if numbers.approximate[i] else ".")
    )
    if numbers.approximate[i]:
        svc.request_learned([(name, rank)])
COLORS = alt.Scale(domain=[LABELS[x] for x in available], range=[PALETTE[x] for x in available])
shown = st.multiselect(
    "Spectra shown",
    [LABELS[x] for x in available],
    default=[LABELS[x] for x in available],
    key=f"shown_{'-'.join(available)}",
)
normalise = st.toggle("Normalise each spectrum by its largest value", value=True, key="normalise")

spectrum_rows, energy_rows, summary = [], [], []
for method in available:
    sigma = bank.sigma(name, method) if method != "sigmascale" else learned.sigma
    energy = spectra.cumulative_energy(sigma)
    keep = spectra.downsample_indices(len(sigma))
    scale = sigma[0] if normalise and sigma[0] > 0 else 1.0
    if LABELS[method] in shown:
        spectrum_rows.append(
            pd.DataFrame({"method": LABELS[method], "index": keep + 1, "sigma": sigma[keep] / scale})
        )
        energy_rows.append(
            pd.DataFrame({"method": LABELS[method], "index": keep + 1, "energy": energy[keep]})
        )
    s = bank.spectrum(name, method, rank)
    row = {
        "spectrum": LABELS[method],
        "effective rank": effective_rank(sigma),
        "participation ratio": participation_ratio(sigma),
        "energy kept at the cut": float(energy[rank - 1]) if rank >= 1 else 0.0,
    }
    if s is not None:
        row["rel. loss at the cut (calibration)"] = float(s.loss["calibration"][rank])
        row["rel. loss at the cut (held-out)"] = float(s.loss["heldout"][rank])
    summary.append(row)

cut = (
    alt.Chart(pd.DataFrame({"rank": [rank]}))
    .mark_rule(color="black", strokeDash=[4, 3])
    .encode(x="rank:Q", tooltip=[alt.Tooltip("rank:Q", title="the plan's rank")])
)
legend = alt.selection_point(fields=["method"], bind="legend")


def _lines(frame: pd.DataFrame, y: str, title: str, log: bool, x_title: str = "index i") -> alt.Chart:
    # log axes end at the data (a relative loss tops out at 1: no "nice" decade up to 10)
    scale = alt.Scale(type="log", nice=False) if log else alt.Scale()
    axis = LOG_AXIS if log else alt.Axis()
    return (
        alt.Chart(frame)
        .mark_line(point=alt.OverlayMarkDef(size=12))
        .encode(
            x=alt.X("index:Q", title=x_title, axis=alt.Axis(format="d")),
            y=alt.Y(f"{y}:Q", title=title, scale=scale, axis=axis),
            color=alt.Color(
                "method:N", scale=COLORS, title=None, legend=alt.Legend(orient="bottom", columns=2)
            ),
            opacity=alt.condition(legend, alt.value(1.0), alt.value(0.15)),
            tooltip=["method", "index", alt.Tooltip(f"{y}:Q", format=".4g")],
        )
        .add_params(legend)
    )


left, right = st.columns(2)
if spectrum_rows:
    frame = pd.concat(spectrum_rows)
    frame = frame[frame["sigma"] > 0]
    left.markdown("**Singular values** (log scale; drag to pan, scroll to zoom, click the legend)")
    left.altair_chart(
        (_lines(frame, "sigma", "σᵢ / σ₁" if normalise else "σᵢ", True) + cut).interactive(), width="stretch"
    )
    right.markdown("**Cumulative energy**: the share of Σσ² in the first i values")
    right.altair_chart(
        (_lines(pd.concat(energy_rows), "energy", "energy", False) + cut).interactive(), width="stretch"
    )
else:
    st.info("Choose at least one spectrum to show.")

st.markdown("**Shape of each spectrum** (lower effective rank = steeper = cheaper to truncate)")
st.dataframe(
    pd.DataFrame(summary).set_index("spectrum").style.format("{:.4g}", na_rep="pending"), width="stretch"
)

# -- loss vs rank -----------------------------------------------------------------------------------------
with_curves = [x for x in available if bank.spectrum(name, x, rank) is not None]
if not with_curves:
    st.info("The loss curves need the calibration statistics of this layer: they appear here when ready.")
    st.stop()
st.markdown("**Relative activation loss ‖(W−W′ₖ)X‖² / ‖WX‖² vs rank k** — calibration and held-out tokens")
curve_rows = []
for method in with_curves:
    s = bank.spectrum(name, method, rank)
    for split, title in (("calibration", "calibration"), ("heldout", "held-out")):
        curve = s.loss[split]
        keep = spectra.downsample_indices(len(curve))
        curve_rows.append(
            pd.DataFrame({"method": LABELS[method], "split": title, "rank": keep, "loss": curve[keep]})
        )
curves = pd.concat(curve_rows)
curves = curves[(curves["loss"] > 0) & curves["method"].isin(shown)]
cols = st.columns(2)
for col, title in zip(cols, ("calibration", "held-out"), strict=True):
    part = curves[curves["split"] == title]
    col.caption(f"measured on {title} tokens")
    if len(part):
        chart = _lines(part.rename(columns={"rank": "index"}), "loss", "relative loss", True, "rank k") + cut
        col.altair_chart(chart.interactive(), width="stretch")
st.caption(
    "Every method's scaling is fitted on the calibration tokens; the held-out curve measures the same "
    f"factors on other tokens (`{shared.config().heldout_text}`), so a gap between the two is overfitting."
)
