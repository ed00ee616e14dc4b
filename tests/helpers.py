"""Small helpers shared by the test layers."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], *, timeout_s: float = 30.0, interval_s: float = 0.1, what: str = ""
) -> T:
    """Poll until ``predicate()`` is truthy; return its value or fail with ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
        time.sleep(interval_s)


_TCP_LISTEN = "0A"


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp and
    tcp6, as the kernel sees them: ``0.0.0.0`` or ``::`` means every interface)."""
    found = set()
    for table, width in (("tcp", 4), ("tcp6", 16)):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] != _TCP_LISTEN or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
            found.add(str(ipaddress.ip_address(words)))
    return found


# The crash-probe kind (tests/crash_kind.py) is registered only inside worker subprocesses;
# tests import these names from here so that importing them does not register the kind.
CRASH_KIND_TABLE = "test_crash_probe"
CRASH_KIND_KILL_NOTE = "kill my consumer"
CRASH_KIND_CREATE_SQL = (
    f"CREATE TABLE IF NOT EXISTS {CRASH_KIND_TABLE} (id uuid PRIMARY KEY, note text NOT NULL)"
)


def in_forked_child(work: Callable[[], bytes]) -> bytes:
    """Run ``work`` in a forked child (as a Celery prefork worker would) and return the bytes
    it produced; fails if the child fails. The child never returns into pytest."""
    import os

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.write(write_fd, work())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child failed"
    return data
