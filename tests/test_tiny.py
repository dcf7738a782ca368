"""The embedded tiny model: determinism, directory round trip, tokenizer, vLLM parity."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from thaw.demo import tiny

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The river town woke slowly on cold mornings."

# Head sizes vLLM 0.32's CPU attention accepts (vllm/v1/attention/backends/cpu_attn.py).
VLLM_CPU_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny.build_model(seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.write_model_dir(tmp_path_factory.mktemp("tiny") / "m0", seed=0)


def _fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_config_shape_fits_vllm_cpu_and_is_small(model: Any) -> None:
    cfg = tiny.TINY_CONFIG
    assert cfg["hidden_size"] == cfg["num_attention_heads"] * cfg["head_dim"]
    assert cfg["head_dim"] in VLLM_CPU_HEAD_SIZES
    assert cfg["max_position_embeddings"] >= 2048
    assert cfg["tie_word_embeddings"] is False
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert not model.training
    assert model.dtype == torch.float32


def test_build_model_is_deterministic(model: Any) -> None:
    again = tiny.build_model(seed=0)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    other = tiny.build_model(seed=1).state_dict()
    for name in a:  # every tensor depends on the seed, norms included
        assert not torch.equal(a[name], other[name]), name


def test_build_model_leaves_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    tiny.build_model(seed=0)
    assert torch.equal(torch.rand(4), expected)


def test_build_model_dtype() -> None:
    m = tiny.build_model(seed=0, dtype="float16")
    assert all(p.dtype == torch.float16 for p in m.parameters())


def test_same_weights_and_tokenizer_in_another_process(model: Any, tokenizer: Any) -> None:
    # Another interpreter with another str-hash seed builds the same bytes.
    code = textwrap.dedent(
        """
        import hashlib, sys
        from thaw.demo import tiny
        sys.path.insert(0, sys.argv[1])
        from test_tiny import _fingerprint
        tok = tiny.build_tokenizer().backend_tokenizer.to_str()
        weights = _fingerprint(tiny.build_model(0).state_dict())
        print(hashlib.sha256(tok.encode()).hexdigest(), weights)
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": _pythonpath()}
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.split()
    tok_hash = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    assert out[-2:] == [tok_hash, _fingerprint(model.state_dict())]


def test_tokenizer_round_trip(tokenizer: Any) -> None:
    assert len(tokenizer) == tiny.TINY_CONFIG["vocab_size"]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id) == (tiny.UNK_ID, tiny.BOS_ID)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (tiny.EOS_ID, tiny.PAD_ID)
    for text in [PROMPT, "Numbers: 10,482 letters; 2.8 meters.", "naïve café — 東京 🚀"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tiny.BOS_ID
        assert tiny.UNK_ID not in ids  # byte-level: nothing is unknown
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # BPE merges learned from the corpus: common words are single tokens.
    assert len(tokenizer(" the", add_special_tokens=False)["input_ids"]) == 1


def test_tokenizer_is_deterministic(tokenizer: Any) -> None:
    again = tiny.build_tokenizer()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_make_prompt_has_exact_length(tokenizer: Any) -> None:
    for n in (2, 17, 1000):
        p = tiny.make_prompt(tokenizer, n, seed=3)
        assert len(tokenizer(p)["input_ids"]) == n
        assert tiny.make_prompt(tokenizer, n, seed=3) == p
    assert tiny.make_prompt(tokenizer, 100, seed=1) != tiny.make_prompt(tokenizer, 100, seed=2)


def test_generate_greedy_is_deterministic_and_ignores_eos(model: Any, tokenizer: Any) -> None:
    a = tiny.generate_greedy(model, tokenizer, PROMPT, max_new_tokens=24)
    assert len(a) == 24
    assert a == tiny.generate_greedy(model, tokenizer, PROMPT, max_new_tokens=24)
    assert len(set(a)) > 4  # not a degenerate repeat of one token
    assert a != tiny.generate_greedy(tiny.build_model(seed=1), tokenizer, PROMPT, 24)


def test_model_dir_round_trip(model_dir: Any, model: Any, tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in model_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "thaw_tiny.json",
    } <= names
    cfg = json.loads((model_dir / "config.json").read_text())
    for key in (
        "hidden_size",
        "head_dim",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "rope_theta",
    ):
        assert cfg[key] == tiny.TINY_CONFIG[key], key
    assert cfg["torch_dtype"] == "float32"

    loaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert _fingerprint(loaded.state_dict()) == _fingerprint(model.state_dict())
    loaded_tok = AutoTokenizer.from_pretrained(model_dir)
    assert loaded_tok(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]
    assert loaded_tok.eos_token_id == tiny.EOS_ID
    assert tiny.generate_greedy(loaded, loaded_tok, PROMPT, 16) == tiny.generate_greedy(
        model, tokenizer, PROMPT, 16
    )


def test_write_model_dir_is_idempotent_and_leaves_no_temp(model_dir: Any) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    assert tiny.write_model_dir(model_dir, seed=0) == model_dir
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before
    assert [p.name for p in model_dir.parent.iterdir()] == [model_dir.name]
    with pytest.raises(FileExistsError):
        tiny.write_model_dir(model_dir, seed=1)


def test_write_model_dir_cli(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "thaw.demo.tiny", str(tmp_path / "m"), "--seed", "2"],
        env={**os.environ, "PYTHONPATH": _pythonpath()},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert Path(out.stdout.strip()) == tmp_path / "m"
    assert json.loads((tmp_path / "m" / "thaw_tiny.json").read_text())["seed"] == 2


def _pythonpath() -> str:
    return os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)


# vLLM spawns its engine and worker processes, so the engine runs in a script of its own.
_VLLM_PARITY = """
import json, sys, time
from pathlib import Path

def main():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from thaw.demo import tiny

    path = tiny.write_model_dir(Path(sys.argv[1]))
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = ["The river town woke", "Hello world", tiny.make_prompt(tok, 1000, seed=3)]
    expected = [tiny.generate_greedy(hf, tok, p, 32) for p in prompts]
    t0 = time.perf_counter()
    # On CPU gpu_memory_utilization is a fraction of host RAM for the whole worker; an explicit
    # KV size is smaller and also skips the warm-up pass (vllm/v1/worker/cpu_worker.py).
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=2048,
              kv_cache_memory_bytes=64 << 20, seed=0)
    init_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp)]
    again = llm.generate(prompts[2:], sp)[0]
    print("RESULT " + json.dumps({
        "init_s": init_s, "expected": expected, "got": got,
        "cached": again.num_cached_tokens, "again": list(again.outputs[0].token_ids)}))

if __name__ == "__main__":
    main()
"""


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")
def test_vllm_greedy_matches_transformers(tmp_path: Path) -> None:
    script = tmp_path / "parity.py"
    script.write_text(_VLLM_PARITY)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "m0")],
        env={**os.environ, "PYTHONPATH": _pythonpath()},
        capture_output=True,
        text=True,
        timeout=540,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    res = json.loads(lines[-1].removeprefix("RESULT "))
    assert res["got"] == res["expected"]
    # The 1000-token prompt's full 128-token blocks (7 of them) hit the prefix cache.
    assert res["cached"] == 896
    assert res["again"] == res["expected"][2]
