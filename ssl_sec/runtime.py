"""Where and in what arithmetic the work runs: device resolution and the precision policy.

Training and every evaluation read these, so the engine and `evaluation/` agree on what
`device: auto` and `precision: auto` mean.

Precision (recipe key `precision`):

| value  | CUDA                                          | CPU                                  |
| ------ | --------------------------------------------- | ------------------------------------ |
| `auto` | bf16 autocast where the GPU has bf16, else fp16 | fp32                               |
| `bf16` | bf16 autocast                                 | bf16 autocast (fast on CPUs with AVX512-BF16 / AMX) |
| `fp16` | fp16 autocast + dynamic loss scaling          | the same (correct but slow: for tests) |
| `fp32` | fp32 (no autocast)                            | fp32                                 |

Losses are computed in float32 inside every autocast region (`ssl_sec.losses`).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from .errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when a GPU is visible, else cpu; `cuda[:i]` needs a visible GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA GPU is visible; use device=cpu or device=auto")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r} but only {torch.cuda.device_count()} GPU(s) are "
                          "visible; use cuda:0 .. cuda:N-1")
    return device


def effective_precision(device: torch.device, precision: str) -> str:
    """The arithmetic `autocast_for(device, precision)` really uses: bf16, fp16 or fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if _cuda_has_bf16(device.index) else "fp16"
    return precision


@functools.cache
def _cuda_has_bf16(index: int | None) -> bool:
    # Asked once per device, not on every training step's autocast.
    with torch.cuda.device(index if index is not None else torch.cuda.current_device()):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_for(device: torch.device, precision: str):
    """The autocast context for `precision` on `device` (a no-op context for fp32)."""
    used = effective_precision(device, precision)
    if used == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[used])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Dynamic loss scaling, enabled for fp16 only (bf16 has fp32's exponent range)."""
    enabled = effective_precision(device, precision) == "fp16"
    return torch.amp.GradScaler(device.type, enabled=enabled)


@contextlib.contextmanager
def backends(device: torch.device, deterministic: bool):
    """cuDNN autotuning for the fixed training shapes, or bit-reproducible kernels, for the
    duration of a run (the process-wide switches are restored afterwards).

    `deterministic=True`: deterministic algorithms only (an error names any op without one),
    no autotuning, and cuBLAS's fixed workspace (read at the first cuBLAS call of the
    process), so that a resumed CUDA run repeats an uninterrupted one exactly. It costs speed.
    """
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def memory_note(device: torch.device) -> str:
    """What memory `device` has, for an out-of-memory message: the GPU's name, total and
    free memory, or the host's RAM."""
    if device.type == "cuda":
        try:
            free, total = torch.cuda.mem_get_info(device)
            return (f"{torch.cuda.get_device_name(device)} ({total / 2**30:.1f} GiB, "
                    f"{free / 2**30:.1f} GiB free after the failed allocation)")
        except RuntimeError:  # a device in an error state: its name is still useful
            return str(device)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return f"the CPU ({total / 2**30:.1f} GiB of RAM)"
    except (ValueError, OSError, AttributeError):
        return "the CPU"
