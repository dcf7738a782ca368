"""freeze_file then restore_file gives bit-identical tensors; model mismatches copy nothing."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thaw import _native, freeze_file, open_snapshot, restore_file
from thaw.copy.datapath import SLOT_SIZE
from thaw.copy.pieces import plan
from thaw.errors import (
    ChecksumMismatch,
    FingerprintMismatch,
    ModelMismatch,
    TensorMismatch,
)
from thaw.format import ALIGNMENT, layout
from thaw.format.checksum import Digests
from thaw.format.dtypes import DTYPES, dtype_name, itemsize, torch_dtype
from thaw.format.fingerprint import Fingerprint

MiB = 1 << 20
BLOCK = _native.BLOCK_HASH_SIZE
SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _in_torch(name: str) -> bool:
    try:
        torch_dtype(name)
    except ValueError:
        return False
    return True


# Every dtype a snapshot may hold that this torch build has (float8/float4 where it has them).
NAMES = [name for name in DTYPES if _in_torch(name)]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes in logical (row-major) order, whatever its strides."""
    if t.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    dense = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())  # standard strides, always
    return dense.reshape(-1).view(torch.uint8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def random_tensor(dtype: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random bytes viewed as `dtype` (every bit pattern, NaNs and all), bool as 0/1."""
    if dtype == "bool":
        return torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8).bool()
    n = math.prod(shape) * itemsize(dtype)
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    return raw.view(torch_dtype(dtype)).reshape(shape)


def zeros(dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    raw = torch.zeros(math.prod(shape) * itemsize(dtype), dtype=torch.uint8)
    return raw.view(torch_dtype(dtype)).reshape(shape)


def source_view(dtype: str, shape: tuple[int, ...], how: str, gen: torch.Generator) -> torch.Tensor:
    """A tensor of `shape` laid out as `how`: contiguous, transposed, strided or broadcast."""
    if how == "transposed" and len(shape) >= 2:
        base = random_tensor(dtype, (*shape[:-2], shape[-1], shape[-2]), gen)
        return base.transpose(-1, -2)
    if how == "strided" and len(shape) >= 1:
        return random_tensor(dtype, (*shape[:-1], 2 * shape[-1]), gen)[..., ::2]
    if how == "expanded" and len(shape) >= 1:
        return random_tensor(dtype, (1, *shape[1:]), gen).expand(shape)
    return random_tensor(dtype, shape, gen)


def target_view(
    dtype: str, shape: tuple[int, ...], how: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A zeroed restore target of `shape` laid out as `how`; for a strided one, what it skips."""
    if how == "transposed" and len(shape) >= 2:
        return zeros(dtype, (*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2), None
    if how == "strided" and len(shape) >= 1:
        base = zeros(dtype, (*shape[:-1], 2 * shape[-1]))
        return base[..., ::2], base[..., 1::2]
    return zeros(dtype, shape), None


tensor_cases = st.tuples(
    st.sampled_from(NAMES),
    st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple),
    st.sampled_from(["contiguous", "transposed", "strided", "expanded"]),
    st.sampled_from(["contiguous", "transposed", "strided"]),
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return tmp_path_factory.mktemp("roundtrip")


@SETTINGS
@given(
    cases=st.lists(tensor_cases, min_size=1, max_size=6),
    as_dict=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_is_bit_identical(workdir: Any, cases: Any, as_dict: Any, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    names = [f"layers.{i}.w" for i in range(len(cases))]
    sources = [source_view(dtype, shape, how, gen) for dtype, shape, how, _ in cases]
    path = workdir / "case.thaw"
    pairs = list(zip(names, sources, strict=True))
    freeze_file(dict(pairs) if as_dict else pairs, path)

    targets = [target_view(dtype, shape, how) for dtype, shape, _, how in cases]
    views = [view for view, _ in targets]
    pairs = list(zip(names, views, strict=True))
    stats = restore_file(dict(pairs) if as_dict else pairs, path)

    assert stats.bytes == sum(s.numel() * s.element_size() for s in sources)
    for name, src, (view, skipped) in zip(names, sources, targets, strict=True):
        assert same_bytes(src, view), name
        if skipped is not None:  # a strided target: the elements between its own stay zero
            assert not as_bytes(skipped).any(), name


def test_every_dtype_round_trips(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    assert {"bfloat16", "float8_e4m3fn", "float8_e5m2", "bool"} <= set(NAMES)
    source = {name: random_tensor(name, (3, 17), gen) for name in NAMES}
    freeze_file(source, tmp_path / "all.thaw")
    snapshot = open_snapshot(tmp_path / "all.thaw")
    assert {t.name: t.dtype for t in snapshot.tensors} == {name: name for name in NAMES}
    target = {name: zeros(name, (3, 17)) for name in NAMES}
    restore_file(target, tmp_path / "all.thaw")
    for name in NAMES:
        assert same_bytes(source[name], target[name]), name


def test_module_round_trip_includes_buffers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    norm: Any = model[1]
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2)
    norm.num_batches_tracked.fill_(11)
    freeze_file(model, tmp_path / "m.thaw")
    names = {t.name for t in open_snapshot(tmp_path / "m.thaw").tensors}
    assert names == set(model.state_dict())

    fresh = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    restore_file(fresh, tmp_path / "m.thaw")
    for name, tensor in model.state_dict().items():
        assert same_bytes(tensor, fresh.state_dict()[name]), name


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


@pytest.mark.parametrize("form", ["module", "state_dict"])
def test_tied_weights_are_stored_once(tmp_path: Path, form: Any) -> None:
    torch.manual_seed(0)
    model = Tied()
    source = model if form == "module" else model.state_dict()
    freeze_file(source, tmp_path / "tied.thaw")
    assert [t.name for t in open_snapshot(tmp_path / "tied.thaw").tensors] == ["embed.weight"]

    fresh = Tied()
    restore_file(fresh if form == "module" else fresh.state_dict(), tmp_path / "tied.thaw")
    assert fresh.head.weight is fresh.embed.weight
    assert same_bytes(fresh.embed.weight, model.embed.weight)


def test_strict_false_allows_snapshot_extras(tmp_path: Path) -> None:
    source = {"a": torch.arange(5.0), "b": torch.arange(3), "extra": torch.ones(2, 2)}
    freeze_file(source, tmp_path / "s.thaw")
    target = {"a": torch.zeros(5), "b": torch.zeros(3, dtype=torch.int64)}
    with pytest.raises(ModelMismatch, match="'extra'") as info:
        restore_file(target, tmp_path / "s.thaw")
    assert type(info.value) is ModelMismatch
    assert not target["a"].any() and not target["b"].any()

    restore_file(target, tmp_path / "s.thaw", strict=False)
    assert torch.equal(target["a"], source["a"]) and torch.equal(target["b"], source["b"])


@pytest.mark.parametrize(
    ("bad", "what", "expected", "found"),
    [
        (torch.full((4, 3), 5, dtype=torch.float16), "dtype", "float16", "float32"),
        (torch.full((3, 4), 5, dtype=torch.float32), "shape", [3, 4], [4, 3]),
    ],
)
def test_tensor_mismatch_names_tensor_and_copies_nothing(
    tmp_path: Path, bad: Any, what: Any, expected: Any, found: Any
) -> None:
    source = {"first": torch.arange(6.0), "second": torch.ones(4, 3), "third": torch.ones(2)}
    freeze_file(source, tmp_path / "s.thaw")
    target = {"first": torch.full((6,), 5.0), "second": bad, "third": torch.full((2,), 5.0)}
    before = {name: t.clone() for name, t in target.items()}
    with pytest.raises(TensorMismatch) as info:
        restore_file(target, tmp_path / "s.thaw")
    e = info.value
    assert (e.tensor, e.what, e.expected, e.found) == ("second", what, expected, found)
    message = str(e)
    assert "'second'" in message and str(expected) in message and str(found) in message
    for name, t in target.items():
        assert same_bytes(t, before[name]), f"{name} was written before the mismatch was raised"


def test_missing_tensor_is_model_mismatch(tmp_path: Path) -> None:
    freeze_file({"a": torch.ones(3)}, tmp_path / "s.thaw")
    target = {"a": torch.zeros(3), "lm_head.weight": torch.zeros(2)}
    with pytest.raises(ModelMismatch, match=r"lm_head\.weight") as info:
        restore_file(target, tmp_path / "s.thaw")
    assert type(info.value) is ModelMismatch
    assert not target["a"].any()


def test_fingerprint_mismatch_names_the_key(tmp_path: Path) -> None:
    recorded = Fingerprint(
        architecture="LlamaForCausalLM",
        dtype="bfloat16",
        parameter_count=6,
        engine="vllm",
        engine_version="0.9",
        tp_rank=1,
        tp_size=2,
        labels={"run": "a"},
    )
    freeze_file({"w": torch.ones(6)}, tmp_path / "s.thaw", fingerprint=recorded)
    assert open_snapshot(tmp_path / "s.thaw").fingerprint == recorded

    target = {"w": torch.zeros(6)}
    expect = Fingerprint(architecture="LlamaForCausalLM", engine="vllm", tp_rank=1, tp_size=4)
    with pytest.raises(FingerprintMismatch) as info:
        restore_file(target, tmp_path / "s.thaw", expect=expect)
    assert info.value.differences == [("tp_size", 4, 2)]
    assert "tp_size" in str(info.value)
    assert not target["w"].any()

    # Unrecorded values ("" and -1) and labels are never compared.
    restore_file(
        target,
        tmp_path / "s.thaw",
        expect=Fingerprint(
            architecture="LlamaForCausalLM",
            tp_rank=1,
            tp_size=2,
            engine="vllm",
            labels={"run": "b"},
        ),
    )
    assert target["w"].eq(1).all()


# --- pieces ---------------------------------------------------------------------------------

lengths = st.one_of(
    st.integers(0, 3 * 4096),
    st.integers(1, 5).flatmap(lambda k: st.integers(k * BLOCK - 5000, k * BLOCK + 5000)),
    st.integers(0, 9 * BLOCK),
)


@SETTINGS
@given(
    sizes=st.lists(lengths, min_size=0, max_size=12),
    slot_blocks=st.integers(1, 4),
    keep=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_plan_invariants(sizes: Any, slot_blocks: Any, keep: Any) -> None:
    slot = slot_blocks * BLOCK
    every = layout([(f"t{i}", "uint8", (n,)) for i, n in enumerate(sizes)])
    # A subset, as when only the CUDA tensors of a model go through staging.
    entries = [e for e, k in zip(every, keep, strict=False) if k]
    pieces = plan(entries, slot)

    previous_end = 0
    covered: dict[int, list[tuple[int, int]]] = {}
    for piece in pieces:
        assert piece.payload_offset % ALIGNMENT == 0
        assert piece.length % ALIGNMENT == 0
        assert piece.length <= slot
        assert piece.payload_offset >= previous_end, "pieces overlap"
        previous_end = piece.payload_offset + piece.length
        for seg in piece.segments:
            entry = entries[seg.index]
            assert seg.piece_offset >= 0 and seg.piece_offset + seg.length <= piece.length
            assert piece.payload_offset + seg.piece_offset == entry.offset + seg.tensor_offset
            covered.setdefault(seg.index, []).append((seg.tensor_offset, seg.length))

    # Every tensor appears (zero-length ones too: their checksum is checked like any other),
    # its segments tile it exactly once, and every cut falls on a hash block boundary so that
    # piecewise block hashes concatenate into the tensor's checksum.
    assert sorted(covered) == list(range(len(entries)))
    for index, segs in covered.items():
        segs.sort()
        position = 0
        for offset, length in segs:
            assert offset == position
            assert offset % BLOCK == 0
            position += length
        assert position == entries[index].length


@SETTINGS
@given(
    sizes=st.lists(st.integers(0, 3 * 4096), min_size=1, max_size=12),
    keep=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_plan_pieces_hold_no_bytes_of_other_tensors(sizes: Any, keep: Any) -> None:
    """Pieces of a subset (the CUDA tensors of a mixed model) never span a tensor outside it.

    A freeze writes whole pieces, gaps zeroed: a piece spanning a CPU tensor between two CUDA
    ones would overwrite that tensor's bytes in the file with zeros.
    """
    every = layout([(f"t{i}", "uint8", (n,)) for i, n in enumerate(sizes)])
    chosen = [e for e, k in zip(every, keep, strict=False) if k]
    others = [e for e, k in zip(every, keep, strict=False) if not k and e.length]
    for piece in plan(chosen, BLOCK):
        for other in others:
            overlap = (
                piece.payload_offset < other.offset + other.length
                and other.offset < piece.payload_offset + piece.length
            )
            assert not overlap, f"a piece spans {other.name}, which is not in the plan"


def test_large_tensor_crosses_slots(tmp_path: Path) -> Any:
    """A tensor over 64 MiB between small ones: restore, and the staged piece path, are exact."""
    gen = torch.Generator().manual_seed(3)
    source = {
        "a.norm": random_tensor("float32", (7,), gen),
        "embed": random_tensor("float16", ((2 * SLOT_SIZE + 3 * MiB + 6) // 2,), gen),
        "b.bias": random_tensor("bfloat16", (3,), gen),
        "mid": random_tensor("uint8", (SLOT_SIZE // 2 + 5,), gen),
        "c.scale": random_tensor("float8_e4m3fn", (), gen),
    }
    path = tmp_path / "big.thaw"
    freeze_file(source, path)
    target = {name: zeros(dtype_name(t.dtype), tuple(t.shape)) for name, t in source.items()}
    restore_file(target, path)
    for name in source:
        assert same_bytes(source[name], target[name]), name

    # The pipeline CUDA restores use, run on the CPU: read each piece into one slot, check
    # the checksums piecewise, scatter the segments.
    snapshot = open_snapshot(path)
    entries = list(snapshot.tensors)
    pieces = plan(entries, SLOT_SIZE)
    embed = next(i for i, e in enumerate(entries) if e.name == "embed")
    assert sum(1 for p in pieces for s in p.segments if s.index == embed) == 3

    def staged_restore() -> dict[str, torch.Tensor]:
        out = {e.name: torch.zeros(e.length, dtype=torch.uint8) for e in entries}
        slot = torch.empty(SLOT_SIZE, dtype=torch.uint8)
        digests = Digests(entries, path, 2)
        fd = os.open(path, os.O_RDONLY)
        try:
            for piece in pieces:
                offset = snapshot.payload_offset + piece.payload_offset
                _native.pread_into(fd, slot.data_ptr(), piece.length, offset)
                for seg in piece.segments:
                    digests.check(seg, slot.data_ptr() + seg.piece_offset)
                    dst = out[entries[seg.index].name]
                    dst[seg.tensor_offset : seg.tensor_offset + seg.length] = slot[
                        seg.piece_offset : seg.piece_offset + seg.length
                    ]
        finally:
            os.close(fd)
        return out

    staged = staged_restore()
    for name in source:
        assert torch.equal(staged[name], as_bytes(source[name])), name

    # A flipped byte in the big tensor's last piece is caught when that tensor completes.
    position = snapshot.payload_offset + snapshot.tensor("embed").offset + 2 * SLOT_SIZE + 12345
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ 0x40]))
    with pytest.raises(ChecksumMismatch) as info:
        staged_restore()
    assert info.value.tensor == "embed"
