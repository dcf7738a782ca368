"""The options of a thaw load, restore or freeze of an engine: vLLM's
`model_loader_extra_config`, SGLang's, and the keywords of thaw.vllm.restore/freeze."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from thaw.format.fingerprint import IDENTITY_KEYS

DAEMON_MODES = ("auto", "require", "never")


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

    @classmethod
    def of(cls, snapshot: str | os.PathLike[str], **keywords: Any) -> Options:
        """Options from keyword arguments (None: the default), as restore/freeze take them."""
        config = {k: v for k, v in keywords.items() if v is not None}
        config["snapshot"] = os.fspath(snapshot)
        return cls.from_config(config)

    def to_config(self) -> dict[str, Any]:
        """A msgpack/JSON-able dict (what travels to the workers)."""
        out = dataclasses.asdict(self)
        out["labels"] = dict(self.labels)
        out["ignore"] = list(self.ignore)
        return out
