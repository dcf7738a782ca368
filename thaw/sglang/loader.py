"""`load_format=ThawSGLangLoader`: SGLang's get_model_loader instantiates a class passed as
load_format with the LoadConfig and calls `load_model(model_config=, device_config=)`.
NOT RUN against a real SGLang (docs/ENGINES.md)."""

from __future__ import annotations

import time
from typing import Any

from thaw.engines.options import Options
from thaw.engines.ranks import resolve


class ThawSGLangLoader:
    """Fills a freshly built SGLang model from per-rank, SGLang-named, pre-processing weights
    (thawd or file), then runs each layer's quant_method.process_weights_after_loading as
    SGLang's DefaultModelLoader does. freeze_on_miss loads the checkpoint, freezes, then
    processes."""

    def __init__(self, load_config: Any) -> None:
        self.load_config = load_config
        self.options = Options.from_config(getattr(load_config, "model_loader_extra_config", {}))

    def download_model(self, model_config: Any) -> None:
        from sglang.srt.model_loader.loader import DefaultModelLoader

        DefaultModelLoader(self._default_config()).download_model(model_config)

    def _default_config(self) -> Any:
        import dataclasses

        return dataclasses.replace(
            self.load_config, load_format="auto", model_loader_extra_config={}
        )

    def load_model(self, *, model_config: Any, device_config: Any, **_: Any) -> Any:
        import sglang
        import torch
        from sglang.srt.distributed import (
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )
        from sglang.srt.model_loader.loader import DefaultModelLoader, _initialize_model
        from sglang.srt.model_loader.utils import set_default_torch_dtype

        from thaw.copy.binding import model_tensors
        from thaw.engines.fingerprints import model_name
        from thaw.engines.sources import SourceKind, locate
        from thaw.engines.transfer import read_rank, write_rank
        from thaw.format.dtypes import dtype_name
        from thaw.sglang.core import fingerprint

        started = time.perf_counter()
        device = torch.device(device_config.device)
        with set_default_torch_dtype(model_config.dtype), device:
            model = _initialize_model(model_config, self.load_config)
        rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        named = model_tensors(list(model.named_parameters()))
        expect = fingerprint(
            architecture=(model_config.hf_config.architectures or [""])[0],
            dtype=dtype_name(model_config.dtype),
            parameter_count=sum(t.numel() for _, t in named),
            quantization=model_config.quantization or "",
            tp_rank=rank,
            tp_size=size,
            engine_version=sglang.__version__,
            model=model_name(model_config.model_path),
            labels=dict(self.options.labels),
        )
        ref = resolve(self.options, rank, size)
        source, client = locate(ref, self.options)
        default = DefaultModelLoader(self._default_config())
        if source.kind == SourceKind.MISSING and self.options.freeze_on_miss:
            model.load_weights(
                default._get_weights_iterator(
                    DefaultModelLoader.Source.init_new(model_config, model)
                )
            )
            write_rank(named, ref, self.options, expect, rank, source_kind="checkpoint")
        else:
            read_rank(named, ref, self.options, expect, rank, source, client)
        for module in model.modules():
            quant_method = getattr(module, "quant_method", None)
            if quant_method is not None and hasattr(quant_method, "process_weights_after_loading"):
                quant_method.process_weights_after_loading(module)
        self.load_seconds = time.perf_counter() - started
        return model.eval()
