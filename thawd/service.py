"""The gRPC face of thawd: thin servicers, the one error mapping, and the interceptors.

A servicer method validates its request, calls one Daemon method and converts nothing but
the reply. Domain errors (thaw.errors) become status codes in `abort_for` only; the error's
class name travels in trailing metadata so the client raises the same class.
Cross-cutting concerns are interceptors: request id, access log, peer credentials.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from thaw import errors
from thaw._proto import thawd_pb2 as pb
from thaw._proto import thawd_pb2_grpc as pb_grpc
from thaw.daemon.fdsocket import TOKEN_METADATA_KEY
from thawd.security import AllowList, Peer, Tokens
from thawd.state import Daemon
from thawd.throttle import Throttle

log = logging.getLogger("thawd.access")
# One line per refused request (bad arguments, permissions, unknown names) and per internal
# error, bounded: a client looping on a bad request must not fill the journal.
_refusals = Throttle()

PEER: contextvars.ContextVar[Peer] = contextvars.ContextVar("peer")
TOKEN: contextvars.ContextVar[str] = contextvars.ContextVar("token", default="")
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
ERROR_CLASS_KEY = "thaw-error"
ERROR_TENSOR_KEY = "thaw-tensor"
ERROR_CHECKSUMS_KEY = "thaw-checksums"  # "recorded computed", 16 hex digits each
HEALTH_PREFIX = "/grpc.health.v1.Health/"
MAX_WATCHES = 16  # Watch streams per uid
MIN_WATCH_INTERVAL_S = 0.2

# Most specific first: the first match wins.
_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.BudgetExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.DaemonUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.ChecksumMismatch, grpc.StatusCode.DATA_LOSS),
    (errors.SnapshotError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ThawError, grpc.StatusCode.FAILED_PRECONDITION),
]


def code_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


async def abort_for(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """The one place a domain error becomes a gRPC status."""
    code = code_for(exc)
    message = str(exc)
    peer = PEER.get(None)
    who = f"uid {peer.uid} pid {peer.pid}" if peer else "unauthenticated"
    if code is grpc.StatusCode.INTERNAL:
        _refusals.log(log, logging.ERROR, "internal error in request %s (%s)", REQUEST_ID.get(),
                      who, exc_info=exc)  # fmt: skip
        message = f"internal error in thawd ({type(exc).__name__}: {exc}); see its log"
    else:
        _refusals.log(log, logging.INFO, "refused request %s (%s): %s %s", REQUEST_ID.get(), who,
                      type(exc).__name__, message[:300])  # fmt: skip
    trailers = [(ERROR_CLASS_KEY, type(exc).__name__),
                (ERROR_TENSOR_KEY, str(getattr(exc, "tensor", "")))]  # fmt: skip
    if isinstance(exc, errors.ChecksumMismatch):
        trailers.append((ERROR_CHECKSUMS_KEY, f"{exc.expected:016x} {exc.found:016x}"))
    await context.abort(code, message, trailing_metadata=tuple(trailers))


def unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            await abort_for(context, e)

    return wrapper


def stream(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for item in fn(self, request, context):
                yield item
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            await abort_for(context, e)

    return wrapper


def _tier(value: int) -> str:
    if value in (pb.TIER_UNSPECIFIED, pb.TIER_PINNED):
        return "pinned"
    if value == pb.TIER_WARM:
        return "warm"
    raise errors.InvalidRequest("pin to TIER_PINNED or TIER_WARM; Unpin makes a snapshot cold")


def _seconds(value: float) -> float:
    """A duration a client reports: finite and not negative, else refused."""
    if not 0.0 <= value < 1e9:
        raise errors.InvalidRequest(f"duration_s must be a number of seconds, not {value!r}")
    return value


class ThawdServicer(pb_grpc.ThawdServicer):
    def __init__(self, daemon: Daemon, stopping: asyncio.Event) -> None:
        self.d = daemon
        self.stopping = stopping
        self.watchers: dict[int, int] = {}  # open Watch streams per uid

    def _accepting(self) -> None:
        if self.stopping.is_set():
            raise errors.DaemonUnavailable("thawd is stopping; retry once it is back")

    @unary
    async def Register(self, request: pb.RegisterRequest, context: Any) -> pb.RegisterResponse:
        snap = await self.d.register(PEER.get(), request.path, request.name, dict(request.labels))
        return pb.RegisterResponse(snapshot=snap)

    @unary
    async def Unregister(
        self, request: pb.UnregisterRequest, context: Any
    ) -> pb.UnregisterResponse:
        await self.d.unregister(PEER.get(), request.name)
        return pb.UnregisterResponse()

    @stream
    async def Pin(self, request: pb.PinRequest, context: Any) -> AsyncIterator[pb.PinProgress]:
        self._accepting()
        async for progress in self.d.tiers.pin(PEER.get(), request.name, _tier(request.tier)):
            yield progress

    @unary
    async def Unpin(self, request: pb.UnpinRequest, context: Any) -> pb.UnpinResponse:
        return pb.UnpinResponse(snapshot=await self.d.tiers.unpin(PEER.get(), request.name))

    @unary
    async def List(self, request: pb.ListRequest, context: Any) -> pb.ListResponse:
        return pb.ListResponse(snapshots=self.d.list())

    @unary
    async def Stat(self, request: pb.StatRequest, context: Any) -> pb.StatResponse:
        return pb.StatResponse(snapshot=self.d.stat(request.name))

    @unary
    async def Verify(self, request: pb.VerifyRequest, context: Any) -> pb.VerifyResponse:
        self._accepting()
        return await self.d.tiers.verify(PEER.get(), request.name)

    @unary
    async def OpenRestore(
        self, request: pb.OpenRestoreRequest, context: Any
    ) -> pb.OpenRestoreResponse:
        self._accepting()
        return await self.d.restores.open(PEER.get(), TOKEN.get(), request)

    @unary
    async def CopyInto(self, request: pb.DaemonCopyRequest,
                       context: Any) -> pb.DaemonCopyResponse:  # fmt: skip
        return await self.d.restores.copy_into(PEER.get(), TOKEN.get(), request)

    @unary
    async def CopyOut(self, request: pb.DaemonCopyRequest,
                      context: Any) -> pb.DaemonCopyResponse:  # fmt: skip
        return await self.d.freezes.copy_out(PEER.get(), TOKEN.get(), request)

    @unary
    async def CloseRestore(
        self, request: pb.CloseRestoreRequest, context: Any
    ) -> pb.CloseRestoreResponse:
        self.d.restores.close(PEER.get(), request.session_id, request.ok, request.bytes,
                              _seconds(request.duration_s), request.error[:1000])  # fmt: skip
        return pb.CloseRestoreResponse()

    @unary
    async def BeginFreeze(
        self, request: pb.BeginFreezeRequest, context: Any
    ) -> pb.BeginFreezeResponse:
        self._accepting()
        return await self.d.freezes.begin(PEER.get(), TOKEN.get(), request)

    @unary
    async def CommitFreeze(
        self, request: pb.CommitFreezeRequest, context: Any
    ) -> pb.CommitFreezeResponse:
        snap = await self.d.freezes.commit(PEER.get(), request.session_id, request.wait)
        return pb.CommitFreezeResponse(snapshot=snap)

    @unary
    async def AbortFreeze(
        self, request: pb.AbortFreezeRequest, context: Any
    ) -> pb.AbortFreezeResponse:
        self.d.freezes.abort(PEER.get(), request.session_id)
        return pb.AbortFreezeResponse()

    @unary
    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.DaemonStatus:
        return self.d.status()

    @unary
    async def ListSessions(self, request: pb.ListSessionsRequest,
                           context: Any) -> pb.ListSessionsResponse:  # fmt: skip
        return pb.ListSessionsResponse(sessions=self.d.restores.sessions())

    @stream
    async def Watch(self, request: pb.WatchRequest, context: Any) -> AsyncIterator[pb.WatchUpdate]:
        # Every stream builds the status and every snapshot's record each interval, on the
        # event loop: bounded per uid, and not faster than 5 times a second.
        uid = PEER.get().uid
        if self.watchers.get(uid, 0) >= MAX_WATCHES:
            raise errors.InvalidRequest(f"uid {uid} has {MAX_WATCHES} Watch streams open "
                                        "already; close one first")  # fmt: skip
        interval = request.interval_s if request.interval_s > 0 else 1.0
        interval = max(interval, MIN_WATCH_INTERVAL_S)
        self.watchers[uid] = self.watchers.get(uid, 0) + 1
        try:
            async for update in self._watch(interval):
                yield update
        finally:
            self.watchers[uid] -= 1

    async def _watch(self, interval: float) -> AsyncIterator[pb.WatchUpdate]:
        queue = self.d.events.subscribe()
        last_bytes, last_t = self.d.restores.bytes_total, time.monotonic()
        next_metrics = last_t
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                if now >= next_metrics:
                    rate = (self.d.restores.bytes_total - last_bytes) / max(now - last_t, 1e-6)
                    last_bytes, last_t = self.d.restores.bytes_total, now
                    next_metrics = now + interval
                    yield pb.WatchUpdate(time_unix=time.time(), metrics=pb.Metrics(
                        status=self.d.status(), snapshots=self.d.list(),
                        restore_bytes_per_s=rate,
                        sessions=self.d.restores.sessions()))  # fmt: skip
                try:
                    update = await asyncio.wait_for(queue.get(), max(0.0, next_metrics - now))
                except asyncio.TimeoutError:
                    continue
                yield update
            while not queue.empty():  # the "stopping" event reaches every watcher
                yield queue.get_nowait()
        finally:
            self.d.events.unsubscribe(queue)


# --- interceptors -----------------------------------------------------------------------------


def _wrap(
    handler: grpc.RpcMethodHandler, around: Callable[[Any, bool], Any]
) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behaviour is `around(behaviour, is_stream)`."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            around(handler.unary_unary, False),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            around(handler.unary_stream, True),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler  # thawd has no client-streaming methods


def _metadata(details: grpc.HandlerCallDetails, key: str) -> str:
    for k, v in details.invocation_metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return ""


def _around(before: Callable[[Any], object], after: Callable[[Any, BaseException | None], None]
            ) -> Callable[[Any, bool], Any]:  # fmt: skip
    def make(behaviour: Any, is_stream: bool) -> Any:
        if is_stream:

            async def gen(request: Any, context: Any) -> Any:
                before(context)
                error: BaseException | None = None
                try:
                    async for item in behaviour(request, context):
                        yield item
                except BaseException as e:
                    error = e
                    raise
                finally:
                    after(context, error)

            return gen

        async def call(request: Any, context: Any) -> Any:
            before(context)
            error: BaseException | None = None
            try:
                return await behaviour(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                after(context, error)

        return call

    return make


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """x-request-id from the client's metadata (or a new one) for the logs of this call."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        rid = _metadata(details, "x-request-id")[:64] or uuid.uuid4().hex[:16]
        return _wrap(handler, _around(lambda ctx: REQUEST_ID.set(rid), lambda ctx, e: None))


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    """One line per call: method, caller, status, milliseconds.

    Successful restores and read-only queries are DEBUG: an engine fleet makes thousands a
    minute, and journald's rate limit would drop the lines that matter with them (restores are
    counted in one INFO line a minute, thawd/logs.py). Changes (register, pin, freeze, ...) and
    refusals are INFO; a caller refused for its identity, corrupt bytes or a daemon fault are
    WARNING."""

    QUIET = frozenset({"OpenRestore", "CloseRestore", "CopyInto", "Status", "List", "Stat",
                       "Watch"})  # fmt: skip
    LOUD = frozenset({"PERMISSION_DENIED", "UNAUTHENTICATED", "DATA_LOSS", "INTERNAL",
                      "UNKNOWN"})  # fmt: skip

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        t0 = time.monotonic()
        method = details.method.rsplit("/", 1)[-1]

        def after(context: Any, error: BaseException | None) -> None:
            code = context.code() if hasattr(context, "code") else None
            fault = error is not None and not isinstance(
                error, (grpc.aio.AbortError, asyncio.CancelledError))  # fmt: skip
            if isinstance(error, asyncio.CancelledError):  # the client went away (a Watch ends)
                code = "CANCELLED"
            elif fault:
                code = type(error).__name__
            peer = PEER.get(None)
            who = f"uid={peer.uid} pid={peer.pid}" if peer else "unauthenticated"
            name = getattr(code, "name", code) or "OK"
            ms = (time.monotonic() - t0) * 1e3
            if name in ("OK", "CANCELLED"):
                level = logging.DEBUG if method in self.QUIET else logging.INFO
            else:
                level = logging.WARNING if fault or name in self.LOUD else logging.INFO
            fields = {"request_id": REQUEST_ID.get(), "method": method, "code": name,
                      "ms": round(ms, 1), "uid": peer.uid if peer else None}  # fmt: skip
            log.log(level, "%s %s %s %s %.1fms", REQUEST_ID.get(), method, who, name, ms,
                    extra={"fields": fields})  # fmt: skip

        return _wrap(handler, _around(lambda ctx: None, after))


class CredentialsInterceptor(grpc.aio.ServerInterceptor):
    """Every call but health carries a token from the fd socket; its peer must be allowed."""

    def __init__(self, tokens: Tokens, allow: AllowList) -> None:
        self.tokens = tokens
        self.allow = allow

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        token = _metadata(details, TOKEN_METADATA_KEY)
        peer = self.tokens.lookup(token) if token else None
        failure: BaseException | None = None
        if peer is None:
            failure = errors.PermissionDenied(
                "no valid thaw token: authenticate on thawd's fd socket first (thaw.connect() "
                "does); tokens end when their fd-socket connection closes or thawd restarts"
            )
        else:
            try:
                self.allow.check(peer)
            except errors.PermissionDenied as e:
                failure = e

        def before(context: Any) -> None:
            if peer is not None:
                PEER.set(peer)
                TOKEN.set(token)

        make = _around(before, lambda ctx, e: None)
        if failure is None:
            return _wrap(handler, make)
        code = (grpc.StatusCode.UNAUTHENTICATED if peer is None
                else grpc.StatusCode.PERMISSION_DENIED)  # fmt: skip
        message = str(failure)

        def refuse(behaviour: Any, is_stream: bool) -> Any:
            if is_stream:

                async def gen(request: Any, context: Any) -> Any:
                    await context.abort(
                        code, message, trailing_metadata=((ERROR_CLASS_KEY, "PermissionDenied"),)
                    )
                    yield  # pragma: no cover

                return gen

            async def call(request: Any, context: Any) -> Any:
                await context.abort(
                    code, message, trailing_metadata=((ERROR_CLASS_KEY, "PermissionDenied"),)
                )

            return call

        return _wrap(handler, refuse)
