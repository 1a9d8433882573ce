"""What guards a run against the world outside it: preemption signals, and a second process on its workdir."""

from __future__ import annotations

import datetime
import fcntl
import os
import signal
import socket
import threading

import jax
from absl import logging

from dpo_jax.errors import Preempted, UserError, signal_name

LOCK_FILE = ".lock"
AGREEMENT_TIMEOUT_MS = 10 * 60 * 1000  # how long a process waits for the others to hear of a preemption


class PreemptionSignals:
    """Turns SIGTERM / SIGINT into a request to stop after the current step (the loop saves, then raises).

    A second Ctrl-C interrupts at once, as usual. Handlers are installed only in the main thread (Python allows
    no other); elsewhere the signals keep their default behaviour.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._stop_at: int | None = None  # the step every process of a multi-host run stops after

    def __enter__(self) -> "PreemptionSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        del frame
        if self.signum is None:
            self.signum = signum
            logging.warning("%s received: finishing the current step, saving a checkpoint, then exiting",
                            signal_name(signum))
        if signum == signal.SIGINT:  # a second Ctrl-C is not polite any more
            signal.signal(signal.SIGINT, signal.default_int_handler)

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    def should_stop(self, scope: str, step: int) -> bool:
        """Whether to save and stop after `step` (ask once per step; `scope` names the stage). One process: whether
        a signal arrived. Several (jax.distributed): all agree on one step, as Orbax's preemption sync does."""
        if jax.process_count() == 1:
            return self.requested
        if self._stop_at is None:
            self._stop_at = self._agree(f"dpo_jax/preemption/{scope}", step)
        return self._stop_at is not None and step >= self._stop_at

    def _agree(self, prefix: str, step: int) -> int | None:
        """A signalled process posts a notice in jax.distributed's key-value store; every process that reads it
        posts its current step and waits at a barrier, so no process has moved on when all read the posted steps:
        the latest of them is the step all stop after (the others run up to it; its steps are already dispatched).
        A process that was not signalled stops with the signal of the one that was."""
        from orbax.checkpoint import multihost

        client = multihost.get_jax_distributed_client()
        if self.signum is not None:
            client.key_value_set(f"{prefix}/signal", str(self.signum), allow_overwrite=True)
        try:
            notice = client.key_value_try_get(f"{prefix}/signal")
        except Exception:  # NOT_FOUND: no process was signalled
            return None
        self.signum = self.signum or int(notice)
        client.key_value_set(f"{prefix}/step/{jax.process_index()}", str(step), allow_overwrite=True)
        client.wait_at_barrier(f"{prefix}/barrier", AGREEMENT_TIMEOUT_MS)
        stop_at = max(int(value) for _, value in client.key_value_dir_get(f"{prefix}/step/"))
        logging.warning("%s: all %d processes stop after step %d", signal_name(self.signum), jax.process_count(), stop_at)
        return stop_at

    def stop(self, where: str) -> None:
        """Raise Preempted if a signal arrived (call where stopping loses nothing, e.g. right after a save);
        `where` says how far the run got, e.g. "dpo step 7 (...)"."""
        if self.signum is not None:
            raise Preempted(self.signum, f"{signal_name(self.signum)} at {where}; rerun the same command to resume")


class WorkdirLock:
    """An exclusive lock on `<workdir>/.lock` for the run's lifetime (fcntl.flock: the kernel drops it when the
    process dies, so a killed run leaves no stale lock). A second process is refused, naming the first."""

    def __init__(self, workdir: str) -> None:
        self.path = os.path.join(workdir, LOCK_FILE)
        self._file = None

    def __enter__(self) -> "WorkdirLock":
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise UserError(f"workdir {os.path.dirname(self.path)} is in use by {holder}; "
                            "wait for it to finish or use another --workdir") from None
        self._file.seek(0)
        self._file.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        self._file.write(f"process {os.getpid()} on {socket.gethostname()} (started {started})\n")
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
