import json

import pytest
import torch
from tiny import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig

from sigmascale_core.cli import main
from sigmascale_core.models import bundled_model_dir
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.progress import ProgressEvent
from sigmascale_core.surgery import load_compressed


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_demo_prints_every_method(capsys):
    code, out, _ = run(["demo", "--shape", "40", "24", "--retention", "0.5"], capsys)
    assert code == 0
    for method in ("svd", "asvd", "svdllm", "sigmascale"):
        assert f"\n{method} " in out


@pytest.mark.parametrize("retention", ["0", "1.5", "abc"])
def test_bad_retention_is_a_one_line_error(retention, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--retention", retention, "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "retention must be" in capsys.readouterr().err


def test_existing_out_is_refused_without_force(capsys, tmp_path):
    code, _, err = run(["compress", "--retention", "0.5", "--out", str(tmp_path)], capsys)
    assert code == 2 and "exists" in err and "--force" in err


def test_corrupt_plan_is_refused(capsys, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text('{"version": 1, "matr')
    code, _, err = run(["compress", "--plan", str(plan), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not valid plan JSON" in err
    assert not (tmp_path / "o").exists()


def test_missing_model_is_refused(capsys, tmp_path):
    code, _, err = run(["eval", "--model", str(tmp_path / "nope"), "--tasks", "ppl"], capsys)
    assert code == 2 and "no such file or directory" in err


def test_non_causal_model_names_what_was_found(capsys, tmp_path):
    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path)
    code, _, err = run(["eval", "--model", str(tmp_path)], capsys)
    assert code == 2 and "bert" in err.lower()


def test_unknown_task_fails_before_loading(capsys):
    code, _, err = run(["eval", "--tasks", "ppl,mmlu"], capsys)
    assert code == 2 and "mmlu" in err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved with the bundled model's tokenizer (a real tokenizer, a tiny network)."""
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir())
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tokenizer))
    directory = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def reloaded_perplexity(out, capsys) -> float:
    """`sigmascale eval` of a saved output folder: perplexity on the first 256 tokens of boolq:evaluation."""
    args = ["eval", "--model", str(out), "--device", "cpu", "--text", "boolq:evaluation"]
    code, stdout, err = run([*args, "--max-eval-tokens", "256"], capsys)
    assert code == 0, err
    return json.loads(stdout)["perplexity"]["boolq:evaluation"]["perplexity"]


def test_compress_then_eval_round_trip(tiny_model_dir, tmp_path, capsys, private_cache):
    out, events = tmp_path / "compressed", tmp_path / "events.jsonl"
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--samples", "2", "--seq-len", "32"]
    code, stdout, err = run(
        [
            "compress",
            *args,
            "--method",
            "svdllm",
            "--retention",
            "0.5",
            "--out",
            str(out),
            "--eval",
            "boolq:evaluation",
            "--max-eval-tokens",
            "256",
            "--progress-json",
            str(events),
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report == json.loads((out / "report.json").read_text())
    assert report["parameter_retention"] == pytest.approx(
        CompressionPlan.load(out / "sigmascale_plan.json").parameter_retention()
    )
    assert report["perplexity"]["boolq:evaluation"]["tokens"] == 255
    # 64 calibration tokens cannot span down_proj's 96 input channels: its Gram needs jitter to whiten
    # (the report names every matrix that needed it, with the λ added)
    jitter = report["whitening_jitter"]
    assert {f"model.layers.{i}.mlp.down_proj" for i in range(2)} <= set(jitter)
    assert set(jitter) <= set(plan_names := CompressionPlan.load(out / "sigmascale_plan.json").matrices)
    assert all(value > 0 for value in jitter.values()) and len(plan_names) == 14
    again = reloaded_perplexity(out, capsys)
    assert again == pytest.approx(report["perplexity"]["boolq:evaluation"]["perplexity"], rel=1e-5)
    model, plan = load_compressed(out)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    m_n_k = [(*m.shape, m.rank) for m in plan.matrices.values()]
    saved = sum(m * n - k * (m + n) for m, n, k in m_n_k if k * (m + n) < m * n)  # from the ranks alone
    assert saved > 0 and len(plan.compressed) == len(m_n_k) == 14  # every matrix shrank at 0.5
    expected = sum(p.numel() for p in dense.parameters()) - saved  # tied embeddings counted once
    assert sum(p.numel() for p in model.parameters()) == expected == report["parameters_after"]
    lines = events.read_text().splitlines()  # --progress-json: one event a line, every stage, in order
    stages = [ProgressEvent.from_json(line).stage for line in lines]
    assert list(dict.fromkeys(stages)) == ["calibration", "compress", "perplexity"]
    last = ProgressEvent.from_json(lines[-1])
    assert last.done == last.total
    code, _, err = run(
        ["compress", *args, "--retention", "0.5", "--out", str(out), "--eval", "boolq:calibration"], capsys
    )
    assert code == 2  # out exists (checked before anything loads)


def test_calibration_and_evaluation_text_must_not_overlap(tiny_model_dir, tmp_path, capsys):
    code, _, err = run(
        [
            "compress",
            "--model",
            str(tiny_model_dir),
            "--retention",
            "0.5",
            "--out",
            str(tmp_path / "o"),
            "--eval",
            "boolq:calibration",
        ],
        capsys,
    )
    assert code == 2 and "both calibration" in err


def test_too_short_calibration_text_says_how_many_tokens(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("only a few words here")
    code, _, err = run(
        [
            "calibrate",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--text",
            f"file:{text}",
            "--samples",
            "4",
            "--seq-len",
            "64",
        ],
        capsys,
    )
    assert code == 2 and "tokens" in err and "256" in err


def test_spectra_csv_and_json(tiny_model_dir, tmp_path, capsys):
    args = [
        "spectra",
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--samples",
        "2",
        "--seq-len",
        "32",
        "--layer",
        "1",
        "--matrix",
        "down",
        "--methods",
        "svd,svdllm",
    ]
    code, out, err = run(args, capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("method,index,singular_value")
    assert len(lines) == 1 + 2 * 64  # two methods × min(64, 96) singular values
    code, _, err = run([*args, "--format", "json", "--out", str(tmp_path / "s.json")], capsys)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["shape"] == [64, 96] and set(summary["methods"]) == {"svd", "svdllm"}
    assert (
        summary["methods"]["svdllm"]["relative_loss_at_rank"]
        <= summary["methods"]["svd"]["relative_loss_at_rank"]
    )
    code, _, err = run([*args[:-4], "--layer", "7", "--matrix", "q"], capsys)
    assert code == 2 and "2 layers" in err
    assert torch.isfinite(torch.tensor(summary["methods"]["svd"]["effective_rank"]))


def test_spectra_diagnostics_of_the_whole_model_as_csv_and_json(
    tiny_model_dir, tmp_path, capsys, private_cache
):
    import csv

    import numpy as np

    from sigmascale_core.diagnostics import FIELDS, diagnostics
    from sigmascale_core.models import get_module

    args = ["spectra", "--model", str(tiny_model_dir), "--device", "cpu", "--samples", "2", "--seq-len", "32"]
    args += ["--diagnostics", "--methods", "svd,svdllm"]
    code, out, err = run([*args, "--out", str(tmp_path / "d.csv")], capsys)
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "d.csv").open()))
    assert len(rows) == 2 * 14  # every matrix of the two layers, two methods
    assert list(rows[0]) == ["matrix", "layer", "kind", "method", *FIELDS, "warning"]
    # W's row equals a direct call on the weights (an independent SVD)
    row = next(r for r in rows if r["matrix"] == "model.layers.1.mlp.down_proj" and r["method"] == "svd")
    W = (
        get_module(AutoModelForCausalLM.from_pretrained(tiny_model_dir), row["matrix"])
        .weight.detach()
        .double()
    )
    direct = diagnostics(torch.linalg.svdvals(W).numpy(), tuple(W.shape), W=W.numpy())
    for field in ("alpha", "stable_rank", "log_norm", "num_spikes", "num_traps", "rand_lambda_max"):
        assert float(row[field]) == pytest.approx(float(getattr(direct, field)), rel=1e-9), field
    assert row["warning"] == direct.warning
    # the same numbers from the cache, as JSON for one layer
    code, out, err = run([*args, "--layer", "1", "--format", "json"], capsys)
    assert code == 0, err
    report = json.loads(out)  # strict JSON: NaN written as null
    assert len(report["matrices"]) == 2 * 7 and report["averages"]["svdllm"]["matrices"] == 7
    again = next(r for r in report["matrices"] if r["matrix"] == row["matrix"] and r["method"] == "svd")
    assert again["alpha"] == float(row["alpha"]) and report["averages"]["svdllm"]["rand_lambda_max"] is None
    assert np.isfinite(report["averages"]["svd"]["alpha"])
    code, _, err = run([*args, "--layer", "7"], capsys)
    assert code == 2 and "2 layers" in err
    code, _, err = run([*args[:-3], "--layer", "1"], capsys)  # the spectra need a matrix
    assert code == 2 and "--matrix" in err


def test_sequential_compress(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "seq"
    code, stdout, err = run(
        [
            "compress",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--samples",
            "2",
            "--seq-len",
            "32",
            "--method",
            "asvd",
            "--retention",
            "0.5",
            "--out",
            str(out),
            "--sequential",
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads(stdout)["calibration"]["sequential"] is True
    model, plan = load_compressed(out)
    assert sum(type(m).__name__ == "LowRankLinear" for m in model.modules()) == len(plan.compressed) == 14


# -- allocation, probing and fine-tuning from the command line ---------------------------------------------
def tiny_args(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--device", "cpu", "--samples", "2", "--seq-len", "32"]


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGMASCALE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_allocated_compress_meets_the_budget_and_beats_uniform_on_the_probe(
    tiny_model_dir, tmp_path, capsys, private_cache
):
    from sigmascale_core.allocation import damage_curves, predicted_damage
    from sigmascale_core.sensitivity import SensitivityTable

    table_path = tmp_path / "table.json"
    code, stdout, err = run(
        ["probe", *tiny_args(tiny_model_dir), "--probe", "proxy", "--out", str(table_path)], capsys
    )
    assert code == 0, err
    assert json.loads(stdout)["probe"]["cached"] is False
    table = SensitivityTable.load(table_path)
    assert len(table.shapes) == 14 and table.metric == "relative_loss" and table.method == "svdllm"
    reports = {}
    for allocation in ("uniform", "greedy", "sensitivity"):
        out = tmp_path / allocation
        code, stdout, err = run(
            [
                "compress",
                *tiny_args(tiny_model_dir),
                "--method",
                "svdllm",
                "--retention",
                "0.5",
                "--allocation",
                allocation,
                "--probe",
                "proxy",
                "--out",
                str(out),
            ],
            capsys,
        )
        assert code == 0, err
        reports[allocation] = json.loads(stdout)
        plan = CompressionPlan.load(out / "sigmascale_plan.json")
        assert plan.allocation == allocation and plan.target_retention == 0.5
        max_step = max(m + n for m, n in table.shapes.values())
        params = sum(m.params_after for m in plan.matrices.values())
        budget = 0.5 * sum(m.params_before for m in plan.matrices.values())
        assert budget - max_step < params <= budget or allocation == "uniform"  # within one rank
        ranks = {name: m.rank for name, m in plan.matrices.items()}
        reports[allocation]["damage"] = predicted_damage(damage_curves(table), ranks)
    assert reports["greedy"]["probe"]["cached"] is True  # the table from `sigmascale probe`
    assert (
        len(
            {
                m["rank"]
                for m in json.loads((tmp_path / "greedy" / "sigmascale_plan.json").read_text())[
                    "matrices"
                ].values()
            }
        )
        > 1
    )
    assert reports["greedy"]["damage"] <= reports["sensitivity"]["damage"] + 1e-12
    assert reports["greedy"]["damage"] < reports["uniform"]["damage"]


def test_perplexity_probe_refuses_evaluation_text(tiny_model_dir, tmp_path, capsys, private_cache):
    text = tmp_path / "eval.txt"
    text.write_text("The same words are evaluated and probed. " * 400)
    args = ["probe", *tiny_args(tiny_model_dir), "--text", f"file:{text}", "--eval", f"file:{text}"]
    code, _, err = run(args, capsys)
    assert code == 2 and "both" in err
    assert not (private_cache / "probes").exists()


def test_finetune_lowers_the_held_out_distillation_loss(tiny_model_dir, tmp_path, capsys, private_cache):
    out = tmp_path / "ft"
    code, stdout, err = run(
        [
            "compress",
            *tiny_args(tiny_model_dir),
            "--method",
            "svd",
            "--retention",
            "0.3",
            "--finetune-steps",
            "8",
            "--finetune-lr",
            "3e-3",
            "--finetune-seq-len",
            "32",
            "--eval",
            "boolq:evaluation",
            "--max-eval-tokens",
            "256",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads(stdout)
    ft = report["finetune"]
    assert ft["steps"] == 8 and ft["trained_parameters"] > 0
    assert ft["held_out_after"]["loss"] < ft["held_out_before"]["loss"]
    assert "perplexity_before_finetune" in report
    # the saved model is the fine-tuned one: its perplexity is the report's "after" figure
    again = reloaded_perplexity(out, capsys)
    assert again == pytest.approx(report["perplexity"]["boolq:evaluation"]["perplexity"], rel=1e-5)
    assert again != pytest.approx(
        report["perplexity_before_finetune"]["boolq:evaluation"]["perplexity"], rel=1e-6
    )


def test_allocation_and_plan_or_negative_steps_are_refused(capsys, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    code, _, err = run(
        ["compress", "--plan", str(plan), "--allocation", "greedy", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "--allocation" in err
    code, _, err = run(
        ["compress", "--retention", "0.5", "--finetune-steps", "-1", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "--finetune-steps" in err


# --------------------------------------------------------------------------------------------------
# Every input is checked before work: one line on stderr, exit status 2, nothing written


@pytest.fixture(scope="module")
def plans(tiny_model_dir, tmp_path_factory):
    """Plan files for the tiny model: good, corrupt, another version, a bad rank, another model's,
    and one naming matrices the model does not have."""
    from sigmascale_core.models import load_model
    from sigmascale_core.surgery import target_shapes

    loaded = load_model(str(tiny_model_dir))
    shapes = target_shapes(loaded.model)
    good = CompressionPlan.uniform(shapes, 0.5, "svd", loaded.fingerprint)
    root = tmp_path_factory.mktemp("plans")
    data = good.to_dict()
    first = next(iter(shapes))
    files = {
        "good": data,
        "corrupt": '{"version": 1, "matr',
        "version": {**data, "version": 99},
        "rank": {
            **data,
            "matrices": {**data["matrices"], first: {"shape": list(shapes[first]), "rank": 10**6}},
        },
        "fingerprint": {**data, "model_fingerprint": "another-model"},
        "names": {
            **data,
            "matrices": {**data["matrices"], "model.layers.9.mlp.up_proj": {"shape": [96, 64], "rank": 4}},
        },
        "option": {**data, "options": {"alpha": 0.5}},
    }
    for name, content in files.items():
        (root / f"{name}.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return root


def tiny_with_bad_weight(directory, tmp_path):
    """The tiny model with one NaN in the final norm, a weight no plan compresses."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    AutoTokenizer.from_pretrained(directory).save_pretrained(tmp_path / "nan")
    return tmp_path / "nan"


BEFORE_LOAD = [  # (arguments after the base ones, what the one line must say)
    (["--retention", "0.5", "--seq-len", "0"], "--seq-len must be a positive integer, got 0"),
    (["--retention", "0.5", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--retention", "0.5", "--samples", "0"], "--samples must be a positive integer"),
    (["--retention", "0.5", "--max-eval-tokens", "0"], "--max-eval-tokens must be a positive integer"),
    (["--retention", "0.5", "--device", "foo"], "--device 'foo' is not a device"),
    (["--retention", "0.5", "--option", "steps=abc"], "option steps expects int"),
    (["--retention", "0.5", "--option", "bogus=1"], "unknown option(s) ['bogus']"),
    (["--retention", "0.5", "--option", "lr=-1"], "lr > 0"),
    (["--retention", "0.5", "--option", "init=random"], "unknown init 'random'"),
    (["--retention", "0.5", "--text", "file:/no/such/text.txt"], "no such file"),
    (["--retention", "0.5", "--eval", "file:/no/such/eval.txt"], "no such file"),
    (["--retention", "0.5", "--out", "/dev/null/x"], "/dev/null is not a folder"),
    (["--plan", "{plans}/corrupt.json"], "not valid plan JSON"),
    (["--plan", "{plans}/version.json"], "plan version 99 is not supported"),
    (["--plan", "{plans}/rank.json"], "rank must be an int in [1, "),
    (["--plan", "{plans}/option.json"], "unknown option(s) ['alpha'] for method 'svd'"),
    (["--plan", "{plans}/missing.json"], "no plan file"),
    (["--plan", "{plans}/good.json", "--retention", "0.5"], "not both"),
]
AFTER_LOAD = [  # checks that need the model: right after it loads, before calibration starts
    (["--plan", "{plans}/fingerprint.json"], "the plan was made for model another-model"),
    (["--plan", "{plans}/names.json"], "this model does not have, e.g. ['model.layers.9.mlp.up_proj']"),
    (["--retention", "0.5", "--seq-len", "300"], "--seq-len 300 exceeds the model's 256 positions"),
    (["--retention", "0.5", "--text", "file:{short}"], "has 5 tokens; 2 samples of 32 tokens need 64"),
    (["--retention", "0.5", "--model", "{nan}"], "model.norm.weight holds 1 NaN/Inf value(s)"),
]


def refusal(extra, tiny_model_dir, plans, tmp_path, capsys) -> tuple[str, float]:
    """Run a compress that must be refused; returns its one error line and the seconds it took."""
    import time

    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    fill = {"plans": plans, "short": short}
    if any("{nan}" in a for a in extra):
        fill["nan"] = tiny_with_bad_weight(tiny_model_dir, tmp_path)
    out, events = tmp_path / "out", tmp_path / "progress.jsonl"
    base = ["compress", *tiny_args(tiny_model_dir), "--method", "sigmascale", "--out", str(out)]
    argv = [*base, "--progress-json", str(events), *[a.format(**fill) for a in extra]]
    start = time.perf_counter()
    code, stdout, err = run(argv, capsys)
    seconds = time.perf_counter() - start
    assert code == 2 and stdout == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists() and not events.exists()  # no model, and no event: calibration never began
    assert not list(tmp_path.glob(".out.*"))
    return err, seconds


@pytest.mark.parametrize(("extra", "message"), BEFORE_LOAD, ids=[m[:30] for _, m in BEFORE_LOAD])
def test_bad_inputs_are_refused_before_the_model_loads(
    extra, message, tiny_model_dir, plans, tmp_path, capsys, monkeypatch
):
    import sigmascale_core.pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(sigmascale_core.pipeline, "load_model", no_loading)
    err, seconds = refusal(extra, tiny_model_dir, plans, tmp_path, capsys)
    assert message in err
    assert seconds < 5


@pytest.mark.parametrize(("extra", "message"), AFTER_LOAD, ids=[m[:30] for _, m in AFTER_LOAD])
def test_inputs_that_need_the_model_are_refused_before_calibration(
    extra, message, tiny_model_dir, plans, tmp_path, capsys, private_cache
):
    err, _ = refusal(extra, tiny_model_dir, plans, tmp_path, capsys)
    assert message in err
    assert not (private_cache / "stats").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(tiny_model_dir, plans, tmp_path, capsys):
    err, seconds = refusal(
        ["--retention", "0.5", "--device", "cuda"], tiny_model_dir, plans, tmp_path, capsys
    )
    assert "no CUDA GPU is available" in err and seconds < 5
