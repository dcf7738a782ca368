"""The embedded default model: a tiny Llama built locally, deterministically, with no download.

Tests, demos and CI need a real Hugging Face model directory that vLLM (CPU build) and
transformers both load, without network access. This module makes one from nothing:

- `TINY_CONFIG`: a `transformers.LlamaConfig`-compatible dict (about 1.4 M parameters).
- `build_tokenizer()`: a byte-level BPE tokenizer trained on a text embedded in this module.
- `build_model(seed)`: a `LlamaForCausalLM` whose weights are a pure function of `seed`.
- `write_model_dir(path, seed)`: an HF directory (config, generation config, tokenizer,
  `model.safetensors`) written atomically; `vllm.LLM(model=path)` loads it.
- `generate_greedy(...)`, `make_prompt(...)`: helpers for demos and tests.

Sizes are chosen for vLLM's CPU attention backend, which accepts head sizes
32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512 only
(vllm/v1/attention/backends/cpu_attn.py, `get_supported_head_sizes`): hence head_dim 64.

transformers and tokenizers are imported lazily (the `tiny` extra), so `import thaw.demo.tiny` is
cheap and `TINY_CONFIG` is usable without them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

__all__ = [
    "SPECIAL_TOKENS",
    "TINY_CONFIG",
    "TINY_CORPUS",
    "build_model",
    "build_tokenizer",
    "generate_greedy",
    "make_prompt",
    "write_model_dir",
]

# Bump when anything that changes the bytes of a written directory changes (corpus, config,
# weight recipe): write_model_dir() refuses to reuse a directory stamped with another version.
TINY_FORMAT_VERSION = 1

VOCAB_SIZE = 512

# Llama's convention: <unk>=0, <s>=1, </s>=2; <pad> follows. The trainer assigns ids to special
# tokens first, in this order.
SPECIAL_TOKENS: dict[str, str] = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
}
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    # head_dim 64: the smallest common size vLLM's CPU backend accepts (16 is rejected).
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": VOCAB_SIZE,
    # KV-cache tests use prompts of about 1k tokens.
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "torch_dtype": "float32",
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
    "use_cache": True,
}

# Standard deviation of the random linear/embedding weights. Larger than initializer_range
# on purpose: logits then spread by several units, so greedy decoding has clear winners and
# vLLM's kernels and transformers' pick the same tokens, and different seeds give visibly
# different text (a restore of the wrong weights shows).
_WEIGHT_STD = 0.25
# Norm weights are 1 + N(0, _NORM_STD) rather than all ones, so a tensor left un-restored
# changes the output.
_NORM_STD = 0.1

# Training text for the tokenizer and the word source of make_prompt(). Original prose; any
# change here changes token ids, so bump TINY_FORMAT_VERSION with it.
TINY_CORPUS = """\
The river town woke slowly on cold mornings. Before the sun cleared the eastern hills, the
baker had already lit the ovens, and the smell of bread drifted down the narrow streets toward
the water. Fishermen checked their nets by lantern light, counting the knots and mending the
holes that the night had made. A dog barked twice and then thought better of it.

In the square, the clock on the old hall struck six. Nobody trusted it; it ran four minutes
fast in summer and seven minutes slow in winter, and the town had long ago decided that this
was a kind of weather rather than a fault. Children learned to add or subtract the difference
before they learned to read the hands.

The school stood at the top of the hill, a long stone building with tall windows and a roof
that leaked in three known places. The teacher, a patient woman named Ada, kept a bucket under
each leak and a map of the leaks on her desk. When a fourth appeared one spring, she added it to
the map, bought a fourth bucket, and used the whole affair as a lesson in measurement: how much
water, how fast, and whether the rate changed with the wind.

Numbers were everywhere in that town. The harbor master recorded the tide at every hour: 1.2
meters, 2.8 meters, 3.5 meters, then falling again to 0.9. The grocer wrote prices on a slate
board, 12 cents for an apple, 45 for a loaf, 230 for a wheel of cheese. The post office kept a
ledger of letters in and letters out, and every year in December the clerk totaled the columns
and pinned the result to the door: 10,482 letters received, 9,716 sent, a deficit the town
took personally.

Travelers came by the morning train and left by the evening one. Some stayed a night at the inn
by the bridge, where the rooms were small and the breakfasts were large. The innkeeper asked
every guest the same three questions: where they had come from, where they were going, and
whether they had seen the comet. The comet had passed eleven years earlier. He was still
collecting answers.

Computers arrived late and were received with suspicion. The first one sat in the library for a
month before anyone turned it on. When they did, it printed a single line, HELLO WORLD, and the
librarian unplugged it at once, on the grounds that it had not been introduced. Later machines
fared better. The bank used one to keep its accounts; the school used another to teach the
children how a program is a list of small steps, each one simple, that together do something no
single step could do.

A program, Ada told them, is like a recipe, except that the cook never guesses. If the recipe
says to stir forty times, the cook stirs forty times, even if the soup is burning. So the person
who writes the recipe must think of everything: what happens if the pot is empty, if the fire is
out, if the salt jar holds sugar by mistake. She wrote on the board: read the input, check it,
compute the result, write the output, and stop. Then she asked them what should happen if the
input never arrives. Nobody knew. That, she said, is the interesting part.

The children wrote small programs of their own. One counted the boats in the harbor from a list
of names. Another converted the tide table from meters to feet and back again, and discovered
that the round trip did not always return the same number. A third tried to predict the clock's
error from the temperature and was, to everyone's surprise, mostly right.

In the evenings the town gathered on the steps of the hall to talk. They talked about the
weather, the price of fish, the new road to the north that had been promised for twenty years,
and the strange quiet of the winter nights. Somebody always brought a guitar. Somebody always
asked for the same song. The stars came out one by one over the river, and the water carried
their light away to the sea, where the big ships waited for morning.

Memory is a strange thing, the old harbor master liked to say. You keep what you use and lose
what you do not, and the trick is to know in advance which is which. He kept a notebook for every
year since he took the job, forty-one notebooks on a shelf above his desk, and he could find any
tide on any day in under a minute. Ask him what he had for lunch, though, and he would have to
think about it.

When the snow came it came all at once. The roads closed, the train stopped at the next town
down the line, and for three days the river town belonged to itself. The baker kept baking. The
school stayed open for anyone who could reach it. The clock, freed from the discipline of
timetables, drifted happily toward its winter error, and on the fourth morning, when the plows
broke through and the first train whistled at the bridge, half the town was late and the other
half was early, and everybody agreed that this was exactly as it should be.
"""


def _import_hf() -> tuple[Any, Any]:
    try:
        import tokenizers
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "thaw.demo.tiny needs transformers and tokenizers: pip install 'thaw[tiny]'"
        ) from exc
    return transformers, tokenizers


def _train_tokenizer_object() -> Any:
    """Train the byte-level BPE on TINY_CORPUS; returns a `tokenizers.Tokenizer`."""
    _, tokenizers = _import_hf()
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS.values()),
        # All 256 byte symbols, so any text (any language, any bytes) encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS.splitlines(keepends=True), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    # Llama prepends <s>; vLLM and transformers both tokenize prompts with
    # add_special_tokens=True, so both see the same ids.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS_ID)]
    )
    # The training is deterministic, but check the contract the config relies on.
    vocab = tok.get_vocab()
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size()} tokens, not {VOCAB_SIZE}")
    for name, tid in zip(SPECIAL_TOKENS.values(), (UNK_ID, BOS_ID, EOS_ID, PAD_ID), strict=True):
        if vocab[name] != tid:
            raise RuntimeError(f"tiny tokenizer: {name} has id {vocab[name]}, not {tid}")
    return tok


def build_tokenizer() -> PreTrainedTokenizerBase:
    """The tiny model's tokenizer: byte-level BPE, 512 tokens, trained on `TINY_CORPUS`.

    Deterministic: the same ids in every process and run. Returned as a transformers fast
    tokenizer with <unk>/<s>/</s>/<pad>; encoding prepends <s>.
    """
    transformers, _ = _import_hf()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer_object(),
        model_max_length=TINY_CONFIG["max_position_embeddings"],
        padding_side="left",
        **SPECIAL_TOKENS,
    )


def _tensor_seed(seed: int, name: str) -> int:
    # One generator per tensor, seeded from (seed, name): each tensor's values do not depend
    # on the order parameters are visited in, nor on which other tensors exist. crc32, not
    # hash(): hash() of a str changes with PYTHONHASHSEED.
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)


def _random_state_dict(seed: int, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        gen = torch.Generator(device="cpu").manual_seed(_tensor_seed(seed, name))
        t = torch.randn(shapes[name], generator=gen, dtype=torch.float32)
        out[name] = 1.0 + _NORM_STD * t if name.endswith("norm.weight") else _WEIGHT_STD * t
    return out


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    d = getattr(torch, dtype, None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return d


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_model(seed: int = 0, dtype: torch.dtype | str = torch.float32) -> LlamaForCausalLM:
    """The tiny Llama with weights drawn from `seed`, in eval mode, on the CPU.

    Weights are a pure function of `seed` (generated in float32, then cast to `dtype`): the
    same in every process and run, independent of transformers' own init code. The global
    torch RNG is left untouched.
    """
    transformers, _ = _import_hf()
    dtype = _as_dtype(dtype)
    config = transformers.LlamaConfig(**{**TINY_CONFIG, "torch_dtype": _dtype_name(dtype)})
    # transformers' __init__ draws its own random init from the global RNG; fork it so the
    # caller's RNG state is unchanged (we overwrite every tensor below anyway).
    with torch.random.fork_rng(devices=[]):
        model = transformers.LlamaForCausalLM(config)
    sd = model.state_dict()
    weights = _random_state_dict(seed, {k: v.shape for k, v in sd.items()})
    model.load_state_dict(weights, strict=True)
    model.to(dtype=dtype)
    model.eval()
    model.generation_config.do_sample = False
    return model


def _dir_stamp(seed: int, dtype: torch.dtype) -> dict[str, Any]:
    return {"format_version": TINY_FORMAT_VERSION, "seed": seed, "dtype": _dtype_name(dtype)}


_STAMP_FILE = "thaw_tiny.json"


def _read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / _STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


def _portable_configs(d: Path, dtype: torch.dtype) -> None:
    """Make the written JSON readable by transformers 4.x as well as 5.x.

    transformers 5 writes `dtype` and `rope_parameters` and names the tokenizer class
    `TokenizersBackend`; 4.x reads `torch_dtype`, `rope_theta` and knows only
    `PreTrainedTokenizerFast` (which 5.x still maps to the same class). The GPU machine's
    transformers need not match the one vLLM pulls in here.
    """
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("torch_dtype", _dtype_name(dtype))
    cfg.setdefault("rope_theta", TINY_CONFIG["rope_theta"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok_path = d / "tokenizer_config.json"
    tok_cfg = json.loads(tok_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    for f in d.iterdir():
        os.chmod(f, 0o644)  # some writers create 0600 files
    os.chmod(d, 0o755)  # mkdtemp makes it 0700


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or info logs from transformers while the tiny model is written.

    The directory is made on first use, inside commands whose stderr is one error line or a
    JSON document (`thawctl freeze --engine vllm --model tiny`); transformers 5 draws a
    "Writing model shards" bar there. The caller's settings come back afterwards.
    """
    transformers, _ = _import_hf()
    hf_logging = transformers.utils.logging
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def write_model_dir(
    path: str | os.PathLike[str], seed: int = 0, dtype: torch.dtype | str = "float32"
) -> Path:
    """Write the tiny model as a Hugging Face directory at `path` and return it.

    Contents: config.json, generation_config.json, tokenizer.json + tokenizer_config.json
    (+ special_tokens_map.json where transformers writes one), model.safetensors, and
    thaw_tiny.json (seed, dtype, format version). `vllm.LLM(model=path)` and
    `AutoModelForCausalLM.from_pretrained(path)` load it.

    Idempotent: if `path` already holds this model (same seed, dtype, format version) it is
    returned untouched. Atomic: the directory is built in a sibling temp dir and renamed into
    place, so readers never see a half-written model; concurrent writers are safe (the loser
    discards its copy). A `path` that exists with other contents raises FileExistsError.
    """
    dest = Path(path)
    dt = _as_dtype(dtype)
    stamp = _dir_stamp(seed, dt)
    if dest.exists():
        if _read_stamp(dest) == stamp:
            return dest
        raise FileExistsError(f"{dest} exists and is not the tiny model {stamp}")

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model = build_model(seed, dt)
        with _quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
            build_tokenizer().save_pretrained(tmp)
        _portable_configs(tmp, dt)
        # Last, so a directory with a stamp is a complete one.
        (tmp / _STAMP_FILE).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            # Someone else renamed theirs into place first (ENOTEMPTY/EEXIST).
            if _read_stamp(dest) == stamp:
                return dest
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def generate_greedy(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int = 16,
) -> list[int]:
    """Greedy-decode `prompt`; return only the new token ids, exactly `max_new_tokens` of them.

    EOS may be generated but does not stop decoding (random weights emit it by chance): the
    same ids as vLLM's `SamplingParams(temperature=0, ignore_eos=True, max_tokens=n)`.
    (`min_new_tokens` would not do: it masks EOS out of the logits; vLLM's ignore_eos does not.)
    """
    enc = tokenizer(prompt, return_tensors="pt")
    prompt_len = enc["input_ids"].shape[1]
    device = next(model.parameters()).device
    with torch.no_grad():
        # transformers 5 annotates generate()'s self as a protocol LlamaForCausalLM misses.
        out = model.generate(  # type: ignore[misc]
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=None,
            pad_token_id=PAD_ID,
        )
    new: list[int] = out[0, prompt_len:].tolist()
    if len(new) != max_new_tokens:  # pragma: no cover - a transformers that stops at EOS anyway
        raise RuntimeError(f"generate stopped after {len(new)} of {max_new_tokens} tokens")
    return new


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m thaw.demo.tiny", description="Write the tiny Llama as a HF model directory."
    )
    parser.add_argument("path", help="directory to create (reused if it already holds it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    print(write_model_dir(args.path, seed=args.seed, dtype=args.dtype))
    return 0


def make_prompt(tokenizer: PreTrainedTokenizerBase, num_tokens: int, seed: int = 0) -> str:
    """A deterministic prompt of words from `TINY_CORPUS` that encodes to `num_tokens` ids
    (counting the <s> the tokenizer prepends). Different seeds give different prompts.
    """
    if num_tokens < 2:
        raise ValueError("num_tokens must be >= 2 (<s> plus at least one token)")
    words = sorted(set(TINY_CORPUS.split()))
    rng = random.Random(seed)
    # The byte-level pre-tokenizer splits before each space, so " word" encodes the same
    # wherever it appears and lengths add up exactly.
    cost = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words}
    fillers = [w for w in words if cost[w] == 1]
    parts: list[str] = []
    left = num_tokens - 1
    while left > 0:
        w = rng.choice(words)
        if cost[w] > left:
            w = rng.choice(fillers)
        parts.append(" " + w)
        left -= cost[w]
    text = "".join(parts)
    n = len(tokenizer(text)["input_ids"])
    if n != num_tokens:  # pragma: no cover - guards the additivity assumption above
        raise RuntimeError(f"make_prompt built {n} tokens, wanted {num_tokens}")
    return text


if __name__ == "__main__":
    raise SystemExit(_main())
