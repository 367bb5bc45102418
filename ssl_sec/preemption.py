"""Stopping cleanly when the cluster says so.

SLURM preempts a job with SIGTERM (and SIGKILL a grace period later), `sbatch
--signal=USR1@120` warns with SIGUSR1 before the time limit, a user presses Ctrl-C (SIGINT).
While training, each of them only sets a flag: the loop finishes the step it is in, writes
a checkpoint and stops with `Preempted`, which the CLI turns into exit code 75
(EX_TEMPFAIL: "try again", what a job script requeues on). A second Ctrl-C interrupts at
once, as a user pressing it twice expects.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Exit code of a run stopped by one of STOP_SIGNALS after writing its checkpoint.
PREEMPTED_EXIT = 75


class Preempted(Exception):  # noqa: N818 - a state, not an error
    """Training stopped on a signal after writing its checkpoint (CLI exit code 75)."""


class StopRequests:
    """While active, the first STOP_SIGNALS delivery sets `signal_name`; the handlers that
    were there before come back on exit. Outside the main thread (signals cannot be caught
    there) it does nothing."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name


def ignore_stop_signals() -> None:
    """For DataLoader workers: the main process decides when to stop and ends them; a
    worker killed by the cluster's SIGTERM would instead fail the step in progress."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
