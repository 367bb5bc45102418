"""Run the `ssl-sec` CLI with a fault injected, for tests/test_faults.py.

    python tests/tools/fault_inject.py kill-in-save N -- pretrain RECIPE ...

kill-in-save N: the N-th checkpoint write stops half way and the process kills itself
with SIGKILL (a node dying while it writes last.pt).
"""

import io
import os
import signal
import sys

import torch

from ssl_sec.cli import main


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


if __name__ == "__main__":
    fault, arg, sep, *argv = sys.argv[1:]
    assert fault == "kill-in-save" and sep == "--", sys.argv
    kill_in_save(int(arg))
    sys.exit(main(argv))
