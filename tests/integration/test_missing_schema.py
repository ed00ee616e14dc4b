"""A database that was never migrated (or is older than the code): every command says so in one
line and exits 2, ``health`` fails its ``schema`` check; after ``afterwrite migrate`` they work.

Runs the real console entry point in subprocesses against a fresh, empty database of its own.
"""

from __future__ import annotations

import subprocess
import sys

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
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("afterwrite: cannot use Redis (AFTERWRITE_REDIS_URL)")
