"""`thawctl serve`: time from a request for a model no slot holds to its first token, split
into queue, swap and prefill; the swap's GB/s beside a pinned restore's, same run.

    python benchmarks/serve.py [--runs 5]      # CPU build of vLLM, the tiny Llama

Measured (CPU, here): a real thawd, a real `thawctl serve` with one slot, two tiny models
(seed 0 and seed 1, frozen from a vLLM engine into thawd, pinned). Each run asks for the
model the slot does not hold, streaming, and reads the first SSE event: queue and swap
seconds come from the server's X-Thaw-Queue-Seconds / X-Thaw-Swap-Seconds headers, prefill
is the rest of the time to the first token (prefill, first decode step, HTTP). Beside it:
the same request for the loaded model (no swap), and the pinned restore of the same
snapshot into CPU tensors by a plain client (`restore_tensors`), the swap's copy ceiling.

Estimated (GPU, not run: no vLLM on the GPU machine): the swap of a Llama-3-8B-sized model
(16.06 GB bf16) on an H200, from the pinned-restore rate docs/BENCHMARKS.md measured there
(53.3 GB/s, new process) plus the fixed per-swap cost measured here (the swap's seconds
less its copy at the pinned rate: fingerprint RPCs, vLLM's layerwise reload, the prefix
cache reset); that cost is assumed not to grow with the model, which is optimistic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from daemon import start_daemon

ROOT = Path(__file__).resolve().parents[1]
ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048,
               "kv_cache_memory_bytes": 64 << 20, "seed": 0}  # fmt: skip
# docs/BENCHMARKS.md, H200 (2026-12-01): restore, pinned tier, new process, 2nd run.
H200_PINNED_RESTORE_GBPS = 53.3
LLAMA8B_BYTES = 16.06e9
PROMPT = "The river town woke"


def freeze_models(base: Path, sock: str) -> None:
    """tiny0 and tiny1 into thawd, pinned: one engine, vLLM's own reload between them."""
    from vllm import LLM

    import thaw
    import thaw.vllm
    from thaw.demo import tiny

    dirs = {s: tiny.write_model_dir(base / f"seed{s}" / "tiny", seed=s) for s in (0, 1)}
    llm = LLM(model=str(dirs[0]), worker_extension_cls=thaw.vllm.WORKER_EXTENSION,
              **ENGINE_ARGS)  # fmt: skip
    with thaw.connect(sock) as client:
        client.freeze(llm, "tiny0")
        llm.collective_rpc("reload_weights", kwargs={"weights_path": str(dirs[1])})
        client.freeze(llm, "tiny1")
    core = llm.llm_engine.engine_core
    core.shutdown()
    del llm


def start_server(base: Path, sock: str, port: int) -> subprocess.Popen[bytes]:
    import httpx

    args = [sys.executable, "-m", "thawctl", "--socket", sock, "serve", "--model",
            str(base / "seed0" / "tiny"), "--snapshot", "tiny0", "--register", "tiny1=tiny1",
            "--port", str(port), "--admin-socket", str(base / "admin" / "serve.sock")]  # fmt: skip
    for k, v in ENGINE_ARGS.items():
        args += ["--engine-arg", f"{k}={json.dumps(v)}"]
    log = open(base / "serve.log", "wb")  # noqa: SIM115 - the server's life
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"thawctl serve exited:\n{(base / 'serve.log').read_text()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit("thawctl serve did not come up in 300 s")


def first_token(url: str, model: str) -> dict[str, float]:
    import httpx

    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        ttft = 0.0
        # Read to the end: the request must finish, the next run swaps this slot.
        for line in r.iter_lines():
            if line.startswith("data: {") and not ttft:
                ttft = time.perf_counter() - t0
        queue_s = float(r.headers["x-thaw-queue-seconds"])
        swap_s = float(r.headers["x-thaw-swap-seconds"])
    return {"ttft": ttft, "queue": queue_s, "swap": swap_s, "prefill": ttft - queue_s - swap_s}


def pinned_restore_gbps(sock: str, name: str, runs: int) -> float:
    """A plain client's restore of the same pinned snapshot into CPU tensors."""
    import torch

    import thaw
    from thaw.format import open_snapshot

    with thaw.connect(sock) as client:
        snap = open_snapshot(client.stat(name).path)
        tensors = {e.name: torch.empty(tuple(e.shape), dtype=getattr(torch, e.dtype))
                   for e in snap.tensors}  # fmt: skip
        rates = []
        for _ in range(runs):
            t0 = time.perf_counter()
            result = client.restore(tensors, name)
            rates.append(result.bytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    import httpx

    base = Path(tempfile.mkdtemp(prefix="thaw-bench-serve-"))
    daemon = start_daemon(base, 256 << 20)
    sock = str(base / "thawd.sock")
    server = None
    try:
        import thaw

        freeze_models(base, sock)
        with thaw.connect(sock) as client:
            for name in ("tiny0", "tiny1"):
                client.pin(name)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = start_server(base, sock, port)
        url = f"http://127.0.0.1:{port}"
        first_token(url, "tiny0")  # warm-up: the first request pays one-time costs
        swapped, loaded = [], []
        for i in range(args.runs):
            swapped.append(first_token(url, "tiny1" if i % 2 == 0 else "tiny0"))
            loaded.append(first_token(url, "tiny1" if i % 2 == 0 else "tiny0"))
        admin = httpx.Client(transport=httpx.HTTPTransport(uds=str(base / "admin/serve.sock")),
                             base_url="http://serve")  # fmt: skip
        swaps = [s for s in admin.get("/pool").json()["last_swaps"] if s["ok"]][-args.runs :]
        swap_bytes = swaps[-1]["bytes"]
        swap_gbps = statistics.median(s["bytes"] / s["seconds"] / 1e9 for s in swaps)
        swap_s = statistics.median(s["seconds"] for s in swaps)
        pinned = pinned_restore_gbps(sock, "tiny1", args.runs)
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(base, ignore_errors=True)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows) * 1e3

    print(f"\nMEASURED (CPU, vLLM CPU build, tiny Llama {swap_bytes / 1e6:.2f} MB float32, "
          f"{args.runs} runs, medians, ms)")  # fmt: skip
    print("| request | first token | queue | swap | prefill + 1st step + HTTP |")
    print("|---|---|---|---|---|")
    for what, rows in (("model not loaded (swap)", swapped), ("model loaded", loaded)):
        print(f"| {what} | {med(rows, 'ttft'):.1f} | {med(rows, 'queue'):.1f} | "
              f"{med(rows, 'swap'):.1f} | {med(rows, 'prefill'):.1f} |")  # fmt: skip
    copy_s = swap_bytes / (pinned * 1e9)
    fixed_s = max(0.0, swap_s - copy_s)
    print(f"\nMEASURED swap (thaw.vllm.restore in the slot, whole call): {swap_s * 1e3:.1f} ms, "
          f"{swap_gbps:.3f} GB/s; pinned restore of the same snapshot into CPU tensors: "
          f"{pinned:.2f} GB/s; fixed per-swap cost (swap less its copy): "
          f"{fixed_s * 1e3:.1f} ms")  # fmt: skip
    gpu_s = LLAMA8B_BYTES / (H200_PINNED_RESTORE_GBPS * 1e9) + fixed_s
    print(f"ESTIMATED (H200, not run): swap of a 16.06 GB bf16 8B model = 16.06 GB / "
          f"{H200_PINNED_RESTORE_GBPS} GB/s + {fixed_s * 1e3:.0f} ms = {gpu_s:.2f} s "
          f"({LLAMA8B_BYTES / gpu_s / 1e9:.1f} GB/s); queue as measured; GPU prefill not "
          "estimated")  # fmt: skip


if __name__ == "__main__":
    main()
