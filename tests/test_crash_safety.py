"""A writer killed (SIGKILL) at any point of a freeze never leaves a snapshot that opens wrong.

A child process freezes about 300 MB of CPU tensors (300 of them); the test kills it after
random delays spread over the time a whole freeze takes, then checks what is on disk.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from thaw import open_snapshot, restore_file
from thaw.errors import SnapshotError

REPO = Path(__file__).resolve().parent.parent
COUNT = 300  # tensors: many, so that a kill lands between writes as well as inside them
NUMEL = 1 << 18  # int32: 1 MiB each, 300 MiB in all

# The writer process. Importing torch takes seconds, so one process imports it once and
# forks a writer per freeze: `freeze PATH SEED` forks a child that freezes and prints
# `done SECONDS`, answered with `writer PID`; `reap` waits for that child, answered with
# `exit STATUS`. The child is reaped only when asked, so its pid stays its own until then.
CHILD = """
import os, sys, time
import torch
torch.set_num_threads(1)  # no OpenMP pool in a process that forks
from thaw import freeze_file

count, numel = int(sys.argv[1]), int(sys.argv[2])
base = torch.arange(count * numel, dtype=torch.int32)
pid = None
for line in sys.stdin:
    command, *args = line.split()
    if command == "freeze":
        data = base + int(args[1])
        tensors = {f"layers.{i}.weight": data[i * numel : (i + 1) * numel] for i in range(count)}
        pid = os.fork()
        if pid == 0:
            started = time.perf_counter()
            freeze_file(tensors, args[0])
            os.write(1, f"done {time.perf_counter() - started}\\n".encode())
            os._exit(0)
        print("writer", pid, flush=True)
    elif command == "reap":
        print("exit", os.waitpid(pid, 0)[1], flush=True)
"""

pytestmark = pytest.mark.slow


class Writer:
    """The forking writer process, started once for the module."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(COUNT), str(NUMEL)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            text=True,
        )

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _until(self, word: str) -> tuple[str, list[str]]:
        """Read lines until one starts with `word`; return it and the lines before."""
        before: list[str] = []
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            assert line, "the writer process died"
            if line.startswith(word):
                return line.split()[1], before
            before.append(line)

    def freeze(self, path: Path, seed: int, kill_after: float | None) -> float | None:
        """Freeze; SIGKILL the writer after `kill_after` seconds. Returns the freeze's duration
        if it finished before the kill."""
        self._send(f"freeze {path} {seed}")
        pid, _ = self._until("writer")
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(int(pid), signal.SIGKILL)  # our own child, not yet reaped: no cleanup runs
        self._send("reap")
        _, lines = self._until("exit")
        done = [float(line.split()[1]) for line in lines if line.startswith("done")]
        return done[0] if done else None

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@functools.lru_cache(maxsize=2)
def expected(seed: int) -> torch.Tensor:
    return torch.arange(COUNT * NUMEL, dtype=torch.int32).add_(seed)


def content_seed(path: Path, seeds: tuple[int, ...]) -> int:
    """Restore `path` and return which seed's tensors it holds, bit for bit (fails otherwise)."""
    whole = torch.zeros(COUNT * NUMEL, dtype=torch.int32)
    target = {f"layers.{i}.weight": whole[i * NUMEL : (i + 1) * NUMEL] for i in range(COUNT)}
    restore_file(target, path)
    seed = int(whole[0])
    assert seed in seeds, f"{path} holds none of the frozen contents"
    assert torch.equal(whole, expected(seed)), f"{path} is not bit-identical to what was frozen"
    return seed


def check_leftovers(directory: Path, name: str, seeds: tuple[int, ...]) -> None:
    """Only `name` and `.name.*.tmp` files; a temporary never opens as a wrong snapshot."""
    for entry in directory.iterdir():
        if entry.name == name:
            continue
        assert entry.name.startswith(f".{name}.") and entry.name.endswith(".tmp"), entry.name
        try:
            open_snapshot(entry)
        except SnapshotError:
            pass
        else:
            # Only in the instant between the header's fsync and the rename is a temporary
            # complete; then it must be exactly what was frozen.
            content_seed(entry, seeds)
        entry.unlink()


@pytest.fixture(scope="module")
def writer() -> Iterator[Any]:
    w = Writer()
    yield w
    w.close()


@pytest.fixture(scope="module")
def calibration(writer: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[float, Path]:
    """Time one whole freeze, and keep its snapshot (seed 1) as the 'old' content."""
    path = tmp_path_factory.mktemp("calibrate") / "old.thaw"
    # Twice: the first freeze of a process is slower (page faults, first fsync).
    seconds = [writer.freeze(path, seed=1, kill_after=None) for _ in range(2)]
    assert None not in seconds
    assert content_seed(path, (1,)) == 1
    return min(seconds), path


def delays(seconds: float, n: int, seed: int) -> list[float]:
    """n delays spread over the freeze, one in each of n equal strata, plus one past its end."""
    rng = random.Random(seed)
    span = seconds * 1.05
    return [span * (k + rng.random()) / n for k in range(n)] + [seconds * 2 + 1]


def test_killed_writer_leaves_nothing_or_a_valid_snapshot(
    tmp_path: Path, writer: Any, calibration: Any
) -> None:
    seconds, _ = calibration
    outcomes = []
    for k, delay in enumerate(delays(seconds, 5, seed=2026)):
        directory = tmp_path / f"kill{k}"
        directory.mkdir()
        path = directory / "model.thaw"
        writer.freeze(path, seed=2, kill_after=delay)
        if path.exists():
            assert content_seed(path, (2,)) == 2
            outcomes.append("complete")
            path.unlink()
        else:
            outcomes.append("absent")
        check_leftovers(directory, "model.thaw", (2,))
    assert "absent" in outcomes, f"no kill landed before the rename: {outcomes}"
    assert outcomes[-1] == "complete", f"a freeze given twice its time did not finish: {outcomes}"


def test_killed_overwrite_never_damages_the_old_snapshot(
    tmp_path: Path, writer: Any, calibration: Any
) -> None:
    seconds, old = calibration
    outcomes = []
    for k, delay in enumerate(delays(seconds, 4, seed=7)):
        directory = tmp_path / f"over{k}"
        directory.mkdir()
        path = directory / "model.thaw"
        # A hard link: the writer must replace the name, never write into the old file.
        os.link(old, path)
        writer.freeze(path, seed=3, kill_after=delay)
        seed = content_seed(path, (1, 3))
        outcomes.append({1: "old", 3: "new"}[seed])
        check_leftovers(directory, "model.thaw", (3,))
        path.unlink()
    assert content_seed(old, (1,)) == 1, "the old snapshot was written in place"
    assert "old" in outcomes, f"no kill landed before the rename: {outcomes}"
    assert outcomes[-1] == "new", outcomes
