"""Process-wide hooks every producer client needs: re-initialise after ``fork``, flush at exit.

Registered once, when :mod:`producer` is imported. Clients are held weakly: one that is no
longer used and runs no thread is simply collected (a client whose thread is running is kept
alive by it, so its buffer is still flushed at exit).

- ``fork`` (gunicorn, Celery prefork, multiprocessing): in the child every client gets fresh
  locks, an empty buffer, no thread (started again on first use), new Redis connections, and
  lets go of its parent's spill segment without unlocking it. The child never sends entries its
  parent had buffered; the parent does.
- exit: ``close()`` on every client, which flushes its buffer for up to
  ``producer_exit_flush_timeout_s`` and spills what is left. From ``atexit``, and, in processes
  started by ``multiprocessing`` or ``billiard`` (Celery's prefork pool), from their exit
  finalizers: those processes end with ``os._exit``, which skips ``atexit``. Nothing runs on
  SIGKILL or a bare ``os._exit``.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import weakref
from typing import Any, Protocol

log = logging.getLogger("afterwrite.producer")

_PROCESS_UTILS = ("multiprocessing.util", "billiard.util")
_EXIT_PRIORITY = 100  # before the pool's own finalizers close what a flush might need


class Managed(Protocol):
    def _after_fork_in_child(self) -> None: ...

    def _at_exit(self) -> None: ...


class _Token:
    """Something ``register_after_fork`` can hold a weak reference to."""


_clients: weakref.WeakSet[Managed] = weakref.WeakSet()
_token = _Token()
_finalizers_in: dict[str, int] = {}  # util module → pid whose finalizer is registered
_after_forkers: set[str] = set()


def register(client: Managed) -> None:
    _clients.add(client)
    _ensure_process_finalizers()


def unregister(client: Managed) -> None:
    _clients.discard(client)


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._after_fork_in_child()
    if _clients:
        _ensure_process_finalizers()


def _at_exit() -> None:
    for client in list(_clients):
        try:
            client._at_exit()
        except Exception:  # one client's trouble must not keep the others from flushing
            log.exception("afterwrite producer: flush at exit failed")


def _ensure_process_finalizers() -> None:
    """Run :func:`_at_exit` from the exit finalizers of multiprocessing / billiard processes.

    Their child processes clear inherited finalizers at start, then call the functions given
    to ``register_after_fork``: :func:`_rearm` registers ours again there."""
    pid = os.getpid()
    for name in _PROCESS_UTILS:
        util: Any = sys.modules.get(name)
        if util is None or _finalizers_in.get(name) == pid:
            continue
        if name not in _after_forkers:
            _after_forkers.add(name)
            util.register_after_fork(_token, functools.partial(_rearm, name))
        util.Finalize(None, _at_exit, exitpriority=_EXIT_PRIORITY)
        _finalizers_in[name] = pid


def _rearm(name: str, _token: object) -> None:
    _finalizers_in.pop(name, None)  # cleared by the process start-up: register it again
    _ensure_process_finalizers()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
