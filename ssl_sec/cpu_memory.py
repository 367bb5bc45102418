"""Keep freed CPU memory in the process instead of handing it back to the OS at every step.

Why: torch allocates CPU tensors with glibc's malloc. With glibc's default settings a freed
block of a few MiB at the top of the heap is returned to the kernel (trimmed) and the next
step's block of the same size is faulted in again, page by page. A training step frees and
re-allocates the same few dozen tensors every iteration, so on the CPU this costs thousands
of page faults per step: measured on the fused objective at N=512 (eval/bench_objective.py),
about 4,400 page faults per forward + backward with the defaults and under 10 with the
settings below. PyTorch's CPU performance guides point
at the same cause (they suggest preloading jemalloc or tcmalloc); glibc's own knobs fix it
without another library.

The settings (mallopt(3)): the heap keeps up to ``TRIM_THRESHOLD`` bytes of free memory at
its top, grows in steps padded by ``TOP_PAD`` bytes, and serves blocks up to
``MMAP_THRESHOLD`` (glibc's maximum) from the heap rather than from fresh mmaps. The price
is resident memory: the process may keep up to about 1 GiB of freed memory for reuse.

Applied by the `ssl-sec` command at start-up, on Linux with glibc only; set the environment
variable ``SSL_SEC_KEEP_FREED_MEMORY=0`` to run with glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 1 << 30  # 1 GiB
TOP_PAD = 256 << 20  # 256 MiB
MMAP_THRESHOLD = 32 << 20  # 32 MiB: the largest value glibc accepts on 64-bit systems

ENV_VAR = "SSL_SEC_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Apply the malloc settings above to this process. Returns True when they took effect,
    False when opted out (``SSL_SEC_KEEP_FREED_MEMORY=0``), not on Linux, or not on glibc
    (e.g. musl, or jemalloc preloaded without mallopt). Safe to call more than once."""
    if os.environ.get(ENV_VAR, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no such symbol)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (_M_TOP_PAD, TOP_PAD),
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        )
    )
