"""Agent fork: capture a session's prefix once, start N continuations in other engines from it.

    python -m thawd --config thawd.toml &          # or systemctl start thawd
    python examples/fork_demo.py --socket /run/thawd/thawd.sock
    python examples/fork_demo.py                    # starts its own thawd in a temp dir

Engine A serves a long "session" (system prompt + history, ~1.5k tokens of the tiny model),
`thaw.kv.fork` stores its full KV blocks in thawd. Engine B, a new process with another
PYTHONHASHSEED and block-hash algorithm (sha256_cbor), restores the prefix and runs N different
continuations in parallel: each reports the prefix as cached instead of prefilling it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_llm(model: str, socket: str, hash_algo: str = "sha256"):  # type: ignore[no-untyped-def]
    from vllm import LLM

    import thaw.kv

    return LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        kv_cache_memory_bytes=64 << 20,
        prefix_caching_hash_algo=hash_algo,
        kv_transfer_config=thaw.kv.kv_transfer_config(socket=socket),
    )


def engine_a(model: str, socket: str, session: str) -> None:
    from vllm import SamplingParams

    import thaw.kv

    llm = make_llm(model, socket)
    t0 = time.perf_counter()
    out = llm.generate([session], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    print(
        f"[A pid {os.getpid()}] served the session: {len(out[0].prompt_token_ids)} tokens "
        f"prefilled in {time.perf_counter() - t0:.2f} s"
    )
    prefix = thaw.kv.fork(llm, "demo-session", session)
    print(f"[A] forked: snapshot {prefix.name!r}, {prefix.cached_tokens} tokens in full blocks")
    llm.llm_engine.engine_core.shutdown()


def engine_b(model: str, socket: str, n: int) -> None:
    from vllm import SamplingParams

    import thaw.kv
    from thaw.kv.store import read_labels

    llm = make_llm(model, socket, hash_algo="sha256_cbor")
    labels, _ = read_labels("demo-session", socket, None)
    t0 = time.perf_counter()
    prefix = thaw.kv.restore(llm, "demo-session")  # checked, pinned, loaded; token ids inside
    cached = prefix.cached_tokens
    print(
        f"[B pid {os.getpid()}, PYTHONHASHSEED={os.environ.get('PYTHONHASHSEED')}, sha256_cbor; "
        f"snapshot written with {labels['kv.hash_algo']}, seed {labels['kv.hash_seed']}] "
        f"restored {cached} tokens in {time.perf_counter() - t0:.2f} s"
    )
    tokenizer = llm.get_tokenizer()
    suffixes = [
        tokenizer.encode(f" branch {i} explores a plan", add_special_tokens=False) for i in range(n)
    ]
    t0 = time.perf_counter()
    outs = llm.generate(
        prefix.prompts(suffixes), SamplingParams(max_tokens=16, temperature=0.0), use_tqdm=False
    )
    print(f"[B] {n} continuations in {time.perf_counter() - t0:.2f} s:")
    for i, o in enumerate(outs):
        print(
            f"    #{i}: prompt {len(o.prompt_token_ids)} tokens, num_cached_tokens="
            f"{o.num_cached_tokens}, output {list(o.outputs[0].token_ids)[:6]}..."
        )
    llm.llm_engine.engine_core.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--socket", help="a running thawd (default: start one here)")
    parser.add_argument("-n", type=int, default=4, help="continuations")
    parser.add_argument("--role", choices=["a", "b"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "a":
        return engine_a(args.model, args.socket, json.loads(os.environ["FORK_SESSION"]))
    if args.role == "b":
        return engine_b(args.model, args.socket, args.n)

    import thaw.demo.tiny

    tmp = Path(tempfile.mkdtemp(prefix="thaw-fork-demo-"))
    daemon = None
    socket = args.socket
    if socket is None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from daemon import start_daemon

        daemon = start_daemon(tmp, 1 << 30)
        socket = str(tmp / "thawd.sock")
    model = str(thaw.demo.tiny.write_model_dir(tmp / "tiny"))
    session = thaw.demo.tiny.make_prompt(thaw.demo.tiny.build_tokenizer(), 1500, seed=11)
    env = dict(os.environ, FORK_SESSION=json.dumps(session), PYTHONPATH=str(ROOT))
    try:
        for role, seed in (("a", "1"), ("b", "2")):
            # Each engine in its own interpreter: B is a new process with another hash seed.
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--role",
                    role,
                    "--model",
                    model,
                    "--socket",
                    socket,
                    "-n",
                    str(args.n),
                ],
                env={**env, "PYTHONHASHSEED": seed},
                check=True,
            )
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=60)


if __name__ == "__main__":
    main()
