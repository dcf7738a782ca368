"""KV-cache snapshots through real vLLM CPU engines and a real thawd.

Engine A (PYTHONHASHSEED=1, sha256 block hashes) serves a 1000-token prompt, its KV goes into
thawd; thawd restarts; engine B (a new process, PYTHONHASHSEED=2, sha256_cbor block hashes) gets
the same prompt from the store: 896 tokens cached (7 full blocks of 128) and the same greedy
tokens. An engine of another model and dtype is refused. Three engines, ~40 s each here; then
two tensor-parallel engines (TP=2), whose ranks store and load their own shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

PROMPT_TOKENS = 1000
BLOCK = 128
FULL_PREFIX = (PROMPT_TOKENS - 1) // BLOCK * BLOCK  # 896


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, module_thawd: Any) -> dict[str, Any]:
    import thaw.demo.tiny

    root = tmp_path_factory.mktemp("kv")
    model = thaw.demo.tiny.write_model_dir(root / "tiny")
    tokenizer = thaw.demo.tiny.build_tokenizer()
    return {
        "model": str(model),
        "prompt": thaw.demo.tiny.make_prompt(tokenizer, PROMPT_TOKENS, seed=3),
        "prompt2": thaw.demo.tiny.make_prompt(tokenizer, PROMPT_TOKENS, seed=4),
        "socket": module_thawd.socket,
        "name": "sess-a",
        "snapshot_dir": str(root / "kv"),
        "root": root,
    }


@pytest.fixture(scope="module")
def engine_a(setup: dict[str, Any], engine: Any) -> dict[str, Any]:
    job = {k: v for k, v in setup.items() if k != "root"}
    return engine({**job, "role": "capture"}, hash_seed=1)


def test_engine_a_captures_and_its_connector_reloads(engine_a: dict[str, Any]) -> None:
    assert engine_a["first"]["prompt_len"] == PROMPT_TOKENS
    assert engine_a["first"]["cached"] == 0
    assert engine_a["captured"] == FULL_PREFIX
    # Local prefix cache emptied: all 896 tokens came back through the connector.
    assert engine_a["reloaded"]["cached"] == FULL_PREFIX
    assert engine_a["reloaded"]["tokens"] == engine_a["first"]["tokens"]
    # Two stored prompts in one generate call: both prefixes come back (loaded together when
    # scheduled in the same step, through restore_many), with the same greedy tokens.
    both = engine_a["both"]
    assert [b["cached"] for b in both] == [FULL_PREFIX, FULL_PREFIX]
    assert [b["tokens"] for b in both] == [
        engine_a["first"]["tokens"],
        engine_a["second"]["tokens"],
    ]


def test_kv_snapshot_in_thawd_and_on_disk(setup: dict[str, Any], engine_a: dict[str, Any]) -> None:
    import thaw

    with thaw.connect(setup["socket"]) as client:
        record = client.stat("sess-a")
    assert record.tier == "pinned"
    labels = dict(record.labels)
    assert labels["kv.blocks"] == "7" and labels["kv.tokens"] == str(FULL_PREFIX)
    assert labels["kv.layout"] == "cpu-LBHNC" and labels["kv.block_size"] == str(BLOCK)
    assert labels["kv.hash_algo"] == "sha256" and labels["kv.hash_seed"] == "1"
    snap = thaw.open_snapshot(Path(setup["snapshot_dir"]) / "sess-a.thaw")
    shapes = {e.name: e.shape for e in snap.tensors}
    # tiny: 2 layers, 2 KV heads, head 64 -> CPU block [2, 128, 128]
    assert shapes == {"kv.layers": (2, 7, 2, 128, 128), "kv.token_ids": (7, 128)}
    assert labels["kv.format"] == "2"
    assert snap.fingerprint.dtype == "float32" and snap.fingerprint.engine == "vllm"


def test_new_engine_other_hash_seed_restores_after_thawd_restart(
    setup: dict[str, Any], engine_a: dict[str, Any], engine: Any, module_thawd: Any
) -> None:
    import thaw

    module_thawd.restart()
    with thaw.connect(setup["socket"]) as client:
        names = {r.name for r in client.list()}
    assert "sess-a" in names  # the registry survived; the file is re-read on demand
    job = {k: v for k, v in setup.items() if k != "root"}
    b = engine({**job, "role": "restore", "hash_algo": "sha256_cbor"}, hash_seed=2)
    want = engine_a["first"]["tokens"]
    # Lazy path: the connector finds the prefix by its token ids.
    assert b["lazy"]["cached"] == FULL_PREFIX
    assert b["lazy"]["tokens"] == want
    # Explicit path: thaw.kv.restore into an emptied prefix cache, then the same prompt.
    assert b["restored"] == FULL_PREFIX
    assert b["after_restore"]["cached"] == FULL_PREFIX
    assert b["after_restore"]["tokens"] == want


def test_mismatched_engine_is_refused(
    setup: dict[str, Any], engine_a: dict[str, Any], engine: Any
) -> None:
    import thaw.demo.tiny

    other = thaw.demo.tiny.write_model_dir(setup["root"] / "tiny-other", seed=1, dtype="float16")
    job = {k: v for k, v in setup.items() if k != "root"}
    c = engine({**job, "model": str(other), "dtype": "float16", "role": "mismatch"}, hash_seed=1)
    assert c["lazy"]["cached"] == 0  # other model: its keys never reach A's blocks
    assert c["refused"].startswith("KVMismatch")
    assert "dtype" in c["refused"] and "weights" in c["refused"]
    assert "unfinished requests" in c["busy"]


def test_kv_never_outlives_the_weights_that_computed_it(setup: dict[str, Any], engine: Any) -> None:
    """An engine serves a prompt (its KV stored), then `thaw.connect().restore(llm, other)`
    swaps its weights in place: the prompt is computed again with the new weights, never
    served from the old weights' KV, and the new weights' KV is stored under their own key.
    A new engine started with load_format="thaw" from those weights, on the first model's
    directory, finds the new weights' KV and never the old's."""
    import thaw.demo.tiny

    prompt = thaw.demo.tiny.make_prompt(thaw.demo.tiny.build_tokenizer(), PROMPT_TOKENS, seed=8)
    job = {k: v for k, v in setup.items() if k != "root"}
    a = engine({**job, "prompt": prompt, "role": "swap"}, hash_seed=7)
    assert a["first"]["cached"] == 0
    assert a["again"]["cached"] == FULL_PREFIX  # the old weights' KV is in the store
    assert a["again"]["tokens"] == a["first"]["tokens"]
    assert a["reference"]["tokens"] != a["first"]["tokens"]  # the swap changed the outputs
    assert a["swapped"]["cached"] == 0
    assert a["swapped"]["tokens"] == a["reference"]["tokens"]
    assert a["keyed"]["cached"] == FULL_PREFIX
    assert a["keyed"]["tokens"] == a["reference"]["tokens"]
    b = engine({**job, "prompt": prompt, "role": "lazy", "load": "weights-b"}, hash_seed=8)
    assert b["lazy"]["cached"] == FULL_PREFIX
    assert b["lazy"]["tokens"] == a["reference"]["tokens"]


def test_tensor_parallel_ranks_store_and_load_their_own_shards(
    setup: dict[str, Any], engine: Any
) -> None:
    """TP=2: each rank stores its shard of the prompt's KV (rank 0 as `name`, rank 1 as
    `name.tp1`, each labelled with its rank), and a new TP=2 engine loads each rank's own
    shard: the prompt is cached and its greedy tokens are the first engine's."""
    import thaw
    import thaw.demo.tiny

    prompt = thaw.demo.tiny.make_prompt(thaw.demo.tiny.build_tokenizer(), PROMPT_TOKENS, seed=5)
    job = {k: v for k, v in setup.items() if k != "root"}
    job = {**job, "prompt": prompt, "name": "sess-tp", "tp": 2}
    a = engine({**job, "role": "capture"}, hash_seed=5)
    assert a["captured"] == FULL_PREFIX
    assert a["reloaded"]["cached"] == FULL_PREFIX
    assert a["reloaded"]["tokens"] == a["first"]["tokens"]
    with thaw.connect(setup["socket"]) as client:
        shards = {name: dict(client.stat(name).labels) for name in ("sess-tp", "sess-tp.tp1")}
    assert [labels["kv.tp"] for labels in shards.values()] == ["0/2", "1/2"]
    # tiny: 2 KV heads, one per rank -> CPU block [1, 128, 128]
    assert {labels["kv.block_shape"] for labels in shards.values()} == {"1x128x128"}
    b = engine({**job, "role": "restore", "hash_algo": "sha256_cbor"}, hash_seed=6)
    assert b["lazy"]["cached"] == FULL_PREFIX
    assert b["lazy"]["tokens"] == a["first"]["tokens"]
    assert b["restored"] == FULL_PREFIX
    assert b["after_restore"]["tokens"] == a["first"]["tokens"]
