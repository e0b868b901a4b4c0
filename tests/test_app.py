"""The Streamlit app, page by page, with streamlit.testing (AppTest) on a tiny random model.

The app reads its default model and texts from $SIGMASCALE_APP_DEFAULTS, so these tests point it at a
tiny Llama (with the bundled tokenizer) and small file: texts; one slow test uses the bundled model.
"""

import json
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from tiny import save_tiny_model, write_text

from sigmascale_core import jobs
from sigmascale_core.metrics import rank_for_retention
from sigmascale_core.models import model_fingerprint
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.surgery import target_shapes

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
TIMEOUT = 120


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    model = save_tiny_model(root / "tiny")
    defaults = {
        "model": str(root / "tiny"),
        "device": "cpu",
        "text": write_text(root / "cal.txt", 1),
        "samples": 4,
        "seq_len": 32,
        "heldout_text": write_text(root / "held.txt", 2),
        "heldout_samples": 2,
        "evaluation": [write_text(root / "eval.txt", 3)],
        "max_eval_tokens": 256,
    }
    return {"defaults": defaults, "fingerprint": model_fingerprint(model), "shapes": target_shapes(model)}


@pytest.fixture
def app(tiny, tmp_path, monkeypatch):
    """An AppTest of app.py with its own cache and runs folders; run once (Model & data page)."""
    import streamlit as st

    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SIGMASCALE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SIGMASCALE_APP_DEFAULTS", json.dumps(tiny["defaults"]))
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    return at


def open_page(at: AppTest, page: str, wait: bool = True) -> AppTest:
    """Switch pages; by default once the compute service has finished (the numbers are all there)."""
    if wait:
        wait_for(at, idle)
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def ranks_of(at: AppTest) -> np.ndarray:
    """The session plan's ranks in model order (dense: min(m, n))."""
    plan = at.session_state["plan"]["plan"]
    return np.array([min(m.shape) if m.is_dense else m.rank for m in plan.matrices.values()])


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def percent(text: str) -> float:
    return float(text.rstrip("%")) / 100


def edit(at: AppTest, rows: dict, unit: str = "retention") -> AppTest:
    """Edit cells of the Ranks table as the browser would: the editor's edit state, then a rerun."""
    key = f"editor_{at.session_state['plan']['version']}_{unit}"
    assert key in [d.key for d in at.data_editor]
    at.session_state[key] = {"edited_rows": rows, "added_rows": [], "deleted_rows": []}
    return at.run()


# -- Model & data ------------------------------------------------------------------------------------------
def wait_for(at: AppTest, predicate, timeout: float = TIMEOUT):
    """Wait for the app's compute service (shared by every session of this server) to reach a state."""
    from views import _shared as shared

    cfg = at.session_state["config"] if "config" in at.session_state else shared.defaults()
    return shared.service(cfg).wait_until(predicate, timeout)


def idle(snap) -> bool:
    return snap.state == "idle"


def test_model_page_loads_and_calibrates(app, tiny):
    assert [r.key for r in app.radio] == ["source_kind"]
    assert {"device", "dtype"} <= {s.key for s in app.selectbox}
    assert {"samples", "seq_len", "seed", "heldout_samples"} <= {n.key for n in app.number_input}
    # the first paint shows the background work's progress, never waiting for it
    assert any(
        "loading the model" in p.proto.text or "spectra of W" in p.proto.text for p in app.get("progress")
    )
    snap = wait_for(app, lambda s: s.stats_ready)
    assert snap.stats_ready
    app.button[0].click().run()  # Apply (the bundled source is the tiny model here)
    assert not app.exception and not app.error
    assert "14 target matrices" in app.success[0].value and "statistics are ready" in app.success[0].value


def test_model_page_reports_a_model_that_cannot_load(app):
    app.radio(key="source_kind").set_value("local")
    app.text_input(key="source_text").input("/no/such/model")
    app.button[0].click().run()
    assert wait_for(app, lambda s: s.state == "error").state == "error"
    app.run()
    assert not app.exception
    assert "no such file or directory" in app.error[0].value
    app.radio(key="source_kind").set_value("hub")
    app.text_input(key="source_text").input("")
    app.button[0].click().run()
    assert "Enter a folder" in app.error[0].value


def test_overlapping_calibration_and_heldout_texts_are_refused(app, tiny):
    app.text_input(key="heldout_text").input(tiny["defaults"]["text"])
    app.button[0].click().run()
    assert not app.exception and "appear in both" in app.error[0].value


# -- Spectra -----------------------------------------------------------------------------------------------
def test_spectra_page_shows_partial_results_then_every_method(app):
    open_page(app, "2_spectra", wait=False)
    snap = wait_for(app, lambda s: s.bank is not None)
    open_page(app, "2_spectra", wait=False)  # the page draws whatever is ready: at least the overview
    assert {"heatmap_metric"} <= {s.key for s in app.selectbox}
    wait_for(app, idle)
    open_page(app, "2_spectra")
    assert {"heatmap_metric", "spectra_layer"} <= {s.key for s in app.selectbox}
    assert len(app.get("vega_lite_chart")) >= 5  # heatmap, σ, energy, two loss curves
    app.selectbox(key="spectra_layer").set_value(1).run()
    assert not app.exception and not app.error
    shown = app.multiselect(key="shown_svd-asvd-svdllm-sigmascale").value
    assert "learned (SigmaScale)" in shown  # learned in the background, shown by default
    summary = app.dataframe[0].value
    assert list(summary.index) == [
        "W (plain SVD)",
        "ASVD scaling",
        "whitening (SVD-LLM)",
        "learned (SigmaScale)",
    ]
    assert (summary["effective rank"] > 0).all()
    assert snap.bank is not None


def test_ranks_say_which_sigmascale_curves_are_pending(app):
    from views import _shared as shared

    snap = wait_for(app, lambda s: s.bank is not None and s.stages["cheap"].complete)
    learned = len(snap.bank.learned)
    open_page(app, "3_ranks", wait=False)
    captions = " ".join(c.value for c in app.caption)
    if learned < 14:  # the service is still learning: the totals say so, never ASVD's curve instead
        assert "/14 matrices" in captions and "pending" in captions
    wait_for(app, idle)
    open_page(app, "3_ranks")
    assert "pending" not in " ".join(c.value for c in app.caption)
    assert shared.service().snapshot().bank.ready("sigmascale").all()


# -- Ranks -------------------------------------------------------------------------------------------------
def test_an_edit_changes_the_totals_correctly(app, tiny):
    open_page(app, "3_ranks")
    assert {s.key for s in app.selectbox} == {"plan_method", "sensitivity_source"}
    assert {"uniform_retention"} <= {s.key for s in app.slider}
    assert sum(1 for s in app.slider if s.key.startswith("layer_")) == 2
    shapes = tiny["shapes"]
    uniform = CompressionPlan.uniform(shapes, 0.75, "sigmascale", tiny["fingerprint"])
    assert percent(metric(app, "Params kept")) == pytest.approx(uniform.parameter_retention(), abs=5.1e-5)
    edit(app, {0: {"q": 0.25}, 1: {"down": 0.5}})
    assert not app.exception and not app.error
    edited = {
        "model.layers.0.self_attn.q_proj": rank_for_retention(
            *shapes["model.layers.0.self_attn.q_proj"], 0.25
        ),
        "model.layers.1.mlp.down_proj": rank_for_retention(*shapes["model.layers.1.mlp.down_proj"], 0.5),
    }
    expected = uniform.with_ranks(edited)
    assert percent(metric(app, "Params kept")) == pytest.approx(expected.parameter_retention(), abs=5.1e-5)
    # rank units: the same matrix at a rank
    app.radio(key="unit").set_value("rank").run()
    edit(app, {0: {"k": 3}}, unit="rank")
    assert app.session_state["plan"]["plan"].matrices["model.layers.0.self_attn.k_proj"].rank == 3


def test_bad_cells_show_an_error_not_a_traceback(app):
    open_page(app, "3_ranks")
    before = metric(app, "Params kept")
    edit(app, {0: {"q": 7.0}, 1: {"k": "lots"}})
    assert not app.exception
    messages = " ".join(e.value for e in app.error)
    assert (
        "layer 0 q: retention must be in (0, 1], got 7" in messages and "'lots' is not a number" in messages
    )
    assert metric(app, "Params kept") == before
    app.radio(key="unit").set_value("rank").run()
    edit(app, {0: {"q": 10_000}}, unit="rank")
    assert "rank must be a whole number in [1, 64]" in app.error[0].value


def test_presets_undo_and_reset(app):
    open_page(app, "3_ranks")
    start = metric(app, "Params kept")
    app.slider(key="uniform_retention").set_value(0.4).run()
    app.button(key="preset_uniform").click().run()
    uniform = percent(metric(app, "Params kept"))
    assert uniform < 0.45
    loss_uniform = float(metric(app, "Loss (calib.)"))
    app.button(key="preset_sensitivity").click().run()
    assert uniform <= percent(metric(app, "Params kept")) <= 0.4  # the budget: the slider's retention
    assert float(metric(app, "Loss (calib.)")) <= loss_uniform
    assert app.session_state["plan"]["plan"].allocation == "greedy"  # the allocator that ran
    app.button(key="undo").click().run()
    assert percent(metric(app, "Params kept")) == pytest.approx(uniform)
    layer_slider = next(s for s in app.slider if s.key.startswith("layer_") and s.key.endswith("_1"))
    layer_slider.set_value(0.2).run()
    assert percent(metric(app, "Params kept")) < uniform
    app.button(key="reset").click().run()
    assert metric(app, "Params kept") == start


def test_a_layer_slider_reporting_its_drawn_value_changes_nothing(app, tiny):
    """The browser can report a freshly drawn slider's own value back as a change (seen in the e2e test:
    after a table edit, layer 0's slider set the whole layer to its rounded retention). Such a report
    is not an edit: the ranks and the undo history stay as the table edit left them."""
    open_page(app, "3_ranks")
    edit(app, {0: {"q": 0.2}})
    plan = app.session_state["plan"]
    ranks, history = ranks_of(app), len(plan["history"])
    slider = app.slider(key=f"layer_{app.session_state['plan']['version']}_0")
    drawn = slider.value
    shapes = list(tiny["shapes"])
    layer = [i for i, name in enumerate(shapes) if name.startswith("model.layers.0.")]
    assert len(set(ranks[layer].tolist())) > 1  # a uniform layer at `drawn` would differ from the edit
    slider.set_value(drawn + 1e-9).run()  # Streamlit sees a change; the value is the one drawn
    assert not app.exception
    plan = app.session_state["plan"]
    assert np.array_equal(ranks_of(app), ranks) and len(plan["history"]) == history
    app.slider(key=f"layer_{app.session_state['plan']['version']}_0").set_value(
        round(drawn - 0.1, 2)
    ).run()  # a real move
    assert ranks_of(app)[layer].sum() < ranks[layer].sum()


def test_sensitivity_preset_from_a_perplexity_probe(app):
    open_page(app, "3_ranks")
    assert app.selectbox(key="sensitivity_source").options == ["loss curves (proxy, instant)"]
    app.button(key="run_probe").click().run()  # a background run: the page never waits for it
    assert not app.exception and not app.error
    (run,) = [r for r in jobs.list_runs() if r.spec["kind"] == "probe"]
    assert _wait(run.id).status == "done"
    app.run()
    source = app.selectbox(key="sensitivity_source")
    assert source.options == ["loss curves (proxy, instant)", "perplexity probe"]
    source.set_value("perplexity probe").run()
    app.slider(key="uniform_retention").set_value(0.5).run()
    app.button(key="preset_sensitivity").click().run()
    assert not app.exception and not app.error
    assert app.session_state["plan"]["plan"].allocation == "greedy"  # the allocator that ran
    assert 0.45 < percent(metric(app, "Params kept")) <= 0.5


def test_a_saved_plan_loads_back_and_bad_plans_are_refused(app, tiny, monkeypatch):
    import streamlit as st
    from streamlit.delta_generator import DeltaGenerator

    downloads = {}
    original = DeltaGenerator.download_button

    def capture(self, label, data, *args, **kwargs):  # what the browser would save
        downloads[label] = data
        return original(self, label, data, *args, **kwargs)

    monkeypatch.setattr(DeltaGenerator, "download_button", capture)
    monkeypatch.setattr(st, "download_button", lambda *a, **k: capture(st._main, *a, **k))
    open_page(app, "3_ranks")
    edit(app, {0: {"q": 0.3, "up": 0.6}})
    app.selectbox(key="plan_method").set_value("svdllm").run()
    assert app.get("download_button")[0].proto.label == "Save plan (JSON)"
    data = json.loads(downloads["Save plan (JSON)"])
    plan = CompressionPlan.from_dict(data)  # the very object the CLI takes
    assert plan.method == "svdllm" and plan.model_fingerprint == tiny["fingerprint"]
    ranks = ranks_of(app)
    app.button(key="reset").click().run()
    assert not np.array_equal(ranks_of(app), ranks)
    app.selectbox(key="plan_method").set_value("svd").run()
    app.file_uploader(key="plan_upload").upload("plan.json", json.dumps(data).encode(), "application/json")
    app.run()
    assert not app.exception and not app.error
    np.testing.assert_array_equal(ranks_of(app), ranks)
    assert app.session_state["plan"]["plan"].method == "svdllm"
    assert percent(metric(app, "Params kept")) == pytest.approx(plan.parameter_retention(), abs=5.1e-5)
    # bad plans: not JSON, another model, another version
    for name, content, message in (
        ("junk.json", b"{not json", "Cannot load junk.json"),
        ("other.json", json.dumps({**data, "model_fingerprint": "0123"}).encode(), "made for model 0123"),
        ("old.json", json.dumps({**data, "version": 99}).encode(), "version 99 is not supported"),
    ):
        app.file_uploader(key="plan_upload").set_value((name, content, "application/json"))
        app.run()
        assert not app.exception
        assert message in app.error[0].value


# -- Run -----------------------------------------------------------------------------------------------
def test_run_page_starts_a_run_and_shows_its_result(app, tiny):
    open_page(app, "3_ranks")
    app.selectbox(key="plan_method").set_value("svd").run()
    open_page(app, "4_run")
    assert {"run_eval", "run_tasks"} <= {m.key for m in app.multiselect}
    assert "The plan from **Ranks**: `svd`" in app.markdown[0].value
    app.checkbox(key="run_finetune").check()
    app.number_input(key="run_finetune_steps").set_value(2)
    app.button[0].click().run()  # Start run
    assert not app.exception and not app.error, [e.value for e in app.error]
    run_id = app.session_state["last_run"]
    record = _wait(run_id)
    assert record.status == "done", record.meta.get("error")
    app.run()
    history = app.dataframe[0].value
    row = history[history["run"] == run_id].iloc[0]
    assert row["status"] == "done" and row["method"] == "svd" and row["fine-tune steps"] == 2
    text = tiny["defaults"]["evaluation"][0]
    assert row[f"ppl {text}"] > 1 and row[f"ppl {text} before fine-tune"] > 1
    assert record.report["finetune"]["steps"] == 2
    assert f"**{run_id}** — done" in " ".join(m.value for m in app.markdown)
    assert any(str(record.model_dir) in c.value for c in app.code)


def test_a_failed_run_shows_its_error(app, tiny):
    plan = CompressionPlan.uniform(tiny["shapes"], 0.5, "svd", "not-this-model")
    spec = jobs.RunSpec(
        kind="compress", model=tiny["defaults"]["model"], text=tiny["defaults"]["text"], samples=2, seq_len=32
    )
    run_dir = jobs.start_run(spec, plan)
    _wait(run_dir.name)
    open_page(app, "4_run")
    assert not app.exception
    assert "the plan was made for model not-this-model" in app.error[0].value


def test_starting_a_run_with_overlapping_texts_is_refused(app, tiny):
    open_page(app, "4_run")
    app.text_input(key="run_eval_other").input(tiny["defaults"]["text"])
    app.button[0].click().run()
    assert not app.exception and "appear in both" in app.error[0].value
    assert jobs.list_runs() == []


def _wait(run_id: str, timeout: float = 600) -> jobs.RunRecord:  # generous: CI machines are shared
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = jobs.read_run(jobs.runs_root() / run_id)
        if record.status in jobs.FINAL:
            return record
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not finish:\n{record.log()}")


# -- Learn ---------------------------------------------------------------------------------------------
def test_learn_page_sliders_move_the_errors(app):
    open_page(app, "5_learn")
    assert [r.key for r in app.radio] == ["toy"]
    plain = float(metric(app, "Activation error ‖(W−W′)X‖² / ‖WX‖²"))
    app.button(key="toy_asvd").click().run()
    assert float(metric(app, "Activation error ‖(W−W′)X‖² / ‖WX‖²")) < plain
    app.button(key="toy_learn").click().run()
    learned = float(metric(app, "Activation error ‖(W−W′)X‖² / ‖WX‖²"))
    best = float(metric(app, "Best possible at this rank (whitening)"))
    assert best - 1e-4 <= learned < plain
    app.slider(key="col_0").set_value(-4.0).run()
    assert float(metric(app, "Activation error ‖(W−W′)X‖² / ‖WX‖²")) > learned
    app.radio(key="toy").set_value("flat spectrum").run()
    app.button(key="toy_identity").click().run()
    assert metric(app, "Activation error ‖(W−W′)X‖² / ‖WX‖²") == metric(
        app, "Best possible at this rank (whitening)"
    )


# -- the real model -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_model_loads_on_the_model_page(tmp_path, monkeypatch):
    import streamlit as st

    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("SIGMASCALE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv(
        "SIGMASCALE_APP_DEFAULTS",
        json.dumps({"device": "cpu", "samples": 2, "seq_len": 64, "heldout_samples": 2}),
    )
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=600).run()
    at.button[0].click().run()
    assert wait_for(at, lambda s: s.loaded is not None, timeout=600).error is None  # loads in the background
    at.run()
    assert not at.exception and not at.error
    assert "210 target matrices" in at.success[0].value and "30 layers" in at.success[0].value
