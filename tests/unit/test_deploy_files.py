"""The deploy files (docker-compose.yml, Procfile, Dockerfile) against the code they start.

Nothing here runs Docker: the files are parsed and every command, module and setting they name
is checked against the CLI, the importable modules, the settings and pyproject's extras, so a
renamed command, a moved module or a typo in a variable fails here instead of at deploy time.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from fastapi import FastAPI

from afterwrite.cli.main import main
from afterwrite.core.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROCFILE = ROOT / "Procfile"
DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = ROOT / "pyproject.toml"

# A Procfile line may run steps joined by `&&` (the worker migrates first); each step is the
# command of the compose service of that name (the last one: the process's own service).
AFTERWRITE_SERVICES = ("migrate", "worker", "beat", "flower", "metrics", "web")
# ${VAR}, ${VAR:-default}, ${VAR:?error}, $VAR
VARIABLE = re.compile(r"\$(?:\{(?P<braced>\w+)(?::?[-?][^}]*)?\}|(?P<bare>\w+))")


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _procfile() -> dict[str, str]:
    processes: dict[str, str] = {}
    for line in PROCFILE.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, command = line.partition(":")
        assert sep, f"Procfile line without 'name: command': {line!r}"
        assert name.strip() not in processes, f"Procfile names {name.strip()!r} twice"
        processes[name.strip()] = command.strip()
    return processes


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def _steps(command: str) -> list[list[str]]:
    """A Procfile command's steps (``a && exec b``), each without its ``exec``."""
    steps: list[list[str]] = [[]]
    for arg in shlex.split(command):
        if arg == "&&":
            steps.append([])
        else:
            steps[-1].append(arg)
    return [step[1:] if step[:1] == ["exec"] else step for step in steps]


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _expand(argv: list[str], env: Mapping[str, str]) -> list[str]:
    """Expand $VAR / ${VAR} the way the Procfile's shell would, from a service's environment."""

    def one(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bare")
        default = re.fullmatch(r"\$\{\w+:-(.*)\}", match.group(0))
        if name not in env and default:
            return default.group(1)
        assert name in env, f"{name} is used but the compose service does not set it"
        return env[name]

    return [VARIABLE.sub(one, arg) for arg in argv]


def _dockerfile_cmd() -> list[str]:
    cmds = [
        line.split(None, 1)[1]
        for line in DOCKERFILE.read_text().splitlines()
        if line.upper().startswith("CMD ")
    ]
    assert cmds, "Dockerfile has no CMD"
    cmd = json.loads(cmds[-1])  # exec form: no shell between the process and its signals
    assert isinstance(cmd, list)
    return [str(a) for a in cmd]


def _all_commands() -> Iterator[tuple[str, list[str]]]:
    """Commands run from the afterwrite image (compose services built here), the Procfile's
    processes and the image's default."""
    for name, service in _services().items():
        if "build" in service:
            yield f"compose service {name}", _argv(service["command"])
    for name, command in _procfile().items():
        for step in _steps(command):
            yield f"Procfile process {name}", step
    yield "Dockerfile CMD", _dockerfile_cmd()


def _module_references(argv: list[str]) -> Iterator[str]:
    """Python targets a command names: ``celery -A X``, ``uvicorn/gunicorn mod:attr``,
    ``python -m mod``."""
    for i, arg in enumerate(argv):
        prev = argv[i - 1] if i else ""
        if prev in {"-A", "--app", "-m"}:
            yield arg
        elif arg.startswith(("-A=", "--app=")):
            yield arg.split("=", 1)[1]
        elif re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*(\(\))?", arg):
            yield arg


def _resolve(reference: str) -> object:
    module_name, _, attr = reference.partition(":")
    module = importlib.import_module(module_name)
    if not attr:
        return module
    target = getattr(module, attr.removesuffix("()"))
    return target() if attr.endswith("()") else target


def _requirement_names(extras: list[str]) -> set[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs: list[str] = list(project["dependencies"])
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        assert extra in optional, f"the Dockerfile installs extra [{extra}], pyproject has none"
        reqs += optional[extra]
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def _dockerfile_extras() -> list[str]:
    match = re.search(r"pip install [\"']?\.(?:\[([\w,-]+)\])?[\"']?", DOCKERFILE.read_text())
    assert match, "the Dockerfile does not pip install the project (pip install .)"
    return match.group(1).split(",") if match.group(1) else []


# --- commands ---------------------------------------------------------------------------------


def test_every_procfile_process_runs_the_same_command_as_its_compose_service() -> None:
    services = _services()
    processes = _procfile()
    assert {"web", "worker", "beat", "flower", "metrics"} <= processes.keys()
    for name, command in processes.items():
        *before, last = _steps(command)
        for step, service_name in [*((s, s[1]) for s in before), (last, name)]:
            assert service_name in services, f"Procfile {name!r}: no compose {service_name!r}"
            service = services[service_name]
            expected = _expand(step, _environment(service))
            assert _argv(service["command"]) == expected, f"Procfile {name!r} != {service_name!r}"


def test_every_procfile_line_is_a_long_running_process() -> None:
    """honcho and foreman run every line as a process and stop them all when one exits: a
    `release: afterwrite migrate` line tore the others down. The worker migrates first
    (concurrent migrations wait on an advisory lock) and then becomes the worker (exec, so
    the runner's SIGTERM reaches Celery for its warm shutdown)."""
    processes = _procfile()
    assert "release" not in processes
    assert _steps(processes["worker"]) == [["afterwrite", "migrate"], ["afterwrite", "worker"]]
    assert " && exec afterwrite worker" in processes["worker"]
    for name, command in processes.items():
        assert "migrate" not in _steps(command)[-1], f"{name} ends when its command is done"


def test_every_afterwrite_subcommand_exists_in_the_cli() -> None:
    assert isinstance(main, click.Group)
    used = 0
    for where, argv in _all_commands():
        if argv and argv[0] == "afterwrite":
            assert len(argv) > 1, f"{where}: bare 'afterwrite'"
            assert argv[1] in main.commands, f"{where}: no CLI command 'afterwrite {argv[1]}'"
            used += 1
    assert used >= 5


def _options(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in getattr(param, "opts", [])}


def test_options_used_in_the_files_exist() -> None:
    """Options of afterwrite's own commands, and of the celery commands that ``afterwrite
    worker`` / ``afterwrite beat`` pass the rest of their arguments to, must exist."""
    from celery.bin.beat import beat
    from celery.bin.worker import worker

    passed_to = {"worker": worker, "beat": beat}
    for where, argv in _all_commands():
        if argv[:1] != ["afterwrite"] or len(argv) < 3:
            continue
        known = _options(main.commands[argv[1]])
        if argv[1] in passed_to:
            known |= _options(passed_to[argv[1]])
        for arg in argv[2:]:
            if arg.startswith("-"):
                assert arg.split("=", 1)[0] in known, f"{where}: unknown option {arg}"


def test_the_image_runs_a_worker_by_default() -> None:
    assert _dockerfile_cmd() == ["afterwrite", "worker"]


def test_module_references_import() -> None:
    references = [ref for _, argv in _all_commands() for ref in _module_references(argv)]
    assert references, "expected at least the web app's module reference"
    for reference in references:
        _resolve(reference)  # ImportError / AttributeError fail the test


def test_web_app_module_exposes_an_asgi_app() -> None:
    argv = _argv(_services()["web"]["command"])
    assert argv[0] == "uvicorn"
    (reference,) = list(_module_references(argv))
    assert isinstance(_resolve(reference), FastAPI)


def test_the_image_installs_what_every_command_runs() -> None:
    """`uvicorn` (or any other program a service starts) must come from what the Dockerfile
    installs: the project's dependencies plus the extras it names."""
    names = _requirement_names(_dockerfile_extras()) | {"afterwrite"}
    for where, argv in _all_commands():
        assert argv[0] in names, f"{where}: {argv[0]!r} is not installed by the Dockerfile"


def test_the_dockerfile_copies_every_module_the_commands_import() -> None:
    text = DOCKERFILE.read_text()
    for _, argv in _all_commands():
        for reference in _module_references(argv):
            top = reference.split(".", 1)[0].split(":", 1)[0]
            assert re.search(rf"^COPY .*\b{top}\b", text, re.M), f"Dockerfile never copies {top}"


# --- compose wiring ---------------------------------------------------------------------------


def test_services_built_from_the_image_are_the_expected_ones() -> None:
    built = {name for name, service in _services().items() if "build" in service}
    assert built == set(AFTERWRITE_SERVICES)
    for name in AFTERWRITE_SERVICES:
        assert "command" in _services()[name], f"{name} relies on the image's default command"


def test_afterwrite_services_share_the_environment_and_it_is_valid() -> None:
    shared = _compose()["x-afterwrite-env"]
    # passwords from the environment / .env, never written in the file
    assert shared["AFTERWRITE_DATABASE_URL"] == (
        "postgresql://afterwrite:${POSTGRES_PASSWORD:-}@postgres:5432/afterwrite"
    )
    assert shared["AFTERWRITE_REDIS_URL"] == "redis://:${REDIS_PASSWORD:-}@redis:6379/0"
    services = _services()
    for name in AFTERWRITE_SERVICES:
        env = _environment(services[name])
        for key, value in shared.items():
            assert env.get(key) == value, f"{name}: {key} differs from x-afterwrite-env"
        # Interpolate compose variables with a stand-in, then validate like the process will:
        # an unknown AFTERWRITE_* name (a typo) or a bad value fails here.
        concrete = {k: VARIABLE.sub("x", v) for k, v in env.items()}
        load_settings(concrete)


def _redis_server_argv(command: str | list[str]) -> list[str]:
    """redis-server's arguments, also when a shell checks the password first (``$$`` is
    compose's escape of ``$``)."""
    argv = _argv(command)
    if argv[:2] == ["sh", "-c"]:
        argv = shlex.split(argv[2].replace("$$", "$"))
    return argv[argv.index("redis-server") + 1 :]


def test_redis_keeps_unconsumed_entries_and_asks_for_a_password() -> None:
    redis = _services()["redis"]
    argv = _redis_server_argv(redis["command"])
    pairs = dict(zip(argv[::2], argv[1::2], strict=False))
    assert pairs.get("--appendonly") == "yes"
    assert pairs.get("--maxmemory-policy") == "noeviction"
    assert pairs.get("--requirepass") == "$REDIS_PASSWORD"
    script = _argv(redis["command"])[2]
    # an empty password would mean no authentication: the container refuses instead
    assert script.startswith('test -n "$$REDIS_PASSWORD" || {')
    # the image's entrypoint runs redis-server as the redis user, not root
    assert "exec docker-entrypoint.sh redis-server" in script
    env = _environment(redis)
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == "${REDIS_PASSWORD:-}"
    assert "redis-cli" in _argv(redis["healthcheck"]["test"])
    assert "ping" in _argv(redis["healthcheck"]["test"])


def test_no_secret_is_written_in_the_compose_file_or_required_by_every_command() -> None:
    """${VAR:?} is interpolated for every compose command (config, ps, down): none here."""
    lines = COMPOSE.read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    assert ":?" not in text
    assert _environment(_services()["postgres"])["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:-}"
    flower = _environment(_services()["flower"])
    assert flower["AFTERWRITE_FLOWER_PASSWORD"] == "${AFTERWRITE_FLOWER_PASSWORD:-}"
    for name in ("metrics", "web"):
        env = _environment(_services()[name])
        assert env["AFTERWRITE_METRICS_PASSWORD"] == "${AFTERWRITE_METRICS_PASSWORD:-}", name
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    used = {m.group("braced") or m.group("bare") for m in VARIABLE.finditer(text)}
    used -= {"REDIS_PASSWORD"} if "$$REDIS_PASSWORD" in text else set()
    used.discard(None)
    assert used <= set(example), f".env.example does not document {used - set(example)}"


def test_the_web_apps_spill_journal_is_on_a_named_volume() -> None:
    """Entries promised as `spilled` must survive a recreated container."""
    web = _services()["web"]
    data_dir = re.search(r"AFTERWRITE_DATA_DIR=(\S+)", DOCKERFILE.read_text())
    assert data_dir is not None
    spill = f"{data_dir.group(1)}/spill"
    env = _environment(web)
    assert "AFTERWRITE_SPILL_DIR" not in env  # the default: <data dir>/spill
    mounts = [v for v in web["volumes"] if v.split(":")[1] == spill]
    assert mounts, f"web keeps {spill} in the container"
    assert mounts[0].split(":")[0] in (_compose().get("volumes") or {})
    assert not mounts[0].endswith(":ro")
    assert re.search(rf"mkdir -p .*{spill}\b", DOCKERFILE.read_text())


def test_postgres_has_a_readiness_check_and_volumes_persist() -> None:
    compose = _compose()
    services = compose["services"]
    assert "pg_isready" in " ".join(_argv(services["postgres"]["healthcheck"]["test"]))
    declared = set(compose.get("volumes") or {})
    for name in ("postgres", "redis"):
        volumes = services[name].get("volumes") or []
        named = {str(v).split(":", 1)[0] for v in volumes}
        assert named & declared, f"{name} keeps its data in no named volume"


@pytest.mark.parametrize(
    ("name", "port", "login"),
    [("flower", "5555", "FLOWER"), ("metrics", "9808", "METRICS")],
)
def test_monitoring_endpoints_refuse_to_start_without_a_password(
    name: str, port: str, login: str
) -> None:
    """No password in the file; without one the command itself refuses to start (tested in
    test_cli / test_prometheus), so compose does not need ${…:?}."""
    service = _services()[name]
    env = _environment(service)
    password = f"AFTERWRITE_{login}_PASSWORD"
    assert env[password] == f"${{{password}:-}}"
    assert env.get(f"AFTERWRITE_{login}_USER")
    assert f"AFTERWRITE_{login}_UNAUTHENTICATED" not in env
    assert "--unauthenticated" not in _argv(service["command"])
    assert "--unauthenticated" not in _procfile()[name]
    assert any(port in str(p) for p in service.get("ports", []))


def test_the_monitoring_services_opt_in_to_every_interface_of_their_container() -> None:
    """Flower and the metrics server listen on 127.0.0.1 unless told otherwise; in a container
    the published port needs 0.0.0.0, said explicitly, and the host publishes it locally."""
    services = _services()
    assert load_settings({}).flower_address == "127.0.0.1"
    assert _environment(services["flower"])["AFTERWRITE_FLOWER_ADDRESS"] == "0.0.0.0"
    metrics = _argv(services["metrics"]["command"])
    assert metrics[metrics.index("--host") + 1] == "0.0.0.0"
    for name in ("flower", "metrics"):
        assert all(str(p).startswith("127.0.0.1:") for p in services[name]["ports"]), name


def test_only_flower_gets_the_flower_login() -> None:
    """The scrape login (metrics server, the web app's /metrics) is separate: whoever can read
    Prometheus's config, or the web container's environment, cannot shut workers down."""
    services = _services()
    for name in AFTERWRITE_SERVICES:
        env = _environment(services[name])
        holds_flower = {k for k in env if k.startswith("AFTERWRITE_FLOWER_")} - {
            "AFTERWRITE_FLOWER_ADDRESS"
        }
        assert bool(holds_flower) == (name == "flower"), (name, holds_flower)
        assert ("AFTERWRITE_METRICS_PASSWORD" in env) == (name in {"metrics", "web"}), name
    example = (ROOT / ".env.example").read_text()
    assert "AFTERWRITE_METRICS_PASSWORD=" in example


def test_the_worker_and_the_readers_share_the_index_directory() -> None:
    services = _services()
    index_dir = "/var/lib/afterwrite/indexes"
    assert re.search(rf"\bAFTERWRITE_INDEX_DIR={index_dir}\b", DOCKERFILE.read_text())
    mounts = {
        name: [v for v in services[name].get("volumes", []) if v.split(":")[1] == index_dir]
        for name in ("worker", "web", "metrics")
    }
    assert all(mounts.values()), mounts
    assert {v[0].split(":")[0] for v in mounts.values()} == {"indexes"}
    assert not mounts["worker"][0].endswith(":ro")  # the builder writes


def _depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


@pytest.mark.parametrize("name", ["worker", "beat"])
def test_worker_and_beat_start_after_the_schema_exists(name: str) -> None:
    deps = _depends_on(_services()[name])
    assert deps.get("migrate") == "service_completed_successfully"
    assert deps.get("redis") == "service_healthy"


def test_migrate_runs_once_after_postgres_is_ready() -> None:
    migrate = _services()["migrate"]
    assert _argv(migrate["command"]) == ["afterwrite", "migrate"]
    assert _depends_on(migrate).get("postgres") == "service_healthy"
    assert migrate.get("restart") in {"no", None}


def test_the_web_app_publishes_port_8000() -> None:
    web = _services()["web"]
    assert any(str(port).endswith("8000:8000") for port in web.get("ports", []))


# --- image ------------------------------------------------------------------------------------


def test_the_image_runs_as_a_non_root_user() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    froms = [line for line in lines if line.upper().startswith("FROM ")]
    assert froms == ["FROM python:3.11-slim"]
    users = [line.split(None, 1)[1] for line in lines if line.upper().startswith("USER ")]
    assert users, "the Dockerfile never switches to a non-root USER"
    user = users[-1].split(":", 1)[0]
    assert user not in {"root", "0"}
    cmd_at = max(i for i, line in enumerate(lines) if line.upper().startswith("CMD "))
    user_at = max(i for i, line in enumerate(lines) if line.upper().startswith("USER "))
    assert user_at < cmd_at
