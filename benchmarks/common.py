"""Shared pieces of the benchmark scripts: model-shaped tensors, timers, the result table."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

import thaw
from thaw import _native

# Llama-3-8B: 32 layers, hidden 4096, MLP 14336, 32 query / 8 KV heads of 128, vocab 128256.
LLAMA3_8B = dict(layers=32, hidden=4096, mlp=14336, heads=32, kv_heads=8, vocab=128256)
# Llama-3-70B: 80 layers, hidden 8192, MLP 28672, 64 query / 8 KV heads of 128, vocab 128256.
LLAMA3_70B = dict(layers=80, hidden=8192, mlp=28672, heads=64, kv_heads=8, vocab=128256)


def _layer(c: dict[str, int], tp: int) -> dict[str, tuple[int, ...]]:
    """One decoder layer's weights on one of `tp` ranks, split as vLLM shards them: the
    column-parallel projections by output rows, o_proj and down_proj by input columns."""
    head = c["hidden"] // c["heads"]
    return {
        "self_attn.q_proj.weight": (c["hidden"] // tp, c["hidden"]),
        "self_attn.k_proj.weight": (c["kv_heads"] * head // tp, c["hidden"]),
        "self_attn.v_proj.weight": (c["kv_heads"] * head // tp, c["hidden"]),
        "self_attn.o_proj.weight": (c["hidden"], c["hidden"] // tp),
        "mlp.gate_proj.weight": (c["mlp"] // tp, c["hidden"]),
        "mlp.up_proj.weight": (c["mlp"] // tp, c["hidden"]),
        "mlp.down_proj.weight": (c["hidden"], c["mlp"] // tp),
        "input_layernorm.weight": (c["hidden"],),
        "post_attention_layernorm.weight": (c["hidden"],),
    }


def llama_shaped(size_gb: float, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Random tensors shaped like Llama-3-8B's, with as many layers as fit `size_gb`.

    The same arguments give the same shapes on every device ("meta" for shapes only)."""
    c = LLAMA3_8B
    layer = _layer(c, 1)
    item = torch.empty((), dtype=dtype).element_size()
    per_layer = sum(_numel(s) for s in layer.values()) * item
    embed = c["vocab"] * c["hidden"] * item
    budget = size_gb * 1e9
    if budget >= 2 * embed + per_layer:
        layers, vocab = round((budget - 2 * embed) / per_layer), c["vocab"]
    else:  # small runs (CPU smoke tests): shrink the vocabulary, keep one layer at least
        layers = max(1, int(budget // (2 * per_layer)))
        vocab = max(1024, int((budget - layers * per_layer) / (2 * c["hidden"] * item)))
    return _tensors(layer, layers, vocab, c["hidden"], dtype, device, seed=0)


def llama_shard(
    c: dict[str, int], rank: int, tp: int, dtype: torch.dtype, device: str
) -> dict[str, torch.Tensor]:
    """Rank `rank`'s shard of a whole Llama-shaped model (`c`) under tensor parallelism `tp`:
    every rank's shapes are the same, its values its own (seeded by the rank)."""
    return _tensors(_layer(c, tp), c["layers"], c["vocab"] // tp, c["hidden"], dtype, device, rank)


def _tensors(
    layer: dict[str, tuple[int, ...]],
    layers: int,
    vocab: int,
    hidden: int,
    dtype: torch.dtype,
    device: str,
    seed: int,
) -> dict[str, torch.Tensor]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    if device == "meta":
        return {
            name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in shapes.items()
        }
    g = torch.Generator(device=device).manual_seed(seed)
    return {
        name: torch.randn(shape, generator=g, device=device, dtype=dtype)
        for name, shape in shapes.items()
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def timed(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def drop_cache(path: str) -> None:
    """Evict a file from the page cache (clean pages only: fsync first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        _native.fadvise(fd, 0, 0, _native.FADV_DONTNEED)
    finally:
        os.close(fd)


def page_cache_read_rate(path: str | Path) -> float:
    """GB/s of reading a file that is in the page cache into anonymous memory with pread on 16
    threads (best of two): what a pin or a verified restore from the cache can approach (both
    must copy the bytes out of the cache before hashing them)."""
    size = os.path.getsize(path)
    dst = torch.empty(size, dtype=torch.uint8)
    _native.prefault(int(dst.data_ptr()), size, 16)
    fd = os.open(path, os.O_RDONLY)
    try:
        seconds = min(timed(lambda: _native.pread_into(fd, int(dst.data_ptr()), size, 0, 16))
                      for _ in range(2))  # fmt: skip
    finally:
        os.close(fd)
    return size / seconds / 1e9


def warm_cache(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


@dataclasses.dataclass
class Row:
    what: str
    gbps: float
    baseline: str = ""
    baseline_gbps: float = 0.0
    target: str = ""
    ok: bool | None = None


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    print(f"| {'measurement':<44} | {'GB/s':>7} | {'baseline':<34} | {'GB/s':>7} | target |")
    print(f"|{'-' * 46}|{'-' * 9}|{'-' * 36}|{'-' * 9}|--------|")
    for r in rows:
        base = f"{r.baseline_gbps:7.2f}" if r.baseline else " " * 7
        verdict = "" if r.ok is None else ("met" if r.ok else "MISSED")
        target = f"{r.target} {verdict}".strip()
        print(f"| {r.what:<44} | {r.gbps:7.2f} | {r.baseline:<34} | {base} | {target} |")


def pinned_h2d_ceiling(size: int) -> float:
    """One pinned buffer copied to the GPU in 64 MB chunks on two streams (DESIGN.md)."""
    from thaw.mem import cuda

    buf = cuda.PinnedBuffer(size)
    _native.prefault(buf.addr, size, 8)
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    streams = [cuda.Stream(), cuda.Stream()]
    chunk = 64 << 20

    def run() -> None:
        for n, off in enumerate(range(0, size, chunk)):
            cuda.copy_h2d(
                int(dst.data_ptr()) + off, buf.addr + off, min(chunk, size - off), streams[n % 2]
            )
        for s in streams:
            s.synchronize()

    run()
    best = min(timed(run) for _ in range(3))
    buf.close()
    return size / best / 1e9


def start_thawd(
    directory: Path, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """thawd on `directory`/thawd.toml (its log: thawd.log there), returned once it answers;
    the benchmark exits with the log when thawd stops, or answers nothing in `timeout` s."""
    sock = str(directory / "thawd.sock")
    with open(directory / "thawd.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "thawd", "--config", str(directory / "thawd.toml")],
            stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"thawd exited:\n{(directory / 'thawd.log').read_text()}")
        try:
            thaw.connect(sock).status()
            return proc
        except thaw.DaemonUnavailable:
            time.sleep(0.2)
    sys.exit(f"thawd did not come up in {timeout:.0f} s")
