"""The Spectra page's spectral diagnostics (AppTest on a tiny random Llama): the ESD chart, the W vs
scaled comparison, the every-matrix table with its averages, and the heatmap coloured by a diagnostic."""

import json
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest
from tiny import save_tiny_model, write_text

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180


@pytest.fixture
def app(tmp_path, monkeypatch):
    """app.py on a tiny Llama (bundled tokenizer) with small file: texts and its own cache."""
    import streamlit as st

    save_tiny_model(tmp_path / "tiny")
    defaults = {
        "model": str(tmp_path / "tiny"),
        "device": "cpu",
        "text": write_text(tmp_path / "cal.txt", 1),
        "samples": 4,
        "seq_len": 32,
        "heldout_text": write_text(tmp_path / "held.txt", 2),
        "heldout_samples": 2,
        "evaluation": [write_text(tmp_path / "eval.txt", 3)],
        "max_eval_tokens": 256,
    }
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SIGMASCALE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SIGMASCALE_APP_DEFAULTS", json.dumps(defaults))
    st.cache_resource.clear()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    return at


def spectra_page_when_idle(at: AppTest) -> AppTest:
    from views import _shared as shared

    shared.service(shared.defaults()).wait_until(lambda s: s.state == "idle", TIMEOUT)
    at.switch_page("views/2_spectra.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def chart_data(at: AppTest) -> list[pd.DataFrame]:
    """Every dataset of every chart on the page (what the browser would draw)."""
    from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df

    charts = at.get("vega_lite_chart")
    return [convert_arrow_bytes_to_pandas_df(d.data.data) for c in charts for d in c.proto.datasets]


def chart_titles(at: AppTest) -> str:
    return " ".join(
        json.dumps(json.loads(c.proto.spec), ensure_ascii=False) for c in at.get("vega_lite_chart")
    )


def test_spectra_page_shows_the_esd_and_the_diagnostics_table(app):
    at = spectra_page_when_idle(app)
    assert "eigenvalue λ = σ²" in chart_titles(at)  # the ESD histogram
    rules = next(d for d in chart_data(at) if "what" in d.columns)
    assert "Marchenko–Pastur bulk edge λ₊" in set(rules["what"])
    frames = {tuple(d.value.columns)[:3]: d.value for d in at.dataframe}
    table = frames[("matrix", "layer", "kind")]
    assert len(table) == 14 and {"alpha", "stable_rank", "num_spikes", "warning"} <= set(table.columns)
    assert table["alpha"].notna().all()
    comparison = next(d.value for d in at.dataframe if "meaning" in d.value.columns)
    assert list(comparison.columns[:4]) == [
        "W (plain SVD)",
        "ASVD scaling",
        "whitening (SVD-LLM)",
        "learned (SigmaScale)",
    ]
    assert "alpha" in comparison.index and "stable_rank" in comparison.index
    labels = {m.label for m in at.metric}
    assert {"mean alpha", "mean stable_rank", "under-trained", "over-trained"} <= labels
    assert all(m.help for m in at.metric if m.label.startswith("mean "))  # each number says what it means
    # the ESD of the learned scaling, and the whole table for the whitened matrices
    key = "esd_svd-asvd-svdllm-sigmascale"
    at.segmented_control(key=key).set_value("sigmascale").run()
    assert not at.exception and "learned at rank" in " ".join(m.value for m in at.markdown)
    at.selectbox(key="diagnostics_of").set_value("svdllm").run()
    assert not at.exception


def test_heatmap_colours_by_any_diagnostic(app):
    at = spectra_page_when_idle(app)
    at.selectbox(key="heatmap_metric").set_value("a spectral diagnostic (WeightWatcher's)…").run()
    at.selectbox(key="heatmap_diagnostic").set_value("stable_rank").run()
    at.selectbox(key="heatmap_diagnostic_of").set_value("svdllm").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Σσ²/σ₁²" in c.value for c in at.caption)  # the diagnostic's meaning beside it
    heat = next(d for d in chart_data(at) if "shape" in d.columns)
    assert len(heat) == 14 and heat["value"].notna().all()
