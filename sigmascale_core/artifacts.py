"""Safe artefacts: safetensors and JSON only, written atomically (temp file + rename), never pickles."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
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


# ---------------------------------------------------------------------------------------------------
# Temp files: named after their writer, so a crashed writer's leftovers can be told from live ones

_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=3).hexdigest()  # pids are per host
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # .NAME.RANDOM.tmp, as tempfile makes them
_WRITER = re.compile(r"\.([0-9a-f]{6})-(\d+)\.[a-z0-9_]{8}\.tmp$")  # .NAME.HOST-PID.RANDOM.tmp
_STALE_TEMP_S = 24 * 3600  # a temp of another host (or a reused pid) older than this is a leftover


def temp_prefix(path: str | os.PathLike) -> str:
    """mkstemp/mkdtemp prefix for a temp beside `path` (use suffix='.tmp'): names this host and pid."""
    return f".{Path(path).name}.{_HOST}-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> None:
    """Delete the temp files and dirs in `folder` left by killed writers (SIGKILL, power loss).

    A temp is stale when its writer ran on this host and that pid is gone, or when it is older than a
    day (another host's, a reused pid, or an old-style name without a pid).
    """
    now = time.time()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if not _TEMP_NAME.match(entry.name):
                continue
            match = _WRITER.search(entry.name)
            with contextlib.suppress(FileNotFoundError):  # another cleaner got there first
                dead = match is not None and match[1] == _HOST and not _pid_alive(int(match[2]))
                if dead or now - entry.stat(follow_symlinks=False).st_mtime > _STALE_TEMP_S:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)


# ---------------------------------------------------------------------------------------------------
# Tensor files

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Every byte of t, bit-exact (numpy has no bfloat16, so viewed as a same-size int); no copy for a
    contiguous CPU tensor."""
    flat = t.detach().reshape(-1).contiguous().cpu()
    return flat.view(_SAME_SIZE_INT[flat.element_size()]).numpy().data


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash of named tensors (any dtype, any device): a flipped bit anywhere changes it."""
    return _checksum((name, tensors[name]) for name in sorted(tensors))


def _checksum(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """tensors_checksum of (name, tensor) pairs given in name order, one tensor in memory at a time."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in named:
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def save_tensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """safetensors write that never leaves a half-written file at `path`; the metadata gains the
    content checksum that `read_tensors` verifies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={**(metadata or {}), CHECKSUM: tensors_checksum(tensors)})
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_tensors(
    path: str | os.PathLike, keep: Callable[[str], bool] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of a file written by `save_tensors_atomic`, or None when it is missing,
    unreadable, or its content no longer matches its checksum (a cache entry to rebuild, never to
    trust). With `keep`, only the tensors it accepts are returned, yet every one is read and checked,
    one at a time: a shard of a big file costs its own memory, not the file's. Interrupts
    (KeyboardInterrupt, SystemExit) pass through: they are not corruption."""
    tensors: dict[str, torch.Tensor] = {}

    def each(fh) -> Iterator[tuple[str, torch.Tensor]]:
        for name in sorted(fh.keys()):
            tensor = fh.get_tensor(name)
            if keep is None or keep(name):
                tensors[name] = tensor
            yield name, tensor

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            checksum = _checksum(each(fh))
    except Exception:  # missing, truncated, not safetensors
        return None
    if metadata.pop(CHECKSUM, None) != checksum:
        return None
    return tensors, metadata


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Text write that never leaves a half-written file at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
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
