"""The KV snapshot glue without vLLM: chain keys, spec checks, the store over a real thawd and
over plain files, the index rebuilt from stored token ids."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

import thaw
from thaw.errors import KVMismatch, ModelMismatch, ThawError
from thaw.kv.store import (
    AUTO_LABEL,
    LAYERS,
    TOKEN_IDS,
    BlockRef,
    KVSpec,
    KVStore,
    auto_name,
    chain_keys,
    copy_blocks,
)

SPEC = KVSpec(
    weights="m1",
    dtype="float32",
    layout="cpu-LBHNC",
    block_size=4,
    block_shape=(2, 4, 8),
    num_layers=2,
)


def blocks(n: int, seed: int) -> torch.Tensor:
    """KV blocks as a snapshot stores them: [layers, n, *block_shape]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SPEC.num_layers, n, *SPEC.block_shape, generator=g)


def labels_for(tokens: list[int]) -> dict[str, str]:
    n = len(tokens) // SPEC.block_size
    keys = chain_keys(SPEC.key, tokens, SPEC.block_size)
    return {"kv.blocks": str(n), "kv.tokens": str(n * SPEC.block_size), "kv.chain": keys[-1]}


def test_chain_keys_depend_on_tokens_and_spec_only() -> None:
    tokens = list(range(10))
    keys = chain_keys(SPEC.key, tokens, 4)
    assert len(keys) == 2  # full blocks only
    assert keys == chain_keys(SPEC.key, [*tokens, 99], 4)
    assert chain_keys(SPEC.key, [0, 1, 2, 3, 7, 7, 7, 7], 4)[0] == keys[0]
    assert chain_keys(SPEC.key, [0, 1, 2, 3, 7, 7, 7, 7], 4)[1] != keys[1]
    other = KVSpec(**{**SPEC.__dict__, "dtype": "float16"})
    assert chain_keys(other.key, tokens, 4)[0] != keys[0]


def test_spec_check_names_every_difference() -> None:
    SPEC.check(KVSpec.from_labels(SPEC.labels()))
    other = KVSpec(**{**SPEC.__dict__, "weights": "m2", "block_size": 8})
    with pytest.raises(KVMismatch) as e:
        SPEC.check(other)
    assert isinstance(e.value, ModelMismatch)
    assert "weights" in str(e.value) and "block_size" in str(e.value)
    with pytest.raises(ThawError, match="not a KV-cache snapshot"):
        KVSpec.from_labels({})
    # A format 1 snapshot (a tensor per layer) is refused by name, not misread.
    with pytest.raises(KVMismatch, match="KV snapshot format 1: this thaw reads format 2"):
        KVSpec.from_labels({**SPEC.labels(), "kv.format": "1"})


@pytest.mark.parametrize("backend", ["thawd", "files"])
def test_store_round_trip_and_index_from_token_ids(
    backend: str, tmp_path: Any, module_thawd: Any
) -> None:
    socket = module_thawd.socket if backend == "thawd" else None
    directory = str(tmp_path / "kv")
    writer = KVStore(SPEC, socket=socket, directory=directory)
    tokens = list(range(100, 113))  # 3 full blocks + 1 token
    keys = chain_keys(SPEC.key, tokens, 4)
    name = auto_name(SPEC, keys) + backend
    layers = blocks(3, 0)
    writer.save(name, layers, torch.tensor(tokens[:12]).view(3, 4), labels_for(tokens))
    # A new store (another engine) knows nothing but what it reads back.
    reader = KVStore(SPEC, socket=socket, directory=directory)
    reader.refresh(force=True)
    refs = reader.match(chain_keys(SPEC.key, [*tokens[:8], 5, 5, 5, 5], 4))
    assert [(r.name, r.index) for r in refs] == [(name, 0), (name, 1)]
    loaded = reader.load(refs[0])
    assert torch.equal(loaded[TOKEN_IDS].flatten(), torch.tensor(tokens[:12]))
    assert torch.equal(loaded[LAYERS], layers)
    # Another spec sees none of it.
    stranger = KVStore(
        KVSpec(**{**SPEC.__dict__, "weights": "m2"}), socket=socket, directory=directory
    )
    stranger.refresh(force=True)
    assert stranger.match(chain_keys(stranger.spec.key, tokens, 4)) == []
    if backend == "thawd":
        with thaw.connect(socket) as client:
            record = client.stat(name)
        assert record.tier == "pinned" and dict(record.labels)["kv.spec"] == SPEC.key
    for s in (writer, reader, stranger):
        s.close()


@pytest.mark.parametrize("backend", ["thawd", "files"])
def test_load_many_stages_several_prefixes_at_once(
    backend: str, tmp_path: Any, module_thawd: Any
) -> None:
    socket = module_thawd.socket if backend == "thawd" else None
    store = KVStore(SPEC, socket=socket, directory=str(tmp_path / "kv"))
    saved = {}
    for seed in range(3):
        tokens = list(range(200 + 8 * seed, 208 + 8 * seed))
        name = f"many-{seed}-{backend}"
        saved[name] = (blocks(2, seed), tokens)
        store.save(name, saved[name][0], torch.tensor(tokens).view(2, 4), labels_for(tokens))
    refs = [BlockRef(name, 0, 2, store.path_for(name)) for name in saved]
    first = store.load_many([*refs, refs[0]])  # a prefix twice: restored once
    assert first[0] is first[3]
    for got, (layers, tokens) in zip(first, saved.values(), strict=False):
        assert torch.equal(got[TOKEN_IDS].flatten(), torch.tensor(tokens))
        assert torch.equal(got[LAYERS], layers)
    assert [t is f for t, f in zip(store.load_many(refs), first, strict=False)] == [True] * 3
    store.close()


def test_files_written_without_daemon_are_registered_later(
    tmp_path: Any, module_thawd: Any
) -> None:
    directory = str(tmp_path / "kv")
    tokens = list(range(8))
    offline = KVStore(SPEC, directory=directory)
    offline.save(
        "offline-prefix", blocks(2, 1), torch.tensor(tokens).view(2, 4), labels_for(tokens)
    )
    online = KVStore(SPEC, socket=module_thawd.socket, directory=directory)
    online.refresh(force=True)
    assert [r.name for r in online.match(chain_keys(SPEC.key, tokens, 4))] == ["offline-prefix"] * 2
    with thaw.connect(module_thawd.socket) as client:
        assert client.stat("offline-prefix").path.endswith("offline-prefix.thaw")
    online.close()


def test_a_full_pinned_budget_unpins_the_oldest_automatic_saves(tmp_path: Any) -> None:
    """Room for two 8 MiB prefixes: a third automatic save unpins the least recently used
    automatic one (it stays in the store, cold, and still loads); a capture is never unpinned,
    and when only captures hold the budget the save fails with BudgetExceeded."""
    from tests.daemon.conftest import ThawdProcess, make_dir
    from thaw.errors import BudgetExceeded

    spec = KVSpec(
        weights="m-big",
        dtype="float32",
        layout="cpu-LBHNC",
        block_size=4,
        block_shape=(1024, 1024),
        num_layers=2,
    )
    daemon = ThawdProcess(make_dir(), pinned_budget="24MiB").start()
    try:
        store = KVStore(spec, socket=daemon.socket, directory=str(tmp_path / "kv"))

        def save(name: str, seed: int, auto: bool) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed)
            data = torch.randn(2, 1, 1024, 1024, generator=g)
            tokens = list(range(seed * 4, seed * 4 + 4))
            labels = {
                "kv.blocks": "1",
                "kv.tokens": "4",
                "kv.chain": chain_keys(spec.key, tokens, 4)[-1],
            }
            if auto:
                labels[AUTO_LABEL] = "1"
            store.save(name, data, torch.tensor(tokens).view(1, 4), labels)
            with thaw.connect(daemon.socket) as client:  # written behind: wait for the file,
                deadline = time.monotonic() + 30  # or unpin would find the snapshot busy
                while client.stat(name).file_pending and time.monotonic() < deadline:
                    time.sleep(0.02)
            return data

        first = save("auto-1", 1, auto=True)
        save("auto-2", 2, auto=True)
        with thaw.connect(daemon.socket) as client:
            client.restore(store._empty(1), "auto-2")  # used since: auto-1 is the oldest
            save("auto-3", 3, auto=True)
            tiers = {n: client.stat(n).tier for n in ("auto-1", "auto-2", "auto-3")}
            assert tiers == {"auto-1": "cold", "auto-2": "pinned", "auto-3": "pinned"}
            loaded = store.load(BlockRef("auto-1", 0, 1, store.path_for("auto-1")))
            assert torch.equal(loaded[LAYERS], first)  # from its file now
            save("capture-1", 4, auto=False)  # room made by unpinning auto-2
            save("capture-2", 5, auto=False)  # and auto-3
            assert client.stat("auto-3").tier == "cold"
            with pytest.raises(BudgetExceeded):  # only captures left pinned
                save("auto-4", 6, auto=True)
            assert {client.stat(n).tier for n in ("capture-1", "capture-2")} == {"pinned"}
        store.close()
    finally:
        daemon.close()


def test_load_refuses_a_snapshot_of_other_shape(tmp_path: Any) -> None:
    directory = str(tmp_path / "kv")
    tokens = list(range(8))
    KVStore(SPEC, directory=directory).save(
        "p", blocks(2, 2), torch.tensor(tokens).view(2, 4), labels_for(tokens)
    )
    wider = KVStore(KVSpec(**{**SPEC.__dict__, "block_shape": (2, 4, 16)}), directory=directory)
    with pytest.raises(ModelMismatch):
        wider.load(BlockRef("p", 0, 2, str(tmp_path / "kv" / "p.thaw")))


def test_copy_blocks_checks_the_tokens_before_writing() -> None:
    layers = blocks(3, 5)
    tokens = torch.arange(12).view(3, 4)
    stored = {LAYERS: layers, TOKEN_IDS: tokens}
    cache = [torch.zeros(6, *SPEC.block_shape) for _ in range(SPEC.num_layers)]
    copy_blocks(stored, "p", [2, 0], [5, 1], [*range(8, 12), *range(4)], cache)
    for layer, out in zip(layers, cache, strict=True):
        assert torch.equal(out[5], layer[2]) and torch.equal(out[1], layer[0])
        assert not out[[0, 2, 3, 4]].any()
    with pytest.raises(KVMismatch, match="other tokens than its index says"):
        copy_blocks(stored, "p", [1], [3], [9, 9, 9, 9], cache)
    assert not any(out[3].any() for out in cache)
    whole = [torch.zeros(6, *SPEC.block_shape) for _ in range(SPEC.num_layers)]
    copy_blocks(stored, "p", [0, 1, 2], [4, 0, 2], list(range(12)), whole)  # the whole snapshot
    for layer, out in zip(layers, whole, strict=True):
        assert torch.equal(out[[4, 0, 2]], layer) and not out[[1, 3, 5]].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["thawd", "files"])
def test_a_gpu_engine_saves_and_loads_in_gpu_memory(
    backend: str, tmp_path: Any, module_thawd: Any
) -> None:
    """A GPU engine's blocks go to the store from GPU memory and come back into it, with no
    host staging; copy_blocks then places them in a cache laid out like vLLM's GPU cache."""
    spec = KVSpec(
        weights="m-gpu",
        dtype="bfloat16",
        layout="gpu-2NBHD",
        block_size=16,
        block_shape=(2, 16, 8, 128),
        num_layers=2,
    )
    socket = module_thawd.socket if backend == "thawd" else None
    store = KVStore(spec, socket=socket, directory=str(tmp_path / "kv"))
    store.device = torch.device("cuda")
    # vLLM's GPU cache: per layer [2 (K, V), num_blocks, 16, 8, 128]; blocks index dim 1.
    cache = [torch.randn(2, 40, 16, 8, 128, device="cuda").bfloat16() for _ in range(2)]
    used = torch.tensor([7, 3, 21], device="cuda")
    tokens = list(range(1000, 1048))
    keys = chain_keys(spec.key, tokens, 16)
    name = f"gpu-prefix-{backend}"
    store.save(
        name,
        torch.stack([layer.transpose(0, 1).index_select(0, used) for layer in cache]),
        torch.tensor(tokens, device="cuda").view(3, 16),
        {"kv.blocks": "3", "kv.tokens": "48", "kv.chain": keys[-1]},
    )
    (loaded,) = store.load_many([BlockRef(name, 0, 3, store.path_for(name))])
    assert {t.device.type for t in loaded.values()} == {"cuda"}
    target = [torch.zeros_like(layer) for layer in cache]
    copy_blocks(
        loaded, name, [0, 1, 2], [30, 31, 5], tokens, [layer.transpose(0, 1) for layer in target]
    )
    for layer, out in zip(cache, target, strict=True):
        assert torch.equal(out[:, [30, 31, 5]], layer[:, [7, 3, 21]])
        assert not out[:, [0, 7, 3, 21]].any()
    # GPU memory outside vLLM's KV budget is not kept: the next load restores again.
    assert store.load(BlockRef(name, 0, 3, store.path_for(name))) is not loaded
    store.close()


def test_importing_thaw_kv_imports_neither_torch_nor_vllm() -> None:
    import subprocess
    import sys

    code = "import sys, thaw.kv; print('torch' in sys.modules, 'vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
