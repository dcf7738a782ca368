"""KV-cache snapshots in thaw's container format, keyed by token ids, and the index over them.

A KV snapshot holds one prefix of full blocks (format 2):

    kv.layers       [num_layers, n_blocks, *block_shape]  the engine's KV bytes, layer by layer,
                                                          block by block
    kv.token_ids    int64 [n_blocks, block_size]          the tokens behind each block

(two tensors, not one per layer: a restore's fixed cost grows with its tensor count, and a
4k-token prefix of an 8B model is only ~10 ms of copying), and records in its fingerprint
labels what the bytes mean (the identity of the weights that computed them, thaw/engines/weights.py;
dtype, layout, block size and shape, layers) plus, for the record only, vLLM's prefix-cache
hash algorithm and seed of the engine that wrote it. Blocks are looked up by *our* chain key:
SHA-256 over the KV spec and the token ids of the block and all blocks before it. The key is a
function of the token ids alone, so an engine with another PYTHONHASHSEED or
`prefix_caching_hash_algo` finds the same blocks; vLLM then hashes the loaded blocks its own
way. The index is rebuilt from the stored token ids, never from vLLM's block hashes.

Snapshots live in thawd (pinned tier, file written behind into `snapshot_dir` or the daemon's
state directory) or, without a daemon, as files in `snapshot_dir`. This module imports torch
but not vLLM; `spec_from_vllm_config` takes the config object duck-typed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from thaw.errors import (
    AlreadyExists,
    BudgetExceeded,
    InvalidRequest,
    KVMismatch,
    NotFound,
    ThawError,
)
from thaw.format.fingerprint import Fingerprint

log = logging.getLogger("thaw.kv")

KIND_LABEL = "thaw.kind"
KIND = "kv"
FORMAT = 2  # format 1 stored a tensor per layer (kv.layer{L}); its snapshots are not read
LAYERS = "kv.layers"
TOKEN_IDS = "kv.token_ids"
# On automatic saves (the connector's), not on captures: thawd may unpin them for room.
AUTO_LABEL = "kv.auto"
# Spec fields compared between a snapshot and an engine, in the order errors name them.
SPEC_FIELDS = ("weights", "dtype", "layout", "block_size", "block_shape", "num_layers")


@dataclasses.dataclass(frozen=True)
class KVSpec:
    """What KV bytes mean: two engines with equal specs can exchange blocks as raw bytes."""

    weights: str  # the engine's loaded weights (thaw.engines.weights.combine); "" = not known
    dtype: str  # KV cache dtype, e.g. "float32"
    layout: str  # e.g. "cpu-LBHNC": vLLM CPU, one [blocks, kv_heads, block, 2*head] per layer
    block_size: int
    block_shape: tuple[int, ...]  # shape of one block of one layer, as stored
    num_layers: int
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def key(self) -> str:
        """Hex digest of the fields that decide compatibility (the chain keys start from it)."""
        fields = {f: getattr(self, f) for f in SPEC_FIELDS}
        fields["block_shape"] = list(self.block_shape)
        fields["tp"] = [self.tp_rank, self.tp_size]
        fields["format"] = FORMAT
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]

    def labels(self) -> dict[str, str]:
        return {
            KIND_LABEL: KIND,
            "kv.spec": self.key,
            "kv.weights": self.weights,
            "kv.dtype": self.dtype,
            "kv.layout": self.layout,
            "kv.block_size": str(self.block_size),
            "kv.block_shape": "x".join(map(str, self.block_shape)),
            "kv.num_layers": str(self.num_layers),
            "kv.tp": f"{self.tp_rank}/{self.tp_size}",
            "kv.format": str(FORMAT),
        }

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> KVSpec:
        if labels.get(KIND_LABEL) != KIND:
            raise ThawError("not a KV-cache snapshot (no thaw.kind=kv label)")
        if labels.get("kv.format", "1") != str(FORMAT):
            raise KVMismatch(
                f"KV snapshot format {labels.get('kv.format', '1')}: this thaw "
                f"reads format {FORMAT}; capture the prefix again"
            )
        try:
            rank, size = labels.get("kv.tp", "0/1").split("/")
            return cls(
                weights=labels.get("kv.weights", ""),
                dtype=labels["kv.dtype"],
                layout=labels["kv.layout"],
                block_size=int(labels["kv.block_size"]),
                block_shape=tuple(int(d) for d in labels["kv.block_shape"].split("x")),
                num_layers=int(labels["kv.num_layers"]),
                tp_rank=int(rank),
                tp_size=int(size),
            )
        except (KeyError, ValueError) as e:
            raise ThawError(f"KV-cache snapshot labels are incomplete or invalid: {e}") from e

    def check(self, snapshot: KVSpec, what: str = "the snapshot") -> None:
        """Raise KVMismatch naming every field where `snapshot` differs from this engine."""
        diffs = [
            f"{f}: engine has {getattr(self, f)!r}, {what} has {getattr(snapshot, f)!r}"
            for f in (*SPEC_FIELDS, "tp_rank", "tp_size")
            if getattr(self, f) != getattr(snapshot, f)
        ]
        if diffs:
            raise KVMismatch(
                f"KV-cache snapshot does not fit this engine ({'; '.join(diffs)}); capture it "
                "again from an engine with the same weights, dtype, block size and parallel layout"
            )


def spec_from_vllm_config(vllm_config: Any, weights: str = "") -> KVSpec:
    """The KV spec an engine with this VllmConfig and these loaded `weights` (an identity
    from thaw.engines.weights) has; valid in every vLLM process."""
    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    kv_heads = mc.get_num_kv_heads(pc)
    head = mc.get_head_size()
    layers = mc.get_num_layers(pc)
    block_size = int(cc.block_size)
    cache_dtype = str(getattr(cc, "cache_dtype", "auto"))
    dtype = str(mc.dtype).removeprefix("torch.") if cache_dtype == "auto" else cache_dtype
    try:
        from vllm.platforms import current_platform

        cpu = current_platform.is_cpu()
    except ImportError:  # pragma: no cover - only with vllm installed
        cpu = False
    block_shape: tuple[int, ...]
    if cpu:
        # vLLM CPU: one [num_blocks, kv_heads, block_size, 2*head] tensor per layer (LBHNC).
        layout, block_shape = "cpu-LBHNC", (kv_heads, block_size, 2 * head)
    else:
        # vLLM GPU (flash attention, NHD): [2, num_blocks, block_size, kv_heads, head] per
        # layer; stored block-major as [n, 2, block_size, kv_heads, head].
        layout, block_shape = "gpu-2NBHD", (2, block_size, kv_heads, head)
    return KVSpec(
        weights=weights,
        dtype=dtype,
        layout=layout,
        block_size=block_size,
        block_shape=block_shape,
        num_layers=layers,
        tp_rank=_tp_rank(),
        tp_size=int(pc.tensor_parallel_size),
    )


def _tp_rank() -> int:
    with contextlib.suppress(Exception):
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    return 0


def engine_labels(vllm_config: Any) -> dict[str, str]:
    """What the writing engine used for its own block hashes: recorded, never relied on."""
    version = ""
    with contextlib.suppress(ImportError):
        import vllm

        version = vllm.__version__
    return {
        "kv.hash_algo": str(vllm_config.cache_config.prefix_caching_hash_algo),
        "kv.hash_seed": os.environ.get("PYTHONHASHSEED", "unset"),
        "kv.vllm": version,
        "kv.model_path": str(vllm_config.model_config.model)[-200:],
    }


# --- chain keys -------------------------------------------------------------------------------


def chain_keys(
    spec_key: str, token_ids: Sequence[int], block_size: int, max_blocks: int | None = None
) -> list[str]:
    """One key per full block: SHA-256 of the spec, the previous key and the block's tokens."""
    n = len(token_ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    out: list[str] = []
    digest = hashlib.sha256(spec_key.encode()).digest()
    ids = torch.as_tensor(list(token_ids[: n * block_size]), dtype=torch.int64)
    raw = ids.numpy().tobytes()
    step = 8 * block_size
    for i in range(n):
        digest = hashlib.sha256(digest + raw[i * step : (i + 1) * step]).digest()
        out.append(digest.hex()[:32])
    return out


def auto_name(spec: KVSpec, keys: Sequence[str]) -> str:
    """Daemon-valid name of an automatically saved prefix: spec, last chain key, block count."""
    return f"kv-{spec.key[:12]}-{keys[-1][:20]}-{len(keys)}"


# --- the store --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockRef:
    """Block `index` of KV snapshot `name` (n_blocks in all; `path` when read from a file)."""

    name: str
    index: int
    n_blocks: int
    path: str


@dataclasses.dataclass(frozen=True)
class StoredPrefix:
    name: str
    path: str
    token_ids: tuple[int, ...]
    keys: tuple[str, ...]
    labels: Mapping[str, str]


class KVStore:
    """KV snapshots of one KV spec, in thawd and/or a directory, indexed by chain key.

    Thread-safe. With a socket, thawd is the store (pinned on save; files it finds in
    `directory` that the daemon lacks are registered); without, files in `directory`.
    """

    def __init__(
        self,
        spec: KVSpec,
        socket: str | None = None,
        directory: str | None = None,
        refresh_s: float = 2.0,
    ) -> None:
        if not socket and not directory:
            raise ThawError("a KV store needs a thawd socket or a snapshot directory")
        self.spec = spec
        self.socket = socket
        self.directory = directory
        self.refresh_s = refresh_s
        self._client: Any = None
        self._lock = threading.RLock()
        self._index: dict[str, BlockRef] = {}
        self._known: dict[str, StoredPrefix] = {}
        self._refreshed = 0.0
        self._staging: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.staging_limit = 256 << 20
        # Where loads land: the engine's KV device (the connector sets it). A GPU engine's
        # loads come from thawd's pinned tier straight into its GPU memory; only host staging
        # is kept in the LRU (GPU memory outside vLLM's KV budget is not ours to hold).
        self.device = torch.device("cpu")
        if directory:
            os.makedirs(directory, exist_ok=True)

    # --- plumbing

    @property
    def client(self) -> Any:
        if self._client is None and self.socket:
            from thaw.daemon.client import connect

            self._client = connect(self.socket)
        return self._client

    def rekey(self, spec: KVSpec) -> None:
        """The engine's weights changed (`spec.weights`): forget the index of the old spec;
        the next refresh indexes the snapshots of the new one."""
        with self._lock:
            self.spec = spec
            self._index.clear()
            self._known.clear()
            self._staging.clear()
            self._refreshed = 0.0

    def path_for(self, name: str) -> str:
        return os.path.join(self.directory, f"{name}.thaw") if self.directory else ""

    def fingerprint(self, extra_labels: Mapping[str, str]) -> Fingerprint:
        labels = {**self.spec.labels(), **extra_labels}
        return Fingerprint(
            dtype=self.spec.dtype,
            model=self.spec.weights,
            engine="vllm",
            engine_version=labels.get("kv.vllm", ""),
            tp_rank=self.spec.tp_rank,
            tp_size=self.spec.tp_size,
            labels=labels,
        )

    # --- index

    def refresh(self, force: bool = False) -> None:
        """Pick up snapshots written by other engines (rate-limited unless `force`)."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._refreshed < self.refresh_s:
                return
            self._refreshed = now
            seen: dict[str, tuple[str, Mapping[str, str]]] = {}
            if self.client is not None:
                for record in self.client.list():
                    labels = dict(record.labels)
                    if labels.get("kv.spec") == self.spec.key:
                        seen[record.name] = (record.path, labels)
            if self.directory:
                self._scan_directory(seen)
            for name, (path, found) in seen.items():
                if name not in self._known:
                    with contextlib.suppress(ThawError):
                        self._add(name, path, found, self._read_token_ids(name, path, found))

    def _scan_directory(self, seen: dict[str, tuple[str, Mapping[str, str]]]) -> None:
        from thaw.format import open_snapshot

        assert self.directory is not None
        for entry in sorted(Path(self.directory).glob("*.thaw")):
            name = entry.stem
            if name in seen or name in self._known:
                continue
            try:
                labels = dict(open_snapshot(entry).fingerprint.labels)
            except (ThawError, OSError):
                continue
            if labels.get("kv.spec") != self.spec.key:
                continue
            if self.client is not None:
                # Written by an engine while the daemon was away, or its registry was lost.
                with contextlib.suppress(AlreadyExists):
                    self.client.register(entry, name, labels=labels)
            seen[name] = (str(entry), labels)

    def _read_token_ids(self, name: str, path: str, labels: Mapping[str, str]) -> list[int]:
        n = int(labels["kv.blocks"])
        ids = torch.empty(n, self.spec.block_size, dtype=torch.int64)
        if self.client is not None:
            self.client.restore_tensors({TOKEN_IDS: ids}, name, strict=False)
        else:
            from thaw.copy.restore import restore_file

            restore_file({TOKEN_IDS: ids}, path, strict=False)
        return ids.flatten().tolist()

    def _add(
        self, name: str, path: str, labels: Mapping[str, str], token_ids: Sequence[int]
    ) -> StoredPrefix:
        keys = chain_keys(self.spec.key, token_ids, self.spec.block_size)
        prefix = StoredPrefix(name, path, tuple(token_ids), tuple(keys), dict(labels))
        with self._lock:
            self._known[name] = prefix
            for i, key in enumerate(keys):
                # The first snapshot that holds a block serves it.
                self._index.setdefault(key, BlockRef(name, i, len(keys), path))
        return prefix

    def match(self, keys: Sequence[str]) -> list[BlockRef]:
        """The stored blocks of the longest stored prefix of `keys` (chained: in order)."""
        out = []
        with self._lock:
            for key in keys:
                ref = self._index.get(key)
                if ref is None:
                    break
                out.append(ref)
        return out

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self._index

    def prefix(self, name: str) -> StoredPrefix:
        with self._lock:
            if name not in self._known:
                self.refresh(force=True)
            if name not in self._known:
                raise NotFound(f"no KV-cache snapshot {name!r} for this engine's KV spec")
            return self._known[name]

    def note_saved(self, name: str, token_ids: Sequence[int], labels: Mapping[str, str]) -> None:
        """Index a prefix this engine is about to save (scheduler decides, worker writes)."""
        self._add(name, self.path_for(name), labels, token_ids)

    # --- data

    def save(
        self,
        name: str,
        blocks: torch.Tensor,
        token_ids: torch.Tensor,
        labels: Mapping[str, str],
    ) -> None:
        """Store `blocks` ([num_layers, n, *block_shape]) and their token ids as `name`."""
        tensors = {LAYERS: blocks.contiguous(), TOKEN_IDS: token_ids.to(torch.int64).contiguous()}
        fingerprint = self.fingerprint(labels)
        if self.client is not None:
            try:
                self._freeze_pinned(tensors, name, fingerprint)
            except AlreadyExists:
                log.debug("KV snapshot %s already stored", name)
        else:
            from thaw.copy.freeze import freeze_file

            path = self.path_for(name)
            if not os.path.exists(path):
                freeze_file(tensors, path, fingerprint=fingerprint)

    def _freeze_pinned(
        self, tensors: dict[str, torch.Tensor], name: str, fingerprint: Fingerprint
    ) -> None:
        """Freeze into thawd's pinned tier. When the pinned budget is full, unpin this spec's
        automatic saves, least recently used first, until the new one fits: they stay in
        the store, cold (loads read their files). Captures are never unpinned here."""
        tried: set[str] = set()
        while True:
            try:
                self.client.freeze_tensors(
                    tensors,
                    name,
                    self.path_for(name) or None,
                    fingerprint,
                    labels=fingerprint.labels,
                    pin=True,
                )
                return
            except BudgetExceeded:
                victim = self._least_recent_save(tried)
                if victim is None:
                    raise
                tried.add(victim)
                with contextlib.suppress(InvalidRequest):  # busy: restored or written now
                    self.client.unpin(victim)
                    log.info("KV snapshot %s unpinned to make room for %s", victim, name)

    def _least_recent_save(self, skip: set[str]) -> str | None:
        """The pinned automatic save of this spec used longest ago, not in use, not in `skip`."""
        candidates = [
            r
            for r in self.client.list()
            if r.labels.get("kv.spec") == self.spec.key
            and r.labels.get(AUTO_LABEL) == "1"
            and r.tier == "pinned"
            and not r.clients
            and r.name not in skip
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda r: r.last_used or r.registered).name

    def load(self, ref: BlockRef) -> dict[str, torch.Tensor]:
        """All tensors of the snapshot `ref` points into, on `device` (host memory: an LRU)."""
        return self.load_many([ref])[0]

    def load_many(self, refs: Sequence[BlockRef]) -> list[dict[str, torch.Tensor]]:
        """`load` for several snapshots: the ones not staged come from thawd in one
        `restore_many` (their control calls overlapped), or from their files."""
        out: list[dict[str, torch.Tensor] | None] = []
        with self._lock:
            for ref in refs:
                cached = self._staging.get(ref.name)
                if cached is not None:
                    self._staging.move_to_end(ref.name)
                out.append(cached)
        missing = {ref.name: ref for ref, got in zip(refs, out, strict=True) if got is None}
        fresh = {name: self._empty(ref.n_blocks) for name, ref in missing.items()}
        if fresh and self.client is not None:
            self.client.restore_many([(fresh[name], name) for name in fresh])
        else:
            from thaw.copy.restore import restore_file

            for name, tensors in fresh.items():
                restore_file(tensors, missing[name].path)
        if self.staging_limit > 0 and self.device.type == "cpu":
            with self._lock:
                for name, tensors in fresh.items():
                    self._staging[name] = tensors
                while (
                    sum(_nbytes(v) for v in self._staging.values()) > self.staging_limit
                    and len(self._staging) > 1
                ):
                    self._staging.popitem(last=False)
        return [
            got if got is not None else fresh[ref.name] for ref, got in zip(refs, out, strict=True)
        ]

    def _empty(self, n_blocks: int) -> dict[str, torch.Tensor]:
        dtype = getattr(torch, self.spec.dtype)
        spec, device = self.spec, self.device
        # Both on the engine's device: a restore into CUDA tensors only takes the direct path
        # from thawd's pool (docs/DAEMON.md).
        return {
            LAYERS: torch.empty(
                spec.num_layers, n_blocks, *spec.block_shape, dtype=dtype, device=device
            ),
            TOKEN_IDS: torch.empty(n_blocks, spec.block_size, dtype=torch.int64, device=device),
        }

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def copy_blocks(
    stored: Mapping[str, torch.Tensor],
    name: str,
    src: Sequence[int],
    dst: Sequence[int],
    token_ids: Sequence[int],
    layers: Sequence[torch.Tensor],
) -> None:
    """Copy blocks `src` of a loaded snapshot into blocks `dst` of the engine's KV `layers`
    (views with the block index first), after checking that the snapshot's blocks hold
    `token_ids`; KVMismatch, before any write, if they do not."""
    stored_tokens = stored[TOKEN_IDS]
    # The usual load is a whole snapshot, in order: its blocks go without a gather.
    whole = list(src) == list(range(stored_tokens.shape[0]))
    src_ids = None if whole else torch.tensor(src, dtype=torch.int64, device=stored_tokens.device)
    if src_ids is not None:
        stored_tokens = stored_tokens.index_select(0, src_ids)
    expected = torch.tensor(token_ids, dtype=torch.int64).view(len(src), -1)
    if not torch.equal(stored_tokens.cpu(), expected):
        raise KVMismatch(f"KV snapshot {name!r} holds other tokens than its index says")
    dst_ids = torch.tensor(dst, dtype=torch.int64, device=layers[0].device)
    for blocks, data in zip(layers, stored[LAYERS], strict=True):
        if src_ids is not None:
            data = data.index_select(0, src_ids)
        blocks.index_copy_(0, dst_ids, data.to(blocks.device))


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def read_labels(
    name: str, socket: str | None, directory: str | None
) -> tuple[Mapping[str, str], str]:
    """(labels, path) of KV snapshot `name` from thawd or the directory; NotFound otherwise."""
    if socket:
        from thaw.daemon.client import connect

        with connect(socket) as client, contextlib.suppress(NotFound):
            record = client.stat(name)
            return dict(record.labels), record.path
    if directory:
        path = os.path.join(directory, f"{name}.thaw")
        if os.path.exists(path):
            from thaw.format import open_snapshot

            return dict(open_snapshot(path).fingerprint.labels), path
    raise NotFound(f"no KV-cache snapshot named {name!r} in thawd or {directory or '(no dir)'}")
