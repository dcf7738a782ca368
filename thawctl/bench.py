"""`thawctl bench`: restore throughput from each tier into this host's GPU (or CPU).

Tiers measured, each into freshly allocated tensors laid out like the snapshot:

- file-cold:  thaw.restore_file after dropping the file from the page cache
              (posix_fadvise DONTNEED); CUDA targets then read with O_DIRECT.
- file-warm:  thaw.restore_file with the file in the page cache.
- daemon-pinned: thaw.connect().restore from thawd's pinned pool, if a daemon answers.

Without a NAME|PATH a synthetic snapshot of --size bytes is written to --dir and removed
after. File restores verify checksums (thaw's default); pinned restores were verified at pin.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from thawctl import exitcodes, render
from thawctl.context import Context
from thawctl.exitcodes import CommandError
from thawctl.refs import looks_like_path

TIERS = ("file-cold", "file-warm", "daemon-pinned")
# Synthetic snapshots are cut into 64 MiB tensors: the size of thaw's staging slots, and
# about the size of a large layer's weight.
TENSOR_BYTES = 64 << 20


def add_parsers(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        parents=[parents["json"], parents["socket"]],
        help="measure restore throughput from each tier",
        description="Measure restore throughput from each tier (file cold, file warm, thawd "
        "pinned) into this host's GPU, or its CPU without one.",
    )
    p.add_argument(
        "ref",
        nargs="?",
        metavar="NAME|PATH",
        help="snapshot to restore (default: a synthetic one of --size)",
    )
    p.add_argument("--size", default="512MiB", help="synthetic snapshot size (default 512MiB)")
    p.add_argument("--dir", help="where the synthetic snapshot is written (default: $TMPDIR)")
    p.add_argument("--device", help="restore into: cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--repeat", type=int, default=3, metavar="N", help="runs per tier (default 3)")
    p.add_argument(
        "--tier",
        action="append",
        choices=TIERS,
        metavar="TIER",
        help=f"only these tiers (repeatable; {', '.join(TIERS)})",
    )
    p.set_defaults(func=run_bench)


def parse_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units and not t[-1].isdigit() else (t, "")
    try:
        value = int(float(num) * units[unit])
    except ValueError:
        raise CommandError(
            f"--size {text!r} is not a size (examples: 512MiB, 2GiB)", exitcodes.USAGE
        ) from None
    if value <= 0:
        raise CommandError("--size must be positive", exitcodes.USAGE)
    return value


def run_bench(ctx: Context) -> int:
    import torch

    args = ctx.args
    if args.repeat < 1:
        raise CommandError("--repeat must be at least 1", exitcodes.USAGE)
    tiers = args.tier or list(TIERS)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {device} but torch sees no CUDA GPU; use --device cpu")
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    with _snapshot(ctx, args) as (path, name, synthetic):
        from thaw import open_snapshot

        snap = open_snapshot(path) if path else None
        info: dict[str, Any] = {
            "path": str(path) if path else None,
            "name": name,
            "bytes": sum(t.length for t in snap.tensors) if snap else None,
            "tensor_count": len(snap.tensors) if snap else None,
            "synthetic": synthetic,
        }
        log = _logger(ctx)
        for tier in tiers:
            log(f"{tier}: ...")
            try:
                runs, source = _measure(ctx, tier, path, name, device, args.repeat)
            except _Skip as e:
                skipped.append({"tier": tier, "reason": str(e)})
                log(f"{tier}: skipped ({e})")
                continue
            results.append(_summary(tier, runs, source))
            log(f"{tier}: {render.rate(max(b / s for b, s in runs))} best of {len(runs)}")
    doc = {
        "device": str(device),
        "snapshot": info,
        "repeat": args.repeat,
        "results": results,
        "skipped": skipped,
    }
    if ctx.json:
        render.emit_json(doc, ctx.out)
        return exitcodes.OK
    ctx.print(
        f"restore into {device}: {render.size(info['bytes'])} in {info['tensor_count']} "
        f"tensors ({'synthetic, ' if synthetic else ''}{info['path'] or name})"
    )
    rows = [
        (
            r["tier"],
            r["source"],
            render.size(r["bytes"]),
            _gbps(r["best_gbps"]),
            _gbps(r["median_gbps"]),
            _gbps(r["first_gbps"]),
            f"{r['best_seconds'] * 1e3:.1f} ms",
        )
        for r in results
    ]
    for s in skipped:
        rows.append((s["tier"], "skipped: " + s["reason"], "", "", "", "", ""))
    ctx.print(
        render.table(
            ("TIER", "SOURCE", "SIZE", "BEST", "MEDIAN", "FIRST", "BEST TIME"),
            rows,
            right=(2, 3, 4, 5, 6),
        )
    )
    return exitcodes.OK


def _gbps(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} GB/s"


class _Skip(Exception):
    pass


def _logger(ctx: Context) -> Callable[[str], None]:
    def log(text: str) -> None:
        if not ctx.json and ctx.err.isatty():
            ctx.err.write(f"\r\x1b[K{text}")
            ctx.err.flush()

    return log


def _summary(tier: str, runs: list[tuple[int, float]], source: str) -> dict[str, Any]:
    rates = [b / s / 1e9 for b, s in runs if s > 0]
    best = min(runs, key=lambda r: r[1])
    return {
        "tier": tier,
        "source": source,
        "bytes": best[0],
        "best_seconds": round(best[1], 6),
        "best_gbps": round(max(rates), 4) if rates else None,
        # The first restore of the process: for daemon-pinned it includes mapping the pool.
        "first_gbps": round(rates[0], 4) if rates else None,
        "median_gbps": round(statistics.median(rates), 4) if rates else None,
        "runs_gbps": [round(r, 4) for r in rates],
    }


@contextlib.contextmanager
def _snapshot(
    ctx: Context, args: argparse.Namespace
) -> Iterator[tuple[Path | None, str | None, bool]]:
    """(file path or None, registered name or None, synthetic?)."""
    ref = args.ref
    if ref is None:
        size = parse_size(args.size)
        with tempfile.TemporaryDirectory(prefix="thawctl-bench-", dir=args.dir) as tmp:
            path = Path(tmp) / "bench.thaw"
            _write_synthetic(path, size)
            yield path, None, True
        return
    if looks_like_path(ref):
        yield Path(ref), None, False
        return
    with ctx.connect() as client:
        record = client.stat(ref)
    readable = Path(record.path) if os.access(record.path, os.R_OK) else None
    yield readable, ref, False


def _write_synthetic(path: Path, size: int) -> None:
    import torch

    from thaw import freeze_file

    gen = torch.Generator().manual_seed(0)
    tensors = {}
    left, i = size, 0
    while left > 0:
        n = min(TENSOR_BYTES, left)
        # Random bytes: compressible data would flatter a compressing filesystem.
        tensors[f"layer{i}.weight"] = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        left -= n
        i += 1
    freeze_file(tensors, path)


def _targets(snap: Any, device: str) -> list[tuple[str, Any]]:
    import torch

    from thaw.format.dtypes import torch_dtype

    return [
        (t.name, torch.empty(t.shape, dtype=torch_dtype(t.dtype), device=device))
        for t in snap.tensors
    ]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def _measure(
    ctx: Context, tier: str, path: Path | None, name: str | None, device: str, repeat: int
) -> tuple[list[tuple[int, float]], str]:
    if tier.startswith("file"):
        if path is None:
            raise _Skip("the snapshot's file is not readable here")
        return _file_runs(path, device, repeat, cold=tier == "file-cold")
    return _daemon_runs(ctx, path, name, device, repeat)


def _file_runs(
    path: Path, device: str, repeat: int, cold: bool
) -> tuple[list[tuple[int, float]], str]:
    from thaw import _native, open_snapshot, restore_file

    snap = open_snapshot(path)
    targets = _targets(snap, device)
    runs, sources = [], set()
    if not cold:
        _warm_page_cache(path, snap)
    for _ in range(repeat):
        if cold:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                _native.fadvise(fd, 0, 0, _native.FADV_DONTNEED)
                resident = _native.resident_bytes(fd, snap.payload_offset, snap.payload_length)
            finally:
                os.close(fd)
            if resident > snap.payload_length // 2:
                raise _Skip("the page cache would not drop the file (tmpfs?)")
        _sync(device)
        t0 = time.perf_counter()
        stats = restore_file(targets, path)
        _sync(device)
        runs.append((stats.bytes, time.perf_counter() - t0))
        sources.add(stats.source)
    return runs, "/".join(sorted(sources))


def _warm_page_cache(path: Path, snap: Any) -> None:
    """Read the payload through the page cache (a CUDA restore of a cold file reads with
    O_DIRECT, which would leave the cache cold); skip the tier if the cache will not hold it."""
    import numpy as np

    from thaw import _native

    buf = np.empty(64 << 20, dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        end = snap.payload_offset + snap.payload_length
        for offset in range(snap.payload_offset, end, buf.size):
            n = min(buf.size, end - offset)
            _native.pread_into(fd, int(buf.ctypes.data), n, offset, 4, 4 << 20)
        resident = _native.resident_bytes(fd, snap.payload_offset, snap.payload_length)
    finally:
        os.close(fd)
    if resident < snap.payload_length // 2:
        raise _Skip("the page cache would not hold the file (too little free memory?)")


def _daemon_runs(
    ctx: Context, path: Path | None, name: str | None, device: str, repeat: int
) -> tuple[list[tuple[int, float]], str]:
    from thaw import open_snapshot
    from thaw.errors import BudgetExceeded, DaemonUnavailable, PermissionDenied

    try:
        client = ctx.connect()
    except DaemonUnavailable:
        raise _Skip("no thawd is running") from None
    except PermissionDenied as e:
        raise _Skip(f"thawd refused this user ({e})") from None
    with client:
        registered = None
        pinned_here = False
        try:
            if name is None:
                assert path is not None
                registered = f"thawctl-bench-{os.getpid()}"
                client.register(path, registered, {"thawctl": "bench"})
                name = registered
            record = client.stat(name)
            if record.tier != "pinned":
                try:
                    client.pin(name)
                    pinned_here = True
                except BudgetExceeded as e:
                    raise _Skip(f"pinned budget too small ({e})") from None
            snap = open_snapshot(path) if path is not None else None
            if snap is None:
                raise _Skip("the snapshot's file is not readable here (needed for its layout)")
            targets = _targets(snap, device)
            runs = []
            for _ in range(repeat):
                _sync(device)
                t0 = time.perf_counter()
                result = client.restore(targets, name)
                _sync(device)
                runs.append((result.bytes, time.perf_counter() - t0))
            return runs, "thawd pool"
        finally:
            # Leave thawd as it was: a snapshot bench registered goes, one it pinned is unpinned.
            with contextlib.suppress(Exception):
                if registered is not None:
                    client.unregister(registered)
                elif pinned_here:
                    client.unpin(name)
