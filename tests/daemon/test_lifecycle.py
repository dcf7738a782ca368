"""Start-up and shut-down as systemd sees them: READY=1 after serving, STOPPING=1 on SIGTERM."""

from __future__ import annotations

import subprocess
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.daemon.conftest import ROOT, ThawdProcess, make_dir


def test_ready_then_stopping_on_an_abstract_notify_socket() -> None:
    directory = make_dir()
    daemon = ThawdProcess(directory)
    daemon.start(notify_address=f"@thaw-test-{directory.name}")
    try:
        assert "READY=1" in daemon.notifications
        # READY means serving: health answers SERVING at once, without a token.
        with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "thaw.v1.Thawd"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        import os
        import stat

        for path in (daemon.socket, daemon.socket.replace(".sock", ".fd.sock")):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert daemon.stop() == 0
        assert "STOPPING=1" in daemon.drain_notifications(until="STOPPING=1")
        assert not (directory / "thawd.sock").exists()
        assert not (directory / "thawd.fd.sock").exists()
    finally:
        daemon.close()


def test_help_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "thawd", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert "--config" in out.stdout
