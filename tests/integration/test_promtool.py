"""Prometheus' own linter on what afterwrite exposes, and its rule tester on the shipped alerts.

``promtool`` (Debian's ``prometheus`` package; ``.ci/run`` installs it) checks the text
exposition of a running ``afterwrite metrics-server`` and of the example app's ``/metrics``
(the producer's counters), loads ``docs/alerts.yml``, and evaluates
``AfterwriteProducerDropping`` on series scraped from the example app while it drops records.
A machine without promtool fails these tests with the install command: they are the only
check that Prometheus itself accepts the output.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis
import yaml

from afterwrite.core.settings import Settings, load_settings
from afterwrite.producer import AsyncClient, Client
from afterwrite.producer.client import redis_options
from afterwrite.worker.index import jobs
from afterwrite.worker.runtime import Runtime
from examples.webapp import create_app
from tests.helpers import wait_for
from tests.index_helpers import add, random_unit

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "docs" / "alerts.yml"
SERVER = "import sys; from afterwrite.cli.main import main; sys.argv[0] = 'afterwrite'; main()"
USER, PASSWORD = "ops", "s3cret pass"


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: apt-get install --no-install-recommends prometheus "
            "(.ci/run does it); these tests are the check that Prometheus accepts our metrics"
        )
    return path


def _check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(settings)
    yield rt
    rt.close()


def test_promtool_rejects_a_quantile_label_on_a_gauge() -> None:
    """What the freshness gauge exported before: the linter does catch it."""
    bad = (
        "# HELP afterwrite_freshness_seconds x\n# TYPE afterwrite_freshness_seconds gauge\n"
        'afterwrite_freshness_seconds{stage="a",scope="b",quantile="0.5"} 1.0\n'
    )
    result = _check_metrics(bad)
    assert result.returncode != 0
    assert "quantile" in result.stdout + result.stderr


def test_a_metrics_server_scrape_passes_promtool(
    base_env: dict[str, str],
    settings: Settings,
    runtime: Runtime,
    pg: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    """Every family present: streams, tables, dead letters, freshness, embeddings, indexes."""
    with Client.from_env(settings) as client:
        for i in range(20):
            client.record_query(f"q{i}")
        client.embed("docs", "d1", "hello world")
    assert runtime.drain("query").run(budget_s=5).inserted == 20
    pg.execute(
        "INSERT INTO dead_letters (kind, payload_raw, payload_sha256, reason, error_code,"
        " detail) VALUES ('query', 'x', %s, 'invalid', 'nul_byte', 'x')",
        (bytes(32),),
    )
    add(pg, "vectors", random_unit(64, 16), model=settings.collection_model("vectors"))
    assert jobs.rebuild(settings, "vectors")["status"] == "published"

    port = _free_port()
    env = {
        **base_env,
        "AFTERWRITE_INDEX_DIR": str(settings.index_path),
        "AFTERWRITE_METRICS_USER": USER,
        "AFTERWRITE_METRICS_PASSWORD": PASSWORD,
    }
    log_path = tmp_path / "metrics.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, "metrics-server", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:

            def up() -> bool:
                assert proc.poll() is None, log_path.read_text()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                except OSError:
                    return False
                return True

            wait_for(up, timeout_s=30, what="the metrics server to listen")
            response = httpx.get(
                f"http://127.0.0.1:{port}/metrics", headers=_basic(USER, PASSWORD), timeout=30
            )
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    assert response.status_code == 200
    text = response.text
    for name in (
        "afterwrite_freshness_seconds",
        "afterwrite_dead_letters",
        "afterwrite_embedding_backlog",
        "afterwrite_index_vectors",
    ):
        assert f"\n{name}{{" in text or f"\n{name} " in text, name
    result = _check_metrics(text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""
    assert 'stat="p99"' in text  # freshness percentiles, not a summary's reserved quantile


def test_the_alert_rules_pass_promtool() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the example app's producer metrics --------------------------------------------------------


def _dropping_client(settings: Settings) -> AsyncClient:
    """A client whose Redis is gone and whose spill journal is disabled: every record drops."""
    gone = load_settings(
        {}, redis_url="redis://127.0.0.1:1/0", spill_max_bytes=0, data_dir=settings.data_dir
    )
    conn = aioredis.Redis.from_url(gone.require_redis_url(), **redis_options(gone, asyncio=True))
    return AsyncClient(conn, gone)


def _metrics_settings(**overrides: Any) -> Settings:
    return load_settings({}, redis_url="redis://127.0.0.1:1/0", **overrides)


def test_the_example_app_serves_producer_metrics_behind_basic_auth(settings: Settings) -> None:
    creds = _metrics_settings(
        metrics_user=USER,
        metrics_password=PASSWORD,
        flower_user="admin",
        flower_password="flower-admin",
    )

    async def scenario() -> dict[str, httpx.Response]:
        conn = aioredis.Redis.from_url(
            settings.require_redis_url(), **redis_options(settings, asyncio=True)
        )
        client = AsyncClient(conn, settings)
        no_creds = create_app(client, latency_ms=0, settings=_metrics_settings())
        app = create_app(client, latency_ms=0, settings=creds)
        try:
            async with (
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://example"
                ) as http,
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=no_creds), base_url="http://example"
                ) as unset,
            ):
                assert (await http.post("/ask", json={"query": "what is RAG?"})).status_code == 200
                return {
                    "anonymous": await http.get("/metrics"),
                    "wrong": await http.get("/metrics", headers=_basic(USER, "nope")),
                    # Flower's admin login is not the scrape login
                    "flower": await http.get("/metrics", headers=_basic("admin", "flower-admin")),
                    "right": await http.get("/metrics", headers=_basic(USER, PASSWORD)),
                    "unset": await unset.get("/metrics"),
                }
        finally:
            await client.close()

    r = asyncio.run(scenario())
    assert r["anonymous"].status_code == 401
    assert r["anonymous"].headers["www-authenticate"].startswith("Basic")
    assert r["wrong"].status_code == 401
    assert r["flower"].status_code == 401
    assert r["unset"].status_code == 503
    assert "AFTERWRITE_METRICS_PASSWORD" in r["unset"].text
    assert r["right"].status_code == 200
    assert r["right"].headers["content-type"].startswith("text/plain")
    text = r["right"].text
    assert 'afterwrite_producer_records_total{outcome="sent"} 2.0' in text  # query + metric
    assert 'afterwrite_producer_records_total{outcome="dropped"} 0.0' in text
    result = _check_metrics(text)
    assert result.returncode == 0, result.stdout + result.stderr


def _dropped(text: str) -> float:
    for line in text.splitlines():
        if line.startswith('afterwrite_producer_records_total{outcome="dropped"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no dropped counter in {text!r}")


def _rule_test(
    values: list[float], tmp_path: Path, *, fires: bool
) -> subprocess.CompletedProcess[str]:
    """promtool's rule unit test: the scraped ``dropped`` values one minute apart, and whether
    AfterwriteProducerDropping must be firing at the end."""
    rule = next(
        r
        for g in yaml.safe_load(ALERTS.read_text())["groups"]
        for r in g["rules"]
        if r.get("alert") == "AfterwriteProducerDropping"
    )
    series = 'afterwrite_producer_records_total{outcome="dropped", job="web"}'
    expected: list[dict[str, Any]] = []
    if fires:
        expected = [
            {
                "exp_labels": {**rule["labels"], "outcome": "dropped", "job": "web"},
                "exp_annotations": rule["annotations"],
            }
        ]
    spec = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": series, "values": " ".join(f"{v:g}" for v in values)}],
                "alert_rule_test": [
                    {
                        "eval_time": f"{len(values) - 1}m",
                        "alertname": "AfterwriteProducerDropping",
                        "exp_alerts": expected,
                    }
                ],
            }
        ],
    }
    path = tmp_path / f"rules-test-{fires}.yml"
    path.write_text(json.dumps(spec))
    return subprocess.run(
        [_promtool(), "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_producer_dropping_fires_on_what_the_example_app_exports(
    settings: Settings, tmp_path: Path
) -> None:
    creds = _metrics_settings(metrics_user=USER, metrics_password=PASSWORD)
    auth = _basic(USER, PASSWORD)

    async def scenario() -> list[str]:
        client = _dropping_client(settings)
        app = create_app(client, latency_ms=0, settings=creds)
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://example"
            ) as http:
                before = (await http.get("/metrics", headers=auth)).text
                answer = await http.post("/ask", json={"query": "what is RAG?"})
                assert answer.status_code == 200  # the answer goes out; the record is lost
                assert answer.json()["recorded"] == "dropped"
                after = (await http.get("/metrics", headers=auth)).text
                return [before, after]
        finally:
            await client.close()

    before, after = asyncio.run(scenario())
    assert (_dropped(before), _dropped(after)) == (0, 2)  # the query and its latency metric
    scraped = [_dropped(before)] * 3 + [_dropped(after)] * 3
    firing = _rule_test(scraped, tmp_path, fires=True)
    assert firing.returncode == 0, firing.stdout + firing.stderr
    # and it does not fire while nothing is dropped (the rule is not always on)
    quiet = _rule_test([_dropped(before)] * 6, tmp_path, fires=False)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    wrongly_expected = _rule_test([_dropped(before)] * 6, tmp_path, fires=True)
    assert wrongly_expected.returncode != 0
