"""Model surgery: fit factors for a plan (search), swap them into the model (apply), save and reload.

Fit and apply are separate, as in llm-awq: `fit_factors` returns plain LowRankFactors keyed by module
name; `apply_factors` replays them. A compressed model is saved as safetensors weights + the base
config (with the ranks) + the plan + modeling_sigmascale.py, atomically; `load_compressed` rebuilds it
from those alone (no pickles, no refit), and so does plain transformers with trust_remote_code.
`export_compressed` brings folders saved before the modeling file existed up to date.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sigmascale_core import modeling_sigmascale
from sigmascale_core.artifacts import remove_stale_temps, temp_prefix, write_json_atomic
from sigmascale_core.calibration import stats_key
from sigmascale_core.methods import LowRankFactors, decompose
from sigmascale_core.modeling_sigmascale import (
    CLASS_OF_MODEL_TYPE,
    LowRankLinear,
    enable_latent_kv,
    replace_with_low_rank,
)
from sigmascale_core.models import GROUP_OF_KIND, get_module, set_module, target_matrices
from sigmascale_core.plan import CompressionPlan
from sigmascale_core.progress import Progress
from sigmascale_core.stats import ActivationStats

PLAN_FILE = "sigmascale_plan.json"
MODELING_FILE = "modeling_sigmascale.py"  # the copy of modeling_sigmascale in every saved folder
WEIGHTS_FILE = "model.safetensors"


def target_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module name -> (out, in) of every target matrix, for building plans."""
    return {ref.name: ref.shape for ref in target_matrices(model)}


def check_plan_matches(model: nn.Module, plan: CompressionPlan, fingerprint: str | None = None) -> None:
    """ValueError unless the plan's matrices are this model's (and, if given, the fingerprint agrees)."""
    shapes = target_shapes(model)
    if fingerprint is not None and plan.model_fingerprint != fingerprint:
        raise ValueError(
            f"the plan was made for model {plan.model_fingerprint}, this model is {fingerprint}: make a new plan"
        )
    unknown = [name for name in plan.matrices if name not in shapes]
    if unknown:
        raise ValueError(
            f"the plan names {len(unknown)} matrices this model does not have, e.g. {unknown[:3]}: "
            f"make a new plan"
        )
    for name, matrix in plan.matrices.items():
        if shapes.get(name) != tuple(matrix.shape):
            raise ValueError(
                f"plan matrix {name} {matrix.shape} does not match the model ({shapes.get(name)})"
            )


def input_stats_keys(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """{matrix name: the stats key of its input}; matrices that read one input (q/k/v) share a key."""
    refs = {ref.name: ref for ref in target_matrices(model)}
    return {name: stats_key(refs[name].layer, GROUP_OF_KIND[refs[name].kind]) for name in names}


def fit_factors(
    model: nn.Module,
    plan: CompressionPlan,
    stats: dict[str, ActivationStats],
    progress: Progress | None = None,
    device: torch.device | str | None = None,
) -> dict[str, LowRankFactors]:
    """Factors for every compressed matrix of the plan (search only: the model is not changed).

    Each matrix is independent given its input's stats; the math runs on `device` (default: the
    weight's), float64 where conditioning needs it, so a GPU keeps busy while the model may stay on
    the host (distributed.py gives each rank's GPU its shard). Factors are left on that device.
    """
    check_plan_matches(model, plan)
    todo = plan.compressed
    keys = input_stats_keys(model, todo)
    factors = {}
    for done, (name, matrix) in enumerate(todo.items(), start=1):
        weight = get_module(model, name).weight.detach()
        weight = weight if device is None else weight.to(device)
        key = keys[name]
        if key not in stats:
            raise ValueError(f"no calibration stats for {name} (expected key {key!r})")
        layer_stats = stats[key].to(weight.device)
        factors[name] = decompose(weight, layer_stats, matrix.rank, plan.method, **plan.options)
        if progress is not None:
            progress(done, len(todo), name)
    return factors


def apply_factors(model: nn.Module, factors: dict[str, LowRankFactors]) -> None:
    """Replace each named nn.Linear by a LowRankLinear holding its factors (bias kept), in place."""
    for name, f in factors.items():
        old = get_module(model, name)
        if not isinstance(old, nn.Linear):
            raise ValueError(f"{name} is a {type(old).__name__}, not an nn.Linear: already compressed?")
        if (f.left.shape[0], f.right.shape[1]) != (old.out_features, old.in_features):
            raise ValueError(
                f"factors for {name} are {f.left.shape[0]}×{f.right.shape[1]}, the layer is "
                f"{old.out_features}×{old.in_features}"
            )
        bias = None if old.bias is None else old.bias.detach()
        new = LowRankLinear.from_weights(f.left, f.right, bias)
        set_module(model, name, new.to(device=old.weight.device, dtype=old.weight.dtype))


def compress(
    model: nn.Module,
    plan: CompressionPlan,
    stats: dict[str, ActivationStats],
    progress: Progress | None = None,
) -> dict[str, LowRankFactors]:
    """fit_factors + apply_factors: the model is compressed in place; the factors are returned."""
    factors = fit_factors(model, plan, stats, progress)
    apply_factors(model, factors)
    return factors


def check_output_dir(out_dir: str | os.PathLike, force: bool = False) -> Path:
    """The resolved `out_dir` if a compressed model can be saved there: refused (ValueError) when it
    exists and not `force`, or when its nearest existing ancestor is no writable folder. Cheap: callers
    check before hours of work, and save_compressed again before its rename."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not force:
        raise ValueError(f"--out {out} exists; pass --force to replace it")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: folder {parent} is not writable")
    return out


def save_compressed(
    model: nn.Module,
    plan: CompressionPlan,
    out_dir: str | os.PathLike,
    tokenizer: Any = None,
    report: dict | None = None,
    force: bool = False,
    latent_kv: bool = False,
) -> Path:
    """Write weights (safetensors), config, plan, tokenizer and report into `out_dir` atomically.

    The folder loads with plain transformers too: modeling_sigmascale.py is copied in and named in the
    config's auto_map, the config carries the ranks (and `latent_kv`, the default of the latent KV cache).
    Everything is written into a temp folder beside `out_dir`, then renamed into place: an interrupted
    save leaves no half-written model. An existing `out_dir` is refused unless `force`, also when it
    appears while saving (another run saving there): the final rename never replaces it then.
    """
    out = check_output_dir(out_dir, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)  # a killed writer's half-written folder
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=temp_prefix(out), suffix=".tmp"))
    try:
        save_file(_untied_state(model), str(tmp / WEIGHTS_FILE))
        config = copy.deepcopy(model.config)
        mark_deployable(config, plan, latent_kv)
        (tmp / "config.json").write_text(config.to_json_string())
        shutil.copyfile(modeling_sigmascale.__file__, tmp / MODELING_FILE)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        plan.save(tmp / PLAN_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            write_json_atomic(report, tmp / "report.json")
        if force and out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _rename_no_replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def mark_deployable(config: Any, plan: CompressionPlan, latent_kv: bool = False) -> None:
    """Make `config` one AutoModelForCausalLM(trust_remote_code=True) builds the compressed model from:
    the plan's ranks, the latent-KV default and the SigmaScale class of its family in auto_map (in place,
    as the model's attention layers share the config object)."""
    if config.model_type not in CLASS_OF_MODEL_TYPE:
        raise ValueError(f"cannot save a {config.model_type!r} model: families {sorted(CLASS_OF_MODEL_TYPE)}")
    config.sigmascale_ranks = {name: matrix.rank for name, matrix in plan.compressed.items()}
    config.sigmascale_latent_kv = latent_kv
    model_class = CLASS_OF_MODEL_TYPE[config.model_type]
    config.auto_map = {"AutoModelForCausalLM": f"{Path(MODELING_FILE).stem}.{model_class}"}


def _rename_no_replace(src: Path, dst: Path) -> None:
    """Rename the folder `src` to `dst`, refusing (ValueError) when `dst` exists. A rename onto a
    non-empty folder fails on POSIX; the check before it covers an empty one (a short race remains
    only for an empty folder created in between)."""
    if dst.exists():
        raise ValueError(f"--out {dst} appeared while saving (another run?); pass --force to replace it")
    try:
        os.rename(src, dst)
    except OSError as err:
        raise ValueError(f"--out {dst} appeared while saving (another run?): {err.strerror}") from err


def _untied_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (tied lm_head/embeddings): safetensors refuses aliases."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if identity not in seen:
            seen.add(identity)
            state[name] = tensor.detach().contiguous()
    return state


def is_compressed_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / PLAN_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def load_compressed(
    directory: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    latent_kv: bool | None = None,
) -> tuple[nn.Module, CompressionPlan]:
    """Rebuild a saved compressed model: base architecture from its config, LowRankLinear where the plan
    says, weights from safetensors (no pickles, no recompression). Folders of any SigmaScale version.

    latent_kv: cache the K/V latents (modeling_sigmascale); None takes the folder's config (default off).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if not is_compressed_dir(directory):
        raise ValueError(f"{directory} is not a SigmaScale output folder (no {PLAN_FILE} + {WEIGHTS_FILE})")
    plan = CompressionPlan.load(directory / PLAN_FILE)
    config = AutoConfig.from_pretrained(directory)
    if latent_kv is None:
        latent_kv = getattr(config, "sigmascale_latent_kv", False)
    config.auto_map = {}  # build the base class here; the folder's own code is for plain transformers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    check_plan_matches(model, plan)
    replace_with_low_rank(model, {name: matrix.rank for name, matrix in plan.compressed.items()})
    try:
        state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    except Exception as err:
        raise ValueError(f"cannot read {directory / WEIGHTS_FILE}: {err}") from err
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{directory}: weights do not match the plan (unexpected {unexpected[:3]})")
    model.tie_weights()  # tied copies (lm_head = embeddings) were saved once
    still_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ValueError(
            f"{directory}: weights missing from {WEIGHTS_FILE}: {still_meta[:3]} (of {len(missing)})"
        )
    _materialise_buffers(model, device)
    mark_deployable(model.config, plan, latent_kv)
    if latent_kv:
        enable_latent_kv(model)
    return model.to(device).eval(), plan


def export_compressed(
    source: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False, latent_kv: bool = False
) -> Path:
    """Rewrite a compressed folder (also one saved before plain-transformers loading existed) into
    `out_dir` in today's format: same weights, plan, tokenizer and report; atomic like save_compressed."""
    from transformers import AutoTokenizer

    source = Path(source).expanduser().resolve()
    if not is_compressed_dir(source):
        raise ValueError(
            f"--model {source} is not a SigmaScale output folder (no {PLAN_FILE} + {WEIGHTS_FILE})"
        )
    out = check_output_dir(out_dir, force)
    if out == source:
        raise ValueError("--out must differ from --model: export writes a new folder")
    model, plan = load_compressed(source)
    tokenizer = (
        AutoTokenizer.from_pretrained(source) if (source / "tokenizer_config.json").is_file() else None
    )
    report_file = source / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    return save_compressed(model, plan, out, tokenizer, report, force=force, latent_kv=latent_kv)


def _materialise_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in the file: rebuild their modules off meta."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "config"):
            with torch.device(device):
                set_module(model, name, type(module)(config=module.config))
    leftover = [name for name, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise ValueError(f"buffers left on the meta device after loading: {leftover[:3]}")
