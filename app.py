"""SigmaScale's app: `streamlit run app.py`. Explore spectra, hand-tune ranks, run a compression.

The pages are thin views over sigmascale_core (see pages/): nothing loads until a page needs it, so the
app starts in a second, on the bundled model with no configuration.
"""

import streamlit as st

st.set_page_config(page_title="SigmaScale", page_icon="σ", layout="wide")

PAGES = [
    st.Page("pages/1_model.py", title="Model & data", icon="📦", url_path="model", default=True),
    st.Page("pages/2_spectra.py", title="Spectra", icon="📉", url_path="spectra"),
    st.Page("pages/3_ranks.py", title="Ranks", icon="🎚️", url_path="ranks"),
    st.Page("pages/4_run.py", title="Run", icon="🚀", url_path="run"),
    st.Page("pages/5_learn.py", title="Learn", icon="🎓", url_path="learn"),
]

st.navigation(PAGES).run()
