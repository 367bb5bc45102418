"""SHA-256 digests that make a damaged file fail loudly instead of loading.

`torch.load` reads a checkpoint without checking its data (a bit flipped in a tensor loads
silently), and safetensors checks only its header. So:

- A checkpoint is sealed: the digest of every byte `torch.save` wrote is appended as the zip
  archive's comment (`ssl_sec sha256 <hex>`), which zip readers, torch's included, skip.
  `check_seal` reads the file once more and compares; any changed byte (header, pickled
  state, tensor data, directory) fails it.
- An exported safetensors file carries `digest(tensors + metadata)` in its metadata.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import torch

ALGORITHM = "sha256"
SEAL = b"ssl_sec sha256 "  # + 64 hex digits: the comment that seals a checkpoint's archive
_SEAL_LEN = len(SEAL) + 64
_END_RECORD = 22  # a zip archive ends with this record; its last 2 bytes: the comment length


def seal(file, written_sha256: str) -> None:
    """Seal the zip archive just written to `file` (opened "w+b"), whose bytes hash to
    `written_sha256`: its comment length (0 as torch writes it) becomes the seal's, and the
    seal follows."""
    file.seek(-2, os.SEEK_END)
    if file.read(2) != b"\0\0":
        raise RuntimeError("torch.save ended its archive with a comment; ssl_sec cannot seal it")
    file.seek(-2, os.SEEK_END)
    file.write(struct.pack("<H", _SEAL_LEN) + SEAL + written_sha256.encode("ascii"))


def check_seal(path: Path) -> bool | None:
    """Whether the file's bytes match its seal; None when it carries none (an archive
    without a comment, as torch writes it). A comment that is not a whole seal (a flipped
    length, prefix or digit) counts as damaged: torch writes no comments."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - _END_RECORD - _SEAL_LEN - 2))
        tail = f.read()
        end = tail.rfind(b"PK\x05\x06")  # the end record; what follows it is the comment
        if end < 0 or len(tail) - end < _END_RECORD:
            return None  # no end record here: not a zip archive torch can read either
        length = struct.unpack("<H", tail[end + 20:end + 22])[0]
        comment = tail[end + _END_RECORD:]
        if length == 0 and not comment:
            return None
        if length != _SEAL_LEN or len(comment) != _SEAL_LEN or not comment.startswith(SEAL):
            return False
        h = hashlib.sha256()
        f.seek(0)
        left = size - _SEAL_LEN - 2
        while left > 0:
            chunk = f.read(min(left, 1 << 23))
            if not chunk:
                return False
            h.update(chunk)
            left -= len(chunk)
        h.update(b"\0\0")  # the comment length as torch wrote it
    return h.hexdigest().encode("ascii") == comment[len(SEAL):]


def digest(obj: Any) -> str:
    """SHA-256 (hex) of a nest of dicts, lists, tuples, tensors and plain values.

    Tensors count by dtype, shape and values in logical order; containers by their order."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{str(t.dtype)[6:]}{tuple(t.shape)}".encode())
        if t.numel():
            flat = t.to("cpu").contiguous().reshape(-1)
            h.update(memoryview(flat.view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(data) + data)
    else:  # numbers, None: their repr is exact
        text = repr(obj).encode()
        h.update(b"r%d:" % len(text) + text)
