"""Explicit KV capture, restore and fork for a vLLM `LLM` that runs `ThawKVConnector`.

    llm = LLM(model=..., kv_transfer_config=thaw.kv.kv_transfer_config(socket=s))
    thaw.kv.capture(llm, "session-1", [prompt])          # store the prompt's full blocks
    # ... in another process, another engine:
    thaw.kv.restore(llm2, "session-1")                   # checked, pinned, loaded
    llm2.generate(prompt + more)                         # num_cached_tokens = restored prefix

Both run requests through the engine (max_tokens=1), so the connector moves the bytes: the
engine's own multiprocess layout, hash seed and hash algorithm never matter.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from thaw.engines import weights
from thaw.engines.ranks import kv_rank_name
from thaw.errors import AlreadyExists, NotFound, ThawError
from thaw.kv.store import KVSpec, read_labels, spec_from_vllm_config

CONNECTOR = "ThawKVConnector"
MODULE = "thaw.kv.connector"


def kv_transfer_config(
    socket: str | None = None,
    snapshot_dir: str | None = None,
    *,
    save: bool = True,
    refresh_s: float = 2.0,
    staging_bytes: int = 256 << 20,
) -> dict[str, Any]:
    """The `kv_transfer_config` that plugs thaw into a vLLM engine.

    `socket`: thawd's socket (default: $THAW_SOCKET or the system socket) unless only
    `snapshot_dir` is given, then files only. `save=False`: load only, never store prompts
    automatically (explicit captures still store). `staging_bytes`: stored snapshots the worker
    keeps in its memory after loading one (0: every load comes from thawd).
    """
    if socket is None and snapshot_dir is None:
        from thaw.daemon.client import default_socket

        socket = default_socket()
    return {
        "kv_connector": CONNECTOR,
        "kv_connector_module_path": MODULE,
        "kv_role": "kv_both",
        # A block that fails to load is recomputed instead of failing the request.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "socket": socket or "",
            "snapshot_dir": os.path.abspath(snapshot_dir) if snapshot_dir else "",
            "save": save,
            "refresh_s": refresh_s,
            "staging_bytes": staging_bytes,
        },
    }


@dataclasses.dataclass(frozen=True)
class KVPrefix:
    """A stored prefix: snapshot `name`, its token ids, and how many of them are in full blocks."""

    name: str
    token_ids: tuple[int, ...]
    cached_tokens: int

    def prompts(self, suffixes: Sequence[Sequence[int] | str], llm: Any = None) -> list[Any]:
        """Prompts that continue this prefix (token id suffixes, or text with `llm`'s tokenizer)."""
        from vllm.inputs import TokensPrompt

        out = []
        for s in suffixes:
            ids = list(s) if not isinstance(s, str) else _encode(llm, s, special=False)
            out.append(TokensPrompt(prompt_token_ids=[*self.token_ids, *ids]))
        return out

    def restore(self, llm: Any) -> KVPrefix:
        """Restore this prefix into `llm` (see thaw.kv.restore)."""
        return restore(llm, self.name)


def _connector_config(llm: Any) -> dict[str, Any]:
    config = llm.llm_engine.vllm_config.kv_transfer_config
    if config is None or config.kv_connector != CONNECTOR:
        raise ThawError(
            "this engine has no thaw KV connector: create it with "
            "LLM(..., kv_transfer_config=thaw.kv.kv_transfer_config(socket=...))"
        )
    return dict(config.kv_connector_extra_config or {})


def _check_idle(llm: Any, what: str) -> None:
    if llm.llm_engine.has_unfinished_requests():
        raise ThawError(
            f"cannot {what} while the engine has unfinished requests: let them finish or "
            "abort them first"
        )


def _encode(llm: Any, prompt: str, special: bool = True) -> list[int]:
    if llm is None:
        raise ThawError("text needs an engine's tokenizer: pass llm=, or token ids")
    return list(llm.get_tokenizer().encode(prompt, add_special_tokens=special))


def engine_spec(llm: Any) -> KVSpec:
    """The KV spec of `llm` with the weights it holds now: what thaw.vllm.restore last put
    into it, else what its config loads (thaw/engines/weights.py)."""
    config = llm.llm_engine.vllm_config
    parts = weights.remembered(llm) or weights.from_vllm_config(config)
    return spec_from_vllm_config(config, weights.combine(parts) if parts else "")


def capture(
    llm: Any,
    name: str,
    prompts_or_token_ids: Sequence[str | Sequence[int]] | str,
) -> list[KVPrefix]:
    """Store the full-block KV of each prompt as snapshot `name` (`name.1`, `name.2`... after
    the first). Runs one 1-token request per prompt; its prefix usually hits the engine's
    prefix cache, so this costs one decode step, not a prefill.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    extra = _connector_config(llm)
    _check_idle(llm, "capture KV")
    spec = engine_spec(llm)
    items = (
        [prompts_or_token_ids]
        if isinstance(prompts_or_token_ids, str)
        else list(prompts_or_token_ids)
    )
    if not items:
        return []
    token_lists = [_encode(llm, p) if isinstance(p, str) else [int(t) for t in p] for p in items]
    names = [name if i == 0 else f"{name}.{i}" for i in range(len(items))]
    for n, ids in zip(names, token_lists, strict=True):
        if len(ids) < spec.block_size:
            raise ThawError(
                f"prompt for {n!r} has {len(ids)} tokens, less than one KV block "
                f"({spec.block_size}): nothing to capture"
            )
        try:
            read_labels(n, extra.get("socket"), extra.get("snapshot_dir"))
        except NotFound:
            continue
        raise AlreadyExists(f"a snapshot named {n!r} exists; remove it or pick another name")
    params = [
        SamplingParams(
            max_tokens=1, temperature=0.0, extra_args={"kv_transfer_params": {"thaw_capture": n}}
        )
        for n in names
    ]
    llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in token_lists], params, use_tqdm=False
    )
    out = []
    for n, ids in zip(names, token_lists, strict=True):
        try:
            labels, _ = read_labels(n, extra.get("socket"), extra.get("snapshot_dir"))
        except NotFound:
            raise ThawError(f"the engine did not store KV snapshot {n!r}; see its log") from None
        full = int(labels["kv.tokens"])
        out.append(KVPrefix(n, tuple(ids[:full]), full))
    return out


def restore(llm: Any, name: str) -> KVPrefix:
    """Restore KV snapshot `name` into `llm`'s prefix cache; returns the prefix (token ids,
    cached token count), ready for `.prompts(suffixes)`.

    Checks model, dtype, layout, block size and parallel layout first (KVMismatch names every
    difference), pins the snapshot in thawd, then runs one 1-token request over the stored
    tokens so the connector loads the blocks; raises if the engine did not report them cached.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from thaw.kv.store import TOKEN_IDS

    extra = _connector_config(llm)
    _check_idle(llm, "restore KV")
    socket, directory = extra.get("socket") or None, extra.get("snapshot_dir") or None
    labels, path = read_labels(name, socket, directory)
    stored = KVSpec.from_labels(labels)
    engine_spec(llm).check(stored, f"snapshot {name!r}")
    n = int(labels["kv.blocks"])
    import torch

    ids = torch.empty(n, stored.block_size, dtype=torch.int64)
    if socket:
        from thaw.daemon.client import connect

        with connect(socket) as client:
            for shard in (kv_rank_name(name, rank) for rank in range(stored.tp_size)):  # every rank
                if client.stat(shard).tier != "pinned":
                    client.pin(shard)
            client.restore_tensors({TOKEN_IDS: ids}, name, strict=False)
    else:
        from thaw.copy.restore import restore_file

        restore_file({TOKEN_IDS: ids}, path, strict=False)
    tokens = ids.flatten().tolist()
    # One more token so the whole stored prefix is eligible (vLLM recomputes the last one).
    prompt = TokensPrompt(prompt_token_ids=[*tokens, tokens[-1]])
    params = SamplingParams(
        max_tokens=1, temperature=0.0, extra_args={"kv_transfer_params": {"thaw_refresh": True}}
    )
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    cached = int(out.num_cached_tokens or 0)
    if cached < len(tokens):
        raise ThawError(
            f"KV snapshot {name!r}: the engine reported {cached} of {len(tokens)} tokens cached "
            "after the restore; see the engine log for the connector's error"
        )
    return KVPrefix(name, tuple(tokens), len(tokens))


def fork(llm: Any, name: str, prefix: str | Sequence[int]) -> KVPrefix:
    """Capture a session's prefix once; engines and continuations then start from it.

    Returns a KVPrefix: `.restore(other_llm)` loads it into another engine (another process,
    another hash seed), `.prompts(suffixes)` builds N continuations that all share it.
    """
    return capture(llm, name, [prefix])[0]
