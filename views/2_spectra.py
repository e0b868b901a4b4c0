"""Spectra: where each matrix's singular values fall, before and after each method's scaling, and the
spectral diagnostics users know from WeightWatcher, of W and of each method's scaled matrix.

Everything is drawn from what the compute service has ready; the rest shows as pending and fills in
on its own. The matrix on screen is computed first (`service.focus`)."""

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from sigmascale_core import spectra
from sigmascale_core.bank import reference_rank
from sigmascale_core.diagnostics import (
    DESCRIPTIONS,
    FIELDS,
    eigenvalues,
    esd_histogram,
    model_averages,
    power_law_line,
)
from sigmascale_core.metrics import effective_rank, participation_ratio
from views import _shared as shared

LABELS = {
    "svd": "W (plain SVD)",
    "asvd": "ASVD scaling",
    "svdllm": "whitening (SVD-LLM)",
    "sigmascale": "learned (SigmaScale)",
}
PALETTE = {"svd": "#555555", "asvd": "#1f77b4", "svdllm": "#2ca02c", "sigmascale": "#d62728"}
LOG_AXIS = alt.Axis(format="~e")  # one format on every log axis
DIAGNOSTIC = "a spectral diagnostic (WeightWatcher's)…"
SHOWN_FIELDS = [f for f in FIELDS if f not in ("n_rows", "n_cols")]  # what the heatmap can colour by
COMPARED = [
    "alpha",
    "alpha_sigma",
    "alpha_weighted",
    "stable_rank",
    "log_spectral_norm",
    "num_spikes",
    "mp_softrank",
]
TABLE_FIELDS = [
    "alpha",
    "alpha_weighted",
    "stable_rank",
    "log_norm",
    "log_spectral_norm",
    "log_alpha_norm",
    "num_spikes",
    "mp_softrank",
    "num_traps",
    "rand_softrank",
    "rank_loss",
    "D",
]
AVERAGED = ["alpha", "alpha_weighted", "stable_rank", "log_spectral_norm", "mp_softrank"]

st.title("Spectra")
svc = shared.service()


def _watch(snap):
    """What this page draws: the overview's coverage and the chosen matrix's results."""
    bank = snap.bank
    if bank is None:
        return (snap.state,)
    name = st.session_state.get("spectra_name")
    ready = () if name not in bank.index else (name in bank.cheap, len(bank.learned.get(name, {})))
    diagnosed = sum(len(d) for d in bank.diagnostics.values())
    ready += () if name not in bank.index else (len(bank.diagnostics.get(name, {})),)
    return (
        snap.state,
        len(bank.weights_sigma),
        len(bank.cheap) // 7,
        len(bank.learned) // 21,
        diagnosed // 28,
        ready,
    )


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
metric = st.selectbox("Colour by", [*metrics, DIAGNOSTIC], key="heatmap_metric")
if metric == DIAGNOSTIC:
    pick_field, pick_method = st.columns(2)
    field = pick_field.selectbox("Diagnostic", SHOWN_FIELDS, key="heatmap_diagnostic")
    of = pick_method.selectbox("of", list(LABELS), format_func=LABELS.get, key="heatmap_diagnostic_of")
    st.caption(f"**{field}**: {DESCRIPTIONS[field]}")
    values = bank.diagnostic(field, of)
else:
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
    pd.DataFrame(summary).set_index("spectrum"),
    column_config={
        c: st.column_config.NumberColumn(format="%.4g") for row in summary for c in row if c != "spectrum"
    },
    width="stretch",
)

# -- loss vs rank -----------------------------------------------------------------------------------------
with_curves = [x for x in available if bank.spectrum(name, x, rank) is not None]
if not with_curves:
    st.info("The loss curves need the calibration statistics of this layer: they appear here when ready.")
else:
    st.markdown(
        "**Relative activation loss ‖(W−W′ₖ)X‖² / ‖WX‖² vs rank k** — calibration and held-out tokens"
    )
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
            chart = (
                _lines(part.rename(columns={"rank": "index"}), "loss", "relative loss", True, "rank k") + cut
            )
            col.altair_chart(chart.interactive(), width="stretch")
    st.caption(
        "Every method's scaling is fitted on the calibration tokens; the held-out curve measures the same "
        f"factors on other tokens (`{shared.config().heldout_text}`), so a gap between the two is overfitting."
    )

# -- spectral diagnostics of this matrix ------------------------------------------------------------------
st.subheader("Spectral diagnostics (WeightWatcher's)")
st.caption(
    "The empirical spectral density (ESD) is the histogram of the eigenvalues λ = σ² of WᵀW — or of the "
    "scaled matrix a method truncates. A heavy power-law tail (alpha 2–6) is what training leaves; noise "
    "stays inside the Marchenko–Pastur bulk. Scaled matrices show how the activations change that picture."
)
diagnosed = [x for x in LABELS if bank.has_diagnostics(name, x)]
if not diagnosed:
    st.info("The diagnostics of this matrix are being computed: they appear here when ready.")
else:
    esd_method = st.segmented_control(
        "ESD of", diagnosed, default=diagnosed[0], format_func=LABELS.get, key=f"esd_{'-'.join(diagnosed)}"
    )
    esd_method = esd_method or diagnosed[0]
    values = bank.diagnostics[name][esd_method]
    # the diagnostics describe SigmaScale's scaling learned at the reference rank (the service's)
    learned_at = reference_rank((m, n), svc.config.reference_retention)
    sigma = (
        bank.spectrum(name, "sigmascale", learned_at).sigma
        if esd_method == "sigmascale"
        else bank.sigma(name, esd_method)
    )
    lam = eigenvalues(sigma)
    edges, _, density = esd_histogram(lam, bins=60)
    bars = pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "density": density})
    bars = bars[bars["density"] > 0]
    floor = float(bars["density"].min()) / 2
    bars["floor"] = floor
    x_scale = alt.Scale(type="log", nice=False)
    y_scale = alt.Scale(type="log", nice=False)
    histogram = (
        alt.Chart(bars)
        .mark_rect(color=PALETTE[esd_method], opacity=0.6)
        .encode(
            x=alt.X("lo:Q", title="eigenvalue λ = σ²", scale=x_scale, axis=LOG_AXIS),
            x2="hi:Q",
            y=alt.Y("density:Q", title="density", scale=y_scale, axis=LOG_AXIS),
            y2="floor:Q",
            tooltip=[
                alt.Tooltip("lo:Q", format=".3g", title="from λ"),
                alt.Tooltip("hi:Q", format=".3g", title="to λ"),
                alt.Tooltip("density:Q", format=".3g"),
            ],
        )
    )
    positive = int((lam > 0).sum())  # the histogram's normalisation
    line_x, line_y = power_law_line(values["alpha"], values["xmin"], int(values["n_tail"]), positive, lam[-1])
    fit = pd.DataFrame({"lo": line_x, "density": line_y})
    fit = fit[fit["density"] >= floor]
    power_law = (
        alt.Chart(fit)
        .mark_line(color="black", strokeWidth=2)
        .encode(x="lo:Q", y="density:Q", tooltip=[alt.Tooltip("density:Q", format=".3g")])
    )
    rules = pd.DataFrame(
        {
            "lo": [values["lambda_plus"], values["xmin"]],
            "what": ["Marchenko–Pastur bulk edge λ₊", "power-law xmin"],
        }
    )
    edge = (
        alt.Chart(rules)
        .mark_rule(strokeWidth=2, strokeDash=[5, 3])
        .encode(
            x="lo:Q",
            color=alt.Color(
                "what:N",
                title=None,
                scale=alt.Scale(range=["#d62728", "#555555"]),
                legend=alt.Legend(orient="bottom", labelLimit=400),
            ),
            tooltip=["what", alt.Tooltip("lo:Q", format=".4g", title="λ")],
        )
    )
    learned_note = f", learned at rank {learned_at}" if esd_method == "sigmascale" else ""
    st.markdown(
        f"**ESD of {LABELS[esd_method]}{learned_note}** (log–log) with the fitted power law "
        f"p(λ) ∝ λ^−{values['alpha']:.2f} from xmin (black)"
    )
    chart = (histogram + power_law + edge).properties(height=320)
    st.altair_chart(chart.interactive(), width="stretch")
    st.markdown("**How the activations move them**: W against each scaled matrix (this matrix)")
    comparison = pd.DataFrame(
        {LABELS[x]: [bank.diagnostics[name][x][f] for f in COMPARED] for x in diagnosed}, index=COMPARED
    )
    comparison["meaning"] = [DESCRIPTIONS[f] for f in COMPARED]
    st.dataframe(
        comparison,
        width="stretch",
        column_config={x: st.column_config.NumberColumn(format="%.4g") for x in comparison.columns[:-1]},
    )
    flags = {LABELS[x]: bank.diagnostics[name][x] for x in diagnosed}
    warnings = [
        f"{label}: {('under' if d['under_trained'] else 'over')}-trained"
        for label, d in flags.items()
        if d["under_trained"] or d["over_trained"]
    ]
    st.caption(
        "WeightWatcher's flags — "
        + ("; ".join(warnings) if warnings else "none (alpha between 2 and 6 everywhere)")
        + f". {DESCRIPTIONS['under_trained']} {DESCRIPTIONS['over_trained']}"
    )

# -- spectral diagnostics of every matrix -------------------------------------------------------------------
st.subheader("Diagnostics of every matrix")
table_method = st.selectbox("Diagnostics of", list(LABELS), format_func=LABELS.get, key="diagnostics_of")
rows = bank.diagnostic_rows([table_method])
if not rows:
    st.info(f"No diagnostics of {LABELS[table_method]} yet: they fill in as the results are computed.")
else:
    averages = model_averages(rows)
    columns = st.columns(len(AVERAGED) + 2)
    for col, field in zip(columns, AVERAGED, strict=False):
        col.metric(f"mean {field}", f"{averages[field]:.3g}", help=DESCRIPTIONS[field])
    columns[-2].metric(
        "under-trained",
        f"{sum(r['under_trained'] for r in rows)}/{len(rows)}",
        help=DESCRIPTIONS["under_trained"],
    )
    columns[-1].metric(
        "over-trained",
        f"{sum(r['over_trained'] for r in rows)}/{len(rows)}",
        help=DESCRIPTIONS["over_trained"],
    )
    table = pd.DataFrame(rows)[["matrix", "layer", "kind", *TABLE_FIELDS, "warning"]]
    st.dataframe(
        table,
        width="stretch",
        hide_index=True,
        column_config={
            f: st.column_config.NumberColumn(f, help=DESCRIPTIONS[f], format="%.4g") for f in TABLE_FIELDS
        }
        | {"warning": st.column_config.TextColumn("warning", help="WeightWatcher's flag: alpha > 6 or < 2.")},
    )
    if len(rows) < len(bank.names):
        st.caption(f"{len(rows)} of {len(bank.names)} matrices ready; the rest fill in as they are computed.")
