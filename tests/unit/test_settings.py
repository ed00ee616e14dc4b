from __future__ import annotations

import pytest

from afterwrite.core.errors import SettingsError
from afterwrite.core.settings import load_settings


def test_defaults_are_valid_and_urls_optional() -> None:
    s = load_settings({})
    assert s.batch_max_entries == 5000
    assert s.database_url is None
    with pytest.raises(SettingsError, match="AFTERWRITE_DATABASE_URL is not set"):
        s.require_database_url()


def test_values_are_parsed_from_the_environment() -> None:
    s = load_settings(
        {
            "AFTERWRITE_DATABASE_URL": "postgresql://u:p@db:5432/app",
            "AFTERWRITE_REDIS_URL": "rediss://user:secret@cache:6380/2",
            "AFTERWRITE_BATCH_MAX_ENTRIES": "2000",
            "AFTERWRITE_DRAIN_INTERVAL_S": "0.5",
            "AFTERWRITE_LOG_LEVEL": "debug",
            "AFTERWRITE_FLOWER_USER": "admin",
            "AFTERWRITE_FLOWER_PASSWORD": "hunter2",
            "AFTERWRITE_METRICS_USER": "prometheus",
            "AFTERWRITE_METRICS_PASSWORD": "scrape-secret",
        }
    )
    assert s.batch_max_entries == 2000
    assert s.drain_interval_s == 0.5
    assert s.log_level == "DEBUG"
    assert s.sqlalchemy_url() == "postgresql+psycopg://u:p@db:5432/app"
    assert s.celery_broker_url == "rediss://user:secret@cache:6380/2"
    assert "hunter2" not in repr(s)
    assert "scrape-secret" not in repr(s)
    assert s.metrics_password is not None
    assert s.metrics_password.get_secret_value() == "scrape-secret"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AFTERWRITE_BATCH_MAX_ENTRIES": "many"}, "AFTERWRITE_BATCH_MAX_ENTRIES: Input should"),
        ({"AFTERWRITE_BATCH_MAX_ENTRIES": "0"}, "AFTERWRITE_BATCH_MAX_ENTRIES"),
        (
            {"AFTERWRITE_DATABASE_URL": "mysql://x/y"},
            "AFTERWRITE_DATABASE_URL: must be a postgresql",
        ),
        ({"AFTERWRITE_REDIS_URL": "http://cache"}, "AFTERWRITE_REDIS_URL: must be a redis"),
        ({"AFTERWRITE_REDIS_URL": "redis://"}, "AFTERWRITE_REDIS_URL: has no host"),
        ({"AFTERWRITE_LOG_LEVEL": "loud"}, "AFTERWRITE_LOG_LEVEL"),
        ({"AFTERWRITE_STREAM_PREFIX": "a b"}, "AFTERWRITE_STREAM_PREFIX"),
        ({"AFTERWRITE_BACH_MAX_ENTRIES": "10"}, "did you mean AFTERWRITE_BATCH_MAX_ENTRIES"),
        ({"AFTERWRITE_RECLAIM_IDLE_S": "30"}, "AFTERWRITE_RECLAIM_IDLE_S must be at least twice"),
        ({"AFTERWRITE_FLOWER_PASSWORD": "x"}, "AFTERWRITE_FLOWER_USER is not"),
        ({"AFTERWRITE_FLOWER_ADDRESS": ""}, "AFTERWRITE_FLOWER_ADDRESS: .*0.0.0.0"),
        ({"AFTERWRITE_METRICS_PASSWORD": "x"}, "AFTERWRITE_METRICS_USER is not"),
        (
            {
                "AFTERWRITE_FLOWER_USER": "admin",
                "AFTERWRITE_FLOWER_PASSWORD": "same",
                "AFTERWRITE_METRICS_USER": "prometheus",
                "AFTERWRITE_METRICS_PASSWORD": "same",
            },
            "AFTERWRITE_METRICS_PASSWORD must differ from AFTERWRITE_FLOWER_PASSWORD",
        ),
        ({"AFTERWRITE_RETENTION_DAYS": "query"}, "AFTERWRITE_RETENTION_DAYS: 'query': expected"),
        ({"AFTERWRITE_RETENTION_DAYS": "query=0"}, "at least 1 day"),
        ({"AFTERWRITE_RETENTION_DAYS": "query=x"}, r"AFTERWRITE_RETENTION_DAYS \(query\): Input"),
    ],
)
def test_bad_settings_fail_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(env)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"AFTERWRITE_BATCH_MAX_ENTRIES": "x", "AFTERWRITE_NOPE": "1"})
    assert "AFTERWRITE_BATCH_MAX_ENTRIES" in str(info.value)
    assert "AFTERWRITE_NOPE: unknown setting" in str(info.value)


def test_environment_is_read_only_through_load_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AFTERWRITE_BATCH_MAX_ENTRIES", "123")
    assert load_settings().batch_max_entries == 123
    assert load_settings({}).batch_max_entries == 5000
