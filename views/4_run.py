"""Run: commit the plan to a background compression + evaluation run; follow it; compare results."""

import itertools
import json
import time
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from sigmascale_core import jobs
from sigmascale_core.methods import METHODS
from sigmascale_core.progress import format_seconds
from sigmascale_core.text import DEFAULT_EVALUATION_TEXTS
from views import _shared as shared

st.title("Run")
cfg = shared.config()
EVALUATION_TEXTS = list(DEFAULT_EVALUATION_TEXTS)


def _task_names() -> list[str]:
    try:
        from sigmascale_core.zeroshot import TASKS

        return list(TASKS)
    except Exception:  # zero-shot support missing: runs still do perplexity
        return []


def _current_plan():
    """The Ranks page's plan when this session has one (its method chosen here), else None."""
    state = st.session_state.get("plan")
    if state is None:
        return None

    def set_method() -> None:
        shared.set_plan(state, state["plan"].with_method(st.session_state["run_plan_method"]))

    st.selectbox(
        "Method",
        METHODS,
        index=METHODS.index(state["plan"].method),
        key="run_plan_method",
        on_change=set_method,
        help="the decomposition the run will use (the same choice as on the Ranks page)",
        width=280,
    )
    return state["plan"]


# -- what to run ------------------------------------------------------------------------------------------
st.subheader("Commit a plan")
try:
    plan = _current_plan()
except Exception as err:
    shared.show_error(err, "Cannot read the plan")
    plan = None
if plan is not None:
    st.markdown(
        f"The plan from **Ranks**: `{plan.method}`, parameter retention **{plan.parameter_retention():.2%}** "
        f"({len(plan.compressed)} of {len(plan.matrices)} matrices compressed, allocation {plan.allocation})."
    )
else:
    st.markdown("No plan edited in this session yet: the run uses a **uniform** plan.")
    a, b = st.columns(2)
    uniform_method = a.selectbox("Method", METHODS, index=METHODS.index("sigmascale"), key="run_method")
    uniform_retention = b.slider("Retention", 0.05, 1.0, shared.DEFAULT_RETENTION, 0.01, key="run_retention")

with st.form("run_form"):
    label = st.text_input("Label (optional)", key="run_label")
    a, b = st.columns(2)
    evaluation = a.multiselect(
        "Perplexity texts",
        EVALUATION_TEXTS,
        default=[t for t in cfg.evaluation if t in EVALUATION_TEXTS],
        key="run_eval",
    )
    other = a.text_input(
        "Other perplexity texts (comma-separated specs)",
        value=",".join(t for t in cfg.evaluation if t not in EVALUATION_TEXTS),
        key="run_eval_other",
    )
    max_tokens = b.number_input(
        "Max tokens per text", 256, 10**8, cfg.max_eval_tokens, step=1024, key="run_tokens"
    )
    tasks_available = _task_names()
    c, d = st.columns(2)
    tasks = c.multiselect("Zero-shot tasks", tasks_available, key="run_tasks")
    limit = d.number_input("Zero-shot items per task", 1, 100000, 100, key="run_limit")
    e, f = st.columns(2)
    finetune = e.checkbox(
        "Fine-tune after compressing",
        value=False,
        key="run_finetune",
        help="distil the dense model into the low-rank factors (KL on next-token distributions, AdamW, "
        "calibration-side text); the perplexity before it is kept in the report",
    )
    finetune_steps = f.number_input(
        "Fine-tune steps", 1, 100_000, 100, key="run_finetune_steps", help="4 × 256 tokens per step"
    )
    go = st.form_submit_button("Start run", type="primary")
baseline = st.button(
    "Evaluate the dense model (baseline for the comparison)",
    key="run_dense",
    help="perplexity (and the zero-shot tasks) of the uncompressed model, with the same settings",
)

if go or baseline:
    texts = list(evaluation) + [t.strip() for t in other.split(",") if t.strip()]
    try:
        from sigmascale_core.pipeline import check_texts

        check_texts(cfg.text, texts)
        spec = cfg.run_spec(
            "dense" if baseline else "compress",
            evaluation=tuple(texts),
            max_eval_tokens=int(max_tokens),
            tasks=tuple(tasks),
            task_limit=int(limit),
            finetune_steps=int(finetune_steps) if finetune and not baseline else 0,
            label="dense baseline" if baseline else label.strip(),
        )
        run_plan = None
        if not baseline:
            run_plan = plan
            if run_plan is None:
                from sigmascale_core.pipeline import uniform_plan

                loaded = shared.service(cfg).snapshot().loaded
                if loaded is None:
                    raise ValueError("the model is still loading: start the run in a few seconds")
                run_plan = uniform_plan(loaded, float(uniform_retention), uniform_method)
        run_dir = jobs.start_run(spec, run_plan)
    except Exception as err:
        shared.show_error(err, "Cannot start the run")
    else:
        st.session_state["last_run"] = run_dir.name
        st.success(f"Started run `{run_dir.name}` (it keeps going if you leave this page or close the tab).")


# -- live progress ------------------------------------------------------------------------------------------
def _active() -> list[jobs.RunRecord]:
    return [r for r in jobs.list_runs() if r.status in jobs.ACTIVE]


def _live() -> None:
    active = _active()
    before = st.session_state.get("active_runs", set())
    now = {r.id for r in active}
    st.session_state["active_runs"] = now
    if before - now:  # a run finished: refresh the history below
        st.rerun()
    if not active:
        return
    st.subheader("Running")
    for record in active:
        box = st.container(border=True)
        steps = record.meta.get("steps", [])
        current = next((s for s in steps if s.get("status") == "running"), None)
        where = (
            f"step {steps.index(current) + 1}/{len(steps)}: {current['name']}" if current else record.status
        )
        progress = record.progress()
        text = f"{record.id} — {where}" + (
            f" — {progress.stage} {progress.done}/{progress.total}, about {format_seconds(progress.eta)} left"
            if progress
            else ""
        )
        box.progress(progress.fraction if progress else 0.0, text=text)
        elapsed = record.seconds
        box.caption(f"{record.meta.get('label') or record.meta.get('kind')} · {elapsed or 0:.0f} s elapsed")
        box.code(jobs.tail_lines(record.log(20_000), 12) or "(no output yet)", language=None)
        if box.button("Cancel", key=f"cancel_{record.id}"):
            jobs.cancel_run(record.path)
            box.warning("Cancelling…")


active_now = _active()
st.session_state.setdefault("active_runs", {r.id for r in active_now})
st.fragment(run_every=2.0 if active_now else None)(_live)()


# -- history -------------------------------------------------------------------------------------------------
def _row(record: jobs.RunRecord) -> dict:
    """A run as a History row: what it is, then its results, then how it was run."""
    plan_file = record.path / "plan.json"
    plan_data = {}
    if plan_file.exists():
        try:
            plan_data = json.loads(plan_file.read_text())
        except ValueError:
            plan_data = {}
    report = record.report or {}
    spec = record.spec
    dense = record.meta.get("kind") == "dense"
    row = {
        "run": record.id,
        "label": record.meta.get("label") or "",
        "kind": record.meta.get("kind", ""),
        "status": record.status,
        "method": plan_data.get("method", "dense" if dense else ""),
        "retention": plan_data.get("parameter_retention", 1.0 if dense else None),
    }
    for text, result in (report.get("perplexity") or {}).items():
        row[f"ppl {text}"] = result.get("perplexity")
    zero = report.get("zero_shot") or {}
    if zero.get("mean_acc") is not None:
        row["zero-shot mean acc"] = zero["mean_acc"]
    for text, result in (report.get("perplexity_before_finetune") or {}).items():
        row[f"ppl {text} before fine-tune"] = result.get("perplexity")
    return row | {
        "model retention": report.get("model_retention", 1.0 if dense else None),
        "model": spec.get("model", ""),
        "max tokens": spec.get("max_eval_tokens"),
        "fine-tune steps": spec.get("finetune_steps", 0),
        "seconds": record.seconds,
    }


st.subheader("History")
records = jobs.list_runs()
if not records:
    st.info(f"No runs yet under `{jobs.runs_root()}`.")
    st.stop()
table = pd.DataFrame([_row(r) for r in records])
st.dataframe(table, hide_index=True, width="stretch")

ppl_columns = [c for c in table.columns if c.startswith("ppl ")]
if ppl_columns:
    which = st.selectbox("Chart", ppl_columns, key="history_metric")
    done = table[(table["status"] == "done") & table[which].notna()]
    # plain column names only: Altair reads "a:b" as field a of type b
    done = done[["run", "label", "kind", "method", "retention"]].assign(perplexity=done[which])
    if len(done):
        points = (
            alt.Chart(done[done["kind"] == "compress"])
            .mark_point(filled=True, size=90)
            .encode(
                x=alt.X(
                    "retention:Q",
                    title="parameter retention",
                    scale=alt.Scale(zero=False, padding=24),  # no point on the chart's edge
                    axis=alt.Axis(format="~%"),
                ),
                y=alt.Y(
                    "perplexity:Q",
                    title=which.replace("ppl ", "perplexity on "),
                    scale=alt.Scale(type="log"),
                    axis=alt.Axis(format="~s"),  # 20, 500, 2k, 1M: one notation on every tick
                ),
                color="method:N",
                tooltip=[
                    "run",
                    "label",
                    "method",
                    alt.Tooltip("retention:Q", format=".2%"),
                    alt.Tooltip("perplexity:Q", format=".3f"),
                ],
            )
        )
        dense = done[done["kind"] == "dense"]
        chart = points
        if len(dense):
            rule = (
                alt.Chart(dense)
                .mark_rule(strokeDash=[5, 3], color="black")
                .encode(
                    y="perplexity:Q",
                    tooltip=["run", alt.Tooltip("perplexity:Q", format=".3f", title="dense")],
                )
            )
            chart = points + rule
        st.altair_chart(chart.interactive(), width="stretch")
        st.caption(
            ("Dashed: the dense model. " if len(dense) else "")
            + "Compare runs evaluated with the same texts and token budget."
        )


def _text_name(text: str) -> str:
    """A perplexity text spec, short enough for a metric's label: a file's name, else the spec."""
    return Path(text.removeprefix("file:")).name if text.startswith("file:") else text


def _results(record: jobs.RunRecord, records: list[jobs.RunRecord]) -> None:
    """The run's perplexity per text and zero-shot accuracy, each beside the dense baseline's."""
    report, dense = record.report, jobs.dense_baseline(record, records)
    dense_report = dense.report if dense else {}
    ppl = report.get("perplexity") or {}
    before = report.get("perplexity_before_finetune") or {}
    dense_ppl = dense_report.get("perplexity") or {}
    zero, dense_zero = report.get("zero_shot") or {}, dense_report.get("zero_shot") or {}
    tasks, dense_tasks = zero.get("tasks") or {}, dense_zero.get("tasks") or {}
    row = _row(record)
    metrics = []  # st.metric's arguments, four to a row
    if row["retention"] is not None:
        whole = row["model retention"]
        metrics.append(
            {
                "label": "Retention",
                "value": f"{row['retention']:.2%}",
                "help": "parameter retention of the target matrices"
                + (f"; whole model {whole:.2%}" if whole is not None else ""),
            }
        )
    for text, result in ppl.items():
        value, base = result["perplexity"], dense_ppl.get(text, {}).get("perplexity")
        metrics.append(
            {
                "label": f"Perplexity · {_text_name(text)}",
                "value": f"{value:.2f}",
                "delta": None if base is None else f"{value - base:+.2f}",
                "delta_color": "inverse",  # lower perplexity is better
                "delta_description": None if base is None else f"vs dense {base:.2f}",
                "help": f"perplexity on `{text}` (lower is better)"
                + (f"; {before[text]['perplexity']:.2f} before fine-tuning" if text in before else ""),
            }
        )
    if zero.get("mean_acc") is not None:
        comparable = dense_zero.get("mean_acc") is not None and set(dense_tasks) == set(tasks)
        mean, base = zero["mean_acc"], dense_zero.get("mean_acc")
        metrics.append(
            {
                "label": "Zero-shot accuracy",
                "value": f"{mean:.1%}",
                "delta": f"{(mean - base) * 100:+.1f} pts" if comparable else None,
                "delta_description": f"vs dense {base:.1%}" if comparable else None,
                "help": f"mean accuracy over {len(tasks)} tasks ({', '.join(tasks)}), "
                f"at most {record.spec.get('task_limit')} items each",
            }
        )
    for col, kwargs in zip(itertools.cycle(st.columns(4)), metrics):
        col.metric(**kwargs)
    if tasks:
        st.dataframe(
            pd.DataFrame(
                [
                    {"task": name, "accuracy": result.get("acc")}
                    | ({"dense": (dense_tasks.get(name) or {}).get("acc")} if dense else {})
                    | {"items": result.get("n")}
                    for name, result in tasks.items()
                ]
            ),
            hide_index=True,
            column_config={
                "accuracy": st.column_config.NumberColumn(format="percent"),
                "dense": st.column_config.NumberColumn(format="percent"),
            },
        )
    if dense is not None:
        st.caption(f"Dense baseline: run `{dense.id}` (same model, token budget and items per task).")
    elif record.meta.get("kind") != "dense":
        st.caption("No dense baseline evaluated like this run yet: **Evaluate the dense model** above.")


st.subheader("One run")
chosen = st.selectbox(
    "Run",
    [r.id for r in records],
    index=[r.id for r in records].index(st.session_state["last_run"])
    if st.session_state.get("last_run") in [r.id for r in records]
    else 0,
    key="history_run",
)
record = next(r for r in records if r.id == chosen)
meta = record.meta
st.markdown(
    f"**{record.id}** — {record.status}; started "
    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(meta['started'])) if meta.get('started') else '—'}"
    + (f", {record.seconds:.1f} s" if record.seconds else "")
)
if record.status == "failed":
    st.error(meta.get("error") or "failed without a message")
elif record.status == "cancelled":
    st.warning("Cancelled: nothing half-written was kept.")
if record.report is not None:
    _results(record, records)
timing = [
    {"step": s["name"], "status": s.get("status"), "seconds": s.get("seconds")} for s in meta.get("steps", [])
]
st.dataframe(pd.DataFrame(timing), hide_index=True)
a, b = st.columns(2)
if (record.path / "plan.json").exists():
    a.download_button(
        "Download plan.json",
        (record.path / "plan.json").read_bytes(),
        file_name=f"{record.id}-plan.json",
        key="dl_plan",
    )
if record.report is not None:
    b.download_button(
        "Download report.json",
        json.dumps(record.report, indent=2),
        file_name=f"{record.id}-report.json",
        key="dl_report",
    )
if record.model_dir is not None:
    st.markdown("Compressed model folder (load it with `sigmascale eval --model …`):")
    st.code(str(record.model_dir), language=None)
with st.expander("Log"):
    st.code(jobs.tail_lines(record.log(), 200) or "(empty)", language=None)
