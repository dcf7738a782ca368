"""`ThawKVConnector`: vLLM KV connector backed by thawd, keyed by token ids.

    LLM(model=..., kv_transfer_config=thaw.kv.kv_transfer_config(socket=..., snapshot_dir=...))

Scheduler side (engine-core process): answers `get_num_new_matched_tokens` from an index of
stored prefixes (chain keys over token ids, thaw/kv/store.py), tells the worker which stored
blocks go into which allocated block ids, and, on the step that finishes a prompt's prefill,
which full blocks to save. Worker side: loads blocks (from thawd's pinned tier, or the file)
into the engine's KV tensors before the forward; saves blocks after it.

KV belongs to the weights that computed it (thaw/engines/weights.py). The chain keys start from
the engine's weights identity: derived from its config at start, unknown after a connector
reset (`reset_prefix_cache(reset_connector=True)`, which thaw.vllm.restore calls after every
in-place restore) until the workers report what they hold, which they do every step. While
it is unknown nothing is matched or saved. A worker whose own identity differs from what
the scheduler keyed a step with refuses that step's loads (vLLM recomputes them) and saves.

Per-request options go in `SamplingParams(extra_args={"kv_transfer_params": {...}})`:
`thaw_capture: name` saves the prompt's full blocks under that name even if already stored;
`thaw_refresh: true` re-reads the store's index before matching.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from thaw.engines import weights
from thaw.engines.ranks import kv_rank_name
from thaw.errors import KVMismatch
from thaw.kv.store import (
    AUTO_LABEL,
    KVStore,
    auto_name,
    chain_keys,
    copy_blocks,
    engine_labels,
    spec_from_vllm_config,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("thaw.kv")


@dataclasses.dataclass
class LoadItem:
    """Copy stored blocks `src` of snapshot `name` into engine blocks `dst`."""

    req_id: str
    name: str
    path: str
    n_blocks: int
    src: list[int]
    dst: list[int]
    token_ids: list[int]  # expected tokens of those blocks, checked against the stored ones


@dataclasses.dataclass
class SaveItem:
    """Store engine blocks `block_ids` (the prompt's full blocks) as snapshot `name`."""

    req_id: str
    name: str
    block_ids: list[int]
    token_ids: list[int]
    labels: dict[str, str]


@dataclasses.dataclass
class ThawKVMetadata(KVConnectorMetadata):
    loads: list[LoadItem] = dataclasses.field(default_factory=list)
    saves: list[SaveItem] = dataclasses.field(default_factory=list)
    # The weights each rank held when the scheduler keyed this step's loads and saves.
    weights: dict[int, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ThawKVWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, every step: the weights each rank holds (where a thaw load or
    restore set them), merged over the ranks."""

    weights: dict[int, str] = dataclasses.field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        merged = dict(self.weights)
        merged.update(getattr(other, "weights", {}))
        return ThawKVWorkerMetadata(merged)


@dataclasses.dataclass
class _ReqState:
    prompt: list[int]
    block_ids: list[int]
    capture: str | None
    saved: bool = False


class ThawKVConnector(KVConnectorBase_V1):
    """KV connector whose store is thawd (pinned tier + snapshot files), keyed by token ids."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        # The scheduler keys KV by the weights the engine was configured to load; a worker's
        # spec is re-keyed by each step's metadata (only the scheduler knows every rank).
        self.weights: dict[int, str] | None = (
            weights.from_vllm_config(vllm_config) if role == KVConnectorRole.SCHEDULER else None
        )
        self.spec = spec_from_vllm_config(vllm_config, _identity(self.weights))
        self.block_size = self.spec.block_size
        self.store = KVStore(
            self.spec,
            socket=extra.get("socket") or None,
            directory=extra.get("snapshot_dir") or None,
            refresh_s=float(extra.get("refresh_s", 2.0)),
        )
        # Stored snapshots kept in the worker's memory after a load (0: every load from thawd).
        self.store.staging_limit = int(extra.get("staging_bytes", 256 << 20))
        self.save_prompts = bool(extra.get("save", True))
        self.engine_labels = engine_labels(vllm_config)
        # scheduler side
        self._matches: dict[str, tuple[int, list[Any]]] = {}
        self._loads: list[LoadItem] = []
        self._reqs: dict[str, _ReqState] = {}
        # worker side
        self._layers: list[torch.Tensor] = []
        self._load_errors: set[int] = set()
        if role == KVConnectorRole.SCHEDULER:
            try:
                self.store.refresh(force=True)
            except Exception as e:  # a missing daemon must not stop the engine: it only misses
                log.warning("thaw KV store not reachable at start: %s", e)

    # --- worker side ----------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        layers = [kv_caches[n] for n in names]
        if len(layers) != self.spec.num_layers:
            raise KVMismatch(
                f"engine has {len(layers)} KV layers, its config says {self.spec.num_layers}"
            )
        dtype = str(layers[0].dtype).removeprefix("torch.")
        block_shape = tuple(self._blocks(layers[0]).shape[1:])
        if dtype != self.spec.dtype or block_shape != self.spec.block_shape:
            raise KVMismatch(
                f"thaw KV connector: the engine's KV tensors are {dtype} blocks of "
                f"{list(block_shape)}, expected {self.spec.dtype} {list(self.spec.block_shape)} "
                f"for layout {self.spec.layout}; this vLLM build's KV layout is not supported"
            )
        self._layers = layers
        self.store.device = layers[0].device  # loads land beside the KV cache

    def _blocks(self, layer: torch.Tensor) -> torch.Tensor:
        """View of one layer's KV with the block index first."""
        return layer if self.spec.layout.startswith("cpu") else layer.transpose(0, 1)

    def _agrees(self, meta: ThawKVMetadata) -> bool:
        """Whether this rank holds the weights the scheduler keyed `meta` with (a rank whose
        weights no thaw load or restore set trusts the scheduler's key). Re-keys this rank's
        store to them."""
        mine = weights.current()
        keyed = meta.weights.get(self.spec.tp_rank)
        if mine is not None and keyed != mine:
            if meta.loads or meta.saves:
                log.warning(
                    "thaw KV: this rank holds weights %s, the step was keyed for %s: "
                    "its KV loads and saves are skipped",
                    mine,
                    keyed,
                )
            return False
        identity = _identity(meta.weights)
        if identity != self.spec.weights:
            self.spec = dataclasses.replace(self.spec, weights=identity)
            self.store.rekey(self.spec)
        return True

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        from thaw.kv.store import BlockRef

        meta = self._get_connector_metadata()
        assert isinstance(meta, ThawKVMetadata)
        if not self._agrees(meta):
            for item in meta.loads:  # vLLM recomputes what was to be loaded
                self._load_errors.update(item.dst)
            return
        # The scheduler names rank 0's snapshot; every other rank loads its own shard.
        refs = []
        for item in meta.loads:
            name = kv_rank_name(item.name, self.spec.tp_rank)
            path = item.path if name == item.name else self.store.path_for(name)
            refs.append(BlockRef(name, 0, item.n_blocks, path))
        staged: list[dict[str, torch.Tensor] | None] = [None] * len(refs)
        if len(refs) > 1:  # the step's loads in one restore_many; one by one if that fails
            try:
                staged = list(self.store.load_many(refs))
            except Exception as e:
                log.warning(
                    "thaw KV: loading %d prefixes together failed (%s); one by one", len(refs), e
                )
        for item, ref, stored in zip(meta.loads, refs, staged, strict=True):
            try:
                self._load(item, stored if stored is not None else self.store.load(ref))
            except Exception as e:
                log.error("thaw KV load of %s for request %s failed: %s", item.name, item.req_id, e)
                self._load_errors.update(item.dst)

    def _load(self, item: LoadItem, stored: dict[str, torch.Tensor]) -> None:
        copy_blocks(
            stored,
            item.name,
            item.src,
            item.dst,
            item.token_ids,
            [self._blocks(layer) for layer in self._layers],
        )

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous in start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # whole blocks are saved after the forward, in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, ThawKVMetadata) or not self._agrees(meta):
            return
        for item in meta.saves:
            try:
                # Gathered where the cache is, into one tensor: thawd takes a GPU engine's
                # blocks by DMA.
                device = self._layers[0].device
                ids = torch.tensor(item.block_ids, dtype=torch.int64, device=device)
                first = self._blocks(self._layers[0])
                blocks = first.new_empty(len(self._layers), len(ids), *first.shape[1:])
                for layer, out in zip(self._layers, blocks, strict=True):
                    torch.index_select(self._blocks(layer), 0, ids, out=out)
                tokens = torch.tensor(item.token_ids, dtype=torch.int64, device=device)
                tokens = tokens.view(len(ids), -1)
                name = kv_rank_name(item.name, self.spec.tp_rank)
                self.store.save(name, blocks, tokens, item.labels)
            except Exception as e:  # the engine serves on; this prefix is just not stored
                log.error("thaw KV save of %s failed: %s", item.name, e)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        mine = weights.current()
        return ThawKVWorkerMetadata({self.spec.tp_rank: mine}) if mine else None

    # --- scheduler side -------------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        if _has_extra_keys(request) or self.weights is None:
            return 0, False  # unknown weights share no KV
        prompt = list(request.prompt_token_ids or [])
        # The last prompt token is always computed (vLLM needs its logits): at most
        # (len - 1) // block_size full blocks can come from the store.
        max_blocks = (len(prompt) - 1) // self.block_size
        if max_blocks * self.block_size <= num_computed_tokens:
            return 0, False
        try:
            self.store.refresh(force=bool(params.get("thaw_refresh")))
        except Exception as e:
            log.warning("thaw KV store refresh failed: %s", e)
        keys = chain_keys(self.spec.key, prompt, self.block_size, max_blocks)
        refs = self.store.match(keys)
        matched = len(refs) * self.block_size
        if matched <= num_computed_tokens:
            return 0, False
        self._matches[request.request_id] = (num_computed_tokens, refs)
        return matched - num_computed_tokens, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        params = request.kv_transfer_params or {}
        if _has_extra_keys(request):
            self._reqs.setdefault(request.request_id, _ReqState([], [], None, saved=True))
            return
        self._reqs.setdefault(
            request.request_id,
            _ReqState(list(request.prompt_token_ids or []), [], params.get("thaw_capture")),
        )
        match = self._matches.pop(request.request_id, None)
        if num_external_tokens <= 0 or match is None:
            return
        local, refs = match
        block_ids = blocks.get_block_ids()[0]
        first = local // self.block_size
        last = first + num_external_tokens // self.block_size
        prompt = self._reqs[request.request_id].prompt
        by_name: dict[str, LoadItem] = {}
        for i in range(first, last):
            ref = refs[i]
            item = by_name.get(ref.name)
            if item is None:
                item = by_name[ref.name] = LoadItem(
                    request.request_id, ref.name, ref.path, ref.n_blocks, [], [], []
                )
            item.src.append(ref.index)
            item.dst.append(block_ids[i])
            item.token_ids.extend(prompt[i * self.block_size : (i + 1) * self.block_size])
        self._loads.extend(by_name.values())

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = ThawKVMetadata(loads=self._loads, weights=dict(self.weights or {}))
        self._loads = []
        progress: list[tuple[str, int]] = []
        for new in scheduler_output.scheduled_new_reqs:
            state = self._reqs.setdefault(
                new.req_id, _ReqState(list(new.prompt_token_ids or []), [], None)
            )
            state.block_ids = list(new.block_ids[0])
            progress.append((new.req_id, new.num_computed_tokens))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            known = self._reqs.get(req_id)
            if known is None:
                continue
            state = known
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:
                    state.block_ids = list(new_ids[0])
                else:
                    state.block_ids.extend(new_ids[0])
            progress.append((req_id, cached.num_computed_tokens[i]))
        for req_id, computed in progress:
            state = self._reqs[req_id]
            end = computed + scheduler_output.num_scheduled_tokens.get(req_id, 0)
            if not state.saved and computed < len(state.prompt) <= end:
                state.saved = True  # this step finishes the prompt's prefill
                item = self._save_item(req_id, state)
                if item is not None:
                    meta.saves.append(item)
        return meta

    def _save_item(self, req_id: str, state: _ReqState) -> SaveItem | None:
        if not (self.save_prompts or state.capture) or self.weights is None:
            return None
        n = len(state.prompt) // self.block_size
        if n == 0:
            return None
        keys = chain_keys(self.spec.key, state.prompt, self.block_size)
        if state.capture is None and self.store.has(keys[-1]):
            return None  # already stored (or loaded from the store)
        name = state.capture or auto_name(self.spec, keys)
        tokens = state.prompt[: n * self.block_size]
        labels = {
            **self.engine_labels,
            "kv.blocks": str(n),
            "kv.tokens": str(len(tokens)),
            "kv.chain": keys[-1],
        }
        if state.capture is None:
            labels[AUTO_LABEL] = "1"  # may be unpinned for room (KVStore._freeze_pinned)
        self.store.note_saved(name, tokens, {**self.spec.labels(), **labels})
        return SaveItem(req_id, name, state.block_ids[:n], tokens, labels)

    def reset_cache(self) -> bool:
        """The engine's weights may have changed (an in-place restore): nothing is matched or
        saved until the workers report what they hold (`update_connector_output`)."""
        self._set_weights(None)
        return True

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        reported = connector_output.kv_connector_worker_meta
        if not isinstance(reported, ThawKVWorkerMetadata):
            return
        if len(reported.weights) == self.spec.tp_size and reported.weights != self.weights:
            self._set_weights(reported.weights)

    def _set_weights(self, parts: dict[int, str] | None) -> None:
        if parts != self.weights:
            log.info("thaw KV: the engine's weights are now %s", _identity(parts) or "unknown")
        self.weights = dict(parts) if parts is not None else None
        self.spec = dataclasses.replace(self.spec, weights=_identity(parts))
        self.store.rekey(self.spec)
        self._matches.clear()

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        self._matches.pop(request.request_id, None)
        return False, None

    def shutdown(self) -> None:
        self.store.close()


def _identity(parts: dict[int, str] | None) -> str:
    return weights.combine(parts) if parts else ""


def _has_extra_keys(request: Request) -> bool:
    """Multimodal inputs, LoRA and cache salts change what a block means beyond its token ids
    (vLLM puts them in the block hash's extra keys); such requests neither load nor save."""
    return bool(
        getattr(request, "mm_features", None)
        or getattr(request, "lora_request", None)
        or getattr(request, "cache_salt", None)
    )
