"""The client library never imports the daemon, the CLI or textual, nor CUDA on a CPU-only path.

Each check runs in a fresh interpreter: sys.modules there shows what importing thaw pulls in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = ("thawd", "thawctl", "textual")
# What only thaw[daemon] and thaw[cli] install: an engine image has the client alone.
NOT_IN_THE_CLIENT = (*FORBIDDEN, "uvloop", "psutil", "prometheus_client")


def run_python(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON object as its last line."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def offending(modules: list[str], forbidden: tuple[str, ...] = FORBIDDEN) -> list[str]:
    return [m for m in modules if m.split(".")[0] in forbidden]


# One interpreter, two stages: a CPU freeze and restore through the core modules, then an
# import of every module of the thaw package (engine integrations and client included).
SCRIPT = """
import importlib, json, pkgutil, sys, tempfile
def cuda_modules():
    return sorted(m for m in sys.modules if m == "cuda" or m.startswith("cuda."))
import thaw, thaw.format, thaw.format.dtypes, thaw.format.fingerprint, thaw.errors, thaw.copy.pieces
light = sorted(sys.modules)
import torch  # torch itself may load cuda.bindings; what thaw adds is what counts
torch_only = cuda_modules()
import thaw, thaw.format, thaw.copy.datapath, thaw.copy.restore, thaw.copy.freeze
after_import = cuda_modules()
directory = tempfile.mkdtemp()
source = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(3)}
thaw.freeze_file(source, directory + "/m.thaw")
target = {"w": torch.zeros(3, 4), "b": torch.zeros(3)}
thaw.restore_file(target, directory + "/m.thaw")
assert all(torch.equal(source[k], target[k]) for k in source)
core = sorted(sys.modules)
after_round_trip = cuda_modules()

imported, skipped = [], {}
for info in pkgutil.walk_packages(thaw.__path__, "thaw."):
    try:
        importlib.import_module(info.name)
        imported.append(info.name)
    except ModuleNotFoundError as e:
        # An optional engine (vllm, sglang, transformers) that is not installed here.
        if e.name is None or e.name.split(".")[0] in ("thaw", "thawd", "thawctl", "textual"):
            raise
        skipped[info.name] = e.name
print(json.dumps({
    "light": light,
    "core": core,
    "torch_only": torch_only,
    "after_import": after_import,
    "after_round_trip": after_round_trip,
    "all": sorted(sys.modules),
    "imported": imported,
    "skipped": skipped,
}))
"""


@pytest.fixture(scope="module")
def imports() -> dict:
    return run_python(SCRIPT)


def test_importing_thaw_loads_neither_torch_nor_cuda(imports: Any) -> None:
    """thawd and tools read manifests through thaw without paying for torch or CUDA."""
    light = imports["light"]
    assert "torch" not in light
    assert [m for m in light if m == "cuda" or m.startswith("cuda.")] == []
    assert offending(light) == []


def test_core_modules_import_no_daemon_cli_or_textual(imports: Any) -> None:
    assert offending(imports["core"]) == []


def test_cpu_freeze_and_restore_load_no_cuda(imports: Any) -> None:
    assert "thaw.mem.cuda" not in imports["core"]
    # Whatever CUDA modules torch loads on its own, thaw adds none on a CPU-only path.
    assert imports["after_import"] == imports["torch_only"]
    assert imports["after_round_trip"] == imports["torch_only"]


def test_no_thaw_module_imports_daemon_cli_or_textual(imports: Any) -> None:
    assert "thaw.format" in imports["imported"]
    assert offending(imports["all"]) == [], imports["skipped"]


def test_the_client_loads_nothing_the_client_install_lacks() -> None:
    """`pip install thaw` (no extras) is enough for `import thaw` and `thaw.connect()`."""
    modules: list[str] = run_python(  # type: ignore[assignment]
        "import json, sys\nimport thaw, thaw.client\nprint(json.dumps(sorted(sys.modules)))"
    )
    assert "thaw.client" in modules
    assert offending(modules, NOT_IN_THE_CLIENT) == []
