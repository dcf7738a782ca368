"""Fixtures for the KV-cache tests: a real thawd (tests/daemon's ThawdProcess)
and vLLM engines, each in a fresh interpreter with its own PYTHONHASHSEED (engine_proc.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE_TIMEOUT = 240.0


def run_engine(job: dict[str, Any], hash_seed: int, log: Path) -> dict[str, Any]:
    """Run tests/kv/engine_proc.py with `job` in a new session; kill its whole group after.

    Output goes to a file, not a pipe: vLLM's engine-core process can outlive the script by a
    few seconds and would hold a pipe open.
    """
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed), PYTHONPATH=str(ROOT))
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "kv" / "engine_proc.py"), json.dumps(job)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(ROOT),
            start_new_session=True,
        )
        try:
            proc.wait(ENGINE_TIMEOUT)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("THAW-KV-RESULT ")]
    assert lines, f"engine process printed no result:\n{text[-6000:]}"
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("THAW-KV-RESULT "))
    assert "error" not in result, result["error"] + "\n--- engine log ---\n" + text[-4000:]
    return result


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Any]]:
    logs = tmp_path_factory.mktemp("engine-logs")
    count = iter(range(1000))

    def run(job: dict[str, Any], hash_seed: int) -> dict[str, Any]:
        return run_engine(job, hash_seed, logs / f"engine-{next(count)}-{job['role']}.log")

    return run
