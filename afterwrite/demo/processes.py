"""Starting and stopping afterwrite's own processes (worker, beat) as subprocesses.

Used by the demo, the benchmark and the acceptance tests, so all three run the pipeline the way
production does: real ``celery`` processes talking to real services.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


class Process:
    """One child process with its log file; stop() is idempotent."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log: Path,
        *,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = log.open("ab")
        self.proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() reaches the pool children
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process only (not its children)."""
        if self.alive():
            os.kill(self.proc.pid, sig)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole process group (the worker and its pool children)."""
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(self.proc.pid, sig)
        if sig == signal.SIGKILL:
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (Celery's warm shutdown: finish the current batch), then SIGKILL."""
        if self.alive():
            self.kill_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill_group(signal.SIGKILL)
        else:
            # the main process is gone; make sure no orphaned pool child keeps draining
            self.kill_group(signal.SIGKILL)
        self._log_file.close()
        return self.proc.returncode

    def tail(self, size: int = 3000) -> str:
        data = self.log.read_bytes() if self.log.exists() else b""
        return data[-size:].decode(errors="replace")


def celery_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "afterwrite.worker.app", *args]


def start_worker(
    env: Mapping[str, str],
    log_dir: Path,
    *,
    concurrency: int = 2,
    name: str = "worker",
    loglevel: str = "WARNING",
) -> Process:
    argv = celery_argv(
        "worker",
        "--concurrency",
        str(concurrency),
        "--loglevel",
        loglevel,
        "--hostname",
        f"{name}@%h",
        "--without-mingle",
        "--without-gossip",
    )
    return Process(name, argv, env, log_dir / f"{name}.log")


def start_beat(env: Mapping[str, str], log_dir: Path, *, loglevel: str = "WARNING") -> Process:
    argv = celery_argv("beat", "--loglevel", loglevel)
    return Process("beat", argv, env, log_dir / "beat.log")
