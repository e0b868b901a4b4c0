"""The Run and Learn pages as the user sees them: results in "One run", chart axes, the plan's method,
the Learn page's delta and ticks. Runs are written as finished run folders, so no run is computed here;
the tiny model and the AppTest come from test_app's fixtures."""

import json
from pathlib import Path

import test_app
from streamlit.proto.Metric_pb2 import Metric
from streamlit.testing.v1 import AppTest

from sigmascale_core import jobs

app, tiny = test_app.app, test_app.tiny  # fixtures: the tiny model, an AppTest on it
open_page = test_app.open_page
LEARN_ERROR = "Activation error ‖(W−W′)X‖² / ‖WX‖²"


def finished_run(run_id: str, kind: str, report: dict, spec: dict, retention: float | None = None) -> Path:
    """A run folder as the runner leaves a finished run (meta, spec, report; plan.json for a compress run)."""
    run_dir = jobs.runs_root() / run_id
    run_dir.mkdir(parents=True)
    meta = {"id": run_id, "kind": kind, "label": "", "status": "done", "started": 1.0, "finished": 2.0}
    (run_dir / "meta.json").write_text(json.dumps({**meta, "steps": []}))
    (run_dir / "spec.json").write_text(json.dumps({"kind": kind, **spec}))
    (run_dir / "report.json").write_text(json.dumps(report))
    if retention is not None:
        (run_dir / "plan.json").write_text(json.dumps({"method": "svd", "parameter_retention": retention}))
    return run_dir


def report(ppl: float, accs: dict[str, float], text: str) -> dict:
    tasks = {name: {"n": 50, "acc": acc, "acc_norm": None} for name, acc in accs.items()}
    mean = sum(accs.values()) / len(accs)
    return {"perplexity": {text: {"perplexity": ppl}}, "zero_shot": {"tasks": tasks, "mean_acc": mean}}


def metrics(at: AppTest) -> dict[str, Metric]:
    return {m.label: m.proto for m in at.metric}


def chart_specs(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]


def encodings(spec: dict) -> list[dict]:
    """Every encoding of a (possibly layered) Vega-Lite spec."""
    return [spec["encoding"]] if "encoding" in spec else [e for s in spec["layer"] for e in encodings(s)]


# -- Run ---------------------------------------------------------------------------------------------------
def test_one_run_shows_perplexity_and_accuracy_beside_the_dense_baseline(app, tiny):
    text = tiny["defaults"]["evaluation"][0]
    spec = {"model": tiny["defaults"]["model"], "max_eval_tokens": 256, "task_limit": 50}
    compressed = report(31.5, {"piqa": 0.6, "arc_easy": 0.5}, text)
    compressed["perplexity_before_finetune"] = {text: {"perplexity": 40.25}}
    finished_run("20260101-000000-aaaaaa", "compress", compressed, spec, retention=0.75)
    open_page(app, "4_run")
    shown = metrics(app)
    ppl = shown[f"Perplexity · {Path(text).name}"]
    assert ppl.body == "31.50" and not ppl.delta  # no baseline yet: nothing to compare with
    assert "40.25 before fine-tuning" in ppl.help and text in ppl.help
    assert shown["Zero-shot accuracy"].body == "55.0%" and not shown["Zero-shot accuracy"].delta
    assert shown["Retention"].body == "75.00%"
    tasks = next(d.value for d in app.dataframe if "task" in d.value.columns)
    assert list(tasks.columns) == ["task", "accuracy", "items"]  # no empty dense column
    assert "No dense baseline" in " ".join(c.value for c in app.caption)
    assert not any("Dashed" in c.value for c in app.caption)  # the chart has no dense line yet

    finished_run("20260101-000001-bbbbbb", "dense", report(20.0, {"piqa": 0.7, "arc_easy": 0.6}, text), spec)
    app.selectbox(key="history_run").set_value("20260101-000000-aaaaaa").run()
    assert not app.exception
    shown = metrics(app)
    ppl = shown[f"Perplexity · {Path(text).name}"]
    assert (ppl.delta, ppl.delta_description) == ("+11.50", "vs dense 20.00")
    assert Metric.MetricColor.Name(ppl.color) == "RED"  # a higher perplexity is worse
    accuracy = shown["Zero-shot accuracy"]
    assert (accuracy.delta, accuracy.delta_description) == ("-10.0 pts", "vs dense 65.0%")
    assert Metric.MetricColor.Name(accuracy.color) == "RED"  # a lower accuracy is worse
    tasks = next(d.value for d in app.dataframe if "task" in d.value.columns)
    assert tasks.set_index("task")["dense"].to_dict() == {"piqa": 0.7, "arc_easy": 0.6}
    assert any("Dashed: the dense model" in c.value for c in app.caption)

    # the History table: results right after what the run is, before how it was run
    columns = list(app.dataframe[0].value.columns)
    assert columns.index(f"ppl {text}") < columns.index("zero-shot mean acc") < columns.index("model")

    # the chart: retention ticks as percentages, perplexity ticks in one notation
    chart = next(s for s in chart_specs(app) if "layer" in s)
    x, y = encodings(chart)[0]["x"], encodings(chart)[0]["y"]
    assert x["axis"]["format"] == "~%" and y["axis"]["format"] == "~s"


def test_the_dense_baseline_gets_its_own_label(app, tiny, monkeypatch):
    started = []
    monkeypatch.setattr(jobs, "start_run", lambda spec, plan: started.append(spec) or jobs.runs_root())
    open_page(app, "4_run")
    app.text_input(key="run_label").input("my compression run")
    app.button(key="run_dense").click().run()
    assert not app.exception and not app.error
    assert [s.kind for s in started] == ["dense"] and started[0].label == "dense baseline"


def test_the_run_page_chooses_the_plans_method(app):
    open_page(app, "3_ranks")
    app.selectbox(key="plan_method").set_value("svd").run()
    open_page(app, "4_run")
    method = app.selectbox(key="run_plan_method")
    assert method.value == "svd"
    method.set_value("asvd").run()
    assert not app.exception
    assert app.session_state["plan"]["plan"].method == "asvd"
    assert "The plan from **Ranks**: `asvd`" in app.markdown[0].value
    open_page(app, "3_ranks")
    assert app.selectbox(key="plan_method").value == "asvd"


# -- Learn -------------------------------------------------------------------------------------------------
def test_learn_page_delta_is_neutral_at_the_optimum_and_red_above_it(app):
    open_page(app, "5_learn")
    above = metrics(app)[LEARN_ERROR]  # plain SVD on the anisotropic example: worse than whitening
    assert above.delta.startswith("+") and above.delta_description == "vs best"
    assert Metric.MetricColor.Name(above.color) == "RED"
    app.radio(key="toy").set_value("flat spectrum").run()
    app.button(key="toy_identity").click().run()
    optimum = metrics(app)[LEARN_ERROR]
    assert optimum.delta == "at the optimum" and Metric.MetricColor.Name(optimum.color) == "GRAY"
    assert Metric.MetricDirection.Name(optimum.direction) == "NONE"


def test_learn_page_axes_integer_index_one_log_notation_whole_legends(app):
    open_page(app, "5_learn")
    spectrum, cloud = chart_specs(app)
    x, y = encodings(spectrum)[0]["x"], encodings(spectrum)[0]["y"]
    assert x["axis"]["format"] == "d" and x["axis"]["tickMinStep"] == 1
    assert y["scale"]["type"] == "log" and y["axis"]["format"] == ".0e"
    for spec in (spectrum, cloud):
        assert encodings(spec)[0]["color"]["legend"]["labelLimit"] == 0
