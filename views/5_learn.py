"""Learn: why scaling a matrix before truncating it helps, on a matrix small enough to see whole."""

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from sigmascale_core import toy as toys

st.title("Learn: scaling before truncating")
st.markdown(
    """
A layer computes **y = W x**. Truncated SVD keeps the top *k* singular directions of W, which is the
best rank-*k* matrix in the plain sense ‖W − W′‖. But the error that matters is on the layer's real
inputs, ‖(W − W′)X‖: a column of W that meets a loud input channel matters more than one that meets a
quiet channel. Scaling first — truncate **S_row·W·S_col**, then fold the scales back — lets the cut
follow the inputs. Scaling up the columns that meet loud channels concentrates what matters in a few
large singular values, so the spectrum the truncation sees is **steeper**, and the same rank keeps more
of what the layer does. ASVD sets the column scales from mean |x|; SVD-LLM whitens with the inputs'
covariance (the optimum for this loss); SigmaScale *learns* row and column scales by gradient descent
through the truncation.

Scaling cannot help when there is nothing to concentrate: a matrix with a **flat spectrum** fed
**isotropic** inputs. Every direction matters equally, any rank-*k* cut loses the same share, and
scales only move the error around. Try the second example.
"""
)

kind = st.radio("Example", toys.TOYS, horizontal=True, key="toy")
toy = toys.toy_problem(kind)
m, n = toy.W.shape
rank = st.slider("Rank kept k", 1, min(m, n) - 1, 2, key="toy_rank")

# the scales live in session state so the buttons can set them
for j in range(n):
    st.session_state.setdefault(f"col_{j}", 0.0)
for i in range(m):
    st.session_state.setdefault(f"row_{i}", 0.0)


def _set(cols: np.ndarray, rows: np.ndarray | None = None) -> None:
    for j, v in enumerate(cols):
        st.session_state[f"col_{j}"] = float(np.clip(np.round(v, 2), -4, 4))
    for i in range(m):
        st.session_state[f"row_{i}"] = 0.0 if rows is None else float(np.clip(np.round(rows[i], 2), -4, 4))


b = st.columns(3)
b[0].button("Identity (plain SVD)", on_click=_set, args=(np.zeros(n),), key="toy_identity")
b[1].button("ASVD scales", on_click=_set, args=(toys.asvd_log2_scales(toy),), key="toy_asvd")
if b[2].button("Learn (SigmaScale)", key="toy_learn"):
    rows, cols = toys.learned_log2_scales(toy, rank)
    cols_shift = cols - cols.mean()  # the gauge: a common shift of rows and columns changes nothing
    _set(cols_shift, rows + cols.mean())

st.markdown("**Column scales** (log₂; column j meets input channel j)")
col_sliders = st.columns(n)
col_log2 = [col_sliders[j].slider(f"c{j}", -4.0, 4.0, step=0.05, key=f"col_{j}") for j in range(n)]
with st.expander("Row scales (log₂)"):
    row_sliders = st.columns(m)
    row_log2 = [row_sliders[i].slider(f"r{i}", -4.0, 4.0, step=0.05, key=f"row_{i}") for i in range(m)]

result = toys.toy_truncation(toy, row_log2, col_log2, rank)
a, b_, c = st.columns(3)
a.metric("Plain error ‖W−W′‖² / ‖W‖²", f"{result.plain_error:.4f}")
gap = round(result.activation_error - result.optimal_activation_error, 4)  # at the metric's precision
b_.metric(
    "Activation error ‖(W−W′)X‖² / ‖WX‖²",
    f"{result.activation_error:.4f}",
    **(
        {"delta": f"{gap:+.4f}", "delta_color": "inverse", "delta_description": "vs best"}  # lower is better
        if gap
        else {"delta": "at the optimum", "delta_color": "off", "delta_arrow": "off"}
    ),
)
c.metric("Best possible at this rank (whitening)", f"{result.optimal_activation_error:.4f}")

left, right = st.columns(2)
sigma = pd.concat(
    [
        pd.DataFrame(
            {
                "spectrum": "W",
                "i": np.arange(1, len(result.sigma) + 1),
                "σ / σ₁": result.sigma / result.sigma[0],
            }
        ),
        pd.DataFrame(
            {
                "spectrum": "scaled W",
                "i": np.arange(1, len(result.scaled_sigma) + 1),
                "σ / σ₁": result.scaled_sigma / result.scaled_sigma[0],
            }
        ),
    ]
)
cut = alt.Chart(pd.DataFrame({"k": [rank + 0.5]})).mark_rule(strokeDash=[4, 3]).encode(x="k:Q")
left.markdown("**Singular values** (normalised; the dashed line is the cut)")
left.altair_chart(
    alt.Chart(sigma)
    .mark_line(point=True)
    .encode(
        x=alt.X("i:Q", title="index", axis=alt.Axis(format="d", tickMinStep=1)),
        y=alt.Y("σ / σ₁:Q", scale=alt.Scale(type="log"), axis=alt.Axis(format=".0e")),
        color=alt.Color(
            "spectrum:N",
            scale=alt.Scale(domain=["W", "scaled W"], range=["#555555", "#d62728"]),
            legend=alt.Legend(orient="bottom", labelLimit=0),
        ),
        tooltip=["spectrum", "i", alt.Tooltip("σ / σ₁:Q", format=".3e")],
    )
    + cut,
    width="stretch",
)

X = toy.X.numpy()
loud = int(np.argmax(np.abs(X).mean(0)))
other = (loud + 1) % n
col_scale = 2.0 ** np.array(col_log2)
cloud = pd.concat(
    [
        pd.DataFrame({"inputs": "x (as the layer sees them)", "a": X[:, loud], "b": X[:, other]}),
        pd.DataFrame(
            {
                "inputs": "S_col⁻¹ x (what the scaled W sees)",
                "a": X[:, loud] / col_scale[loud],
                "b": X[:, other] / col_scale[other],
            }
        ),
    ]
)
right.markdown(f"**Activation cloud**: channel {loud} (loudest) against channel {other}")
right.altair_chart(
    alt.Chart(cloud)
    .mark_circle(size=14, opacity=0.5)
    .encode(
        x=alt.X("a:Q", title=f"channel {loud}"),
        y=alt.Y("b:Q", title=f"channel {other}"),
        color=alt.Color(
            "inputs:N",
            scale=alt.Scale(range=["#d62728", "#555555"]),
            legend=alt.Legend(orient="bottom", direction="vertical", labelLimit=0),
        ),
        tooltip=["inputs", alt.Tooltip("a:Q", format=".3f"), alt.Tooltip("b:Q", format=".3f")],
    )
    .interactive(),
    width="stretch",
)
st.caption(
    "Move a column's scale and watch the activation error: raising the scale of the column that meets the "
    "loud channel makes the truncation keep it, and the activation error falls towards the whitening optimum "
    "even as the plain error rises. On the flat example nothing beats plain SVD."
)
