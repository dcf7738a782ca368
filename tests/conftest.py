"""Fixtures shared by every suite: a small snapshot, and one real thawd per test module."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from thaw import freeze_file

if TYPE_CHECKING:
    from tests.daemon.conftest import ThawdProcess


@pytest.fixture(scope="module")
def module_thawd() -> Iterator[ThawdProcess]:
    """One thawd (tests/daemon/conftest.py's ThawdProcess, default config) for a whole test
    module: each start pays a new interpreter's torch import. Restartable: its registry lives
    in its state directory."""
    from tests.daemon.conftest import ThawdProcess, make_dir

    directory = make_dir()
    daemon = ThawdProcess(directory).start()
    yield daemon
    daemon.close()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def small_snapshot(tmp_path: Path) -> Any:
    """A valid snapshot of three CPU tensors (float32, bfloat16, an int64 scalar) and its source.

    Returns (path, source): `source` maps each tensor name to the tensor that was frozen.
    """
    g = torch.Generator().manual_seed(0)
    source = {
        "embed.weight": torch.randn(64, 32, generator=g),
        "norm.weight": torch.randn(32, generator=g).to(torch.bfloat16),
        "step": torch.tensor(7, dtype=torch.int64),
    }
    path = tmp_path / "small.thaw"
    freeze_file(source, path)
    return path, source
