"""The Celery app: ``celery -A worker.app worker|beat|flower``.

JSON only (a pickle-typed message is refused, never deserialized). Configuration is read from
``AFTERWRITE_*`` variables when Celery first needs it, so importing this module never fails;
starting a worker with bad settings does, naming the variable.

Tasks move batches, not events: beat kicks each kind's drain every ``drain_interval_s``; the
drain reads up to ``batch_max_entries`` stream entries per batch and keeps going while there is
backlog, within ``drain_budget_s``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from afterwrite.settings import Settings, load_settings
from models.registry import kinds
from worker.runtime import RuntimeHolder

DRAIN_TASK = "afterwrite.drain"
RECLAIM_TASK = "afterwrite.reclaim"


def celery_config(settings: Settings) -> dict[str, Any]:
    kick_expiry_s = max(5.0, 5 * settings.drain_interval_s)
    schedule: dict[str, Any] = {}
    for kind in kinds:
        schedule[f"drain:{kind.name}"] = {
            "task": DRAIN_TASK,
            "schedule": settings.drain_interval_s,
            "args": (kind.name,),
            # A kick nobody picked up in time is dropped: the next one does the same work.
            "options": {"expires": kick_expiry_s},
        }
        schedule[f"reclaim:{kind.name}"] = {
            "task": RECLAIM_TASK,
            "schedule": settings.reclaim_interval_s,
            "args": (kind.name,),
            "options": {"expires": settings.reclaim_interval_s},
        }
    return {
        "broker_url": settings.celery_broker_url,
        "broker_connection_retry_on_startup": True,
        # Well above any task's duration; Celery's Redis transport redelivers unacked task
        # messages only after this (drain kicks are not acked late, so it rarely matters).
        "broker_transport_options": {"visibility_timeout": 3600},
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": False,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.drain_budget_s + settings.batch_timeout_s * 2,
        "task_soft_time_limit": settings.drain_budget_s + settings.batch_timeout_s,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
        "beat_schedule": schedule,
    }


app = Celery("afterwrite", include=["worker.tasks"])
app.afterwrite = RuntimeHolder()  # the process-local Runtime, see worker.runtime


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(load_settings()))
