"""Commands on snapshots: ls, info, register, pin, unpin, rm, verify.

A NAME|PATH argument is a file when it has a slash, ends in .thaw or exists (snapshot names
cannot contain "/"); otherwise it names a registered snapshot. `info` and `verify` of a file
need no daemon.
"""

from __future__ import annotations

import argparse
import errno
import os
import time
from typing import Any

from thawctl import exitcodes, render, schema
from thawctl.context import Context
from thawctl.progress import Progress
from thawctl.refs import is_object, looks_like_path


def label(text: str) -> tuple[str, str]:
    """argparse type of --label: KEY=VALUE."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label {text!r} is not KEY=VALUE")
    return key, value


def add_label_option(parser: argparse.ArgumentParser, help: str) -> None:
    """The repeatable --label KEY=VALUE option; its values land in args.label as pairs."""
    parser.add_argument(
        "--label", type=label, action="append", default=[], metavar="KEY=VALUE", help=help
    )


def add_parsers(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    both = [parents["json"], parents["socket"]]

    p = sub.add_parser(
        "ls",
        parents=both,
        help="list registered snapshots",
        description="List the snapshots thawd knows, with tier, residency and restore counts.",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print names only, one a line")
    p.add_argument(
        "-o",
        "--output",
        choices=["wide"],
        help="wide: also labels, a fingerprint summary and the time of registration",
    )
    p.add_argument("--tier", choices=["cold", "warm", "pinned"], help="only snapshots in TIER")
    add_label_option(p, "only snapshots with this label (repeatable: all must match)")
    p.set_defaults(func=run_ls)

    p = sub.add_parser(
        "info",
        parents=both,
        help="describe a snapshot (a file needs no daemon)",
        description="Header, fingerprint, sizes and the tensor table of a snapshot "
        "file, or of a registered snapshot together with its daemon state.",
    )
    p.add_argument("ref", metavar="NAME|PATH")
    p.add_argument("--summary", action="store_true", help="leave out the tensor table")
    p.set_defaults(func=run_info)

    p = sub.add_parser(
        "register",
        parents=both,
        help="register a snapshot file with thawd",
        description="Register a snapshot file (cold: on disk only). The daemon "
        "checks that you could read the file yourself.",
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument(
        "--name", default="", help="snapshot name (default: the file name without .thaw)"
    )
    add_label_option(p, "attach a label (repeatable)")
    p.set_defaults(func=run_register)

    p = sub.add_parser(
        "pin",
        parents=both,
        help="pin a snapshot into thawd's page-locked memory",
        description="Pin a snapshot (registering the file first if needed). "
        "Every tensor's checksum is verified as it is read. Shows a progress bar "
        "on a terminal, plain lines otherwise.",
    )
    p.add_argument("ref", metavar="NAME|PATH")
    p.add_argument(
        "--warm", action="store_true", help="keep it in the page cache instead (the warm tier)"
    )
    p.add_argument("--name", default="", help="name to register a PATH under")
    add_label_option(p, "label for a PATH registered here (repeatable)")
    p.set_defaults(func=run_pin)

    p = sub.add_parser("unpin", parents=both, help="release a snapshot's memory (back to cold)")
    p.add_argument("ref", metavar="NAME|PATH")
    p.set_defaults(func=run_unpin)

    p = sub.add_parser(
        "rm",
        parents=both,
        help="unregister a snapshot (the file stays)",
        description="Unregister a snapshot and release its memory. The file on "
        "disk is not deleted.",
    )
    p.add_argument("ref", metavar="NAME|PATH")
    p.set_defaults(func=run_rm)

    p = sub.add_parser(
        "verify",
        parents=both,
        help="recompute a snapshot's checksums",
        description="Read every tensor and compare it with the checksum recorded "
        "at freeze time. A PATH is read here, without the daemon, reporting every "
        "mismatch; for a NAME, thawd re-hashes the bytes where they are (its pinned "
        "pool buffer, else the file), records the outcome and stops at the first "
        "mismatch. Exit code 7 on a mismatch.",
    )
    p.add_argument("ref", metavar="NAME|PATH")
    p.set_defaults(func=run_verify)


# --- helpers -----------------------------------------------------------------------------------


def resolve(client: Any, ref: str) -> str:
    """The registered name for a NAME|PATH argument."""
    if not looks_like_path(ref):
        return ref
    record = find_by_path(client, ref)
    if record is None:
        from thaw.errors import NotFound

        raise NotFound(f"{ref} is not registered; `thawctl register {ref}` registers it")
    return str(record.name)


def find_by_path(client: Any, path: str) -> Any:
    """The first snapshot registered for the file at `path` (the same file by any name: a
    symlink or a hard link too), or None. An object is its URI."""
    if is_object(path):
        return next((r for r in client.list() if r.path == path), None)
    wanted = os.path.realpath(path)
    for r in client.list():
        if os.path.realpath(r.path) == wanted or _same_file(r.path, path):
            return r
    return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def require_file(path: str) -> None:
    """FileNotFoundError (exit 4) for a PATH that is not there: said here, in thawctl's words,
    rather than thawd's refusal of the request (exit 2). Objects are thawd's to find."""
    if not is_object(path) and not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such file", path)


def register_path(ctx: Context, client: Any, path: str, name: str, labels: dict[str, str]) -> Any:
    """Register `path`, refusing a file that is registered already unless a --name is given:
    a second name for one file is allowed only on purpose (its pins would hold the bytes
    twice), and then said."""
    require_file(path)
    existing = find_by_path(client, path)
    if existing is not None and not name:
        raise exitcodes.CommandError(
            f"{path} is already registered as {existing.name}; use that name, or pass --name "
            "to register the file under a second name"
        )
    record = client.register(path, name, labels)
    if existing is not None:
        ctx.warn(f"note: {record.path} is also registered as {existing.name}")
    return record


def _checksum_word(r: Any) -> str:
    return str(r.checksum_state)


def _human_snapshot(ctx: Context, r: Any) -> None:
    now = time.time()
    fp = schema.snapshot(r)["fingerprint"]
    rows = [
        ("name", r.name),
        ("path", r.path + ("  (being written)" if r.file_pending else "")),
        ("tier", r.tier + (f" (wanted: {r.wanted_tier})" if r.wanted_tier != r.tier else "")),
        (
            "size",
            f"{render.size(r.size_bytes)} payload, {render.size(schema.known(r.file_bytes))} file",
        ),
        (
            "resident",
            f"{render.size(r.resident_bytes)} ({render.percent(r.resident_bytes, r.size_bytes)})",
        ),
        (
            "restores",
            f"{r.restores}, last {render.ago(schema.known(r.last_used), now)}; {r.clients} open",
        ),
        ("checksums", _checksum_word(r)),
        ("tensors", str(r.tensor_count)),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(r.labels.items())) or "-"),
        ("fingerprint", _fingerprint_line(fp)),
    ]
    if r.error:
        rows.append(("error", r.error))
    _pairs(ctx, rows)


def _pairs(ctx: Context, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        ctx.print(f"{k.ljust(width)}  {v}")


def _fingerprint_line(fp: dict[str, Any] | None) -> str:
    if not fp:
        return "-"
    parts = [fp.get("architecture") or "?", fp.get("dtype") or "?"]
    if fp.get("parameter_count", -1) >= 0:
        parts.append(f"{fp['parameter_count']:,} parameters")
    parts.append(
        f"engine {fp.get('engine') or '?'}"
        + (f" {fp['engine_version']}" if fp.get("engine_version") else "")
    )
    parts.append(f"tp rank {fp.get('tp_rank', 0)} of {fp.get('tp_size', 1)}")
    if fp.get("quantization"):
        parts.append(f"quantization {fp['quantization']}")
    if fp.get("model"):
        parts.append(f"model {fp['model']}")
    return ", ".join(parts)


# --- ls ----------------------------------------------------------------------------------------


def run_ls(ctx: Context) -> int:
    args = ctx.args
    with ctx.connect() as client:
        records = client.list()
    records = [
        r
        for r in records
        if (args.tier is None or r.tier == args.tier)
        and all(r.labels.get(k) == v for k, v in args.label)
    ]
    records.sort(key=lambda r: r.name)
    if ctx.json:
        render.emit_json({"snapshots": [schema.snapshot(r) for r in records]}, ctx.out)
        return exitcodes.OK
    if args.quiet:
        for r in records:
            ctx.print(r.name)
        return exitcodes.OK
    if not records:
        ctx.print("no snapshots registered (`thawctl register PATH` or `thawctl pin PATH`)")
        return exitcodes.OK
    now = time.time()
    wide = args.output == "wide"
    rows = []
    for r in records:
        row = [
            r.name,
            r.tier,
            render.size(r.size_bytes),
            render.percent(r.resident_bytes, r.size_bytes),
            r.clients,
            r.restores,
            render.ago(schema.known(r.last_used), now),
            _checksum_word(r),
        ]
        if wide:
            row += [
                ",".join(f"{k}={v}" for k, v in sorted(r.labels.items())) or "-",
                fingerprint_summary(schema.snapshot(r)["fingerprint"]),
                render.ago(r.registered or None, now),
            ]
        rows.append((*row, r.path))
    headers = ["NAME", "TIER", "SIZE", "RESIDENT", "CLIENTS", "RESTORES", "LAST RESTORE"]
    headers += ["CHECKSUMS", *(("LABELS", "FINGERPRINT", "REGISTERED") if wide else ()), "PATH"]
    ctx.print(render.table(headers, rows, right=(2, 3, 4, 5)))
    return exitcodes.OK


def fingerprint_summary(fp: dict[str, Any] | None) -> str:
    """`LlamaForCausalLM/float32/vllm-0.32.0/tp1of2/tiny`: what was frozen, in one cell (the
    parts that were recorded; the tensor-parallel part only for a shard)."""
    if not fp:
        return "-"
    engine = "-".join(p for p in (fp.get("engine"), fp.get("engine_version")) if p)
    shard = f"tp{fp.get('tp_rank', 0)}of{fp['tp_size']}" if fp.get("tp_size", 1) > 1 else ""
    parts = (
        fp.get("architecture"),
        fp.get("dtype"),
        fp.get("quantization"),
        engine,
        shard,
        fp.get("model"),
    )
    return "/".join(p for p in parts if p) or "-"


# --- info --------------------------------------------------------------------------------------


def run_info(ctx: Context) -> int:
    from thawctl import local

    ref = ctx.args.ref
    record = None
    doc: dict[str, Any] | None
    if is_object(ref):  # thawd reads objects, thawctl does not: the registered record
        with ctx.connect() as client:
            record = client.stat(resolve(client, ref))
        doc = None
    elif looks_like_path(ref):
        doc = local.file_info(ref)
    else:
        with ctx.connect() as client:
            record = client.stat(ref)
        doc = None if is_object(record.path) else _file_doc_if_readable(record.path)
    if ctx.json:
        render.emit_json(
            {
                "source": "daemon" if record is not None else "file",
                "snapshot": schema.snapshot(record) if record is not None else None,
                "file": doc,
            },
            ctx.out,
        )
        return exitcodes.OK
    if record is not None:
        _human_snapshot(ctx, record)
        if doc is None and is_object(record.path):
            return exitcodes.OK
        if doc is None:
            ctx.print(f"\n(the file {record.path} is not readable here: no tensor table)")
            return exitcodes.OK
        ctx.print()
    assert doc is not None
    _human_file(ctx, doc)
    return exitcodes.OK


def _file_doc_if_readable(path: str) -> dict[str, Any] | None:
    from thaw.errors import SnapshotError
    from thawctl import local

    try:
        return local.file_info(path)
    except SnapshotError as e:
        if isinstance(
            e.__cause__, OSError
        ):  # unreadable here, or pending: the daemon's view stands
            return None
        raise


def _human_file(ctx: Context, doc: dict[str, Any]) -> None:
    dtypes = ", ".join(f"{k} {render.size(v)}" for k, v in sorted(doc["bytes_by_dtype"].items()))
    _pairs(
        ctx,
        [
            ("file", doc["path"]),
            (
                "format",
                f"thaw snapshot v{doc['format_version']}, checksums {doc['checksum_algorithm']}",
            ),
            (
                "size",
                f"{render.size(doc['file_bytes'])} file, {render.size(doc['tensor_bytes'])} "
                f"in {doc['tensor_count']} tensors ({dtypes or 'none'})",
            ),
            ("fingerprint", _fingerprint_line(doc["fingerprint"])),
        ],
    )
    labels = doc["fingerprint"].get("labels") or {}
    if labels:
        ctx.print("labels       " + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())))
    if ctx.args.summary:
        return
    ctx.print()
    rows = [
        (
            t["name"],
            t["dtype"],
            "x".join(str(d) for d in t["shape"]) or "scalar",
            render.size(t["length"]),
            t["offset"],
            t["checksum"],
        )
        for t in doc["tensors"]
    ]
    ctx.print(
        render.table(("TENSOR", "DTYPE", "SHAPE", "SIZE", "OFFSET", "CHECKSUM"), rows, right=(3, 4))
    )


# --- register, pin, unpin, rm ------------------------------------------------------------------


def run_register(ctx: Context) -> int:
    with ctx.connect() as client:
        record = register_path(ctx, client, ctx.args.path, ctx.args.name, dict(ctx.args.label))
    if ctx.json:
        render.emit_json({"snapshot": schema.snapshot(record)}, ctx.out)
    else:
        ctx.print(
            f"registered {record.name}: {record.path} ({render.size(record.size_bytes)}, "
            f"{record.tensor_count} tensors, {record.tier})"
        )
    return exitcodes.OK


def run_pin(ctx: Context) -> int:
    args = ctx.args
    registered = False
    with ctx.connect() as client:
        ref = args.ref
        if looks_like_path(ref):
            require_file(ref)
            existing = find_by_path(client, ref)
            if existing is None:
                record = client.register(ref, args.name, dict(args.label))
                registered = True
                if not ctx.json:
                    ctx.print(f"registered {record.name}: {record.path}")
                name = record.name
            else:
                name = existing.name
                if args.name and args.name != name:
                    ctx.warn(
                        f"note: {ref} is registered as {name}: pinning {name} "
                        "(--name applies to a file not registered yet)"
                    )
        else:
            name = ref
        verb = "warming" if args.warm else "pinning"
        bar = Progress(f"{verb} {name}", ctx.out, enabled=not ctx.json)
        started = time.monotonic()
        last = None
        try:
            for p in client.pin_progress(name, warm=args.warm):
                last = p
                if not p.done:
                    bar.update(p.done_bytes, p.total_bytes, p.elapsed_s or None)
        except BaseException as e:
            bar.abandon()
            if registered:
                _undo_register(client, name, e)
            raise
    assert last is not None and last.done
    record = last.snapshot
    seconds = last.elapsed_s or (time.monotonic() - started)
    bar.finish(last.done_bytes, last.total_bytes, seconds)
    if ctx.json:
        doc = schema.pin_result(record, seconds, last.done_bytes)
        doc["registered"] = registered
        render.emit_json(doc, ctx.out)
    else:
        ctx.print(
            f"{record.name} is {record.tier}: {render.size(record.resident_bytes)} resident, "
            f"checksums {record.checksum_state}"
        )
    return exitcodes.OK


def _undo_register(client: Any, name: str, error: BaseException) -> None:
    """A `pin PATH` that registered the file and then failed leaves thawd as it found it:
    the registration goes again, and the error line says so (or says that it stayed)."""
    from thaw.errors import DaemonError, add_note

    try:
        client.unregister(name)
    except DaemonError as e:
        add_note(error, f"registered as {name} but not pinned (unregistering it failed: {e})")
    else:
        add_note(error, f"unregistered {name} again (this pin had registered it)")


def run_unpin(ctx: Context) -> int:
    with ctx.connect() as client:
        record = client.unpin(resolve(client, ctx.args.ref))
    if ctx.json:
        render.emit_json({"snapshot": schema.snapshot(record)}, ctx.out)
    else:
        ctx.print(f"unpinned {record.name}: now {record.tier}")
    return exitcodes.OK


def run_rm(ctx: Context) -> int:
    with ctx.connect() as client:
        name = resolve(client, ctx.args.ref)
        record = client.stat(name)
        client.unregister(name)
    if ctx.json:
        render.emit_json({"removed": name, "path": record.path}, ctx.out)
    else:
        ctx.print(f"removed {name} (the file {record.path} is kept)")
    return exitcodes.OK


# --- verify ------------------------------------------------------------------------------------


def run_verify(ctx: Context) -> int:
    ref = ctx.args.ref
    if not looks_like_path(ref):
        return _verify_in_daemon(ctx, ref)
    from thawctl import local

    bar = Progress(f"verifying {ref}", ctx.out, enabled=not ctx.json)
    try:
        result = local.verify_file(ref, on_progress=bar.update)
    except BaseException:
        bar.abandon()
        raise
    bar.finish(result.bytes, result.bytes, result.seconds)
    if ctx.json:
        render.emit_json(
            {**result.to_json(), "name": None, "daemon_checksum_state": None, "read_from": "file"},
            ctx.out,
        )
    elif result.ok:
        ctx.print(
            f"ok: {result.tensors} tensors verified, {render.size(result.bytes)} in "
            f"{result.seconds:.2f}s"
        )
    else:
        for m in result.mismatches:
            ctx.print(f"CORRUPT {m.tensor}: recorded {m.expected:016x}, computed {m.found:016x}")
    if not result.ok:
        from thawctl.context import report

        return report(result.error(), ctx.err)
    return exitcodes.OK


def _verify_in_daemon(ctx: Context, name: str) -> int:
    """thawd re-hashes the snapshot where its bytes are (its pool buffer when pinned, else the
    file) and records the outcome in its checksum_state; it stops at the first mismatch."""
    from thaw.errors import SnapshotCorrupt

    with ctx.connect() as client:
        if not ctx.json:
            ctx.print(f"verifying {name} in thawd…")
        try:
            result = client.verify(name)
            error: SnapshotCorrupt | None = None
        except SnapshotCorrupt as e:
            error = e
        record = client.stat(name)
    mismatches = []
    if error is not None and error.tensor:
        hexed = [f"{c:016x}" if c is not None else None for c in (error.expected, error.found)]
        mismatches.append({"tensor": error.tensor, "expected": hexed[0], "found": hexed[1]})
    if ctx.json:
        render.emit_json(
            {
                "source": "daemon",
                "name": name,
                "path": record.path,
                "ok": error is None,
                "tensor_count": record.tensor_count,
                "bytes": result.bytes if error is None else 0,
                "seconds": round(result.seconds, 6) if error is None else 0.0,
                "read_from": result.source if error is None else None,
                "mismatches": mismatches,
                "daemon_checksum_state": record.checksum_state,
            },
            ctx.out,
        )
    elif error is None:
        ctx.print(
            f"ok: {record.tensor_count} tensors verified by thawd, "
            f"{render.size(result.bytes)} from its {result.source} in "
            f"{result.seconds:.2f}s"
        )
    else:
        for m in mismatches:
            ctx.print(f"CORRUPT {m['tensor']}: recorded {m['expected']}, computed {m['found']}")
    if error is not None:
        from thawctl.context import report

        return report(error, ctx.err)
    return exitcodes.OK
