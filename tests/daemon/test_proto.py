"""thaw/_proto is exactly what scripts/gen_proto.py makes from proto/: never edited by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.daemon.conftest import ROOT


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    committed = ROOT / "thaw" / "_proto"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(p.name for p in committed.iterdir() if p.suffix in (".py", ".pyi"))
    for name in names:
        assert (tmp_path / name).read_text() == (committed / name).read_text(), (
            f"thaw/_proto/{name} differs from its proto: run scripts/gen_proto.py"
        )
    assert "from . import thawd_pb2" in (tmp_path / "thawd_pb2_grpc.py").read_text()
