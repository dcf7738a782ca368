"""Fixtures shared by the snapshot tests."""

from __future__ import annotations

import pytest
import torch

from thaw import freeze_file


@pytest.fixture
def small_snapshot(tmp_path):
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
