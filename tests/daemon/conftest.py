"""A real thawd in a subprocess on a temporary socket, config and state directory.

`thawd_socket` is the fixture other suites (thawctl) use: the socket path of a running
daemon, stopped after the test. `thawd_factory` starts daemons with config overrides and
gives handles to stop, kill and restart them. Readiness is the daemon's own READY=1 on a
NOTIFY_SOCKET this module listens on, exactly as systemd sees it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table: s3 = {allow = [...], ...}
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class ThawdProcess:
    """One thawd subprocess; restartable with the same config (and so the same registry).

    `python` and `code` run it with another interpreter on another copy of the packages
    (the Python 3.10 test); by default this interpreter on this checkout. `wrapper` goes
    before the command (`setpriv --reuid=nobody ...`)."""

    def __init__(self, directory: Path, python: str = sys.executable, code: Path = ROOT,
                 wrapper: tuple[str, ...] = (), **config: object) -> None:  # fmt: skip
        self.dir = directory
        self.python, self.code, self.wrapper = python, code, wrapper
        self.socket = str(directory / "thawd.sock")
        self.config_path = directory / "thawd.toml"
        settings: dict[str, object] = {
            "socket": self.socket,
            "state_dir": str(directory / "state"),
            "pool": "memfd",
            "io_threads": 2,
            "drain_grace_s": 2.0,
            "pinned_budget": "256MiB",
            "warm_budget": "256MiB",
        }
        self.settings = settings
        self.configure(**config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "thawd.log"
        self.notifications: list[str] = []

    def configure(self, **config: object) -> None:
        """Change keys of the config file (a running thawd reads it again on SIGHUP)."""
        self.settings.update(config)
        text = "".join(f"{k} = {_toml(v)}\n" for k, v in self.settings.items())
        self.config_path.write_text(text)

    def start(self, notify_address: str | None = None,
              env: dict[str, str] | None = None) -> ThawdProcess:  # fmt: skip
        """Start and wait for READY=1; `env` adds to the environment (WATCHDOG_USEC, ...)."""
        self.notifications = []
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        address = notify_address or str(self.dir / f"notify-{time.monotonic_ns()}.sock")
        listener.bind(address if not address.startswith("@") else "\0" + address[1:])
        listener.settimeout(0.2)
        path = os.pathsep.join(p for p in (str(self.code), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, NOTIFY_SOCKET=address, PYTHONPATH=path, PYTHONUNBUFFERED="1",
                   **(env or {}))  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrapper, self.python, "-m", "thawd", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.code),
            )
        self._listener = listener
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"thawd exited with {self.proc.returncode}:\n{self.log.read_text()}"
                )
            with contextlib.suppress(TimeoutError):
                self.notifications.extend(listener.recv(4096).decode().splitlines())
            if "READY=1" in self.notifications:
                return self
        self.kill()
        raise RuntimeError(f"thawd sent no READY=1 in {START_TIMEOUT} s:\n{self.log.read_text()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def drain_notifications(self, timeout: float = 5.0, until: str = "") -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (not until or until not in self.notifications):
            with contextlib.suppress(TimeoutError, OSError):
                self.notifications.extend(self._listener.recv(4096).decode().splitlines())
        return self.notifications

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> ThawdProcess:
        self.stop()
        self._listener.close()
        return self.start()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.kill()
            with contextlib.suppress(Exception):
                self._listener.close()


def make_dir() -> Path:
    # /tmp, mode 0755: processes of other uids (the security tests) must reach the socket.
    directory = Path(tempfile.mkdtemp(prefix="thawd-test-", dir="/tmp"))
    directory.chmod(0o755)
    return directory


@pytest.fixture
def thawd_factory() -> Iterator[object]:
    started: list[ThawdProcess] = []
    dirs: list[Path] = []

    def factory(**config: object) -> ThawdProcess:
        directory = make_dir()
        dirs.append(directory)
        daemon = ThawdProcess(directory, **config)  # type: ignore[arg-type]
        started.append(daemon)
        return daemon.start()

    yield factory
    for daemon in started:
        daemon.close()
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def thawd(thawd_factory: object) -> ThawdProcess:
    return thawd_factory()  # type: ignore[operator]


@pytest.fixture
def thawd_socket(thawd: ThawdProcess) -> str:
    """The socket path of a running thawd (stopped after the test)."""
    return thawd.socket


# --- fixture snapshots ------------------------------------------------------------------------


def random_tensors(seed: int = 0, scale: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(64 * scale, 96, generator=g),
        "layers.0.norm": torch.randn(96, generator=g).to(torch.float16),
        "layers.0.proj": torch.randn(96, 128 * scale, generator=g),
        "layers.0.index": torch.randint(0, 1 << 30, (33,), generator=g, dtype=torch.int64),
    }


def write_snapshot(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], model: str = "fixture"
) -> Path:
    """A snapshot written with thaw.format.SnapshotWriter (no dependence on thaw.demo.tiny)."""
    from thaw import _native
    from thaw.format import SnapshotWriter, layout
    from thaw.format.dtypes import dtype_name
    from thaw.format.fingerprint import Fingerprint

    entries = layout([(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()])
    with SnapshotWriter(path, entries) as w:
        sums = []
        for e, t in zip(entries, tensors.values(), strict=True):
            t = t.contiguous()
            w.write_at(e.offset, t.data_ptr(), e.length)
            sums.append(_native.tree_hash(t.data_ptr(), e.length))
        w.commit(Fingerprint(model=model), sums)
    return Path(path)


def flip_byte(path: str | os.PathLike[str], tensor: str, at: int) -> None:
    """Flip one bit of byte `at` of `tensor` in a snapshot file, in place."""
    from thaw.format import open_snapshot

    snap = open_snapshot(path)
    entry = snap.tensor(tensor)
    with open(path, "r+b") as f:
        f.seek(snap.payload_offset + entry.offset + at)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))


def zeros_like(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(t) for n, t in tensors.items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(
            a[n].view(torch.uint8) if a[n].dtype != torch.bool else a[n],
            b[n].view(torch.uint8) if b[n].dtype != torch.bool else b[n],
        )
        for n in a
    )


def run_client(
    code: str,
    uid: int | None = None,
    timeout: float = 60.0,
    groups: tuple[int, ...] = (),
    wrapper: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh Python (under the command `wrapper`, if any); with `uid`, it drops
    to that uid (and gid, and the supplementary `groups`) after imports.

    The interpreter lives under /root here, so the child starts as root, imports, then gives
    up its privileges before it touches the daemon, as an unprivileged engine process would.
    """
    prelude = f"import os, sys, json\nsys.path.insert(0, {str(ROOT)!r})\n"
    # Everything the child imports comes before the drop: the interpreter's own modules are
    # not readable by other uids here.
    prelude += "import time, torch, thaw.client, thaw.errors\n"
    prelude += "import thaw.copy.restore, thaw.copy.datapath\n"
    # The client imports protobuf, gRPC and its records on its first gRPC call: here, before.
    prelude += "import grpc, thaw._proto.thawd_pb2_grpc, thaw.daemon.records\n"
    prelude += "import tests.daemon.conftest\n"
    if uid is not None:
        prelude += f"os.setgroups({list(groups)}); os.setgid({uid}); os.setuid({uid})\n"
    return subprocess.run(
        [*wrapper, sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )
