"""One vLLM engine in a fresh interpreter, driven by a JSON job; prints one JSON result line.

    python tests/kv/engine_proc.py '{"role": "capture", "model": DIR, "socket": S, ...}'

A separate interpreter per engine, so each test engine has its own PYTHONHASHSEED (set by the
caller) and nothing of vLLM stays in the pytest process.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

RESULT = "THAW-KV-RESULT "


def make_llm(job: dict, **extra: Any) -> Any:
    from vllm import LLM

    import thaw.kv

    tp = job.get("tp", 1)
    if tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        # vLLM CPU binds each rank's threads to cores of a NUMA node of its own, and a CI box
        # has one node: give each rank its share of this process's CPUs by hand.
        cpus = sorted(os.sched_getaffinity(0))
        share = max(1, len(cpus) // tp)
        groups = [cpus[r * share : (r + 1) * share] or cpus[-1:] for r in range(tp)]
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, g)) for g in groups)

    return LLM(
        model=job["model"],
        dtype=job.get("dtype", "float32"),
        enforce_eager=True,
        max_model_len=2048,
        kv_cache_memory_bytes=64 << 20,
        prefix_caching_hash_algo=job.get("hash_algo", "sha256"),
        tensor_parallel_size=tp,
        kv_transfer_config=thaw.kv.kv_transfer_config(
            socket=job.get("socket"), snapshot_dir=job.get("snapshot_dir")
        ),
        **extra,
    )


def greedy(llm: Any, prompt: str | dict, n: int = 32) -> dict:
    return greedy_many(llm, [prompt], n)[0]


def greedy_many(llm: Any, prompts: list[str | dict], n: int = 32) -> list[dict]:
    """One generate call: prompts scheduled together load their KV in the same steps."""
    from vllm import SamplingParams

    t0 = time.perf_counter()
    outs = llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False
    )
    return [
        {
            "tokens": list(out.outputs[0].token_ids),
            "cached": out.num_cached_tokens,
            "prompt_len": len(out.prompt_token_ids),
            "seconds": time.perf_counter() - t0,
        }
        for out in outs
    ]


def shutdown(llm: Any) -> None:
    import contextlib

    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()


def other_weights(llm: Any, job: dict) -> str:
    """Register in thawd a snapshot of other weights for this engine (its own, frozen, each
    float tensor moved by noise: same names and shapes, other outputs); returns its name."""
    import torch

    import thaw
    from thaw.copy.freeze import freeze_file
    from thaw.copy.restore import read_tensor
    from thaw.format import open_snapshot

    directory = job["snapshot_dir"]
    mine = os.path.join(directory, "weights-a.thaw")
    thaw.vllm.freeze(llm, "weights-a", path=mine, socket=job["socket"])
    snap = open_snapshot(mine)
    g = torch.Generator().manual_seed(11)
    other = {}
    for entry in snap.tensors:
        t = read_tensor(snap, entry)
        if t.is_floating_point():
            t = t + 0.05 * torch.randn(t.shape, generator=g).to(t.dtype)
        other[entry.name] = t
    path = os.path.join(directory, "weights-b.thaw")
    freeze_file(other, path, fingerprint=snap.fingerprint)
    with thaw.connect(job["socket"]) as client:
        client.register(path, "weights-b")
    return "weights-b"


def swap(llm: Any, job: dict) -> dict:
    """Serve a prompt (its KV goes to the store), swap the weights in place, serve it again:
    the KV of the old weights must not come back."""
    import thaw

    prompt, out = job["prompt"], {}
    out["first"] = greedy(llm, prompt)
    llm.reset_prefix_cache()  # the engine's own cache goes; the store keeps the prompt's KV
    out["again"] = greedy(llm, prompt)
    other = other_weights(llm, job)
    with thaw.connect(job["socket"]) as client:
        client.restore(llm, other)
    out["swapped"] = greedy(llm, prompt)
    # The same prompt with a cache salt: neither vLLM's prefix cache nor the connector serve
    # it, so it is computed with the new weights from scratch.
    out["reference"] = greedy(llm, {"prompt": prompt, "cache_salt": "fresh"})
    out["stored"] = greedy(llm, prompt)  # the new weights' KV for the prompt goes to the store
    llm.reset_prefix_cache()
    out["keyed"] = greedy(llm, prompt)  # and comes back, keyed by the new weights
    return out


def main(job: dict) -> dict:
    import thaw.kv
    from thaw.errors import ThawError

    role = job["role"]
    t0 = time.perf_counter()
    extra: dict = {"worker_extension_cls": "thaw.vllm.worker.ThawWorkerExtension"}
    if job.get("load"):  # load_format="thaw" from this snapshot
        extra.update(
            load_format="thaw",
            model_loader_extra_config={"snapshot": job["load"], "socket": job["socket"]},
        )
    llm = make_llm(job, **extra)
    result: dict = {"init_s": time.perf_counter() - t0}
    prompt = job["prompt"]
    if role == "capture":
        result["first"] = greedy(llm, prompt)
        info = thaw.kv.capture(llm, job["name"], [prompt])[0]
        result["captured"] = info.cached_tokens
        # Same engine, local prefix cache emptied: the connector brings the blocks back.
        llm.reset_prefix_cache()
        result["reloaded"] = greedy(llm, prompt)
        # A second prompt, saved automatically; then both together, from the store at once.
        result["second"] = greedy(llm, job["prompt2"])
        llm.reset_prefix_cache()
        result["both"] = greedy_many(llm, [prompt, job["prompt2"]])
    elif role == "restore":
        result["lazy"] = greedy(llm, prompt)
        llm.reset_prefix_cache()
        result["restored"] = thaw.kv.restore(llm, job["name"]).cached_tokens
        result["after_restore"] = greedy(llm, prompt)
    elif role == "lazy":
        result["lazy"] = greedy(llm, prompt)
    elif role == "swap":
        result.update(swap(llm, job))
    elif role == "mismatch":
        result["lazy"] = greedy(llm, prompt)
        try:
            thaw.kv.restore(llm, job["name"])
            result["refused"] = ""
        except ThawError as e:
            result["refused"] = f"{type(e).__name__}: {e}"
        from vllm import SamplingParams

        llm.llm_engine.add_request("pending", prompt, SamplingParams(max_tokens=4))
        try:
            thaw.kv.capture(llm, "never", [prompt])
            result["busy"] = ""
        except ThawError as e:
            result["busy"] = f"{type(e).__name__}: {e}"
        while llm.llm_engine.has_unfinished_requests():
            llm.llm_engine.step()
    shutdown(llm)
    return result


if __name__ == "__main__":
    try:
        out = main(json.loads(sys.argv[1]))
    except BaseException:
        out = {"error": traceback.format_exc()}
    print(RESULT + json.dumps(out), flush=True)
    sys.stdout.flush()
    os._exit(0)  # vLLM's shutdown hooks add seconds; the engine processes die with us
