"""Flower as ``afterwrite flower`` starts it: authentication on by default."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_flower_answers_401_without_credentials(base_env: dict[str, str], tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **base_env,
        "AFTERWRITE_FLOWER_USER": "ops",
        "AFTERWRITE_FLOWER_PASSWORD": "correct horse",
        "AFTERWRITE_FLOWER_PORT": str(port),
    }
    log = (tmp_path / "flower.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "flower", "--address=127.0.0.1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:

        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "flower.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return False
            return True

        wait_for(up, timeout_s=60, what="Flower to listen")
        assert _status(url) == 401
        assert _status(url, ("ops", "wrong")) == 401
        assert _status(url, ("ops", "correct horse")) == 200
        # the password is not on the command line, where `ps` would show it
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"correct horse" not in cmdline
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
