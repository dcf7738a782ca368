"""Pinning a snapshot from object storage vs a plain parallel download of the same object.

    python benchmarks/s3.py                   # 512 MB from moto's server on loopback
    python benchmarks/s3.py --size-gb 4 --endpoint http://minio:9000 --bucket models

Starts (unless --endpoint) an S3-protocol server on loopback (moto's server mode, as the
tests do), uploads a Llama-shaped snapshot, then in the same run measures, best of --repeat:

- thawd's pin of s3://BUCKET/bench.thaw: parallel ranged GETs straight into the pool buffer,
  every tensor verified against the manifest (no cache directory: every pin reads the store);
- boto3's download_fileobj of the same object into memory with the same concurrency and
  part size: the plain parallel download, which verifies nothing;
- a second thawd with a cache directory: its pins after the first read the node's copy
  (what a restarted node does), verified as any file.

A loopback server measures the client side's overhead, not a network: moto is a Python
process, so both figures are bounded by it.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Row, llama_shaped, print_table, start_thawd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import thaw  # noqa: E402
from tests.s3.store import CREDENTIALS, MotoServer  # noqa: E402
from thaw import freeze_file  # noqa: E402


def thawd_for_store(directory: Path, endpoint: str, bucket: str, args: argparse.Namespace,
                budget: int, cache: bool) -> subprocess.Popen[bytes]:  # fmt: skip
    directory.mkdir(exist_ok=True)
    sock = directory / "thawd.sock"
    cached = f'cache_dir = "{directory / "cache"}"\ncache_bytes = {2 * budget}\n' if cache else ""
    (directory / "thawd.toml").write_text(
        f'socket = "{sock}"\nstate_dir = "{directory / "state"}"\npool = "memfd"\n'
        f"pinned_budget = {budget}\nwarm_budget = 0\nio_threads = 8\n"
        f'[s3]\nallow = ["s3://{bucket}/"]\nendpoint_url = "{endpoint}"\n'
        f'connections = {args.connections}\npart_size = "{args.part_mib}MiB"\n{cached}'
    )
    return start_thawd(directory, 60, {**os.environ, **CREDENTIALS, "PYTHONPATH": str(ROOT)})


def pins(directory: Path, uri: str, repeat: int, first: bool) -> tuple[int, list[float]]:
    """The payload's bytes and the seconds of `repeat` pins (unpinned after each); `first`:
    one pin more, not timed (a cache's filling)."""
    times = []
    with thaw.connect(str(directory / "thawd.sock")) as client:
        record = client.register(uri)
        for i in range(repeat + first):
            t0 = time.perf_counter()
            pinned = client.pin(record.name)
            if i >= first:
                times.append(time.perf_counter() - t0)
            assert pinned.checksum_state == "verified"
            client.unpin(record.name)
    return record.size_bytes, times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-gb", type=float, default=0.5)
    p.add_argument("--endpoint", default="", help="an S3-compatible store (default: moto)")
    p.add_argument("--bucket", default="thaw-bench")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--part-mib", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    os.environ.update({k: os.environ.get(k, v) for k, v in CREDENTIALS.items()})

    import boto3
    from boto3.s3.transfer import TransferConfig

    server = None if args.endpoint else MotoServer()
    endpoint = args.endpoint or (server.url if server else "")
    directory = Path(tempfile.mkdtemp(prefix="thaw-s3-bench-"))
    daemons: list[subprocess.Popen[bytes]] = []
    try:
        s3 = boto3.session.Session().client("s3", endpoint_url=endpoint)
        if server is not None:
            s3.create_bucket(Bucket=args.bucket)
        path = directory / "bench.thaw"
        tensors = llama_shaped(args.size_gb, torch.bfloat16, "cpu")
        freeze_file(tensors, path)
        size = path.stat().st_size
        transfer = TransferConfig(multipart_threshold=args.part_mib << 20,
                                  multipart_chunksize=args.part_mib << 20,
                                  max_concurrency=args.connections)  # fmt: skip
        s3.upload_file(str(path), args.bucket, "bench.thaw", Config=transfer)
        path.unlink()
        print(f"object: s3://{args.bucket}/bench.thaw, {size / 1e9:.2f} GB, {endpoint}")

        downloads = []
        for _ in range(args.repeat):
            sink = io.BytesIO()
            t0 = time.perf_counter()
            s3.download_fileobj(args.bucket, "bench.thaw", sink, Config=transfer)
            downloads.append(time.perf_counter() - t0)
            assert sink.getbuffer().nbytes == size
            del sink

        uri = f"s3://{args.bucket}/bench.thaw"
        runs = {}
        for label, cache in (("store", False), ("cache", True)):
            where = directory / label
            budget = size + (1 << 30)
            daemons.append(thawd_for_store(where, endpoint, args.bucket, args, budget, cache))
            payload, runs[label] = pins(where, uri, args.repeat, first=cache)
        download = Row("", 0.0, "boto3 download_fileobj, same parts", size / min(downloads) / 1e9)
        names = {
            "store": f"thawd pin from S3, verified ({args.connections}x{args.part_mib} MiB)",
            "cache": "thawd pin from its cache_dir, verified",
        }
        rows = [
            dataclasses.replace(download, what=names[k], gbps=payload / min(runs[k]) / 1e9)
            for k in names
        ]
        print_table(f"S3 -> memory, best of {args.repeat} (payload vs object bytes)", rows)
        for label, seconds in (*runs.items(), ("download", downloads)):
            print(f"  {label} seconds: {', '.join(f'{s:.2f}' for s in seconds)}")
    finally:
        for daemon in daemons:
            daemon.terminate()
            daemon.wait(30)
        if server is not None:
            server.kill()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
