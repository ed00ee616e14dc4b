"""The built wheel, installed into a fresh virtualenv, works inside someone else's service.

What a team does: build (or download) the wheel, ``pip install`` it into the service's own
environment, and run it from the service's directory, which holds its own ``models.py``,
``worker.py``, ``producer.py``, ``settings.py`` and ``migrations/``. Those names were
afterwrite's top-level modules once, and collided.

The fresh virtualenv gets afterwrite from the wheel only; its third-party dependencies come
from the project's virtualenv through a ``.pth`` line (no network, seconds instead of minutes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]

# A service of its own, with the names that used to collide.
USER_FILES = {
    "models.py": "class Conversation:\n    table = 'conversations'\n",
    "worker.py": "raise SystemExit('the service worker.py must not be imported by afterwrite')\n",
    "producer.py": "raise SystemExit('the service producer.py must not be imported')\n",
    "settings.py": "DEBUG = False\n",
    "migrations/__init__.py": "",
    "migrations/0001_initial.py": "raise SystemExit('the service migration must not run')\n",
}

HANDLER = """
import json, sys
import models  # the service's own models.py, next to afterwrite
from afterwrite import Client

client = Client.from_env()
receipts = [
    client.record_query(f"question {i} from the handler?", user_id="u1", model_ids=["gpt-4o"])
    for i in range(40)
]
client.close()
heavy = sorted(
    m for m in ("sqlalchemy", "psycopg", "celery", "kombu", "faiss", "numpy", "onnxruntime",
                "tokenizers") if m in sys.modules
)
print(json.dumps({
    "accepted": [str(r) for r in receipts if r.accepted],
    "refused": [r.outcome.value for r in receipts if not r.accepted],
    "heavy": heavy,
    "afterwrite": __import__("afterwrite").__file__,
    "models": models.__file__,
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("afterwrite-*.whl")
    return built


def test_the_wheel_holds_one_package_and_no_development_code(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"afterwrite"}, sorted(top)
    assert not [n for n in names if "/tests/" in n or "/benchmarks/" in n or "fake_openai" in n]
    for needed in (
        "afterwrite/py.typed",
        "afterwrite/worker/app.py",
        "afterwrite/migrations/script.py.mako",
        "afterwrite/embedders/data/all-MiniLM-L6-v2.tokenizer.json",
    ):
        assert needed in names, needed
    assert any(n.startswith("afterwrite/migrations/versions/") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert (
        "afterwrite = afterwrite.cli.main:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin/python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # dependencies from the project's environment, after the fresh one's own site-packages
    (Path(site) / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.fixture
def service_dir(tmp_path: Path) -> Path:
    app = tmp_path / "service"
    for name, text in USER_FILES.items():
        path = app / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (app / "handler.py").write_text(HANDLER)
    kind = app / "examples/agent_steps"
    kind.mkdir(parents=True)
    for name in ("__init__.py", "agent_steps/__init__.py", "agent_steps/model.py"):
        (app / "examples" / name).write_text((ROOT / "examples" / name).read_text())
    return app


def _env(base_env: dict[str, str], venv: Path, service: Path) -> dict[str, str]:
    env = dict(base_env)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["AFTERWRITE_DATA_DIR"] = str(service / "data")
    # a spilled record would wait for this host's next client to replay it: on a busy machine
    # the default 50 ms must not decide whether the test sees every row
    env["AFTERWRITE_PRODUCER_TIMEOUT_MS"] = "2000"
    # The session's database carries the example kind's revision (tests/conftest.py), so the
    # service holds that kind as its own code (AFTERWRITE_IMPORTS=examples.agent_steps.model),
    # on its PYTHONPATH as a service's code is. The checkout is not on the path.
    env["PYTHONPATH"] = str(service)
    return env


@pytest.fixture
def started(service_dir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _start(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def test_the_installed_wheel_records_stores_and_reports_from_a_service_directory(
    fresh_venv: Path,
    service_dir: Path,
    base_env: dict[str, str],
    started: list[subprocess.Popen[bytes]],
) -> None:
    env = _env(base_env, fresh_venv, service_dir)
    bin_dir = fresh_venv / "bin"

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(bin_dir / argv[0]), *argv[1:]],
            cwd=service_dir,
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done

    handler = run("python", "handler.py")
    out = json.loads(handler.stdout.strip().splitlines()[-1])
    assert out["afterwrite"].startswith(str(fresh_venv)), out["afterwrite"]  # not the checkout
    assert out["models"] == str(service_dir / "models.py")
    assert out["heavy"] == [], "recording loaded heavy modules"
    accepted = out["accepted"]
    assert len(accepted) == 40
    assert out["refused"] == []

    logs = service_dir / "logs"
    logs.mkdir()
    started.append(
        _start([str(bin_dir / "afterwrite"), "worker", "-c", "1"], env, service_dir, logs / "w")
    )
    started.append(_start([str(bin_dir / "afterwrite"), "beat"], env, service_dir, logs / "b"))

    def stored() -> list[str]:
        with psycopg.connect(env["AFTERWRITE_DATABASE_URL"], autocommit=True) as conn:
            rows = conn.execute("SELECT id::text FROM query_history").fetchall()
        return [r[0] for r in rows]

    def everything_landed() -> bool:
        for proc in started:
            assert proc.poll() is None, _logs(logs)
        return set(stored()) >= set(accepted)

    wait_for(everything_landed, timeout_s=120, interval_s=0.5, what="the recorded queries")
    time.sleep(2)  # later drains must not store anything twice
    rows = stored()
    assert sorted(rows) == sorted(accepted), "each accepted id lands exactly once"

    report = json.loads(run("afterwrite", "status", "--json").stdout)
    tables = {t["kind"]: t for t in report["tables"]}
    assert "query" in tables
    assert not list(service_dir.glob("migrations/*.pyc")), "the service's migrations were read"


def _logs(directory: Path) -> str:
    tails = (f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in directory.iterdir())
    return "\n".join(tails)
