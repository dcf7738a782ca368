"""KV-cache restore from thawd's pinned tier, beside the ceiling measured in the same run.

    python benchmarks/kv_restore.py --device cuda     # GPU machine: no vLLM needed
    python benchmarks/kv_restore.py                   # CPU: throughput + TTFT with vLLM CPU

Part 1 (any device): KV snapshots shaped like an 8B model's (Llama-3-8B: 32 layers, 8 KV
heads of 128, bf16, vLLM GPU block size 16: 128 KiB per token, a 4k-token prefix = 0.54 GB)
are frozen into a fresh thawd, pinned, and restored with `thaw.connect().restore` into
device tensors in the snapshot's block-major shape; then, as the connector does, their token
ids checked and their blocks copied into a KV cache laid out like vLLM's GPU cache (per layer
[2, num_blocks, 16, 8, 128]) at random block ids (`thaw.kv.store.copy_blocks`). One
prefix, then a batch of prefixes in one `restore_many`. The ceiling: one pinned buffer of the same
size copied H2D (CUDA) or memcpy'd (CPU), in the same process.

Part 2, CPU (needs vLLM): time to first token of a 4100-token prompt with the tiny model:
full prefill vs a prefix restored through ThawKVConnector from thawd vs vLLM's own local
prefix-cache hit.

Part 2, CUDA (no vLLM there): time to first token of a 4097-token prompt with a
Llama-3-8B-shaped model in plain torch (llama_forward.py, random bf16 weights): full prefill
vs the 4096-token prefix's KV restored from thawd's pinned tier, copied into the model's
cache, plus the one token computed on it (a CUDA graph, as engines run it); the logits must
equal those computed on the model's own cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Row, pinned_h2d_ceiling, print_table, timed
from daemon import memcpy_rate, start_daemon

import thaw
from thaw.kv.store import LAYERS, TOKEN_IDS, KVSpec, copy_blocks

# Llama-3-8B KV on vLLM GPU (flash attention, NHD), block size 16.
NUM_LAYERS, KV_HEADS, HEAD, BLOCK = 32, 8, 128, 16


def kv_spec(dtype: str) -> KVSpec:
    return KVSpec(
        weights="bench-llama3-8b",
        dtype=dtype,
        layout="gpu-2NBHD",
        block_size=BLOCK,
        block_shape=(2, BLOCK, KV_HEADS, HEAD),
        num_layers=NUM_LAYERS,
    )


def prefix_tensors(spec: KVSpec, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    n = tokens // BLOCK
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, spec.dtype)
    return {
        LAYERS: torch.randn(NUM_LAYERS, n, *spec.block_shape, generator=g).to(dtype),
        TOKEN_IDS: torch.randint(0, 128000, (n, BLOCK), generator=g, dtype=torch.int64),
    }


def throughput(args: argparse.Namespace) -> None:
    spec = kv_spec(args.dtype)
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    one = prefix_tensors(spec, args.prefix_tokens, 0)
    size = sum(t.numel() * t.element_size() for t in one.values())
    with tempfile.TemporaryDirectory(prefix="thaw-kvbench-") as tmp:
        directory = Path(tmp)
        # A VMM pool buffer is whole 256 MiB chunks (thawd's default vmm_chunk).
        chunk = 256 << 20
        daemon = start_daemon(directory, -(-size // chunk) * chunk * (1 + args.batch) + (1 << 30))
        try:
            if device == "cuda":  # an engine connects with CUDA up (thaw warms its path then)
                torch.cuda.init()
            client = thaw.connect(str(directory / "thawd.sock"))
            status = client.status()
            print(
                f"thawd {status.version}, pool {status.pool_kind}, device {device}, "
                f"prefix {args.prefix_tokens} tokens = {size / 1e9:.3f} GB",
                flush=True,
            )
            names = []
            for i in range(1 + args.batch):
                tensors = one if i == 0 else prefix_tensors(spec, args.prefix_tokens, i)
                name = f"kv-bench-{i}"
                labels = {**spec.labels(), "kv.blocks": str(args.prefix_tokens // BLOCK)}
                client.freeze(
                    tensors,
                    name,
                    str(directory / f"{name}.thaw"),
                    thaw.Fingerprint(model=spec.weights, dtype=spec.dtype, labels=labels),
                    labels=labels,
                    pin=True,
                )
                names.append(name)
                del tensors
            n = args.prefix_tokens // BLOCK
            dtype = getattr(torch, spec.dtype)
            targets = [
                {
                    LAYERS: torch.empty(
                        NUM_LAYERS, n, *spec.block_shape, dtype=dtype, device=device
                    ),
                    TOKEN_IDS: torch.empty(n, BLOCK, dtype=torch.int64, device=device),
                }
                for _ in range(1 + args.batch)
            ]
            # The engine's KV cache: room for every prefix, prefixes land on random blocks.
            num_blocks = n * (1 + args.batch) + 64
            cache = [
                torch.empty(2, num_blocks, BLOCK, KV_HEADS, HEAD, dtype=dtype, device=device)
                for _ in range(NUM_LAYERS)
            ]
            perm = torch.randperm(num_blocks).tolist()
            views = [layer.transpose(0, 1) for layer in cache]  # block index first

            first = timed(lambda: client.restore(targets[0], names[0]), sync)
            # A 12 ms restore varies by a millisecond from run to run: ten of them, best and median.
            runs = sorted(
                timed(lambda: client.restore(targets[0], names[0]), sync)
                for _ in range(max(args.repeat, 10))
            )
            warm, median = runs[0], runs[len(runs) // 2]
            ok = all(torch.equal(targets[0][k].cpu(), one[k]) for k in one)

            for name, t in zip(names[1:], targets[1:], strict=True):  # map each buffer once
                client.restore(t, name)
            # What the connector does with a loaded prefix: check its token ids against the
            # index's (here: the stored ones) and copy its blocks into the cache (copy_blocks).
            tokens = [t[TOKEN_IDS].flatten().tolist() for t in targets]

            def scatter(k: int) -> None:
                dst = perm[n * k : n * (k + 1)]
                copy_blocks(targets[k], names[k], range(n), dst, tokens[k], views)

            scatter_s = min(timed(lambda: scatter(0), sync) for _ in range(3))

            # The batch: all prefixes in one restore_many (their control calls overlapped).
            batch_items = list(zip(targets[1:], names[1:], strict=True))

            def batch() -> None:
                client.restore_many(batch_items)
                for k in range(1, len(targets)):
                    scatter(k)

            def batch_restore_only() -> None:
                client.restore_many(batch_items)

            batch_s = min(timed(batch, sync) for _ in range(args.repeat))
            batch_restore_s = min(timed(batch_restore_only, sync) for _ in range(args.repeat))
            if device == "cuda":
                ceiling = pinned_h2d_ceiling(size)
                ceiling_name = "pinned H2D ceiling (64 MB chunks, 2 streams), same size"
            else:
                ceiling = memcpy_rate(size, 8)
                ceiling_name = "memcpy ceiling (8 threads), same size"
            bsize = size * args.batch
            base = f"{ceiling_name.split(' (')[0]}, {size / 1e9:.2f} GB"
            target = ">= 45 GB/s" if device == "cuda" else ""

            def row(what: str, nbytes: int, seconds: float, check: bool = False) -> Row:
                gbps = nbytes / seconds / 1e9
                ok = (gbps >= 45.0) if check and device == "cuda" else None
                return Row(
                    f"{what} ({seconds * 1e3:.1f} ms)",
                    gbps,
                    base,
                    ceiling,
                    target if check else "",
                    ok,
                )

            rows = [
                row("1 prefix: first restore in this process", size, first),
                row("1 prefix: restore, pinned tier", size, warm, check=True),
                row(f"1 prefix: restore, median of {len(runs)}", size, median),
                row("1 prefix: restore + scatter", size, warm + scatter_s),
                row(f"{args.batch} prefixes, restore_many", bsize, batch_restore_s, check=True),
                row(f"{args.batch} prefixes, restore_many + scatter", bsize, batch_s),
            ]
            print(f"ceiling: {ceiling_name}: {ceiling:.2f} GB/s")
            print_table(f"KV restore, {args.dtype}, {device}, pool {status.pool_kind}", rows)
            print(f"restored bytes equal the frozen ones: {ok}")
            client.close()
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)


def ttft(args: argparse.Namespace) -> None:
    """CPU: first-token time of a long prompt, restored prefix vs full prefill (tiny model)."""
    from vllm import LLM, SamplingParams

    import thaw.demo.tiny
    import thaw.kv

    with tempfile.TemporaryDirectory(prefix="thaw-kvttft-") as tmp:
        directory = Path(tmp)
        daemon = start_daemon(directory, 1 << 30)
        try:
            model = thaw.demo.tiny.write_model_dir(directory / "tiny")
            tokenizer = thaw.demo.tiny.build_tokenizer()
            prompt = thaw.demo.tiny.make_prompt(tokenizer, args.ttft_tokens, seed=7)
            # The tiny model's config says 2048 positions; its random weights serve any (RoPE).
            positions = args.ttft_tokens + 128
            llm = LLM(
                model=str(model),
                dtype="float32",
                enforce_eager=True,
                max_model_len=positions,
                hf_overrides={"max_position_embeddings": positions},
                kv_cache_memory_bytes=64 << 20,
                kv_transfer_config=thaw.kv.kv_transfer_config(
                    socket=str(directory / "thawd.sock"), save=False, staging_bytes=0
                ),
            )
            params = SamplingParams(max_tokens=1, temperature=0.0)

            def first_token() -> tuple[float, int]:
                t0 = time.perf_counter()
                out = llm.generate([prompt], params, use_tqdm=False)[0]
                return time.perf_counter() - t0, int(out.num_cached_tokens or 0)

            llm.generate(["warm up"], params, use_tqdm=False)
            prefill = []
            for _ in range(args.repeat):
                llm.reset_prefix_cache()
                prefill.append(first_token())
            prefix = thaw.kv.capture(llm, "ttft", [prompt])[0]
            restored = []
            for _ in range(args.repeat):
                llm.reset_prefix_cache()  # the connector loads from thawd every time
                restored.append(first_token())
            local = [first_token() for _ in range(args.repeat)]
            print(
                f"\nTTFT, tiny model (2 layers), {args.ttft_tokens}-token prompt, "
                f"{prefix.cached_tokens} tokens in full blocks; best of {args.repeat}"
            )
            for label, runs in (
                ("full prefill", prefill),
                ("restored from thawd", restored),
                ("vLLM local prefix-cache hit", local),
            ):
                best = min(runs)
                print(f"  {label:30s} {best[0] * 1e3:8.1f} ms   num_cached_tokens={best[1]}")
            print(f"  speed-up restored vs prefill: {min(prefill)[0] / min(restored)[0]:.2f}x")
            with __import__("contextlib").suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)


def ttft_forward(args: argparse.Namespace, shape: Any = None) -> None:
    """CUDA: first-token time of a prompt whose prefix is in thawd, with a Llama-3-8B-shaped
    torch model (llama_forward.py): a full prefill vs the prefix's KV restored from the pinned
    tier plus the one token computed on it. The restored cache must give the very logits the
    model's own cache gives."""
    from llama_forward import Llama, Shape

    shape = shape or Shape()
    device, tokens = args.device, args.prefix_tokens
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dtype = getattr(torch, args.dtype)
    spec = dataclasses.replace(
        kv_spec(args.dtype),
        weights=f"bench-llama-{shape.layers}x{shape.hidden}",
        block_shape=(2, BLOCK, shape.kv_heads, shape.head),
        num_layers=shape.layers,
    )
    n = tokens // BLOCK
    model = Llama(shape, dtype, device)
    ids = torch.randint(0, shape.vocab, (n * BLOCK + 1,), device=device)
    prefix, last = ids[:-1], ids[-1:]

    def prefill() -> None:
        model.forward(ids)[0].argmax()

    prefill()  # warm-up: kernels chosen, workspaces allocated
    prefill_s = min(timed(prefill, sync) for _ in range(args.repeat))
    with torch.no_grad():
        _, own = model.forward(prefix)  # the engine's own cache of the prefix
    # Block-major, as a KV snapshot stores vLLM's GPU cache: per layer
    # [blocks, K/V, 16, heads, head].
    layers = [
        torch.stack([k.transpose(0, 1), v.transpose(0, 1)], dim=1)
        .reshape(n, BLOCK, 2, shape.kv_heads, shape.head)
        .transpose(1, 2)
        for k, v in own
    ]
    kv = {LAYERS: torch.stack(layers), TOKEN_IDS: prefix.view(n, BLOCK).to(torch.int64)}
    del layers
    size = sum(t.numel() * t.element_size() for t in kv.values())
    with tempfile.TemporaryDirectory(prefix="thaw-kvttft-") as tmp:
        directory = Path(tmp)
        chunk = 256 << 20
        daemon = start_daemon(directory, -(-size // chunk) * chunk + (1 << 30))
        try:
            client = thaw.connect(str(directory / "thawd.sock"))
            labels = {**spec.labels(), "kv.blocks": str(n)}
            fingerprint = thaw.Fingerprint(model=spec.weights, dtype=spec.dtype, labels=labels)
            client.freeze(
                kv, "prefix", str(directory / "prefix.thaw"), fingerprint, labels=labels, pin=True
            )
            staging = {k: torch.empty_like(v) for k, v in kv.items()}
            # The engine's cache: per layer K and V as [positions, heads, head], which the
            # model reads as [heads, positions, head].
            store = [
                torch.empty(2, n * BLOCK, shape.kv_heads, shape.head, dtype=dtype, device=device)
                for _ in range(shape.layers)
            ]
            cache = [(kv_pair[0].transpose(0, 1), kv_pair[1].transpose(0, 1)) for kv_pair in store]

            def load(blocks: dict[str, torch.Tensor]) -> None:
                """Block-major KV into the cache: one device copy per layer."""
                for layer, stored in zip(store, blocks[LAYERS], strict=True):
                    layer.view(2, n, BLOCK, shape.kv_heads, shape.head).copy_(
                        stored.transpose(0, 1)
                    )

            load(kv)
            step = one_token(model, last, cache, device)
            expected = step().clone()  # the token computed on the model's own cache

            def restored() -> torch.Tensor:
                client.restore(staging, "prefix")
                load(staging)
                return step()

            restored()
            restored_s = min(timed(restored, sync) for _ in range(args.repeat))
            restore_s = min(
                timed(lambda: client.restore(staging, "prefix"), sync) for _ in range(args.repeat)
            )
            load_s = min(timed(lambda: load(staging), sync) for _ in range(args.repeat))
            step_s = min(timed(step, sync) for _ in range(args.repeat))
            # Every restore must give the model's own KV, bit for bit, and the token computed
            # on it the logits computed on the model's own cache.
            checks, exact, same, repeatable, diff = 10, 0, 0, 0, 0.0
            for _ in range(checks):
                client.restore(staging, "prefix")
                exact += all(torch.equal(staging[k], kv[k]) for k in kv)
                load(staging)
                logits = step().clone()
                repeatable += torch.equal(step(), logits)  # the same cache again
                same += torch.equal(logits, expected)
                diff = max(diff, (logits.float() - expected.float()).abs().max().item())
            client.close()
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
    print(
        f"\nTTFT, Llama shape {shape.layers} layers x {shape.hidden}, {args.dtype}, {device} "
        f"(torch forward, random weights; no vLLM): {n * BLOCK + 1}-token prompt, "
        f"{n * BLOCK} tokens of KV ({size / 1e9:.2f} GB) in thawd; best of {args.repeat}"
    )
    graph = " (CUDA graph)" if device == "cuda" else ""
    for label, seconds in (
        ("full prefill", prefill_s),
        ("restored from thawd + 1 token", restored_s),
        ("  of which: restore (pinned tier)", restore_s),
        ("  block-major KV into the cache", load_s),
        (f"  the one token{graph}", step_s),
    ):
        print(f"  {label:38s} {seconds * 1e3:8.1f} ms")
    print(f"  speed-up restored vs prefill: {prefill_s / restored_s:.2f}x")
    print(f"  restored KV equal to the model's own, bit for bit: {exact} of {checks} restores")
    print(
        f"  logits on the restored cache equal those on the model's own: {same} of {checks} "
        f"(largest difference {diff:.3g}); the token computed twice on one cache agreed "
        f"{repeatable} of {checks} times"
    )


def one_token(model: Any, last: torch.Tensor, cache: list[Any], device: str) -> Any:
    """The step that computes the prompt's last token on `cache` (static tensors), returning
    its logits. On CUDA a graph, as engines run it: eager, one token through 32 layers took
    29.8 ms on an H200, nearly all of it launching small kernels."""
    if device != "cuda":
        return lambda: model.forward(last, cache)[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        model.forward(last, cache)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits, _ = model.forward(last, cache)

    def replay() -> torch.Tensor:
        graph.replay()
        return logits

    return replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prefix-tokens", type=int, default=4096)
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="prefixes in the batch run (default: 8 on cuda, 2 on cpu)",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--ttft-tokens",
        type=int,
        default=4100,
        help="prompt length of the TTFT part (4096 of 4100 in full blocks)",
    )
    parser.add_argument("--no-ttft", action="store_true", help="skip the TTFT part")
    args = parser.parse_args()
    if args.batch is None:
        args.batch = 8 if args.device == "cuda" else 2
    throughput(args)
    if args.device == "cuda" and not args.no_ttft:
        with torch.no_grad():
            ttft_forward(args)
    if args.device == "cpu" and not args.no_ttft:
        try:
            import vllm  # noqa: F401
        except ImportError:
            print("vLLM not installed: TTFT part skipped")
            return
        ttft(args)


if __name__ == "__main__":
    main()
