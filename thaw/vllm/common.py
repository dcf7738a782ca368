"""Engine-independent parts of the vLLM integration: options, per-rank snapshot references,
fingerprints and the choice between thawd and the file. Imports neither vllm nor torch at
module level, so it is tested without an engine.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from thaw.errors import DaemonUnavailable, NotFound, ThawError
from thaw.format.fingerprint import IDENTITY_KEYS, Fingerprint

ENGINE = "vllm"
# Recorded in every vLLM snapshot's labels: what the tensors are, so that a reader (a person,
# thawctl info) knows they are not a checkpoint and not kernel-format weights.
WEIGHTS_LABEL = "thaw.weights"
WEIGHTS_KIND = "vllm-pre-processing"  # per-rank shards, vLLM parameter names, before packing
NAMES_LABEL = "thaw.names"
SHARD_LABEL = "thaw.shard"
DAEMON_MODES = ("auto", "require", "never")


class SnapshotMissing(ThawError):
    """The snapshot a vLLM engine was asked to load does not exist (in thawd or on disk)."""


class EngineBusy(ThawError):
    """The engine has unfinished requests: swapping weights under them would mix models."""


class ExtensionMissing(ThawError):
    """The engine's workers cannot be reached: the LLM lacks thaw's worker extension."""


@dataclasses.dataclass(frozen=True)
class Options:
    """`model_loader_extra_config` of `load_format="thaw"` (and the keywords of restore/freeze).

    snapshot: a thawd snapshot name or a file path (".thaw" suffix or a "/" makes it a path);
        "{rank}" in it is replaced by the tensor-parallel rank.
    path: for a daemon name, the file behind it: read when thawd is not running, written by
        freeze_on_miss. "{rank}" as above.
    socket: thawd's socket ("" = $THAW_SOCKET / the system default).
    daemon: auto (use thawd when it runs), require (fail without it), never.
    freeze_on_miss: when the snapshot does not exist, load the model normally and freeze it.
    pin: freeze_on_miss into thawd pins the new snapshot (else it stays demotable).
    verify: check per-tensor checksums when reading a file (thawd verified at pin time).
    labels: extra fingerprint labels for snapshots this writes.
    ignore: fingerprint keys not compared (e.g. ["model"] to load a fine-tune's weights).
    """

    snapshot: str
    path: str = ""
    socket: str = ""
    daemon: str = "auto"
    freeze_on_miss: bool = False
    pin: bool = True
    verify: bool = True
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ignore: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> Options:
        config = dict(config or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown thaw loader option(s) {unknown}; known: {sorted(known)}")
        if not isinstance(config.get("snapshot"), str) or not config["snapshot"]:
            raise ValueError(
                'load_format="thaw" needs model_loader_extra_config={"snapshot": NAME_OR_PATH}'
            )
        if config.get("daemon", "auto") not in DAEMON_MODES:
            raise ValueError(f"daemon must be one of {DAEMON_MODES}, not {config['daemon']!r}")
        labels = config.get("labels", {}) or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ValueError("labels must map strings to strings")
        ignore = tuple(config.get("ignore", ()) or ())
        bad = [k for k in ignore if k not in IDENTITY_KEYS]
        if bad:
            raise ValueError(f"cannot ignore {bad}: fingerprint keys are {list(IDENTITY_KEYS)}")
        for key in ("freeze_on_miss", "pin", "verify"):
            if key in config and not isinstance(config[key], bool):
                raise ValueError(f"{key} must be true or false")
        config["labels"] = dict(labels)
        config["ignore"] = ignore
        return cls(**config)

    def to_config(self) -> dict[str, Any]:
        """A msgpack/JSON-able dict (what travels to the workers)."""
        out = dataclasses.asdict(self)
        out["labels"] = dict(self.labels)
        out["ignore"] = list(self.ignore)
        return out


def is_path(snapshot: str) -> bool:
    """A file path rather than a thawd name: it has a directory part or the .thaw suffix."""
    return os.sep in snapshot or snapshot.endswith(".thaw") or snapshot.startswith("~")


def rank_path(template: str, rank: int, tp_size: int) -> str:
    """The file of one rank: "{rank}" is replaced; without it, TP>1 inserts ".rank{N}" before
    the suffix (model.thaw -> model.rank1.thaw) and TP=1 uses the path as is."""
    template = os.path.expanduser(template)
    if "{rank}" in template:
        return template.replace("{rank}", str(rank))
    if tp_size == 1:
        return template
    p = Path(template)
    suffix = p.suffix or ""
    return str(p.with_name(f"{p.name[: len(p.name) - len(suffix)]}.rank{rank}{suffix}"))


def rank_name(name: str, rank: int, tp_size: int) -> str:
    """The thawd name of one rank: "{rank}" is replaced; without it, TP>1 appends -rank{N}."""
    if "{rank}" in name:
        return name.replace("{rank}", str(rank))
    return name if tp_size == 1 else f"{name}-rank{rank}"


@dataclasses.dataclass(frozen=True)
class RankRef:
    """Where one rank's snapshot lives: a thawd name, a file, or both ("" = none)."""

    name: str
    path: str

    @property
    def label(self) -> str:
        return self.name or self.path


def resolve(options: Options, rank: int, tp_size: int) -> RankRef:
    if is_path(options.snapshot):
        return RankRef("", os.path.abspath(rank_path(options.snapshot, rank, tp_size)))
    path = rank_path(options.path, rank, tp_size) if options.path else ""
    return RankRef(
        rank_name(options.snapshot, rank, tp_size), os.path.abspath(path) if path else ""
    )


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one rank's bytes come from: thawd (a name, and its tier) or a file."""

    kind: str  # "thawd" | "file" | "missing"
    name: str = ""
    path: str = ""
    tier: str = ""
    fingerprint: Fingerprint | None = None


def connect_daemon(options: Options) -> Any:
    """A thaw client, or None where the daemon is not running and daemon != "require"."""
    if options.daemon == "never":
        return None
    from thaw.daemon.client import connect

    try:
        return connect(options.socket or None)
    except DaemonUnavailable:
        if options.daemon == "require":
            raise
        return None


def missing_message(ref: RankRef, options: Options, daemon_running: bool) -> str:
    """Why a rank's snapshot was not found, and how to make it."""
    where = []
    if ref.name:
        if options.daemon == "never":
            where.append(f"{ref.name!r} is a thawd name but daemon='never'")
        elif daemon_running:
            where.append(f"thawd has no snapshot {ref.name!r}")
        else:
            where.append(f"thawd is not running at {options.socket or default_socket()}")
    if ref.path:
        where.append(f"{ref.path} does not exist")
    elif ref.name:
        where.append('no "path" to fall back to')
    return (
        f"snapshot {ref.label!r} not found ({'; '.join(where)}): create it with "
        '"freeze_on_miss": true, `thawctl freeze --engine vllm`, or thaw.vllm.freeze(llm, ...)'
    )


def default_socket() -> str:
    from thaw.daemon.client import default_socket as socket

    return socket()


# A parent process asks thawd once, before any engine process starts: a healthy thawd answers
# in milliseconds; a stuck one should not hold the engine's start for the client's 30 s.
PREFLIGHT_TIMEOUT_S = 5.0


def preflight(config: Mapping[str, Any] | None, tp_size: int) -> None:
    """Check `load_format="thaw"`'s options and that every rank's snapshot exists, in the
    process that creates the engine, before vLLM starts the engine core and its workers:
    there a failure would surface only as vLLM's "Engine core initialization failed" after the
    engine's start-up. Raises ValueError (bad options), SnapshotMissing or DaemonUnavailable
    (daemon="require"). Fingerprints are checked later, by each worker, against its model."""
    options = Options.from_config(config)
    if options.freeze_on_miss:
        return  # a missing snapshot is made, not refused
    client = None
    if options.daemon != "never":
        from thaw.daemon.client import Client

        try:
            # Client, not connect(): this process restores nothing and maps no pool.
            client = Client(options.socket or default_socket(), timeout=PREFLIGHT_TIMEOUT_S)
        except DaemonUnavailable:
            if options.daemon == "require":
                raise
    try:
        for rank in range(tp_size):
            ref = resolve(options, rank, tp_size)
            if find_source(ref, client).kind == "missing":
                raise SnapshotMissing(
                    (f"rank {rank}: " if tp_size > 1 else "")
                    + missing_message(ref, options, daemon_running=client is not None)
                )
    finally:
        if client is not None:
            client.close()


def find_source(ref: RankRef, client: Any) -> Source:
    """thawd when it holds the snapshot (by name, or a registered file by path), else the file."""
    from thaw.format import open_snapshot

    if client is not None:
        record = None
        if ref.name:
            try:
                record = client.stat(ref.name)
            except NotFound:
                record = None
        elif ref.path:
            record = next((r for r in client.list() if os.path.abspath(r.path) == ref.path), None)
        if record is not None and not record.error:
            fp = record.fingerprint if isinstance(record.fingerprint, Fingerprint) else None
            return Source("thawd", record.name, record.path, record.tier, fp)
    if ref.path and os.path.exists(ref.path):
        return Source("file", "", ref.path, "file", open_snapshot(ref.path).fingerprint)
    return Source("missing", ref.name, ref.path)


def without(fp: Fingerprint, keys: Sequence[str]) -> Fingerprint:
    """`fp` with `keys` unset, so `check` does not compare them."""
    if not keys:
        return fp
    unset: dict[str, Any] = {k: (-1 if isinstance(getattr(fp, k), int) else "") for k in keys}
    return dataclasses.replace(fp, **unset)


def model_name(model: str) -> str:
    """What fingerprints record as the model: an id as given, a directory by its name
    (as `thawctl freeze` does, so a copied model directory still matches)."""
    return Path(model).resolve().name if os.path.isdir(model) else model


def make_fingerprint(
    *,
    architecture: str,
    dtype: str,
    parameter_count: int,
    quantization: str,
    tp_rank: int,
    tp_size: int,
    engine_version: str,
    model: str,
    labels: Mapping[str, str] = (),  # type: ignore[assignment]
) -> Fingerprint:
    all_labels = {
        WEIGHTS_LABEL: WEIGHTS_KIND,
        NAMES_LABEL: "vllm",
        SHARD_LABEL: f"tp{tp_rank}/{tp_size}",
        **dict(labels),
    }
    return Fingerprint(
        architecture=architecture,
        dtype=dtype,
        parameter_count=parameter_count,
        quantization=quantization,
        tp_rank=tp_rank,
        tp_size=tp_size,
        engine=ENGINE,
        engine_version=engine_version,
        model=model,
        labels=all_labels,
    )


@dataclasses.dataclass(frozen=True)
class RankTransfer:
    """What one rank moved."""

    rank: int
    snapshot: str
    source: str  # thawd | file | checkpoint (freeze_on_miss)
    tier: str  # pinned | warm | cold | file | ""
    bytes: int
    seconds: float
    content_id: str = ""  # what the rank holds now (thaw.kv.weights), "" when not known

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EngineTransfer:
    """A restore or freeze across all ranks of an engine."""

    snapshot: str
    ranks: tuple[RankTransfer, ...]
    seconds: float

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.ranks)

    @property
    def tier(self) -> str:
        tiers = {r.tier for r in self.ranks}
        return tiers.pop() if len(tiers) == 1 else ",".join(sorted(tiers))

    @property
    def paths(self) -> list[str]:
        return [r.snapshot for r in self.ranks]

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")
