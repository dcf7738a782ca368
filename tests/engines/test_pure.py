"""The engine-independent logic of thaw.vllm and thaw.sglang (no engine, no sglang):
options, per-rank names and paths, fingerprint refusal, batching, per-rank payloads, layering."""

from __future__ import annotations

import subprocess
import sys

import pytest

from thaw import FingerprintMismatch
from thaw.engines.fingerprints import make_fingerprint, without
from thaw.engines.options import Options
from thaw.engines.ranks import rank_name, rank_path, resolve
from thaw.engines.sources import Source, SourceKind, check_before_copy, missing_message
from thaw.format.fingerprint import Fingerprint
from thaw.sglang.core import batches, fingerprint, per_rank_named_tensors


def test_rank_paths_and_names() -> None:
    assert rank_path("/s/m.thaw", 0, 1) == "/s/m.thaw"
    assert rank_path("/s/m.thaw", 1, 2) == "/s/m.rank1.thaw"
    assert rank_path("/s/m-{rank}.thaw", 1, 2) == "/s/m-1.thaw"
    assert rank_name("llama", 0, 1) == "llama"
    assert rank_name("llama", 1, 4) == "llama-rank1"
    assert rank_name("llama@{rank}", 3, 4) == "llama@3"
    ref = resolve(Options.from_config({"snapshot": "llama", "path": "/s/l.thaw"}), 1, 2)
    assert (ref.name, ref.path) == ("llama-rank1", "/s/l.rank1.thaw")
    assert resolve(Options.from_config({"snapshot": "/s/l.thaw"}), 0, 1).name == ""


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="snapshot"):
        Options.from_config({})
    with pytest.raises(ValueError, match="unknown"):
        Options.from_config({"snapshot": "x", "snapshto": 1})
    with pytest.raises(ValueError, match="daemon"):
        Options.from_config({"snapshot": "x", "daemon": "maybe"})
    with pytest.raises(ValueError, match="cannot ignore"):
        Options.from_config({"snapshot": "x", "ignore": ["colour"]})
    o = Options.from_config({"snapshot": "x", "freeze_on_miss": True, "ignore": ["model"]})
    assert Options.from_config(o.to_config()) == o


def _fp(**kw: object) -> Fingerprint:
    base: dict[str, object] = dict(
        engine="vllm",
        architecture="LlamaForCausalLM",
        dtype="float32",
        parameter_count=10,
        quantization="",
        tp_rank=0,
        tp_size=1,
        engine_version="0.32.0",
        model="tiny",
    )
    base.update(kw)
    return make_fingerprint(**base)  # type: ignore[arg-type]


def test_a_missing_snapshot_says_whether_thawd_runs() -> None:
    by_name = Options.from_config({"snapshot": "llama", "socket": "/run/x/thawd.sock"})
    ref = resolve(by_name, 0, 1)
    assert "thawd has no snapshot 'llama'" in missing_message(ref, by_name, daemon_running=True)
    stopped = missing_message(ref, by_name, daemon_running=False)
    assert "thawd is not running at /run/x/thawd.sock" in stopped
    assert "has no snapshot" not in stopped and 'no "path" to fall back to' in stopped
    never = Options.from_config({"snapshot": "llama", "daemon": "never", "path": "/s/l.thaw"})
    text = missing_message(resolve(never, 0, 1), never, daemon_running=False)
    assert "a thawd name but daemon='never'" in text and "/s/l.thaw does not exist" in text


def test_fingerprint_refusal_names_each_difference() -> None:
    engine = _fp()
    source = Source(SourceKind.FILE, path="/x", fingerprint=_fp(dtype="float16", tp_size=2))
    with pytest.raises(FingerprintMismatch) as e:
        check_before_copy(source, engine, Options.from_config({"snapshot": "/x"}))
    assert "dtype" in str(e.value) and "tp_size" in str(e.value)
    other_model = Source(SourceKind.FILE, path="/x", fingerprint=_fp(model="tiny-ft"))
    check_before_copy(
        other_model, engine, Options.from_config({"snapshot": "/x", "ignore": ["model"]})
    )
    assert without(engine, ["model", "tp_size"]).tp_size == -1
    assert engine.labels["thaw.weights"] == "vllm-pre-processing"
    sg = fingerprint(
        architecture="A",
        dtype="float16",
        parameter_count=1,
        quantization="",
        tp_rank=0,
        tp_size=1,
        engine_version="0.5.23",
        model="m",
    )
    assert sg.engine == "sglang" and sg.labels["thaw.names"] == "sglang"


def test_batches_keep_order_and_bound_size() -> None:
    named = [(f"t{i}", n) for i, n in enumerate([3, 3, 5, 1, 9, 2])]
    groups = list(batches(named, max_bytes=6, nbytes=lambda n: n))
    assert [[n for n, _ in g] for g in groups] == [["t0", "t1"], ["t2", "t3"], ["t4"], ["t5"]]
    assert [x for g in groups for x in g] == named


def test_per_rank_payload() -> None:
    r0, r1 = [("a", 1), ("b", 2)], [("a", 10), ("b", 20)]
    assert per_rank_named_tensors([r0, r1], tuple) == [("a", (1, 10)), ("b", (2, 20))]
    with pytest.raises(ValueError, match="rank 1"):
        per_rank_named_tensors([r0, [("a", 1), ("c", 2)]], tuple)


def test_importing_integrations_imports_no_engine() -> None:
    code = (
        "import sys, thaw, thaw.vllm, thaw.sglang, thaw.client;"
        "bad=[m for m in ('vllm','sglang','torch','thawd','thawctl') if m in sys.modules];"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_sglang_loader_needs_sglang() -> None:
    from thaw.sglang.loader import ThawSGLangLoader

    class LoadConfig:
        model_loader_extra_config = {"snapshot": "x"}

    loader = ThawSGLangLoader(LoadConfig())
    assert loader.options.snapshot == "x"
    with pytest.raises(ImportError):
        loader.load_model(model_config=None, device_config=None)
