"""One check of method options for plans, probes and the CLI; the CompressionConfig JSON twin."""

import json

import pytest
from tiny import tiny_model

from sigmascale_core.methods import check_options
from sigmascale_core.models import model_fingerprint
from sigmascale_core.pipeline import CompressionConfig, check_config
from sigmascale_core.plan import CompressionPlan, parse_options
from sigmascale_core.probing import proxy_sensitivity
from sigmascale_core.surgery import target_shapes

BAD_OPTIONS = [  # (method, options, what the error names)
    ("svd", {"alpha": 0.5}, "unknown option(s) ['alpha'] for method 'svd'; it takes: compute_dtype"),
    ("svdllm", {"compute_dtype": "float16"}, "compute_dtype of svdllm must be one of ('float64', 'float32')"),
    ("asvd", {"alpha": "half"}, "option alpha of asvd expects float, got 'half'"),
    ("sigmascale", {"steps": 1.5}, "option steps of sigmascale expects int, got 1.5"),
    ("sigmascale", {"steps": True}, "expects int, got True"),
    ("sigmascale", {"lr": float("nan")}, "must be finite"),
    ("sigmascale", {"lr": 0}, "lr > 0"),
    ("sigmascale", {"steps": -1}, "steps ≥ 0"),
    ("sigmascale", {"l2": -1e-3}, "l2, init_noise ≥ 0"),
    ("sigmascale", {"init": "random"}, "unknown init 'random'"),
    ("nope", {}, "unknown method 'nope'"),
]


@pytest.mark.parametrize(("method", "options", "message"), BAD_OPTIONS)
def test_bad_options_are_refused_the_same_way_everywhere(method, options, message):
    with pytest.raises(ValueError) as direct:
        check_options(method, options)
    assert message in str(direct.value)
    if method == "nope":
        return
    model = tiny_model()
    shapes = target_shapes(model)
    data = CompressionPlan.uniform(shapes, 0.5, method, model_fingerprint(model)).to_dict()
    with pytest.raises(ValueError) as from_json:  # a plan file from the app or a colleague
        CompressionPlan.from_dict({**data, "options": options})
    with pytest.raises(ValueError) as probing:
        proxy_sensitivity(model, {}, method, options=options)
    assert str(from_json.value) == str(probing.value) == str(direct.value)


def test_good_options_pass_and_cli_strings_are_typed_by_the_defaults():
    assert check_options("sigmascale", {"lr": 1, "steps": 0, "init": "identity"}) == {
        "lr": 1,
        "steps": 0,
        "init": "identity",
    }
    assert check_options("svd", None) == {}
    assert parse_options(["steps=40", "lr=0.1", "init=identity"], "sigmascale") == {
        "steps": 40,
        "lr": 0.1,
        "init": "identity",
    }
    with pytest.raises(ValueError, match="option steps expects int, got 'abc'"):
        parse_options(["steps=abc"], "sigmascale")
    with pytest.raises(ValueError, match="key=value"):
        parse_options(["steps"], "sigmascale")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\]"):
        parse_options(["bogus=1"], "sigmascale")


def test_compression_config_json_twin(tmp_path):
    config = CompressionConfig(
        out=str(tmp_path / "o"),
        retention=0.5,
        method="sigmascale",
        options={"steps": 3},
        evaluation=("boolq:evaluation", "lambada"),
        seq_len=64,
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert data["evaluation"] == ["boolq:evaluation", "lambada"] and data["options"] == {"steps": 3}
    assert CompressionConfig.from_dict(data) == config
    with pytest.raises(ValueError, match=r"unknown compression config field\(s\) \['retnetion'\]"):
        CompressionConfig.from_dict({**data, "retnetion": 0.4})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"seq_len": 0}, "--seq-len must be a positive integer, got 0"),
        ({"batch_size": 0}, "--batch-size must be a positive integer"),
        ({"finetune_steps": -1}, "--finetune-steps must be ≥ 0"),
        ({"finetune_lr": float("inf")}, "--finetune-lr must be a finite number"),
        ({"dtype": "int8"}, "--dtype 'int8'"),
        ({"allocation": "best"}, "--allocation 'best'"),
        ({"retention": None}, "give --retention R or --plan PLAN.json"),
        ({"device": "meta"}, "--device meta: unsupported device type"),
        ({"device": "tpu"}, "--device 'tpu' is not a device"),
    ],
)
def test_config_checks_name_the_field(fields, message, tmp_path):
    config = CompressionConfig(**{"out": str(tmp_path / "o"), "retention": 0.5, **fields})
    with pytest.raises(ValueError) as error:
        check_config(config)
    assert message in str(error.value)
