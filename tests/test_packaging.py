"""What a fresh clone or a fresh install gets: quiet first use of the tiny model, pinned test
installs, and dependencies split so an engine image installs only the client.

Each run that depends on the environment runs in a fresh interpreter, as a new install would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
