"""Fixtures for thawctl's tests: a real thawd on a temporary socket (tests/daemon's
ThawdProcess), snapshot files, and `thawctl` run in this process (`main(argv)`, capsys).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from thawctl_testlib import Result, ThawdProcess, make_dir, random_tensors, write_snapshot


@pytest.fixture
def thawctl(capsys: pytest.CaptureFixture[str]) -> Any:
    """Run `thawctl ARGS...` in this process; returns Result(code, out, err)."""
    from thawctl.cli import main

    def run(*argv: str) -> Result:
        capsys.readouterr()
        code = main(list(argv))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def thawd(module_thawd: ThawdProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[ThawdProcess]:
    """The module's thawd, on $THAW_SOCKET, with no snapshots registered before and after."""
    import thaw

    monkeypatch.setenv("THAW_SOCKET", module_thawd.socket)
    _clear(thaw, module_thawd.socket)
    yield module_thawd
    _clear(thaw, module_thawd.socket)


def _clear(thaw: Any, socket: str) -> None:
    with thaw.connect(socket) as client:
        for record in client.list():
            client.unregister(record.name)


@pytest.fixture
def own_thawd(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A factory of daemons of this test alone, with config overrides; on $THAW_SOCKET."""
    started: list[tuple[ThawdProcess, Path]] = []

    def start(**config: object) -> ThawdProcess:
        directory = make_dir()
        daemon = ThawdProcess(directory, **config).start()
        started.append((daemon, directory))
        monkeypatch.setenv("THAW_SOCKET", daemon.socket)
        return daemon

    yield start
    for daemon, directory in started:
        daemon.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def snapshot_dir() -> Iterator[Path]:
    """A directory thawd (another process, maybe another uid) can read."""
    directory = make_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def snapshot_file(snapshot_dir: Path) -> Path:
    """A small valid snapshot of four tensors."""
    path = write_snapshot(snapshot_dir / "small.thaw", random_tensors(0))
    path.chmod(0o644)
    return path
