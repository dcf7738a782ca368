"""The operator's routes: register and unregister models at runtime, the pool's status,
draining a slot. Never open to the network by default:

- on a Unix socket (always): created mode 0600 in a directory of its own, so only the uid
  that runs `thawctl serve` (and root) can connect; uvicorn's own `uds=` would make it 0666;
- on the HTTP port only with `--admin-token-file`: every call then needs
  `Authorization: Bearer <token>` (401 without, 403 with a wrong one).
"""

from __future__ import annotations

import asyncio
import hmac
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, Router

from thawctl.serve.app import error, model_error
from thawctl.serve.models import Model, ModelError, validate_name
from thawctl.serve.pool import Pool, Slot

DRAIN_TIMEOUT_S = 300.0


class Admin:
    def __init__(self, pool: Pool, resolve: Callable[[str, str], Model]) -> None:
        """`resolve(name, snapshot)`: a Model for a thawd snapshot (blocking: a gRPC call to
        thawd; run on a thread)."""
        self.pool = pool
        self.resolve = resolve

    async def status(self, request: Request) -> Response:
        return JSONResponse(self.pool.status())

    async def register(self, request: Request) -> Response:
        try:
            body = await request.json()
            name = validate_name(str(body["name"]))
            snapshot = str(body.get("snapshot") or name)
            model = await asyncio.to_thread(self.resolve, name, snapshot)
            self.pool.register(model)
        except ModelError as e:
            return model_error(e)
        except (ValueError, KeyError, TypeError) as e:
            return error(400, f"expected {{\"name\": ..., \"snapshot\": ...}}: {e!r}",
                         "invalid_request_error")  # fmt: skip
        return JSONResponse(_model(model), status_code=201)

    async def unregister(self, request: Request) -> Response:
        try:
            model = self.pool.unregister(request.path_params["name"])
        except ModelError as e:
            return model_error(e)
        return JSONResponse(_model(model))

    async def drain(self, request: Request) -> Response:
        timeout = float(request.query_params.get("timeout", DRAIN_TIMEOUT_S))
        try:
            slot = await self.pool.drain(int(request.path_params["index"]), timeout)
        except ModelError as e:
            return model_error(e)
        return JSONResponse(_slot(slot))

    async def resume(self, request: Request) -> Response:
        try:
            slot = self.pool.resume(int(request.path_params["index"]))
        except ModelError as e:
            return model_error(e)
        return JSONResponse(_slot(slot))

    def router(self) -> Router:
        return Router(routes=[
            Route("/pool", self.status, methods=["GET"]),
            Route("/models", self.register, methods=["POST"]),
            Route("/models/{name}", self.unregister, methods=["DELETE"]),
            Route("/slots/{index:int}/drain", self.drain, methods=["POST"]),
            Route("/slots/{index:int}/resume", self.resume, methods=["POST"]),
        ])  # fmt: skip


def _model(m: Model) -> dict[str, Any]:
    return {"name": m.name, "snapshot": m.snapshot, "architecture": str(m.architecture)}


def _slot(s: Slot) -> dict[str, Any]:
    return {"slot": s.index, "state": s.state, "model": s.model, "in_flight": s.in_flight}


class TokenAuth:
    """ASGI middleware: a bearer token on every call (hmac.compare_digest: no timing leak)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            header = dict(scope.get("headers") or ()).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            response: Response | None = None
            if scheme.lower() != b"bearer" or not given:
                response = error(401, "the admin API needs Authorization: Bearer <token> "
                                 "(the token file of --admin-token-file)", "authentication_error",
                                 {"WWW-Authenticate": "Bearer"})  # fmt: skip
            elif not hmac.compare_digest(given.strip(), self.token):
                response = error(403, "wrong admin token", "permission_error")
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def mount_with_token(admin: Admin, token: str) -> Mount:
    """The admin routes under /admin on the HTTP port, behind the token."""
    return Mount("/admin", app=TokenAuth(admin.router(), token))


def read_token(path: str) -> str:
    """The token file's one line; refused when others may read it (a token anyone on the
    host can read authenticates no one)."""
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):o})"
                              f": chmod 600 {path}")  # fmt: skip
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if len(token) < 16:
        raise ValueError(f"{path}: the admin token must be at least 16 characters")
    return token


def unix_listener(path: str) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600 from the start (made under umask 077, so
    there is no moment when others could connect)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        os.unlink(path)  # a stale socket of an earlier server
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
    finally:
        os.umask(old)
    sock.listen(64)
    return sock


def default_socket(port: int) -> str:
    """Per port, so two servers on one host do not take each other's socket."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/thaw-{os.getuid()}"
    return os.path.join(runtime, "thaw", f"serve-{port}.sock")
