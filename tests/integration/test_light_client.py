"""Recording from a web process loads only what recording needs.

A fresh interpreter per check: ``sys.modules`` of the test session holds everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("sqlalchemy", "psycopg", "celery", "kombu", "faiss", "numpy", "onnxruntime", "tokenizers")

_SCRIPT = """
import json, sys
HEAVY = {heavy!r}

def loaded():
    return sorted(m for m in HEAVY if m in sys.modules)

import afterwrite
steps = {{"import afterwrite": loaded()}}
from afterwrite import AsyncClient, Client, IndexReader, Receipt, Outcome
steps["names imported"] = loaded()
with Client.from_env() as client:
    receipt = client.record_query("light?", user_id="u1", model_ids=["m"])
    client.record_metric("latency_ms", 1.5, tags={{"route": "/q"}})
    client.embed("docs", "d1", "a document")
steps["Client used"] = loaded()
steps["accepted"] = receipt.accepted
IndexReader("docs", {index_dir!r})
steps["IndexReader constructed"] = loaded()
print(json.dumps(steps))
"""


def test_recording_loads_no_heavy_module_and_a_reader_loads_numpy_and_faiss(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    script = _SCRIPT.format(heavy=HEAVY, index_dir=str(tmp_path / "indexes"))
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=base_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    steps = json.loads(done.stdout.strip().splitlines()[-1])
    assert steps["import afterwrite"] == []
    assert steps["names imported"] == []
    assert steps["Client used"] == [], "recording loaded heavy modules"
    assert steps["accepted"] is True
    assert {"faiss", "numpy"} <= set(steps["IndexReader constructed"])
    assert not {"sqlalchemy", "psycopg", "celery"} & set(steps["IndexReader constructed"])
