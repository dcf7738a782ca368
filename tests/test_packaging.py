"""What a fresh clone or a fresh install gets: quiet first use of the tiny model, pinned test
installs, and dependencies split so an engine image installs only the client.

Each run that depends on the environment runs in a fresh interpreter, as a new install would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.daemon.conftest import ThawdProcess, make_dir

REPO = Path(__file__).resolve().parent.parent


def test_the_tiny_model_directory_is_written_without_progress_output(tmp_path: Path) -> None:
    """A fresh clone writes the tiny model on first use, inside commands whose stderr is one
    error line (`thawctl freeze --engine vllm --model tiny` without vLLM): transformers' progress
    bars must not reach it."""
    pytest.importorskip("transformers")
    out = subprocess.run(
        [sys.executable, "-m", "thaw.tiny", str(tmp_path / "tiny")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "tiny")
    assert out.stderr == ""
    assert (tmp_path / "tiny" / "model.safetensors").is_file()


# --- Python 3.10 (requires-python = ">=3.10") -------------------------------------------------

PY310_PROBE = (
    "import sys; assert sys.version_info[:2] == (3, 10); "
    "import grpc, grpc_health, google.protobuf, uvloop, psutil, tomli, setuptools"
)


def python310() -> str:
    """A Python 3.10 with thawd's dependencies: $THAW_PYTHON310, else python3.10 on PATH."""
    for python in (os.environ.get("THAW_PYTHON310", ""), shutil.which("python3.10") or ""):
        if python and subprocess.run([python, "-c", PY310_PROBE], capture_output=True,
                                     timeout=60).returncode == 0:  # fmt: skip
            return python
    pytest.skip("no Python 3.10 with thawd's dependencies: point THAW_PYTHON310 at one (a venv "
                "with pip install -c constraints/test.txt grpcio grpcio-health-checking "
                "protobuf uvloop psutil tomli prometheus-client setuptools)")  # fmt: skip


def test_thawd_serves_on_python_3_10(tmp_path: Path) -> None:
    """thawd on the oldest Python the package claims: its config parser is tomli there."""
    python = python310()
    code = tmp_path / "code"
    for package in ("thaw", "thawd"):
        shutil.copytree(REPO / package, code / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))  # fmt: skip
    subprocess.run([python, "setup.py", "-q", "build_ext", "--build-lib", str(code),
                    "--build-temp", str(tmp_path / "build")], cwd=REPO, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    directory = make_dir()
    daemon = ThawdProcess(directory, python=python, code=code)
    try:
        daemon.start()
        with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="thaw.v1.Thawd"), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert daemon.stop() == 0
        assert "Python 3.10" in subprocess.run([python, "--version"], capture_output=True,
                                               text=True).stdout  # fmt: skip
    finally:
        daemon.close()
        shutil.rmtree(directory, ignore_errors=True)
