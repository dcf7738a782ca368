"""One slot's engine: a real `vllm.LLM`, driven by one thread of its own.

vLLM's `LLMEngine` is synchronous (`add_request`, then `step()` until done) and not
thread-safe, so every call on it happens on this slot's thread, in order. That order is what
makes a swap safe: a restore is a command in the same inbox as requests, and thaw's restore
refuses an engine with unfinished requests (thaw.vllm.api), so no swap ever runs under a
request. The asyncio side never blocks: it posts commands and awaits results, which the
thread hands back with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

from thaw.engines.transfer import EngineTransfer

# Used when the model's tokenizer has none (the tiny test model): role-prefixed lines,
# ending in the assistant's turn. `--chat-template FILE` replaces it.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclasses.dataclass
class Job:
    """One generation request on its way through a slot's thread. `outputs` receives vLLM's
    `RequestOutput`s (deltas when streaming) and ends with None, or an exception."""

    request_id: str
    model: str  # the weights it must run on: checked on the thread against what is loaded
    prompt: Any  # a string, or {"prompt_token_ids": [...]} (vLLM's TokensPrompt)
    params: Any  # vllm.SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[Any]
    done: bool = False  # its last output (or its error) was taken: nothing to abort

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


class RequestRefused(ValueError):
    """vLLM refused to add the request (a prompt too long for the model, ...): HTTP 400."""


class WrongWeights(RuntimeError):
    """A request reached a slot holding other weights: refused rather than served."""


class Engine:
    """A started vLLM engine and the thread that owns it."""

    def __init__(self, index: int, llm: Any, loaded: str, socket: str | None) -> None:
        self.index = index
        self.llm = llm
        self.loaded = loaded  # the model whose weights the engine holds ("" unknown)
        self.socket = socket
        self.max_model_len = int(llm.llm_engine.model_config.max_model_len)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._jobs: dict[str, Job] = {}
        self._thread = threading.Thread(target=self._run, name=f"thaw-serve-slot{index}",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    # --- the asyncio side --------------------------------------------------------------

    def submit(self, job: Job) -> None:
        if not self.alive():  # nothing would ever answer it
            job.put(RuntimeError(f"slot {self.index}'s engine has stopped"))
            return
        self._inbox.put(("add", job))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def swap(self, model: str, snapshot: str) -> EngineTransfer:
        """Restore `snapshot` into this engine (the pool calls it only with no request in
        flight here); the engine holds `model` afterwards."""
        if not self.alive():
            raise RuntimeError(f"slot {self.index}'s engine has stopped")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[EngineTransfer] = loop.create_future()
        self._inbox.put(("swap", (model, snapshot, loop, done)))
        return await done

    async def render_chat(self, messages: list[dict[str, Any]], template: str | None) -> Any:
        """The chat prompt as token ids, rendered on the slot's thread (tokenizing is CPU
        work that must not run on the event loop)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        self._inbox.put(("chat", (messages, template, loop, done)))
        return await done

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._inbox.put(("stop", None))
        self._thread.join(timeout=60)
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()

    # --- the slot's thread -------------------------------------------------------------

    def _run(self) -> None:
        engine = self.llm.llm_engine
        while True:
            busy = engine.has_unfinished_requests()
            try:
                # Idle: sleep until a command comes. Busy: take what is there, then step.
                commands = [self._inbox.get(block=not busy)] if not busy else []
            except queue.Empty:  # pragma: no cover - block=True never raises it
                commands = []
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for kind, arg in commands:
                if kind == "stop":
                    for job in self._jobs.values():
                        job.put(RuntimeError("the server is stopping"))
                    return
                self._command(kind, arg)
            if engine.has_unfinished_requests():
                self._step()

    def _command(self, kind: str, arg: Any) -> None:
        engine = self.llm.llm_engine
        if kind == "add":
            job: Job = arg
            if job.model != self.loaded:
                job.put(WrongWeights(f"slot {self.index} holds {self.loaded!r}, not "
                                     f"{job.model!r}"))  # fmt: skip
                return
            try:
                engine.add_request(job.request_id, job.prompt, job.params)
            except Exception as e:  # a prompt vLLM refuses (too long, ...): that request's
                job.put(RequestRefused(str(e)))
                return
            self._jobs[job.request_id] = job
        elif kind == "abort":
            if self._jobs.pop(arg, None) is not None:
                engine.abort_request([arg])
        elif kind == "swap":
            model, snapshot, loop, done = arg
            self._swap(model, snapshot, loop, done)
        elif kind == "chat":
            messages, template, loop, done = arg
            try:
                tok = self.llm.get_tokenizer()
                text = tok.apply_chat_template(
                    messages,
                    chat_template=template
                    or getattr(tok, "chat_template", None)
                    or DEFAULT_CHAT_TEMPLATE,
                    add_generation_prompt=True,
                    tokenize=False,
                )
                # The template writes the special tokens itself (vLLM's chat does the same).
                result: Any = {"prompt_token_ids": tok.encode(text, add_special_tokens=False)}
            except Exception as e:
                result = e
            loop.call_soon_threadsafe(_settle, done, result)

    def _swap(self, model: str, snapshot: str, loop: asyncio.AbstractEventLoop,
              done: asyncio.Future[EngineTransfer]) -> None:  # fmt: skip
        import thaw.vllm

        # What the engine holds is unknown from the first byte copied until the restore
        # returns: nothing may be served from it meanwhile, nor after a failure.
        self.loaded = ""
        try:
            # ignore=["model"]: a fine-tune carries another checkpoint name; the pool checked
            # its architecture when it was registered, and thaw checks it again here. The
            # restore resets the prefix cache: KV of the old weights never serves the new.
            result: Any = thaw.vllm.restore(self.llm, snapshot, socket=self.socket,
                                            ignore=["model"])  # fmt: skip
            self.loaded = model
        except Exception as e:
            result = e
        loop.call_soon_threadsafe(_settle, done, result)

    def _step(self) -> None:
        try:
            outputs = self.llm.llm_engine.step()
        except Exception as e:  # the engine died: every request on it fails, loudly
            for job in self._jobs.values():
                job.put(e)
            self._jobs.clear()
            raise
        for out in outputs:
            owner = self._jobs.get(out.request_id)
            if owner is None:
                continue
            owner.put(out)
            if out.finished:
                del self._jobs[out.request_id]
                owner.put(None)


def _settle(fut: asyncio.Future[Any], result: Any) -> None:
    if fut.cancelled():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


def start_llm(model: str, engine_args: Mapping[str, Any]) -> Any:
    """A vLLM engine for a slot: the model's architecture, thaw's worker extension (restore
    reaches the workers through it). Blocking (tens of seconds): called before serving."""
    from vllm import LLM

    import thaw.vllm

    kwargs = dict(engine_args)
    kwargs.setdefault("worker_extension_cls", thaw.vllm.WORKER_EXTENSION)
    return LLM(model=model, **kwargs)


def chat_template_file(path: str | None) -> str | None:
    if path is None:
        return None
    with open(os.path.expanduser(path), encoding="utf-8") as f:
        return f.read()


def now() -> float:
    return time.monotonic()
