"""The import paths users write stay valid however the insides move (docs/ARCHITECTURE.md):
the library's doors, the engines' doors and the names vLLM resolves by string."""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest


def test_the_library_doors() -> None:
    import thaw
    import thaw.client

    for name in ("freeze_file", "restore_file", "TransferStats", "fork", "open_snapshot"):
        assert callable(getattr(thaw, name)), name
    assert thaw.connect is thaw.client.connect
    assert issubclass(thaw.FingerprintMismatch, thaw.ThawError)
    assert thaw.Fingerprint().to_json()["tp_size"] == -1


def test_the_engine_doors() -> None:
    import thaw
    import thaw.kv
    import thaw.sglang
    import thaw.vllm

    for name in ("restore", "freeze", "freeze_engine", "Options", "EngineTransfer"):
        assert getattr(thaw.vllm, name) is not None, name
    for error in (thaw.vllm.SnapshotMissing, thaw.vllm.EngineBusy, thaw.vllm.ExtensionMissing):
        assert issubclass(error, thaw.ThawError)
    for name in ("kv_transfer_config", "capture", "restore", "fork"):
        assert callable(getattr(thaw.kv, name)), name
    config = thaw.kv.kv_transfer_config(socket="/run/x/thawd.sock")
    assert config["kv_connector_module_path"] == "thaw.kv.connector"
    assert config["kv_connector"] == "ThawKVConnector"
    assert thaw.sglang.ThawSGLangLoader.__name__ == "ThawSGLangLoader"


def test_names_vllm_resolves_by_string() -> None:
    pytest.importorskip("vllm")
    import thaw.vllm
    from thaw.vllm import worker

    module, _, cls = thaw.vllm.WORKER_EXTENSION.rpartition(".")
    assert getattr(importlib.import_module(module), cls) is worker.ThawWorkerExtension
    assert worker.WORKER_EXTENSION == thaw.vllm.WORKER_EXTENSION
    plugins = importlib.metadata.entry_points(group="vllm.general_plugins")
    thaw_plugin = [p for p in plugins if p.name == "thaw"]
    if thaw_plugin:  # where thaw is installed (pip install -e .)
        assert thaw_plugin[0].value == "thaw.vllm.plugin:register"
    from thaw.vllm.plugin import register

    assert callable(register)
    connector = importlib.import_module(config_module())
    assert connector.ThawKVConnector.__name__ == "ThawKVConnector"


def config_module() -> str:
    import thaw.kv

    return str(thaw.kv.kv_transfer_config(socket="/s")["kv_connector_module_path"])
