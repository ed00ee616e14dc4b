from __future__ import annotations

import ssl
import warnings

from celery import Celery
from redbeat.schedulers import RedBeatConfig

from afterwrite.core.settings import load_settings
from afterwrite.worker.app import DISPATCH_TASK, RECLAIM_TASK, celery_config


def test_json_only_and_a_schedule_per_kind() -> None:
    config = celery_config(load_settings({}, redis_url="redis://cache:6379/0"))
    assert config["accept_content"] == ["json"]
    assert config["task_serializer"] == "json"
    assert config["result_accept_content"] == ["json"]
    schedule = config["beat_schedule"]
    # one dispatcher kicks the drains that have work (no per-kind drain kick every second)
    assert schedule["dispatch"]["task"] == DISPATCH_TASK
    assert not [name for name in schedule if name.startswith("drain:")]
    assert {"embed", "index_refresh"}.isdisjoint(schedule)
    assert schedule["reclaim:query"]["task"] == RECLAIM_TASK
    assert config["broker_url"] == "redis://cache:6379/0"
    assert "broker_use_ssl" not in config
    # kicks are taken once, not tracked: nothing for a full Redis to refuse on receipt or ack
    assert config["broker_transport_options"]["ack_emulation"] is False
    assert config["broker_transport"] == "afterwrite.worker.broker:Transport"
    # beat's state as JSON in Redis, under the pipeline's prefix, never a pickle file
    assert config["beat_scheduler"] == "afterwrite.worker.beat:Scheduler"
    assert config["redbeat_key_prefix"] == "afterwrite:beat"


def test_beat_starts_without_redbeat_deprecation_warnings() -> None:
    app = Celery("t", set_as_current=False)
    app.conf.update(celery_config(load_settings({}, redis_url="redis://cache:6379/0")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # redbeat warns (and logs) at every beat start
        conf = RedBeatConfig(app)
    assert conf.redis_url == "redis://cache:6379/0"
    assert conf.key_prefix == "afterwrite:beat"


def test_tls_broker_verifies_certificates() -> None:
    config = celery_config(load_settings({}, redis_url="rediss://app:pw@cache:6380/0"))
    assert config["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    explicit = celery_config(
        load_settings({}, redis_url="rediss://cache:6380/0?ssl_cert_reqs=none")
    )
    assert "broker_use_ssl" not in explicit
