"""Cold start of a vLLM engine: the default loader vs load_format="thaw" from a pinned snapshot.

    python benchmarks/cold_start.py                      # the tiny model, on CPU here
    python benchmarks/cold_start.py --model /models/llama8b --dtype bfloat16   # a GPU host

Starts a thawd of its own (memfd pool on CPU; pass --pool vmm on GPU), freezes the model's
vLLM snapshot once (load_format="thaw" with freeze_on_miss), pins it, then starts each engine in
a fresh process and prints: engine init (LLM() minus the weight load), weight load (what the
loader took in the worker), first token (one greedy token of a short prompt) and total.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_ENGINE = r"""
import json, re, sys, time, io, os

def main():
    cfg = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(model=cfg["model"], dtype=cfg["dtype"], enforce_eager=True, max_model_len=2048,
              kv_cache_memory_bytes=cfg["kv"], **cfg["extra"])
    ready = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=1)
    t1 = time.perf_counter()
    llm.generate(["The river town woke"], sp, use_tqdm=False)
    first = time.perf_counter() - t1
    print("RESULT " + json.dumps({"ready_s": ready, "first_token_s": first}), flush=True)

if __name__ == "__main__":
    main()
"""


def _run(cfg: dict, log: Path) -> dict:
    script = log.with_suffix(".py")
    script.write_text(_ENGINE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_LOGGING_LEVEL": "INFO"}
    with open(log, "w") as out:
        argv = [sys.executable, str(script), json.dumps(cfg)]
        proc = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=out, text=True, env=env, timeout=900
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"engine failed ({proc.returncode}); see {log}")
    res = json.loads(lines[-1][7:])
    res["load_s"] = _load_seconds(proc.stdout + log.read_text())  # vLLM logs to stdout
    return res


def _load_seconds(text: str) -> float:
    """Weight load as the worker logged it: vLLM's default loader logs "Loading weights took
    X seconds" (2 decimals); thaw's loader "...; loading weights took X seconds"."""
    import re

    found = re.findall(r"[Ll]oading weights took ([0-9.]+) seconds", text)
    return float(found[-1]) if found else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="", help="HF model directory (default: the tiny Llama)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--pool", default="memfd", choices=["memfd", "vmm"])
    p.add_argument("--budget", default="64GiB", help="thawd pinned budget")
    p.add_argument("--kv-bytes", type=int, default=64 << 20)
    p.add_argument("--runs", type=int, default=1)
    args = p.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from daemon.conftest import ThawdProcess, make_dir  # the tests' real-thawd runner

    import thaw

    work = Path(tempfile.mkdtemp(prefix="thaw-cold-"))
    daemon_dir = make_dir()
    daemon = ThawdProcess(
        daemon_dir, pool=args.pool, pinned_budget=args.budget, warm_budget=args.budget
    ).start()
    try:
        model = args.model
        if not model:
            from thaw.demo import tiny

            model = str(tiny.write_model_dir(work / "tiny"))
        snap = work / "model.thaw"
        base = {"model": model, "dtype": args.dtype, "kv": args.kv_bytes}
        # Create the snapshot: one engine start that loads normally and freezes (not timed).
        _run(
            {
                **base,
                "extra": {
                    "load_format": "thaw",
                    "model_loader_extra_config": {
                        "snapshot": str(snap),
                        "freeze_on_miss": True,
                        "daemon": "never",
                    },
                },
            },
            work / "freeze.log",
        )
        client = thaw.connect(daemon.socket)
        client.register(snap, "cold-start")
        pinned = client.pin("cold-start")
        thaw_extra = {
            "load_format": "thaw",
            "model_loader_extra_config": {
                "snapshot": "cold-start",
                "socket": daemon.socket,
                "daemon": "require",
            },
        }
        rows = []
        for run in range(args.runs):
            for label, extra in (("default loader", {}), ("thaw (pinned)", thaw_extra)):
                res = _run({**base, "extra": extra}, work / f"{run}-{label[:4]}.log")
                rows.append((label, res))
        print(
            f"\nmodel {model} ({args.dtype}), snapshot {pinned.size_bytes / 1e6:.1f} MB "
            f"{pinned.tier}, thawd pool {args.pool}"
        )
        print(f"{'':16} {'engine init':>12} {'weight load':>12} {'first token':>12} {'total':>10}")
        for label, r in rows:
            init = r["ready_s"] - (r["load_s"] if r["load_s"] == r["load_s"] else 0.0)
            total = r["ready_s"] + r["first_token_s"]
            print(
                f"{label:16} {init:11.2f}s {r['load_s']:11.4f}s {r['first_token_s']:11.3f}s "
                f"{total:9.2f}s"
            )
    finally:
        daemon.close()
        shutil.rmtree(daemon_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
