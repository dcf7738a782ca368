"""thawd's lifecycle, in order: bind the sockets, register health, allocate, serve, READY=1.

Once ready: WATCHDOG=1 from the event loop when systemd set a watchdog; SIGHUP reloads the
config (thawd/reload.py). On SIGTERM or SIGINT: STOPPING=1, health NOT_SERVING, refuse new
restores, freezes and pins, drain open sessions and pending snapshot writes for up to
`drain_grace_s`, stop the gRPC server, close the fd socket, release every pool buffer and
mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from thaw._proto import thawd_pb2 as pb
from thaw._proto import thawd_pb2_grpc as pb_grpc
from thawd import __version__, hostinfo, logs, metrics
from thawd.budgets import human
from thawd.buffers import choose_pool_kind
from thawd.config import Config, ConfigError
from thawd.events import Events
from thawd.fdserver import FdServer
from thawd.notify import notify, watchdog, watchdog_period
from thawd.reload import Reloader
from thawd.security import AllowList, Tokens, resolve_group
from thawd.service import (
    AccessLogInterceptor,
    CredentialsInterceptor,
    RequestIdInterceptor,
    ThawdServicer,
)
from thawd.state import Daemon

log = logging.getLogger("thawd")
SERVICE = pb.DESCRIPTOR.services_by_name["Thawd"].full_name


def _check_not_running(path: str) -> None:
    """Refuse to steal the socket of a live daemon; remove a stale one."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a leftover of a killed daemon
        return
    finally:
        probe.close()
    raise SystemExit(f"thawd: another thawd is serving {path}; stop it first")


async def run(config: Config, reload_config: Callable[[], Config]) -> int:
    """Serve until SIGTERM or SIGINT; `reload_config` reads the config again on SIGHUP."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Until the reloader is in place a SIGHUP changes nothing (its default would kill thawd).
    loop.add_signal_handler(signal.SIGHUP, lambda: None)

    gid = resolve_group(config.socket_group)
    allow = AllowList.build(config.allow_uids, config.allow_gids, gid)
    tokens = Tokens()
    events = Events()
    summary = logs.RestoreSummary()  # restores counted for the log from the first one
    events.listen(summary.observe)

    # 1. Bind, in the directory that config.check found (systemd's RuntimeDirectory=; never
    #    made here). The sockets appear with mode 0600 (umask) and only then get their final
    #    mode and group, so no one connects through a wider window.
    _check_not_running(config.socket)
    credentials = CredentialsInterceptor(tokens, allow)
    server = grpc.aio.server(
        interceptors=[RequestIdInterceptor(), AccessLogInterceptor(), credentials],
        options=[("grpc.max_receive_message_length", 64 << 20)],
    )
    old = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{config.socket}")
    finally:
        os.umask(old)
    if config.tcp_listen:
        try:
            server.add_insecure_port(config.tcp_listen)
        except RuntimeError:  # grpc says only "Failed to bind"
            raise ConfigError(f"tcp_listen = {config.tcp_listen!r}: cannot listen there (in use, "
                              "or not this host's address); write HOST:PORT or \"\"") from None
        log.warning("TCP listener on %s: only health answers without an fd-socket token",
                    config.tcp_listen)  # fmt: skip
    fdserver = FdServer(config.fd_socket, config.socket_mode, gid, allow, tokens)
    fdserver.bind()

    # 2. Health, NOT_SERVING until the pool is up.
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    # 3. Allocate: pool backend, registry, re-pins. A VMM pool keeps one exported fd per
    #    chunk (4096 for a 1 TiB budget): the soft fd limit goes up to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Worker threads for blocking work: 64, not asyncio's min(32, cpus + 4), so that clients
    # whose filesystems hang (each holds at most state.IO_PER_UID) leave threads for others.
    loop.set_default_executor(ThreadPoolExecutor(64, thread_name_prefix="thawd-io"))
    pool_kind = await asyncio.to_thread(choose_pool_kind, config.pool)
    gpus = await asyncio.to_thread(hostinfo.gpus)
    daemon = Daemon(config, pool_kind, events, gpus)
    await daemon.load()
    servicer = ThawdServicer(daemon, stop)
    pb_grpc.add_ThawdServicer_to_server(servicer, server)
    metrics.start(config.metrics_port, daemon, events)
    if config.repin_on_start:
        await daemon.repin(lambda line: notify(f"STATUS={line}", "EXTEND_TIMEOUT_USEC=120000000"))

    # 4. Serve.
    await server.start()
    os.chown(config.socket, -1, gid)
    os.chmod(config.socket, config.socket_mode)
    fdserver.start(daemon, stop)
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    # 5. READY.
    log.info("thawd %s ready on %s (pool %s, pinned budget %s, warm budget %s, %d snapshots)",
             __version__, config.socket, pool_kind, human(config.pinned_budget),
             human(config.warm_budget), len(daemon.entries))  # fmt: skip
    notify("READY=1", f"STATUS=serving {len(daemon.entries)} snapshots on {config.socket}",
           f"MAINPID={os.getpid()}")  # fmt: skip
    reloader = Reloader(reload_config, daemon, [credentials, fdserver])
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = asyncio.ensure_future(reloader.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    period = watchdog_period()
    pings = asyncio.ensure_future(watchdog(period)) if period else None
    summaries = asyncio.ensure_future(logs.summarize(summary, log))

    await stop.wait()

    # From here on, the configuration as last reloaded.
    config = daemon.config
    log.info("stopping: draining for up to %.1f s", config.drain_grace_s)
    notify("STOPPING=1", "STATUS=draining")
    summaries.cancel()
    if pings is not None:
        pings.cancel()
    await health_servicer.enter_graceful_shutdown()  # every service NOT_SERVING
    events.publish("stopping", message="thawd is shutting down")
    await daemon.drain(config.drain_grace_s)
    await server.stop(1.0)
    await fdserver.close()
    daemon.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(config.socket)
    summary.flush(log, "since the last summary")
    log.info("stopped")
    return 0
