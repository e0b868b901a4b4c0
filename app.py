"""SigmaScale's app: `streamlit run app.py`. Explore spectra, hand-tune ranks, run a compression.

The pages are thin views over sigmascale_core (see views/): nothing loads until a page needs it, so the
app starts in a second, on the bundled model with no configuration.
"""

import streamlit as st

st.set_page_config(page_title="SigmaScale", page_icon=":material/compress:", layout="wide")

PAGES = [
    st.Page(
        "views/1_model.py", title="Model & data", icon=":material/database:", url_path="model", default=True
    ),
    st.Page("views/2_spectra.py", title="Spectra", icon=":material/show_chart:", url_path="spectra"),
    st.Page("views/3_ranks.py", title="Ranks", icon=":material/tune:", url_path="ranks"),
    st.Page("views/4_run.py", title="Run", icon=":material/rocket_launch:", url_path="run"),
    st.Page("views/5_learn.py", title="Learn", icon=":material/school:", url_path="learn"),
]

st.navigation(PAGES).run()
