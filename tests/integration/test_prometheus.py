"""The Prometheus endpoint against real Redis and PostgreSQL, and its documentation."""

from __future__ import annotations

import base64
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from afterwrite.core.metric_names import METRICS, SPECS
from afterwrite.core.settings import Settings, load_settings
from afterwrite.producer import Client
from afterwrite.producer.client import redis_options
from afterwrite.producer.prometheus import ProducerCollector
from afterwrite.worker.operations.exporter import registry
from afterwrite.worker.runtime import Runtime
from tests.helpers import listening_addresses, wait_for

DOCS = Path(__file__).resolve().parents[2] / "docs"
EXPOSED = {name for m in METRICS for name in m.exposed_names}


def _scrape(settings: Settings) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Sample name and labels → value, parsed from the text exposition."""
    text = generate_latest(registry(settings)).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(settings)
    yield rt
    rt.close()


def test_backlog_gauge_follows_a_known_backlog(
    settings: Settings, runtime: Runtime, pg: psycopg.Connection[Any]
) -> None:
    with Client.from_env(settings) as client:
        for i in range(25):
            client.record_query(f"q{i}")
    s = _scrape(settings)
    assert _value(s, "afterwrite_up", component="redis") == 1
    assert _value(s, "afterwrite_up", component="postgres") == 1
    assert _value(s, "afterwrite_stream_length", kind="query") == 25
    assert _value(s, "afterwrite_stream_length", kind="metric") == 0
    assert _value(s, "afterwrite_stream_entries_added_total", kind="query") == 25
    assert _value(s, "afterwrite_stream_entries_drained_total", kind="query") == 0
    age = _value(s, "afterwrite_stream_oldest_entry_age_seconds", kind="query")
    assert age is not None
    assert 0 <= age < 30

    assert runtime.drain("query").run(budget_s=5).inserted == 25
    with Client.from_env(settings) as client:
        for i in range(4):
            client.record_query(f"later{i}")
    s = _scrape(settings)
    assert _value(s, "afterwrite_stream_length", kind="query") == 4
    assert _value(s, "afterwrite_stream_entries_added_total", kind="query") == 29
    assert _value(s, "afterwrite_stream_entries_drained_total", kind="query") == 25
    assert _value(s, "afterwrite_table_rows", kind="query") == 25
    samples = _value(s, "afterwrite_freshness_samples", stage="enqueue_to_committed", scope="query")
    assert samples == 25
    quantiles = [
        _value(
            s,
            "afterwrite_freshness_seconds",
            stage="enqueue_to_committed",
            scope="query",
            stat=q,
        )
        for q in ("p50", "p90", "p99")
    ]
    assert all(q is not None for q in quantiles)
    assert quantiles == sorted(quantiles)  # type: ignore[type-var]


def test_dead_letters_and_embedding_figures(
    settings: Settings, pg: psycopg.Connection[Any], rdb: redis.Redis
) -> None:
    for i, code in enumerate(("nul_byte", "nul_byte", "too_long")):
        pg.execute(
            "INSERT INTO dead_letters (kind, payload_raw, payload_sha256, reason, error_code,"
            " detail) VALUES ('query', %s, %s, 'invalid', %s, 'x')",
            (code.encode(), bytes([i]) * 32, code),
        )
    rdb.hset(
        f"{settings.stream_prefix}:embed:stats",
        mapping={"requests": 2, "cache_hits": 3, "unchanged": 1, "embedded": 4},
    )
    with Client.from_env(settings) as client:
        client.embed("docs", "d1", "hello world")
    s = _scrape(settings)
    dead = "afterwrite_dead_letters"
    assert _value(s, dead, kind="query", reason="invalid", error_code="nul_byte") == 2
    assert _value(s, dead, kind="query", reason="invalid", error_code="too_long") == 1
    assert _value(s, "afterwrite_embedding_events_total", event="requests") == 2
    assert _value(s, "afterwrite_embedding_events_total", event="throttled") == 0
    # cache hits among the texts that needed a vector: 3 / (3 + 4); unchanged ones needed none
    assert _value(s, "afterwrite_embedding_cache_hit_ratio") == pytest.approx(3 / 7)
    assert _value(s, "afterwrite_embedding_backlog") == 1  # in the embed stream


def test_a_scrape_with_postgres_down_reports_it_instead_of_failing(settings: Settings) -> None:
    down = load_settings(
        {}, database_url="postgresql://nobody@127.0.0.1:1/none", redis_url=settings.redis_url
    )
    s = _scrape(down)
    assert _value(s, "afterwrite_up", component="postgres") == 0
    assert _value(s, "afterwrite_up", component="redis") == 1
    assert _value(s, "afterwrite_stream_length", kind="query") == 0  # Redis figures still there
    assert not any(name == "afterwrite_table_rows" for name, _ in s)


def test_a_scrape_with_redis_down_reports_it_instead_of_failing(settings: Settings) -> None:
    down = load_settings({}, database_url=settings.database_url, redis_url="redis://127.0.0.1:1/0")
    s = _scrape(down)
    assert _value(s, "afterwrite_up", component="redis") == 0
    assert _value(s, "afterwrite_up", component="postgres") == 1
    assert not any(name == "afterwrite_stream_length" for name, _ in s)


def test_producer_collector_exports_the_client_counters(settings: Settings, tmp_path: Path) -> None:
    reg = CollectorRegistry(auto_describe=True)
    conn = redis.Redis.from_url(settings.require_redis_url(), **redis_options(settings))
    with Client(conn, settings) as client:
        reg.register(ProducerCollector(client))
        client.record_query("one")
        client.record_query("two")
        text = generate_latest(reg).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert _value(samples, "afterwrite_producer_records_total", outcome="sent") == 2
    assert _value(samples, "afterwrite_producer_records_total", outcome="recorded") == 2
    assert _value(samples, "afterwrite_producer_records_total", outcome="dropped") == 0
    assert _value(samples, "afterwrite_producer_not_sent_total", reason="failed") == 0
    assert {name for name, _ in samples} <= EXPOSED


# --- the server, as `afterwrite metrics-server` runs it ---------------------------------------

SERVER = (
    "import sys; from afterwrite.cli.main import main; "
    "from afterwrite.cli.observe import metrics_server; "
    "main.add_command(metrics_server); sys.argv[0] = 'afterwrite'; main()"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_metrics_server_requires_credentials_and_serves_prometheus_text(
    base_env: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    with Client.from_env(settings) as client:
        for i in range(3):
            client.record_query(f"q{i}")
    port = _free_port()
    env = {
        **base_env,
        "AFTERWRITE_METRICS_USER": "ops",
        "AFTERWRITE_METRICS_PASSWORD": "s3cret pass",
        "AFTERWRITE_FLOWER_USER": "admin",
        "AFTERWRITE_FLOWER_PASSWORD": "flower admin",
    }
    log = (tmp_path / "metrics.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, "metrics-server", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:

        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "metrics.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return False
            return True

        wait_for(up, timeout_s=30, what="the metrics server to listen")
        assert listening_addresses(port) == {"127.0.0.1"}  # without --host: this machine only
        assert _get(url)[0] == 401
        assert _get(url, ("ops", "wrong"))[0] == 401
        assert _get(url, ("admin", "flower admin"))[0] == 401  # Flower's login is not the scrape's
        status, text = _get(url, ("ops", "s3cret pass"))
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(text)}
        length = families["afterwrite_stream_length"]
        assert {s.labels["kind"]: s.value for s in length.samples}["query"] == 3
        assert b"s3cret" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def test_metrics_server_refuses_to_start_without_credentials(base_env: dict[str, str]) -> None:
    """Flower's login is not enough: the scrape login is its own."""
    env = {**base_env, "AFTERWRITE_FLOWER_USER": "admin", "AFTERWRITE_FLOWER_PASSWORD": "x"}
    proc = subprocess.run(
        [sys.executable, "-c", SERVER, "metrics-server", "--port", str(_free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "AFTERWRITE_METRICS_PASSWORD" in proc.stderr


# --- documentation ----------------------------------------------------------------------------


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    doc = (DOCS / "monitoring.md").read_text()
    documented = set(re.findall(r"`(afterwrite_[a-z0-9_]+)`", doc))
    listed = {
        m.group(1) for m in re.finditer(r"^\| `(afterwrite_[a-z0-9_]+)` \|", doc, re.MULTILINE)
    }
    assert listed == EXPOSED
    assert documented - EXPOSED == set()
    for m in METRICS:
        row = re.search(rf"^\| `{m.exposed_names[0]}` \| (\w+) \| ([^|]+) \|", doc, re.MULTILINE)
        assert row is not None, m.name
        assert row.group(1) == m.type
        assert row.group(2).strip() == (", ".join(m.labels) or "-")


def test_alert_rules_load_and_name_only_registered_metrics() -> None:
    rules = yaml.safe_load((DOCS / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert len(exprs) >= 3
    used = {name for e in exprs for name in re.findall(r"\bafterwrite_[a-z0-9_]+", e)}
    assert used <= EXPOSED, used - EXPOSED
    # the three the issue asks for: backlog age, dead-letter rate, index age
    assert {
        "afterwrite_stream_oldest_entry_age_seconds",
        "afterwrite_dead_letters",
        "afterwrite_unsearchable_oldest_age_seconds",
    } <= used
    for g in rules["groups"]:
        for r in g["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}
            assert r["alert"].startswith("Afterwrite")
    assert set(SPECS) == {m.name for m in METRICS}  # names are unique
