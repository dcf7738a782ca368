"""The reader rejects every kind of damage with its own ThawError subclass and a clear message."""

from __future__ import annotations

import contextlib
import json
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.format_spec import FIELDS, HEADER, MiB
from thaw import _native, freeze_file, open_snapshot, restore_file
from thaw.copy.restore import read_tensor
from thaw.errors import (
    BadMagic,
    ChecksumMismatch,
    HeaderCorrupt,
    ManifestCorrupt,
    ManifestOutOfBounds,
    RestoreIncomplete,
    SnapshotError,
    ThawError,
    TruncatedSnapshot,
    UnsupportedVersion,
)

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        return dict(zip(FIELDS, HEADER.unpack(f.read(HEADER.size)), strict=True))


def write_header(path: Path, header: dict, *, fix_checksum: bool = True) -> None:
    header = dict(header)
    if fix_checksum:
        head = HEADER.pack(*(header[f] for f in FIELDS[:-1]), 0)[:-8]
        header["header_checksum"] = _native.xxh3(head)
    with open(path, "r+b") as f:
        f.write(HEADER.pack(*(header[f] for f in FIELDS)))


def set_header(path: Path, **fields: Any) -> None:
    """Change header fields and recompute the header checksum, so that only they are wrong."""
    write_header(path, {**read_header(path), **fields})


def read_manifest(path: Path) -> dict:
    h = read_header(path)
    with open(path, "rb") as f:
        f.seek(h["manifest_offset"])
        return json.loads(f.read(h["manifest_length"]))


def write_manifest(path: Path, manifest: dict | bytes) -> None:
    """Replace the manifest with a correctly checksummed one: only its content is wrong."""
    blob = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    h = read_header(path)
    with open(path, "r+b") as f:
        f.seek(h["manifest_offset"])
        f.write(blob)
        f.truncate(h["manifest_offset"] + len(blob))
    set_header(
        path,
        manifest_length=len(blob),
        file_length=h["manifest_offset"] + len(blob),
        manifest_checksum=_native.xxh3(blob),
    )


def flip(path: Path, position: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ mask]))


def rejects(path: Path, cls: type[SnapshotError], *phrases: str) -> SnapshotError:
    """open_snapshot raises exactly `cls`, with the path and every phrase in its message."""
    with pytest.raises(SnapshotError) as info:
        open_snapshot(path)
    e = info.value
    assert type(e) is cls, f"expected {cls.__name__}, got {type(e).__name__}: {e}"
    message = str(e)
    assert message.startswith(str(path))
    for phrase in phrases:
        assert phrase in message, message
    return e


def rejects_without_allocating(
    path: Path, cls: type[SnapshotError], phrase: str, damage: Any
) -> None:
    """`rejects`, and the rejection allocates under 4 MiB: nothing sized by a damaged field."""
    tracemalloc.start()
    try:
        rejects(path, cls, phrase)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, f"{peak} bytes allocated to reject {damage}"


def targets(source: dict) -> dict:
    return {name: torch.zeros_like(t) for name, t in source.items()}


# --- header ---------------------------------------------------------------------------------


def test_valid_snapshot_opens(small_snapshot: Any) -> None:
    path, source = small_snapshot
    snapshot = open_snapshot(path)
    assert [t.name for t in snapshot.tensors] == list(source)


@pytest.mark.parametrize("magic", [b"THAWSNAQ", b"\0" * 8, b"PK\x03\x04\0\0\0\0", b"thawsnap"])
def test_wrong_magic(small_snapshot: Any, magic: Any) -> None:
    path, _ = small_snapshot
    with open(path, "r+b") as f:
        f.write(magic)
    rejects(path, BadMagic, "not a thaw snapshot")


@pytest.mark.parametrize("content", [b"", b"THAW", b"THAWSNA", b"not a snapshot at all" * 100])
def test_not_a_snapshot(tmp_path: Path, content: Any) -> None:
    path = tmp_path / "other.bin"
    path.write_bytes(content)
    rejects(path, BadMagic, "not a thaw snapshot")


@pytest.mark.parametrize("version", [0, 2, 99, 2**32 - 1])
def test_unknown_version(small_snapshot: Any, version: Any) -> None:
    path, _ = small_snapshot
    set_header(path, version=version)
    e = rejects(path, UnsupportedVersion, f"format version {version}", "version 1")
    assert "upgrade" in str(e)


@pytest.mark.parametrize(
    "position",
    [
        12,  # flags
        20,  # alignment
        24,  # payload_offset
        40,  # manifest_offset
        56,  # file_length
        64,  # manifest_checksum
        72,  # the header checksum itself
        79,
    ],
)
def test_header_checksum_damage(small_snapshot: Any, position: Any) -> None:
    path, _ = small_snapshot
    flip(path, position)
    rejects(path, HeaderCorrupt, "header checksum mismatch")


@pytest.mark.parametrize(
    ("fields", "cls", "phrase"),
    [
        ({"header_size": 8192}, HeaderCorrupt, "header size 8192"),
        ({"alignment": 512}, HeaderCorrupt, "alignment 512"),
        ({"payload_offset": 0}, HeaderCorrupt, "misaligned"),
        ({"payload_offset": (2 << 20) + 8}, HeaderCorrupt, "misaligned"),
        ({"payload_length": 12345}, HeaderCorrupt, "misaligned"),
        ({"payload_length": 1 << 40}, HeaderCorrupt, "payload overlaps the manifest"),
        ({"manifest_length": 1 << 60}, HeaderCorrupt, "64 MiB"),
        ({"manifest_length": 64 << 20}, HeaderCorrupt, "past the end of the file"),
        ({"manifest_offset": 1 << 62}, HeaderCorrupt, "past the end of the file"),
        ({"file_length": 1 << 60}, TruncatedSnapshot, "truncated"),
    ],
)
def test_absurd_header_fields_allocate_nothing(
    small_snapshot: Any, fields: Any, cls: type[SnapshotError], phrase: Any
) -> None:
    path, _ = small_snapshot
    set_header(path, **fields)
    rejects_without_allocating(path, cls, phrase, fields)


def test_declared_length_differs_from_file(small_snapshot: Any) -> None:
    path, _ = small_snapshot
    size = os.path.getsize(path)
    set_header(path, file_length=size - 1)
    rejects(path, HeaderCorrupt, f"header says {size - 1} bytes, file has {size}")
    set_header(path, file_length=size + 1)
    rejects(path, TruncatedSnapshot, f"file is {size} bytes, header says {size + 1}")


def test_shorter_manifest_length_fails_manifest_checksum(small_snapshot: Any) -> None:
    path, _ = small_snapshot
    h = read_header(path)
    set_header(path, manifest_length=h["manifest_length"] - 1)
    rejects(path, ManifestCorrupt, "manifest checksum mismatch")


def test_shorter_payload_leaves_tensor_outside(small_snapshot: Any) -> None:
    path, _ = small_snapshot
    h = read_header(path)
    set_header(path, payload_length=h["payload_length"] - 4096)
    rejects(path, ManifestOutOfBounds, "'step'", "outside the payload")


# --- truncation -----------------------------------------------------------------------------


def test_truncated_at_several_points(small_snapshot: Any) -> None:
    path, _ = small_snapshot
    original = path.read_bytes()
    h = read_header(path)
    points = {
        0: BadMagic,
        1: BadMagic,
        7: BadMagic,
        8: TruncatedSnapshot,
        50: TruncatedSnapshot,
        HEADER.size - 1: TruncatedSnapshot,
        HEADER.size: TruncatedSnapshot,
        4096: TruncatedSnapshot,
        1 << 20: TruncatedSnapshot,
        h["payload_offset"]: TruncatedSnapshot,
        h["payload_offset"] + 100: TruncatedSnapshot,
        h["manifest_offset"]: TruncatedSnapshot,
        h["manifest_offset"] + 17: TruncatedSnapshot,
        len(original) - 1: TruncatedSnapshot,
    }
    for length, cls in points.items():
        path.write_bytes(original[:length])
        e = rejects(path, cls)
        if cls is TruncatedSnapshot:
            assert "truncated" in str(e) or "shorter than its header" in str(e)


# --- manifest -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", [0, 1, 40, -2, -1])
def test_manifest_bytes_flipped(small_snapshot: Any, where: Any) -> None:
    path, _ = small_snapshot
    h = read_header(path)
    flip(path, h["manifest_offset"] + where % h["manifest_length"], 0x20)
    rejects(path, ManifestCorrupt, "manifest checksum mismatch")


def entry(manifest: dict, name: str) -> dict:
    return next(t for t in manifest["tensors"] if t["name"] == name)


def test_entry_outside_payload(small_snapshot: Any) -> None:
    path, _ = small_snapshot
    m = read_manifest(path)
    entry(m, "step")["offset"] = read_header(path)["payload_length"]
    write_manifest(path, m)
    rejects(path, ManifestOutOfBounds, "'step'", "outside the payload")


def test_entry_overlapping_another(small_snapshot: Any) -> None:
    path, _ = small_snapshot
    m = read_manifest(path)
    entry(m, "norm.weight")["offset"] = entry(m, "embed.weight")["offset"]
    write_manifest(path, m)
    rejects(path, ManifestOutOfBounds, "overlaps")


def test_entry_misaligned(small_snapshot: Any) -> None:
    path, _ = small_snapshot
    m = read_manifest(path)
    entry(m, "norm.weight")["offset"] += 64
    write_manifest(path, m)
    rejects(path, ManifestOutOfBounds, "'norm.weight'", "not aligned")


def test_duplicate_names(small_snapshot: Any) -> None:
    path, _ = small_snapshot
    m = read_manifest(path)
    entry(m, "step")["name"] = "norm.weight"
    write_manifest(path, m)
    rejects(path, ManifestCorrupt, "'norm.weight' appears twice")


@pytest.mark.parametrize(
    ("mutate", "phrase"),
    [
        (lambda m: entry(m, "step").update(dtype="float128"), "unknown dtype 'float128'"),
        (lambda m: entry(m, "step").update(dtype=["int64"]), "invalid manifest"),
        (lambda m: entry(m, "step").update(name=""), "bad tensor name"),
        (lambda m: entry(m, "step").update(name=7), "bad tensor name"),
        (lambda m: entry(m, "step").update(shape=[-1]), "bad shape"),
        (lambda m: entry(m, "step").update(shape=[True]), "bad shape"),
        (lambda m: entry(m, "step").update(shape=[1.0]), "bad shape"),
        (lambda m: entry(m, "step").update(shape=[1] * 17), "at most 16 dims"),
        (lambda m: entry(m, "step").update(shape=[1 << 48]), "bad shape"),
        (lambda m: entry(m, "step").update(shape=[2]), "does not match"),
        (lambda m: entry(m, "step").update(offset=-4096), "bad offset/length"),
        (lambda m: entry(m, "step").update(length=1 << 56), "bad offset/length"),
        (lambda m: entry(m, "step").update(length=9), "does not match"),
        (lambda m: entry(m, "step").update(checksum="not hex"), "invalid manifest"),
        (lambda m: entry(m, "step").update(checksum=None), "invalid manifest"),
        (lambda m: entry(m, "step").pop("length"), "invalid manifest"),
        (lambda m: m.update(format="safetensors"), "not a thaw manifest"),
        (lambda m: m.update(checksum_algorithm="md5"), "unknown checksum algorithm 'md5'"),
        (lambda m: m.update(tensors={"step": 1}), "tensors must be a list"),
        (lambda m: m.update(tensors=[1, 2]), "invalid manifest"),
        (lambda m: m.pop("fingerprint"), "invalid manifest"),
        (lambda m: m["fingerprint"].update(tp_rank="0"), "fingerprint tp_rank must be int"),
        (lambda m: m["fingerprint"].update(color="red"), "unknown fingerprint keys"),
        (lambda m: m["fingerprint"].update(labels={"a": 1}), "labels must map strings"),
    ],
)
def test_invalid_manifest_content(small_snapshot: Any, mutate: Any, phrase: Any) -> None:
    path, _ = small_snapshot
    m = read_manifest(path)
    mutate(m)
    write_manifest(path, m)
    rejects(path, ManifestCorrupt, phrase)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"{",
        b"\xff\xfe not utf-8",
        b"[]",
        b"null",
        b'{"format": "thaw-snapshot"}',
        b"[" * 100_000 + b"]" * 100_000,  # nesting deep enough to exhaust the parser's stack
        b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
    ],
    ids=["empty", "unclosed", "not-utf8", "list", "null", "no-tensors", "deep-list", "deep-dict"],
)
def test_manifest_not_a_manifest(small_snapshot: Any, blob: Any) -> None:
    path, _ = small_snapshot
    write_manifest(path, blob)
    rejects(path, ManifestCorrupt, "invalid manifest")


@pytest.mark.parametrize(
    ("update", "cls", "phrase"),
    [
        ({"shape": [1 << 47] * 16}, ManifestCorrupt, "does not match"),
        ({"shape": [1 << 40], "length": 8 << 40}, ManifestOutOfBounds, "outside the payload"),
        ({"shape": [1 << 47, 1 << 8], "length": 1 << 58}, ManifestCorrupt, "bad offset/length"),
        ({"offset": (1 << 56) - 4096}, ManifestOutOfBounds, "outside the payload"),
    ],
)
def test_absurd_tensor_sizes_allocate_nothing(
    small_snapshot: Any, update: Any, cls: type[SnapshotError], phrase: Any
) -> None:
    path, _ = small_snapshot
    m = read_manifest(path)
    entry(m, "step").update(update)
    write_manifest(path, m)
    rejects_without_allocating(path, cls, phrase, update)


def test_unopenable_paths(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="cannot open"):
        open_snapshot(tmp_path / "missing.thaw")
    # A directory is not a snapshot: a SnapshotError, not an OSError from reading it.
    with pytest.raises(SnapshotError):
        open_snapshot(tmp_path)


# --- payload --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["embed.weight", "norm.weight", "step"])
def test_flipped_payload_byte(small_snapshot: Any, name: str) -> None:
    path, source = small_snapshot
    snapshot = open_snapshot(path)
    e = snapshot.tensor(name)
    flip(path, snapshot.payload_offset + e.offset + e.length - 1, 0x10)
    open_snapshot(path)  # the header and manifest are intact; the damage shows when reading

    with pytest.raises(RestoreIncomplete) as info:
        restore_file(targets(source), path)
    cause = info.value.__cause__
    assert type(cause) is ChecksumMismatch
    assert cause.tensor == name
    assert f"tensor {name!r}" in str(cause)
    assert name in str(info.value)

    with pytest.raises(ChecksumMismatch, match=name):
        read_tensor(snapshot, e)

    restored = targets(source)
    restore_file(restored, path, verify=False)
    for other, t in source.items():
        same = torch.equal(
            restored[other].view(-1).view(torch.uint8)[:-1], t.view(-1).view(torch.uint8)[:-1]
        )
        assert same, other
        last_equal = torch.equal(
            restored[other].view(-1).view(torch.uint8)[-1:], t.view(-1).view(torch.uint8)[-1:]
        )
        assert last_equal == (other != name)


def test_flip_in_payload_padding_is_harmless(small_snapshot: Any) -> None:
    path, source = small_snapshot
    snapshot = open_snapshot(path)
    e = snapshot.tensor("norm.weight")
    flip(path, snapshot.payload_offset + e.offset + e.length + 100)
    restored = targets(source)
    restore_file(restored, path)
    for name, t in source.items():
        assert torch.equal(restored[name], t), name


# --- fuzzing --------------------------------------------------------------------------------


class FuzzBase:
    """A small valid snapshot's bytes, header and source (with a short repr for hypothesis)."""

    def __init__(self, directory: Any, path: Path) -> None:
        g = torch.Generator().manual_seed(5)
        self.source = {
            "a": torch.randn(40, 30, generator=g),
            "b": torch.randint(-100, 100, (7,), generator=g, dtype=torch.int16),
            "c": torch.randn(5000, generator=g).to(torch.float16),
            "d": torch.tensor(True),
            "e": torch.empty(0, 3),
        }
        freeze_file(self.source, path)
        self.directory = directory
        self.original = path.read_bytes()
        self.header = read_header(path)

    def __repr__(self) -> str:
        return f"FuzzBase({len(self.original)} bytes)"


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = tmp_path_factory.mktemp("fuzz")
    return FuzzBase(directory, directory / "base.thaw")


def only_thaw_errors(path: Path, source: Any) -> None:
    """open_snapshot and restore_file raise nothing but ThawError subclasses."""
    try:
        open_snapshot(path)
    except ThawError:
        return
    with contextlib.suppress(ThawError):
        restore_file(targets(source), path)
    with contextlib.suppress(ThawError):
        restore_file(targets(source), path, verify=False, strict=False)


@SETTINGS
@given(data=st.data())
def test_fuzz_flipped_bytes_and_truncation(fuzz_base: Any, data: Any) -> None:
    directory, original, h, source = (
        fuzz_base.directory,
        fuzz_base.original,
        fuzz_base.header,
        fuzz_base.source,
    )
    regions = [
        (0, HEADER.size),
        (h["payload_offset"], h["payload_offset"] + h["payload_length"]),
        (h["manifest_offset"], len(original)),
        (0, len(original)),
    ]
    content = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        lo, hi = data.draw(st.sampled_from(regions), label="region")
        position = data.draw(st.integers(lo, hi - 1), label="position")
        content[position] ^= data.draw(st.integers(1, 255), label="mask")
    if data.draw(st.booleans(), label="truncate"):
        content = content[: data.draw(st.integers(0, len(content)), label="length")]
    path = directory / "flipped.thaw"
    path.write_bytes(content)
    only_thaw_errors(path, source)


@SETTINGS
@given(length=st.integers(0, 2**21 + 2**15))
def test_fuzz_truncation_never_opens(fuzz_base: Any, length: int) -> None:
    directory, original = fuzz_base.directory, fuzz_base.original
    length = min(length, len(original) - 1)
    path = directory / "truncated.thaw"
    path.write_bytes(original[:length])
    with pytest.raises(SnapshotError) as info:
        open_snapshot(path)
    assert type(info.value) in (BadMagic, TruncatedSnapshot)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["float32", "int16", "bool", "a", "0" * 16, "f" * 16]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)

small_ints = st.integers(-1, 3) | st.integers(0, 8).map(lambda k: k * 4096) | st.integers(0, 2**20)


@SETTINGS
@given(data=st.data())
def test_fuzz_manifest_content(fuzz_base: Any, data: Any) -> None:
    """Validly checksummed manifests with wrong content: only ThawError, never another."""
    directory, original, h, source = (
        fuzz_base.directory,
        fuzz_base.original,
        fuzz_base.header,
        fuzz_base.source,
    )
    manifest = json.loads(original[h["manifest_offset"] :])
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        where = data.draw(st.sampled_from(["tensor", "fingerprint", "top"]), label="where")
        tensors = manifest.get("tensors")
        if where == "tensor" and isinstance(tensors, list) and tensors:
            doc = tensors[data.draw(st.integers(0, len(tensors) - 1), label="entry")]
            keys = ["name", "dtype", "shape", "offset", "length", "checksum", "other"]
        elif where == "fingerprint" and isinstance(manifest.get("fingerprint"), dict):
            doc = manifest["fingerprint"]
            keys = sorted([*doc, "other"])
        else:
            doc = manifest
            keys = ["format", "checksum_algorithm", "fingerprint", "tensors"]
        if not isinstance(doc, dict):
            continue
        key = data.draw(st.sampled_from(keys), label="key")
        if data.draw(st.integers(0, 9), label="delete") == 0:
            doc.pop(key, None)
        elif key in ("offset", "length"):
            doc[key] = data.draw(small_ints | json_values, label="value")
        elif key == "shape":
            doc[key] = data.draw(st.lists(small_ints, max_size=5) | json_values, label="value")
        else:
            doc[key] = data.draw(json_values, label="value")
    path = directory / "manifest.thaw"
    path.write_bytes(original)
    write_manifest(path, json.dumps(manifest).encode())
    only_thaw_errors(path, source)


def test_manifest_parse_cost_is_bounded_by_its_structure(small_snapshot: Any) -> None:
    """64 MiB of `[{},{},...]` with a valid checksum was 22 million dicts (~1.5 GB) in the
    parser: the structure is counted on the raw bytes first and such a manifest is refused
    without building it."""
    path, _ = small_snapshot
    m = read_manifest(path)
    blob = json.dumps(m).encode()
    bomb = blob.replace(b'"tensors": [', b'"tensors": [' + b"{}," * 6_000_000, 1)
    assert len(bomb) > 16 * MiB
    write_manifest(path, bomb)
    tracemalloc.start()
    try:
        rejects(path, ManifestCorrupt, "JSON objects and arrays")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(bomb), peak  # the bytes read, not millions of objects


@pytest.mark.parametrize(
    ("mutate", "phrase"),
    [
        (lambda m: entry(m, "step").update(extra=1), "exactly the keys"),
        (lambda m: m["tensors"].append([]), "exactly the keys"),
        (lambda m: entry(m, "step").update(checksum="F" * 16), "16 lowercase hex digits"),
        (lambda m: entry(m, "step").update(checksum="0" * 15), "16 lowercase hex digits"),
        (
            lambda m: m["fingerprint"].update(labels={str(i): "" for i in range(1025)}),
            "at most 1024",
        ),
        (lambda m: m["fingerprint"].update(model="m" * 5000), "longer than 4096"),
    ],
)
def test_manifest_entries_have_one_shape(small_snapshot: Any, mutate: Any, phrase: Any) -> None:
    path, _ = small_snapshot
    m = read_manifest(path)
    mutate(m)
    write_manifest(path, m)
    rejects(path, ManifestCorrupt, phrase)


@SETTINGS
@given(tensors=st.lists(json_values, max_size=6), fingerprint=json_values)
def test_fuzz_parse_manifest_refuses_with_manifest_corrupt(tensors: Any, fingerprint: Any) -> None:
    """Whatever JSON stands where the tensors and fingerprint go, the parser returns a
    manifest or raises ManifestCorrupt, never another exception."""
    from thaw.format import CHECKSUM_ALGORITHM, parse_manifest

    doc = {
        "format": "thaw-snapshot",
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "fingerprint": fingerprint,
        "tensors": tensors,
    }
    with contextlib.suppress(ManifestCorrupt):
        parse_manifest("fuzz", json.dumps(doc).encode(), 1 << 20)
