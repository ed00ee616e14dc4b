"""How ``afterwrite flower`` runs Flower: every page behind its authentication.

Flower guards its pages and API with ``tornado.web.authenticated``, but not ``/metrics`` and
``/healthcheck`` (``flower.views.monitor``): they answer anyone who can reach the port.
:func:`require_authentication_everywhere` puts the same guard on those two handlers, so with
basic auth configured a request without the credentials gets 401 there too. It patches
Flower's classes in this process only, which is why the guard holds for ``afterwrite flower``
(Flower in-process) and not for ``celery -A afterwrite.worker.app flower``.

Used by afterwrite.cli.main.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

TASKS_COLUMNS = "name,args,result,received,runtime"
"""Flower's task list columns (``--tasks_columns``): the kind is the task's argument and the
rows are in its result (``inserted``, ``entries``, ``dead_lettered``), so both are shown
without opening each task."""

_GUARDED = "_afterwrite_authenticated"


def require_authentication_everywhere() -> list[str]:
    """Wrap ``get`` of Flower's monitor handlers (``/metrics``, ``/healthcheck``) in
    ``tornado.web.authenticated``, as Flower's other handlers are. Idempotent.

    Returns the names of the handlers now guarded. Raises RuntimeError when a Flower version
    without them is installed, rather than start with an unguarded endpoint left unknown.
    """
    import tornado.web
    from flower.views import monitor

    guarded = []
    for name in ("Metrics", "Healthcheck"):
        handler = getattr(monitor, name, None)
        get: Callable[..., Any] | None = getattr(handler, "get", None)
        if handler is None or get is None:
            raise RuntimeError(f"flower.views.monitor.{name}.get not found: check Flower's version")
        if not getattr(get, _GUARDED, False):
            wrapped = tornado.web.authenticated(get)
            setattr(wrapped, _GUARDED, True)
            handler.get = wrapped
        guarded.append(name)
    return guarded
