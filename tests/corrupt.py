"""Damage a safetensors file the way a disk or a bad copy does: one byte inside one tensor's data."""

import json
import struct
from pathlib import Path


def flip_tensor_byte(path: Path, name: str, index: int, mask: int = 0x01) -> None:
    """XOR byte `index` (negative: from the end) of tensor `name`'s data with `mask`; the file still
    parses, so only a content check can tell."""
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + header_len])[name]["data_offsets"]
    start = 8 + header_len
    raw[start + (begin if index >= 0 else end) + index] ^= mask
    path.write_bytes(bytes(raw))
