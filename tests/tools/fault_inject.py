"""Run the `ssl-sec` CLI with a fault injected, for tests/test_faults.py and
tests/test_failures.py.

    python tests/tools/fault_inject.py FAULT ARG -- pretrain RECIPE ...

kill-in-save N: the N-th checkpoint write stops half way and the process kills itself
    with SIGKILL (a node dying while it writes last.pt).
raise-at-step N: the N-th training step raises a RuntimeError (a bug, a failed collective),
    and at that moment a non-daemon thread starts that never ends (as a pin-memory thread
    stuck in a CUDA call would: an interpreter shutdown joining it waits forever). The time of
    the failure and the pids of the DataLoader workers alive then are written as JSON to
    $FAULT_RECORD.
oom-at-step N: the N-th training step runs out of memory (on a GPU for real: an allocation
  no GPU holds; on the CPU torch's OutOfMemoryError raised as the CUDA allocator raises it).
cuda-error-at-step N: the N-th training step triggers a device-side assert (a real CUDA
    error; needs a GPU), with the same record and stuck thread as raise-at-step.
"""

import io
import json
import multiprocessing
import os
import signal
import sys
import threading
import time

import torch

from ssl_sec import engine
from ssl_sec.cli import run


def kill_in_save(n: int) -> None:
    real = torch.save
    calls = [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            buf = io.BytesIO()
            real(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(obj, f, *args, **kwargs)

    torch.save = save


def _record_and_wedge() -> None:
    """Write the failure's time and the live workers' pids, then start a thread that blocks
    any ordinary interpreter exit forever."""
    with open(os.environ["FAULT_RECORD"], "w") as f:
        json.dump({"time": time.time(),
                   "workers": [p.pid for p in multiprocessing.active_children()]}, f)
    threading.Thread(target=threading.Event().wait, daemon=False).start()


def _raise_from_a_device_assert(v1):
    index = torch.full((1,), v1.shape[0] * 10, device=v1.device)
    v1.flatten()[index].sum().item()  # out of bounds on the device: a CUDA error


def fail_at_step(n: int, how: str) -> None:
    real = engine.optimize_step
    calls = [0]

    def step(model, v1, v2, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            if how == "oom" and v1.is_cuda:  # a real one: the allocator cannot serve 4 PiB
                torch.empty(1 << 52, dtype=torch.uint8, device=v1.device)
            if how == "oom":  # torch's error as the CUDA allocator raises it
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            _record_and_wedge()
            if how == "cuda":
                _raise_from_a_device_assert(v1)
            raise RuntimeError(f"injected failure at step {n}")
        return real(model, v1, v2, *args, **kwargs)

    engine.optimize_step = step


if __name__ == "__main__":
    fault, arg, sep, *argv = sys.argv[1:]
    assert sep == "--", sys.argv
    if fault == "kill-in-save":
        kill_in_save(int(arg))
    else:
        how = {"raise-at-step": "raise", "oom-at-step": "oom", "cuda-error-at-step": "cuda"}
        fail_at_step(int(arg), how[fault])
    run(argv)
