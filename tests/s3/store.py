"""A real S3-protocol server for the tests: moto's server mode, in its own process on
loopback, and a TCP relay in front of it that can slow the bytes down, answer 503, or
lose the server (the network failures a mocked client cannot show)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

# Credentials of the tests' store: moto accepts any. The secret is distinctive so that the
# tests can look for it in thawd's log.
SECRET = "thaw-test-secret-7f3a9c"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "thawtestkey",
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """`python -m moto.server` on 127.0.0.1; `kill()` ends it the hard way."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.kill()
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
        ).client("s3", endpoint_url=self.url)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Relay:
    """A TCP relay on loopback to `port`. `rate`: bytes a second per connection toward the
    client (0: as fast as it goes); `fail_first`: that many connections are answered with
    HTTP 503 (S3's SlowDown) instead of being relayed."""

    def __init__(self, port: int, rate: int = 0, fail_first: int = 0) -> None:
        self.upstream = port
        self.rate = rate
        self.fail_first = fail_first
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                failing = self.connections <= self.fail_first
                self._open.append(down)
            threading.Thread(target=self._serve, args=(down, failing), daemon=True).start()

    def _serve(self, down: socket.socket, failing: bool) -> None:
        if failing:
            with contextlib.suppress(OSError):
                down.recv(65536)
                body = b"<Error><Code>SlowDown</Code><Message>slow down</Message></Error>"
                down.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))  # fmt: skip
            down.close()
            return
        try:
            up = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
        except OSError:
            down.close()  # the server is gone: as a dead host's connection, closed
            return
        with self._lock:
            self._open.append(up)
        threading.Thread(target=self._pipe, args=(down, up, 0), daemon=True).start()
        self._pipe(up, down, self.rate)

    def _pipe(self, src: socket.socket, dst: socket.socket, rate: int) -> None:
        piece = 65536
        try:
            while data := src.recv(piece):
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.close()
