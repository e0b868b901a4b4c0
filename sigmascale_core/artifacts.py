"""Safe artefacts: safetensors and JSON only, written atomically (temp file + rename), never pickles."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CHECKSUM = "checksum"  # metadata field: blake2b of every tensor's name, dtype, shape and bytes


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide, racy once threads run


def _publish(tmp: str, path: Path) -> None:
    """Rename a finished temp file into place, readable like any file the user writes (mkstemp makes 0600)."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash of named tensors (any dtype, any device): a flipped bit anywhere changes it."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        flat = t.reshape(-1).contiguous().cpu()
        h.update(flat.view(_SAME_SIZE_INT[flat.element_size()]).numpy().data)  # bit-exact, no copy
    return h.hexdigest()


def save_tensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """safetensors write that never leaves a half-written file at `path`; the metadata gains the
    content checksum that `read_tensors` verifies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={**(metadata or {}), CHECKSUM: tensors_checksum(tensors)})
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of a file written by `save_tensors_atomic`, or None when it is missing,
    unreadable, or its content no longer matches its checksum (a cache entry to rebuild, never to
    trust). Interrupts (KeyboardInterrupt, SystemExit) pass through: they are not corruption."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118
    except Exception:  # missing, truncated, not safetensors
        return None
    if metadata.pop(CHECKSUM, None) != tensors_checksum(tensors):
        return None
    return tensors, metadata


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Text write that never leaves a half-written file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(obj: object, path: str | os.PathLike) -> None:
    """JSON write that never leaves a half-written file at `path`."""
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def cache_root() -> Path:
    """Where computed artefacts live: $SIGMASCALE_CACHE, else ./cache (the repository's cache/)."""
    return Path(os.environ.get("SIGMASCALE_CACHE", "cache")).resolve()
