"""What runs next to a vLLM model (in the worker process): its fingerprint, its pre-processing
parameter layout, an in-place reload of per-rank vLLM-named tensors through vLLM's layerwise
reload, and a pre-processing copy of its weights for freezing.

vLLM 0.32 internals used here (docs/ENGINES.md lists them with the reasons):
`model_loader.reload.layerwise` (LAYERWISE_INFO, initialize/finalize_layerwise_reload,
make_online_process_loader), `reload.meta.SKIP_LOAD_TENSORS`, `reload.utils.get_layer_tensors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from thaw.engines.fingerprints import make_fingerprint, model_name
from thaw.format.dtypes import dtype_name
from thaw.format.fingerprint import Fingerprint

SKELETON_PREFIX = "thaw_skeleton"


def tp_rank_size(vllm_config: Any) -> tuple[int, int]:
    from vllm.distributed import get_tensor_model_parallel_rank

    pc = vllm_config.parallel_config
    if getattr(pc, "pipeline_parallel_size", 1) != 1:
        raise NotImplementedError("thaw snapshots of pipeline-parallel vLLM engines: not yet")
    return get_tensor_model_parallel_rank(), pc.tensor_parallel_size


def fingerprint(
    vllm_config: Any,
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    labels: dict[str, str] | None = None,
) -> Fingerprint:
    """The fingerprint of this rank of this engine (what its snapshot must match)."""
    import vllm

    mc = vllm_config.model_config
    rank, size = tp_rank_size(vllm_config)
    architectures = (
        getattr(mc, "architectures", None) or getattr(mc.hf_config, "architectures", None) or [""]
    )
    count = 0
    for shape, _ in specs.values():
        n = 1
        for d in shape:
            n *= d
        count += n
    return make_fingerprint(
        engine="vllm",
        architecture=architectures[0],
        dtype=dtype_name(mc.dtype),
        parameter_count=count,
        quantization=mc.quantization or "",
        tp_rank=rank,
        tp_size=size,
        engine_version=vllm.__version__,
        model=model_name(mc.model),
        labels=labels or {},
    )


def parameters(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's parameters as (vLLM name, tensor), shared ones once: what a snapshot holds."""
    from thaw.copy.binding import model_tensors

    return model_tensors(list(model.named_parameters()))


def preprocessing_specs(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The parameter layout the model had before process_weights_after_loading, read from the
    metadata vLLM records at model creation for in-place reloads (on CPU the processed linear
    weights are empty: their layout survives only there)."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
    from vllm.model_executor.model_loader.reload.meta import SKIP_TENSORS

    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    seen: set[int] = set()
    for mname, module in model.named_modules():
        info = LAYERWISE_INFO.get(module)
        recorded = info.restore_metadata[0] if info is not None else {}
        for pname, live in module._parameters.items():
            if live is None or id(live) in seen:
                continue
            seen.add(id(live))
            name = f"{mname}.{pname}" if mname else pname
            meta = recorded.get(pname)
            if meta is not None and pname not in SKIP_TENSORS:
                specs[name] = (tuple(meta.shape), meta.dtype)
            else:
                specs[name] = (tuple(live.shape), live.dtype)
    return specs


def is_packed(model: torch.nn.Module, specs: dict[str, Any]) -> bool:
    """True where a live parameter no longer has its pre-processing shape (CPU oneDNN packing
    leaves empty weights; quantization kernels repack)."""
    live = dict(model.named_parameters())
    return any(
        name not in live or tuple(live[name].shape) != shape for name, (shape, _) in specs.items()
    )


def empty_like_specs(
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device
) -> list[tuple[str, torch.Tensor]]:
    return [(n, torch.empty(shape, dtype=dt, device=device)) for n, (shape, dt) in specs.items()]


@torch.no_grad()
def reload_in_place(
    vllm_config: Any, model: torch.nn.Module, tensors: list[tuple[str, torch.Tensor]]
) -> None:
    """Load per-rank, vLLM-named, pre-processing tensors into a live model and re-process them.

    vLLM's layerwise reload puts each layer back in its pre-processing layout (on meta),
    buffers what the weight loaders receive, and once a layer has all of it materializes the
    layer, replays the loads, runs process_weights_after_loading (on CPU: oneDNN packing) and
    copies the result into the original kernel tensors. Its own entry point feeds checkpoint
    (HF) names through model.load_weights, whose loaders shard for this rank; our tensors are
    already this rank's shard under vLLM's names, so each layer's loaders are swapped for a
    plain copy before the tensors go in. Each rank thus loads only its own shard.
    """
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.inplace import get_parameter_for_reload
    from vllm.model_executor.model_loader.reload.layerwise import (
        finalize_layerwise_reload,
        initialize_layerwise_reload,
        make_online_process_loader,
    )
    from vllm.model_executor.model_loader.reload.meta import SKIP_LOAD_TENSORS
    from vllm.model_executor.model_loader.reload.utils import get_layer_tensors
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    live_loaders: list[
        tuple[Any, Any]
    ] = []  # (tensor, loader) of live (non-meta) tensors whose loader we replace
    with set_current_vllm_config(vllm_config):
        initialize_layerwise_reload(model)
        for layer in model.modules():
            tensor: Any
            for name, tensor in get_layer_tensors(layer).items():
                if name in SKIP_LOAD_TENSORS:
                    continue
                if not tensor.is_meta:
                    live_loaders.append((tensor, getattr(tensor, "weight_loader", None)))
                tensor.weight_loader = default_weight_loader
                tensor.weight_loader = make_online_process_loader(layer, name)
        try:
            for name, value in tensors:
                param: Any = get_parameter_for_reload(model, name)
                param.weight_loader(param, value)
        finally:
            finalize_layerwise_reload(model, vllm_config.model_config)
            for live, loader in live_loaders:
                if loader is None:
                    with contextlib.suppress(AttributeError):
                        del live.weight_loader
                else:
                    live.weight_loader = loader


@contextlib.contextmanager
def skeleton(vllm_config: Any, device: torch.device) -> Iterator[torch.nn.Module]:
    """A second, unprocessed copy of the model (same TP shard) loaded from its checkpoint by
    vLLM's default loader: the pre-processing weights of an engine whose live ones are packed.
    Its attention layers get their own prefix (vLLM refuses duplicate layer names) and are
    unregistered afterwards."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    mc = vllm_config.model_config
    context = vllm_config.compilation_config.static_forward_context
    before = set(context)
    try:
        with set_current_vllm_config(vllm_config), set_default_torch_dtype(mc.dtype), device:
            model = initialize_model(
                vllm_config=vllm_config, model_config=mc, prefix=SKELETON_PREFIX
            )
        load_config = dataclasses.replace(
            vllm_config.load_config, load_format="auto", model_loader_extra_config={}
        )
        with set_current_vllm_config(vllm_config):
            DefaultModelLoader(load_config).load_weights(model, mc)
        yield model
    finally:
        for key in set(context) - before:
            context.pop(key, None)
