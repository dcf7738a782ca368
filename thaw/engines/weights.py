"""Which weights an engine holds: KV belongs to the weights that computed it.

A KV block is only valid for the weights it was computed with, so the chain keys of KV
snapshots start from an identity of the engine's loaded weights, not of its model directory:

- loaded from thaw (load_format="thaw", or restored in place): the snapshot's content id (its
  tensors' names, dtypes, shapes and checksums: thaw.format.Manifest.content_id), per rank;
- loaded from a checkpoint: a hash of the checkpoint's weight files, whole (the sha256 a
  Hugging Face cache names each file by, where the file is one of its blobs, else xxh3 of
  every byte).

Every in-place restore changes it. A worker process records what its model holds now
(`loaded`); the engine's identity over all ranks is `combine`d from the parts. No part known
means no KV is loaded or saved: unknown weights never share KV.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_BLOB = re.compile(r"[0-9a-f]{64}")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_READ = 64 << 20  # checkpoint files are hashed 64 MiB at a time (a multiple of 16 MiB blocks)

_current: str | None = None
_engines: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()
_checkpoints: dict[tuple[str, int, int, int], str] = {}
_lock = threading.Lock()


def loaded(identity: str | None) -> None:
    """This process's model now holds the weights `identity` (None: not known)."""
    global _current
    _current = identity or None


def current() -> str | None:
    """The identity of the weights this process's model holds, if a thaw load or restore set
    it; None for weights loaded some other way."""
    return _current


def combine(parts: Mapping[int, str]) -> str:
    """The engine's identity from each rank's (24 hex digits)."""
    doc = "\n".join(f"{rank}:{parts[rank]}" for rank in sorted(parts))
    return hashlib.sha256(doc.encode()).hexdigest()[:24]


def remember(llm: Any, parts: Mapping[int, str]) -> None:
    """What a restore in this (the engine's owning) process put into `llm`'s ranks."""
    _engines[llm] = dict(parts)


def remembered(llm: Any) -> dict[int, str] | None:
    return _engines.get(llm)


def checkpoint(model: str, revision: str | None = None) -> str:
    """The identity of a checkpoint's weights: "ckpt:" + a hash of config.json and every weight
    file's name and content. A hub id that is not a local directory: its id and revision."""
    path = Path(model)
    if not path.is_dir():
        hub = f"hub:{model}@{revision or 'main'}".encode()
        return "ckpt:" + hashlib.sha256(hub).hexdigest()[:24]
    h = hashlib.sha256()
    config = path / "config.json"
    if config.exists():
        h.update(config.read_bytes())
    for f in sorted(path.iterdir()):
        if f.suffix in _WEIGHT_SUFFIXES:
            h.update(f"{f.name}:{_file_hash(f)}\n".encode())
    return "ckpt:" + h.hexdigest()[:24]


def _file_hash(f: Path) -> str:
    """A content hash of one weight file: the sha256 its Hugging Face cache blob is named by,
    else xxh3 blocks of every byte (cached per (path, inode, size, mtime) in this process)."""
    target = f.resolve()
    if target.parent.name == "blobs" and _BLOB.fullmatch(target.name):
        return "sha256:" + target.name
    st = target.stat()
    key = (str(target), st.st_ino, st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _checkpoints:
            return _checkpoints[key]
    from thaw import _native

    digests = []
    buf = bytearray(_READ)
    view = memoryview(buf)
    with open(target, "rb", buffering=0) as fh:
        while n := fh.readinto(view):
            digests.append(_native.block_hashes(_address(buf), n, min(8, os.cpu_count() or 1)))
    value = f"xxh3:{_native.xxh3(b''.join(digests)):016x}"
    with _lock:
        _checkpoints[key] = value
    return value


def _address(buf: bytearray) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def from_vllm_config(vllm_config: Any) -> dict[int, str] | None:
    """Each rank's weights identity for an engine built from `vllm_config`, as its loader
    will have left them: the snapshots' content ids for load_format="thaw" (asked of thawd,
    or read from the files' manifests), else the checkpoint's. None when a snapshot cannot
    be found (its KV then stays unknown until the workers report what they loaded)."""
    tp = int(vllm_config.parallel_config.tensor_parallel_size)
    load = vllm_config.load_config
    if str(getattr(load, "load_format", "")) != "thaw":
        mc = vllm_config.model_config
        ident = checkpoint(mc.model, getattr(mc, "revision", None))
        return dict.fromkeys(range(tp), ident)
    from thaw.engines.options import Options
    from thaw.engines.ranks import resolve
    from thaw.engines.sources import client_for
    from thaw.errors import ThawError

    try:
        options = Options.from_config(getattr(load, "model_loader_extra_config", None))
        client = client_for(options)
        parts = {}
        for rank in range(tp):
            ref = resolve(options, rank, tp)
            parts[rank] = _content_id(ref.name, ref.path, client)
    except (ThawError, OSError, ValueError, LookupError):
        return None
    return parts


def _content_id(name: str, path: str, client: Any) -> str:
    if client is not None and name:
        content = client.stat(name).content_id
        if content:
            return str(content)
    from thaw.format import open_snapshot

    if not path:
        raise LookupError(f"no file behind snapshot {name!r}")
    return open_snapshot(path).manifest.content_id
