"""The OpenAI-compatible routes: /v1/completions, /v1/chat/completions (both with real SSE
streams), /v1/models, /health, /metrics.

Requests and responses are vLLM's own protocol models (vllm.entrypoints.openai.*.protocol),
validated and serialized as `vllm serve` does, and `to_sampling_params` is vLLM's mapping
from the request to sampling: what this module adds is only the routing (a lease on a slot
holding the requested model, from pool.py) and the loop over the slot's outputs.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from thawctl.serve.engine import Job, RequestRefused
from thawctl.serve.metrics import Metrics
from thawctl.serve.models import ModelError
from thawctl.serve.pool import Lease, Pool, QueueFull

# OpenAI's default for /v1/completions when max_tokens is left out.
COMPLETION_MAX_TOKENS = 16


def error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> Response:
    """An error body as OpenAI (and vLLM) write it: {"error": {message, type, param, code}}."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def model_error(e: ModelError) -> Response:
    headers = {"Retry-After": str(e.retry_after)} if isinstance(e, QueueFull) else None
    return error(e.status, str(e), e.kind, headers)


def lease_headers(lease: Lease) -> dict[str, str]:
    """Where and how long: which slot served, the wait split into queue and swap (what
    benchmarks/serve.py reads; prefill is the rest of the time to the first token)."""
    return {
        "X-Thaw-Slot": str(lease.slot.index),
        "X-Thaw-Queue-Seconds": f"{lease.queue_s:.6f}",
        "X-Thaw-Swap-Seconds": f"{lease.swap_s:.6f}",
    }


class Api:
    def __init__(self, pool: Pool, metrics: Metrics, chat_template: str | None) -> None:
        self.pool = pool
        self.metrics = metrics
        self.chat_template = chat_template

    # --- /v1/completions, /v1/chat/completions ------------------------------------------

    async def completions(self, request: Request) -> Response:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        return await self._generate(request, CompletionRequest, "completions")

    async def chat(self, request: Request) -> Response:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        return await self._generate(request, ChatCompletionRequest, "chat")

    async def _generate(self, request: Request, schema: Any, route: str) -> Response:
        import pydantic

        try:
            body = await request.json()
            req = schema.model_validate(body)
        except (ValueError, pydantic.ValidationError) as e:
            return error(400, f"invalid request: {e}", "invalid_request_error")
        name = str(req.model or "")
        try:
            if getattr(req, "n", 1) not in (None, 1):
                raise ModelError("only n=1 is served")
            lease = await self.pool.acquire(name)
        except ModelError as e:
            self.metrics.requests.labels(name if name in self.pool.models else "",
                                         route, str(e.status)).inc()  # fmt: skip
            return model_error(e)
        try:
            if route == "chat":
                prompt = await lease.slot.engine.render_chat(_messages(req), self.chat_template)
                max_tokens = (
                    req.max_completion_tokens
                    or req.max_tokens
                    or max(1, lease.slot.engine.max_model_len - len(prompt["prompt_token_ids"]))
                )
                params = req.to_sampling_params(max_tokens, {})
            else:
                prompt = _completion_prompt(req.prompt)
                params = req.to_sampling_params(req.max_tokens or COMPLETION_MAX_TOKENS, {})
        except Exception as e:
            lease.release()
            return error(400, f"invalid request: {e}", "invalid_request_error")
        except BaseException:  # cancelled (the client left) while the prompt was rendered
            lease.release()
            raise
        job = Job(f"{route}-{uuid.uuid4().hex}", name, prompt, params,
                  asyncio.get_running_loop(), asyncio.Queue())  # fmt: skip
        lease.slot.engine.submit(job)
        count = self.metrics.requests.labels(name, route, "200").inc
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return LeasedStream(lease, job, self._stream(lease, job, route, count, usage),
                                media_type="text/event-stream",
                                headers=lease_headers(lease))  # fmt: skip
        try:
            outputs = [o async for o in _outputs(lease, job)]
        except RequestRefused as e:
            self.metrics.requests.labels(name, route, "400").inc()
            return error(400, str(e), "invalid_request_error")
        except Exception as e:
            self.metrics.requests.labels(name, route, "500").inc()
            return error(500, f"generation failed: {e}", "internal_error")
        count()
        final = outputs[-1]
        return JSONResponse(_response(route, name, job.request_id, final),
                            headers=lease_headers(lease))  # fmt: skip

    async def _stream(self, lease: Lease, job: Job, route: str, count: Callable[[], None],
                      usage: bool) -> AsyncIterator[str]:  # fmt: skip
        """Server-sent events, one per step's delta as the slot produces it; with `usage`
        (stream_options.include_usage) a last chunk with no choices and the token counts,
        as OpenAI sends it."""
        from vllm.entrypoints.generate.base.protocol import DeltaMessage
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionResponseStreamChoice,
            ChatCompletionStreamResponse,
        )
        from vllm.entrypoints.openai.completion.protocol import (
            CompletionResponseStreamChoice,
            CompletionStreamResponse,
        )
        from vllm.entrypoints.serve.engine.protocol import UsageInfo

        first = True
        prompt_tokens = completion_tokens = 0
        try:
            async for out in _outputs(lease, job):
                c = out.outputs[0]
                prompt_tokens = max(prompt_tokens, len(out.prompt_token_ids or ()))
                completion_tokens += len(c.token_ids)
                if route == "chat":
                    delta = DeltaMessage(role="assistant" if first else None, content=c.text)
                    chunk: Any = ChatCompletionStreamResponse(
                        id=job.request_id, model=job.model,
                        choices=[ChatCompletionResponseStreamChoice(
                            index=0, delta=delta, finish_reason=c.finish_reason)],
                    )  # fmt: skip
                else:
                    chunk = CompletionStreamResponse(
                        id=job.request_id, model=job.model,
                        choices=[CompletionResponseStreamChoice(
                            index=0, text=c.text, finish_reason=c.finish_reason)],
                    )  # fmt: skip
                first = False
                yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
            if usage:
                kind = ChatCompletionStreamResponse if route == "chat" else CompletionStreamResponse
                total = prompt_tokens + completion_tokens
                counts = UsageInfo(
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    total_tokens=total,
                )
                last = kind(id=job.request_id, model=job.model, choices=[], usage=counts)
                yield f"data: {last.model_dump_json(exclude_none=True)}\n\n"
            count()
        except Exception as e:
            body = {"error": {"message": f"generation failed: {e}", "type": "internal_error",
                              "param": None, "code": 500}}  # fmt: skip
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

    # --- /v1/models, /health, /metrics -----------------------------------------------------

    async def models(self, request: Request) -> Response:
        from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelList

        cards = []
        for m in self.pool.models.values():
            # Beyond OpenAI's card (vLLM's allows extra fields): where the model is loaded.
            card = ModelCard(id=m.name, owned_by="thaw", root=m.snapshot, created=int(m.registered))
            card.slots = [s.index for s in self.pool.slots if s.model == m.name]  # type: ignore[attr-defined]
            cards.append(card)
        return JSONResponse(ModelList(data=cards).model_dump())

    async def health(self, request: Request) -> Response:
        alive = [s for s in self.pool.slots if s.engine.alive()]
        body = {"status": "ok" if alive else "unavailable", "slots": len(alive)}
        return JSONResponse(body, status_code=200 if alive else 503)

    async def prometheus(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]


def build(api: Api, extra: list[Any] | None = None) -> Starlette:
    return Starlette(routes=[*api.routes(), *(extra or [])])


class LeasedStream(StreamingResponse):
    """A stream that ends its request however the response ends: a client that leaves
    before the first chunk cancels the response before the generator ever ran, and a
    generator never started runs no `finally`. Without this the slot would count that
    request forever and never swap again."""

    def __init__(self, lease: Lease, job: Job, content: AsyncIterator[str], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.lease, self.job = lease, job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _end(self.lease, self.job)


def _end(lease: Lease, job: Job) -> None:
    """A request left before its last output is aborted in the engine; the lease goes."""
    if not job.done:
        job.done = True
        lease.slot.engine.abort(job.request_id)
    lease.release()


async def _outputs(lease: Lease, job: Job) -> AsyncIterator[Any]:
    """The slot's outputs for one job; the lease is released when it ends, however it ends
    (a client gone mid-stream aborts the request in the engine first)."""
    try:
        while True:
            item = await job.outputs.get()
            if item is None or isinstance(item, BaseException):
                job.done = True
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        _end(lease, job)


def _completion_prompt(prompt: Any) -> Any:
    """One prompt: a string or token ids (a list of one of them too)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return {"prompt_token_ids": prompt}
    raise ModelError("prompt must be one string or one list of token ids")


def _messages(req: Any) -> list[dict[str, Any]]:
    """Chat messages as the template sees them: text content (parts joined)."""
    out = []
    for m in req.messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append({"role": m.get("role", "user"), "content": content or ""})
    return out


def _response(route: str, model: str, request_id: str, final: Any) -> dict[str, Any]:
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponse,
        ChatCompletionResponseChoice,
        ChatMessage,
    )
    from vllm.entrypoints.openai.completion.protocol import (
        CompletionResponse,
        CompletionResponseChoice,
    )
    from vllm.entrypoints.serve.engine.protocol import PromptTokenUsageInfo, UsageInfo

    c = final.outputs[0]
    prompt_tokens = len(final.prompt_token_ids or [])
    # cached_tokens: the prefix cache's hits; after a swap they start again from 0, since
    # the restore dropped the KV of the old weights (docs/SERVE.md).
    usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=len(c.token_ids),
                      total_tokens=prompt_tokens + len(c.token_ids),
                      prompt_tokens_details=PromptTokenUsageInfo(
                          cached_tokens=int(final.num_cached_tokens or 0)))  # fmt: skip
    body: Any
    if route == "chat":
        body = ChatCompletionResponse(
            id=request_id, model=model, usage=usage,
            choices=[ChatCompletionResponseChoice(
                index=0, message=ChatMessage(role="assistant", content=c.text),
                finish_reason=c.finish_reason, stop_reason=c.stop_reason)],
        )  # fmt: skip
    else:
        body = CompletionResponse(
            id=request_id, model=model, usage=usage,
            choices=[CompletionResponseChoice(index=0, text=c.text, finish_reason=c.finish_reason,
                                              stop_reason=c.stop_reason)],
        )  # fmt: skip
    result: dict[str, Any] = body.model_dump(exclude_none=True)
    return result
