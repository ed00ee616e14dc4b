"""A database that was never migrated (or is older than the code): every command says so in one
line and exits 2, ``health`` fails its ``schema`` check; after ``afterwrite migrate`` they work.

Runs the real console entry point in subprocesses against a fresh, empty database of its own.
"""

from __future__ import annotations

import subprocess
import sys

import psycopg

MESSAGE = (
    "afterwrite: the database has no afterwrite schema (or an old one): run `afterwrite migrate`"
)
COMMANDS = [
    ["dlq", "list"],
    ["stats"],
    ["index", "status"],
    ["status"],
    ["status", "--json"],
    ["dlq", "purge"],
    ["export", "query"],
]


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "afterwrite.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _says_migrate(proc: subprocess.CompletedProcess[str], command: list[str]) -> None:
    assert proc.returncode == 2, (command, proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.splitlines() == [MESSAGE] or (
        # export's progress line goes to stderr too; the message is still its only error line
        command[0] == "export" and MESSAGE in proc.stderr.splitlines()
    ), (command, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == "", (command, proc.stdout)  # no "0 rows", no empty tables


def test_every_command_on_a_database_without_the_schema_says_run_migrate(
    base_env: dict[str, str], empty_database: str
) -> None:
    env = {**base_env, "AFTERWRITE_DATABASE_URL": empty_database}
    for command in COMMANDS:
        _says_migrate(_run(env, *command), command)

    health = _run(env, "health", "--no-worker")
    assert health.returncode == 1, health.stdout + health.stderr
    assert f"FAIL schema    {MESSAGE.removeprefix('afterwrite: ')}" in health.stdout

    migrated = _run(env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    for command in (["dlq", "list"], ["stats"], ["index", "status"], ["status"]):
        proc = _run(env, *command)
        assert proc.returncode == 0, (command, proc.stdout, proc.stderr)
        assert MESSAGE not in proc.stderr
    health = _run(env, "health", "--no-worker")
    assert health.returncode == 0, health.stdout + health.stderr
    assert "ok   schema" in health.stdout


def test_an_older_schema_says_run_migrate_too(
    base_env: dict[str, str], empty_database: str
) -> None:
    env = {**base_env, "AFTERWRITE_DATABASE_URL": empty_database}
    assert _run(env, "migrate").returncode == 0
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute("DROP TABLE index_builds")  # as before the revision that added it
        conn.execute("ALTER TABLE dead_letters DROP COLUMN detail")  # a column added later
    for command in (["status"], ["index", "status"], ["dlq", "list"]):
        _says_migrate(_run(env, *command), command)
