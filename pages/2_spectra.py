"""Spectra: where each matrix's singular values fall, before and after each method's scaling."""

import altair as alt
import pandas as pd
import streamlit as st

from pages import _shared as shared
from sigmascale_core import spectra
from sigmascale_core.metrics import effective_rank, participation_ratio
from sigmascale_core.models import MATRIX_KINDS

st.title("Spectra")
bank = shared.ready_bank()
if bank is None:
    st.stop()
cfg = shared.config()
state = shared.plan_state(bank)
numbers = bank.evaluate(state["ranks"], state["method"])

LABELS = {
    "svd": "W (plain SVD)",
    "asvd": "ASVD scaling",
    "svdllm": "whitening (SVD-LLM)",
    "sigmascale": "learned (SigmaScale)",
}
PALETTE = {"svd": "#555555", "asvd": "#1f77b4", "svdllm": "#2ca02c", "sigmascale": "#d62728"}

# -- overview heatmap ---------------------------------------------------------------------------------
st.subheader("Overview: layers × matrices")
metrics = {
    "effective rank of W / min(m, n)": lambda: spectra.effective_ranks(bank, "svd") / bank.full_rank,
    "effective rank of W": lambda: spectra.effective_ranks(bank, "svd"),
    "effective rank after whitening / min(m, n)": lambda: (
        spectra.effective_ranks(bank, "svdllm") / bank.full_rank
    ),
    f"relative loss at the current plan ({state['method']}, calibration)": lambda: numbers.loss[
        "calibration"
    ],
    f"relative loss at the current plan ({state['method']}, held-out)": lambda: numbers.loss["heldout"],
    "parameter retention of the current plan": lambda: numbers.retention,
}
metric = st.selectbox("Colour by", list(metrics), key="heatmap_metric")
values = metrics[metric]()
heat = pd.DataFrame(
    {
        "layer": bank.layers,
        "matrix": bank.kinds,
        "value": values,
        "shape": [f"{m}×{n}" for m, n in bank.shapes],
    }
)
kinds_order = [k for k in MATRIX_KINDS if k in set(bank.kinds)]
heatmap = (
    alt.Chart(heat)
    .mark_rect()
    .encode(
        x=alt.X("matrix:N", sort=kinds_order, title=None),
        y=alt.Y("layer:O", title="layer"),
        color=alt.Color("value:Q", title=None, scale=alt.Scale(scheme="viridis")),
        tooltip=["layer", "matrix", "shape", alt.Tooltip("value:Q", format=".4g", title=metric)],
    )
    .properties(height=alt.Step(16 if len(set(bank.layers.tolist())) > 8 else 28))
)
st.altair_chart(heatmap, width="stretch")

# -- one matrix -----------------------------------------------------------------------------------------
st.subheader("One matrix")
layers = sorted(set(bank.layers.tolist()))
pick_layer, pick_kind = st.columns([2, 3])
layer = pick_layer.selectbox("Layer", layers, key="spectra_layer")
kind = pick_kind.segmented_control("Matrix", kinds_order, default="q", key="spectra_kind") or "q"
i = bank.find(layer, kind)
name = bank.names[i]
m, n = (int(x) for x in bank.shapes[i])
rank = int(numbers.ranks[i])
ref_rank = spectra.reference_rank((m, n))
st.caption(
    f"`{name}` — {m}×{n}; the current plan keeps rank **{rank}**"
    f"{' (dense)' if numbers.dense[i] else ''} of {min(m, n)} ({numbers.retention[i]:.0%} of its parameters)."
)

learned = bank.spectrum(name, "sigmascale")
if learned is None:
    cols = st.columns([3, 2])
    if cols[0].button(
        f"Learn the SigmaScale scaling for this matrix (at rank {ref_rank}, retention "
        f"{spectra.REFERENCE_RETENTION:.2f}; a few seconds on CPU)",
        key="learn_one",
    ):
        try:
            shared.learn_sigmascale(cfg, bank, [name])
            learned = bank.spectrum(name, "sigmascale")
        except Exception as err:
            shared.show_error(err, "Cannot learn the SigmaScale scaling")
    if cols[1].button(f"Learn it for all {len(bank.names)} matrices (minutes on CPU)", key="learn_all"):
        try:
            shared.learn_sigmascale(cfg, bank, bank.names)
            learned = bank.spectrum(name, "sigmascale")
        except Exception as err:
            shared.show_error(err, "Cannot learn the SigmaScale scalings")
methods = ["svd", "asvd", "svdllm"] + (["sigmascale"] if learned is not None else [])
COLORS = alt.Scale(domain=[LABELS[x] for x in methods], range=[PALETTE[x] for x in methods])
st.caption(
    f"SigmaScale learns its scaling for one rank: shown here learned at rank {ref_rank} "
    f"(retention {spectra.REFERENCE_RETENTION:.2f}), then applied unchanged at every rank."
    + ("" if learned is not None else " Not learned for this matrix yet.")
)
shown = st.multiselect(
    "Spectra shown",
    [LABELS[x] for x in methods],
    default=[LABELS[x] for x in methods],
    key=f"shown_{len(methods)}",
)
normalise = st.toggle("Normalise each spectrum by its largest value", value=True, key="normalise")

spectrum_rows, energy_rows, summary = [], [], []
for method in methods:
    s = bank.spectrum(name, method)
    sigma = s.sigma
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
    summary.append(
        {
            "spectrum": LABELS[method],
            "effective rank": effective_rank(sigma),
            "participation ratio": participation_ratio(sigma),
            "energy kept at the cut": float(energy[rank - 1]) if rank >= 1 else 0.0,
            "rel. loss at the cut (calibration)": float(s.loss["calibration"][rank]),
            "rel. loss at the cut (held-out)": float(s.loss["heldout"][rank]),
        }
    )

cut = (
    alt.Chart(pd.DataFrame({"rank": [rank]}))
    .mark_rule(color="black", strokeDash=[4, 3])
    .encode(x="rank:Q", tooltip=[alt.Tooltip("rank:Q", title="current rank cut")])
)
legend = alt.selection_point(fields=["method"], bind="legend")


def _lines(frame: pd.DataFrame, y: str, title: str, log: bool, x_title: str = "index i") -> alt.Chart:
    scale = alt.Scale(type="log") if log else alt.Scale()
    return (
        alt.Chart(frame)
        .mark_line(point=alt.OverlayMarkDef(size=12))
        .encode(
            x=alt.X("index:Q", title=x_title),
            y=alt.Y(f"{y}:Q", title=title, scale=scale),
            color=alt.Color("method:N", scale=COLORS, title=None),
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
st.dataframe(pd.DataFrame(summary).set_index("spectrum").style.format("{:.4g}"), width="stretch")

# -- loss vs rank -----------------------------------------------------------------------------------------
st.markdown("**Relative activation loss ‖(W−W′ₖ)X‖² / ‖WX‖² vs rank k** — calibration and held-out tokens")
curve_rows = []
for method in methods:
    s = bank.spectrum(name, method)
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
    f"factors on other tokens (`{cfg.heldout_text}`), so a gap between the two is overfitting."
)
