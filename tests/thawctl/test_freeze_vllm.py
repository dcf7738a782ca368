"""`thawctl freeze --engine vllm` with the real vLLM (CPU build) on the tiny model."""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest
from thawctl_testlib import run_subprocess

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
]


def test_freeze_with_vllm_writes_a_snapshot_and_keeps_stdout_json(snapshot_dir: Any) -> None:
    out = snapshot_dir / "tiny-vllm.thaw"
    # A fresh interpreter: vLLM spawns its engine processes, which need a __main__ guard.
    # No --dtype: auto is the checkpoint's float32 (vLLM's own auto is bfloat16 on this build).
    done = run_subprocess(
        "freeze", "--engine", "vllm", "--model", "tiny", "-o", str(out), "--json", timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)  # the engine's logs went to stderr
    assert doc["engine"] == "vllm" and doc["tensor_parallel_size"] == 1
    assert doc["fingerprint"]["engine"] == "vllm"
    assert doc["fingerprint"]["dtype"] == "float32"
    assert [f["path"] for f in doc["files"]] == [str(out.resolve())]
    verified = run_subprocess("verify", str(out))
    assert verified.returncode == 0, verified.stderr
