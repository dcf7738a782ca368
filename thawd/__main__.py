"""`thawd --config FILE`: run the thaw host daemon in the foreground (systemd runs it so)."""

from __future__ import annotations

import argparse
import functools
import sys

from thaw.errors import ThawError

# What thaw[daemon] adds to the client's dependencies, by module name.
DAEMON_MODULES = {"uvloop", "psutil", "prometheus_client", "grpc_health", "tomli"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="thawd",
        description="The thaw host daemon: keeps model snapshots pinned or page-cache warm in "
        "host memory and serves restores to local engine processes over a Unix socket.",
        epilog="Configuration keys and defaults: docs/DAEMON.md. Under systemd: "
        "`systemctl start thawd` after `make install-service` (docs/OPERATIONS.md).",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config (default: built-in defaults)")
    p.add_argument("--check-config", metavar="FILE",
                   help="check FILE as a start would (keys, the socket group, the socket's "
                   "directory, the state directory), print ok and exit 0, else the problem and "
                   "exit 2")  # fmt: skip
    p.add_argument("--socket", help="gRPC socket path (overrides the config's `socket`)")
    p.add_argument("--state-dir", help="registry and frozen snapshots (overrides `state_dir`)")
    p.add_argument("--pool", choices=["auto", "memfd", "vmm"], help="pool backend override")
    p.add_argument("--log-level", help="debug, info, warning, error")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from thawd import __version__

    if args.version:
        print(f"thawd {__version__}")
        return 0
    try:
        import uvloop

        from thawd import config as config_mod
        from thawd import logs
        from thawd.server import run
    except ModuleNotFoundError as e:  # `pip install thaw` is the client alone
        if (e.name or "").split(".")[0] not in DAEMON_MODULES:
            raise
        print(f"thawd: {e.name} is not installed: the daemon needs pip install 'thaw[daemon]'",
              file=sys.stderr)  # fmt: skip
        return 2

    overrides = {
        k: v
        for k, v in (
            ("socket", args.socket),
            ("state_dir", args.state_dir),
            ("pool", args.pool),
            ("log_level", args.log_level),
        )
        if v
    }
    path = args.check_config or args.config
    try:
        config = config_mod.load(path, overrides)
        config_mod.check(config, path or "defaults")
    except ThawError as e:
        print(f"thawd: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        print("ok")
        return 0
    logs.configure(config.log_level, config.log_format)
    try:
        return uvloop.run(run(config, functools.partial(config_mod.load, path, overrides)))
    except config_mod.ConfigError as e:  # what only binding can tell: a port in use
        print(f"thawd: {path or 'defaults'}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
