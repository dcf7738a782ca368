"""`thawctl serve` end to end: a real thawd, a real `thawctl serve` process with one real
vLLM CPU engine, the official `openai` client as a user's client and raw HTTP for SSE.

Every answer is checked against an engine loaded directly with that model's weights
(conftest.py's `reference`): a request served by the wrong weights fails these tests. The
tests share one server and run in file order; each leaves the pool serving.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import stat
import time
from typing import Any

import httpx
import pytest

from .conftest import CHAT, MAX_QUEUE, MAX_TOKENS, PROMPTS, Server

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed"),
]


def openai_client(server: Server) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def complete(server: Server, model: str, prompt: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            **extra}  # fmt: skip
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)


def test_models_lists_every_model_and_where_it_is(server: Server) -> None:
    models = {m.id: m for m in openai_client(server).models.list().data}
    assert set(models) == {"tiny0", "tiny1", "small"}
    assert models["tiny0"].model_extra is not None
    assert models["tiny0"].model_extra["slots"] == [0]  # the first weights, loaded at start
    assert models["tiny1"].model_extra is not None
    assert models["tiny1"].model_extra["slots"] == []


def test_completions_per_model_equal_direct_engine_across_swaps(
    server: Server, reference: dict[str, Any]
) -> None:
    client = openai_client(server)
    # tiny1 is not loaded: the one slot swaps, then back, then again.
    for model in ("tiny0", "tiny1", "tiny0", "tiny1"):
        for prompt in PROMPTS:
            raw = client.completions.with_raw_response.create(
                model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
            )
            answer = raw.parse()
            assert answer.model == model
            assert answer.choices[0].text == reference[model][prompt], (model, prompt)
            assert raw.headers["x-thaw-slot"] == "0"
    swaps = server.admin().get("/pool").json()["last_swaps"]
    assert [(s["model"], s["ok"]) for s in swaps[-3:]] == [("tiny1", True), ("tiny0", True),
                                                          ("tiny1", True)]  # fmt: skip
    assert all(s["tier"] == "pinned" and s["bytes"] > 0 for s in swaps)


def test_another_architecture_goes_to_its_own_slot(
    server: Server, reference: dict[str, Any]
) -> None:
    """Slot 1 runs the one-layer model's architecture: "small" is served there (its weights
    from thawd into an engine started empty), the tiny models never are."""
    client = openai_client(server)
    for model in ("small", "tiny1", "small", "tiny0"):
        raw = client.completions.with_raw_response.create(
            model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0
        )
        assert raw.parse().choices[0].text == reference[model][PROMPTS[0]], model
        assert raw.headers["x-thaw-slot"] == ("1" if model == "small" else "0")
    slots = server.admin().get("/pool").json()["slots"]
    assert [(s["model"], s["swaps"] > 0) for s in slots] == [("tiny0", True), ("small", True)]


def test_chat_uses_the_template_and_equals_direct_engine(
    server: Server, reference: dict[str, Any]
) -> None:
    client = openai_client(server)
    for model in ("tiny0", "tiny1"):
        answer = client.chat.completions.create(
            model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0
        )
        assert answer.choices[0].message.role == "assistant"
        assert answer.choices[0].message.content == reference[model]["chat"], model


def test_completion_stream_is_sse_and_adds_up(server: Server, reference: dict[str, Any]) -> None:
    body = {"model": "tiny0", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", raw[-200:]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert len(chunks) > 1
    assert all(c["object"] == "text_completion" and c["model"] == "tiny0" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference["tiny0"][PROMPTS[0]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_chat_stream_through_openai_client(server: Server, reference: dict[str, Any]) -> None:
    stream = openai_client(server).chat.completions.create(
        model="tiny1",
        messages=CHAT,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len(deltas) > 1
    assert "".join(deltas) == reference["tiny1"]["chat"]
    assert chunks[-1].usage is None  # only when asked for


def test_stream_usage_when_asked_equals_the_unstreamed_usage(server: Server) -> None:
    client = openai_client(server)
    plain = client.completions.create(model="tiny0", prompt=PROMPTS[1], max_tokens=MAX_TOKENS,
                                      temperature=0)  # fmt: skip
    chunks = list(client.completions.create(
        model="tiny0", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert plain.usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (
        plain.usage.prompt_tokens, plain.usage.completion_tokens)  # fmt: skip
    assert all(c.usage is None for c in chunks[:-1])


def test_a_client_leaving_mid_stream_frees_the_slot(
    server: Server, reference: dict[str, Any]
) -> None:
    body = {"model": "tiny1", "prompt": PROMPTS[0], "max_tokens": 1000, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
        next(r.iter_lines())  # one event, then hang up with ~1000 tokens to go
    admin = server.admin()
    deadline = time.monotonic() + 30
    while admin.get("/pool").json()["slots"][0]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert admin.get("/pool").json()["slots"][0]["in_flight"] == 0
    # The slot is free to swap: the other model is served.
    assert complete(server, "tiny0", PROMPTS[0]).json()["choices"][0]["text"] == (
        reference["tiny0"][PROMPTS[0]])  # fmt: skip


def test_concurrent_requests_for_two_models_on_one_slot(
    server: Server, reference: dict[str, Any]
) -> None:
    import openai

    async def main() -> list[tuple[str, str, str]]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused",
                                    max_retries=0)  # fmt: skip

        async def one(model: str, prompt: str) -> tuple[str, str, str]:
            r = await client.completions.create(model=model, prompt=prompt,
                                                max_tokens=MAX_TOKENS, temperature=0)  # fmt: skip
            return model, prompt, r.choices[0].text

        jobs = [one(m, p) for _ in range(2) for m in ("tiny0", "tiny1") for p in PROMPTS]
        return list(await asyncio.gather(*jobs))

    before = server.admin().get("/pool").json()["slots"][0]["swaps"]
    results = asyncio.run(main())
    assert len(results) == 8
    for model, prompt, text in results:
        assert text == reference[model][prompt], (model, prompt)
    # Requests were batched per model, not swapped per request.
    after = server.admin().get("/pool").json()["slots"][0]["swaps"]
    assert 1 <= after - before <= 4


LONG = 1000  # tokens: a stream in flight for seconds on the CPU build


def test_no_swap_under_a_request_in_flight(server: Server, reference: dict[str, Any]) -> None:
    """A long stream on the one slot: a request for the other model waits for it to end
    (the slot is reserved, so a later request for the first model queues, not joins)."""
    # The whole long answer on tiny0's weights, alone on the slot (and the slot holds tiny0).
    expected = complete(server, "tiny0", PROMPTS[0], max_tokens=LONG, ignore_eos=True)
    assert expected.status_code == 200
    expected_text = expected.json()["choices"][0]["text"]

    async def main() -> tuple[str, httpx.Response, httpx.Response, int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            long = {"model": "tiny0", "prompt": PROMPTS[0], "max_tokens": LONG,
                    "ignore_eos": True, "temperature": 0, "stream": True}  # fmt: skip
            async with client.stream("POST", "/v1/completions", json=long) as stream:
                lines = stream.aiter_lines()
                first = await anext(lines)  # in flight now
                other = asyncio.create_task(client.post("/v1/completions", json={
                    "model": "tiny1", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                    "temperature": 0}))  # fmt: skip
                await asyncio.sleep(0.3)
                again = asyncio.create_task(client.post("/v1/completions", json={
                    "model": "tiny0", "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS,
                    "temperature": 0}))  # fmt: skip
                events = [first] + [line async for line in lines if line.startswith("data: {")]
            text = "".join(json.loads(e.removeprefix("data: "))["choices"][0]["text"]
                           for e in events)  # fmt: skip
            return text, await other, await again, len(events)

    text, other, again, chunks = asyncio.run(main())
    assert chunks >= 2
    # A swap under the stream would have put tiny1's weights under its later tokens: the
    # whole stream equals the answer computed on tiny0 alone.
    assert text == expected_text
    assert other.json()["choices"][0]["text"] == reference["tiny1"][PROMPTS[0]]
    assert again.json()["choices"][0]["text"] == reference["tiny0"][PROMPTS[1]]
    swaps = [s["model"] for s in server.admin().get("/pool").json()["last_swaps"]]
    assert swaps[-2:] == ["tiny1", "tiny0"]  # and the later tiny0 request waited for it


def test_swap_drops_the_prefix_cache(server: Server, reference: dict[str, Any]) -> None:
    prompt = reference["long_prompt"]["text"]

    def cached(model: str) -> int:
        r = complete(server, model, prompt, max_tokens=1)
        assert r.status_code == 200, r.text
        return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    cached("tiny0")
    assert cached("tiny0") == 512  # 4 full 128-token blocks of the CPU backend
    cached("tiny1")  # swap away...
    assert cached("tiny0") == 0  # ...and back: no KV of other weights survived either swap


def test_queue_full_is_429_with_retry_after(server: Server, reference: dict[str, Any]) -> None:
    admin = server.admin()
    # With the only slot drained, every request waits: the queue fills deterministically.
    assert admin.post("/slots/0/drain").json()["state"] == "drained"

    async def main() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            body = {"model": "tiny1", "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS,
                    "temperature": 0}  # fmt: skip
            waiting = [asyncio.create_task(client.post("/v1/completions", json=body))
                       for _ in range(MAX_QUEUE)]  # fmt: skip
            while admin_queue("tiny1") < MAX_QUEUE:
                await asyncio.sleep(0.05)
            refused = await client.post("/v1/completions", json=body)
            assert admin.post("/slots/0/resume").status_code == 200
            return list(await asyncio.gather(*waiting)), refused

    def admin_queue(model: str) -> int:
        models = admin.get("/pool").json()["models"]
        return int(next(m["queue"] for m in models if m["name"] == model))

    served, refused = asyncio.run(main())
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert [r.status_code for r in served] == [200] * MAX_QUEUE
    assert all(r.json()["choices"][0]["text"] == reference["tiny1"][PROMPTS[1]] for r in served)


def test_unknown_model_is_404(server: Server) -> None:
    import openai

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        openai_client(server).completions.create(model="nope", prompt="x", max_tokens=1)


def test_a_request_vllm_refuses_is_400(server: Server) -> None:
    body = {"model": "tiny0", "prompt": [5] * 3000, "max_tokens": 1}  # > max_model_len
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert "3000" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_admin_refuses_unauthenticated_callers(server: Server) -> None:
    assert httpx.get(f"{server.url}/admin/pool").status_code == 401
    wrong = {"Authorization": "Bearer " + "0" * 32}
    assert httpx.get(f"{server.url}/admin/pool", headers=wrong).status_code == 403
    right = {"Authorization": f"Bearer {server.token}"}
    pool = httpx.get(f"{server.url}/admin/pool", headers=right)
    assert pool.status_code == 200 and pool.json()["slots"][0]["slot"] == 0
    # The Unix socket admits only its owner (and root): mode 0600 in a 0700 directory.
    assert stat.S_IMODE(os.stat(server.admin_socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(server.admin_socket)).st_mode) == 0o700


def test_register_at_runtime_then_serve_then_unregister(
    server: Server, reference: dict[str, Any], tmp_path: Any
) -> None:
    import torch

    from thaw import freeze_file
    from thaw.format.fingerprint import Fingerprint

    admin = server.admin()
    created = admin.post("/models", json={"name": "tiny1-ft", "snapshot": "tiny1"})
    assert created.status_code == 201, created.text
    assert complete(server, "tiny1-ft", PROMPTS[0]).json()["choices"][0]["text"] == (
        reference["tiny1"][PROMPTS[0]])  # fmt: skip
    assert "tiny1-ft" in {m.id for m in openai_client(server).models.list().data}

    # Weights of another architecture: no slot of this pool can hold them.
    other = tmp_path / "other.thaw"
    fp = Fingerprint(architecture="MistralForCausalLM", dtype="float32", parameter_count=4096,
                     tp_rank=0, tp_size=1, engine="vllm", model="other")  # fmt: skip
    freeze_file({"w": torch.zeros(64, 64)}, other, fingerprint=fp)
    refused = admin.post("/models", json={"name": "other", "snapshot": str(other)})
    assert refused.status_code == 422 and "no slot can hold" in refused.json()["error"]["message"]
    missing = admin.post("/models", json={"name": "ghost", "snapshot": "no-such-snapshot"})
    assert missing.status_code == 404

    assert admin.delete("/models/tiny1-ft").status_code == 200
    assert complete(server, "tiny1-ft", PROMPTS[0]).status_code == 404


def test_metrics(server: Server) -> None:
    text = httpx.get(f"{server.url}/metrics").text
    assert 'thaw_serve_swaps_total{model="tiny1",outcome="ok"}' in text
    assert 'thaw_serve_requests_total{model="tiny0",outcome="200",route="completions"}' in text
    assert 'thaw_serve_requests_total{model="tiny1",outcome="429",route="completions"} 1.0' in text
    assert 'thaw_serve_queue_depth{model="tiny0"} 0.0' in text
    # The slot held tiny1-ft, unregistered since: "empty" (its weights serve no model).
    states = [
        line
        for line in text.splitlines()
        if line.startswith('thaw_serve_slot_state{slot="0"') and line.endswith(" 1.0")
    ]
    assert states == ['thaw_serve_slot_state{slot="0",state="empty"} 1.0']
    assert "thaw_serve_swap_seconds_count" in text


def test_top_shows_the_pool(server: Server, module_thawd: Any) -> None:
    """`thawctl top --serve SOCKET`, key P: slots, the model per slot, queue, swaps/min."""
    from thawctl.tui.app import ThawTop
    from thawctl.tui.screens.main import MainScreen
    from thawctl.tui.source import DaemonSource
    from thawctl.tui.widgets.pool import PoolTable

    complete(server, "tiny0", PROMPTS[0])  # the slot holds a registered model again

    async def scenario() -> None:
        app = ThawTop(DaemonSource(module_thawd.socket, 0.2), 0.2, server.admin_socket)
        async with app.run_test(size=(100, 30)) as pilot:
            screen = app.screen
            assert isinstance(screen, MainScreen)
            await pilot.press("P")
            assert screen.has_class("-pool")
            table = screen.query_one(PoolTable)
            deadline = time.monotonic() + 20
            while table.row_count == 0 and time.monotonic() < deadline:
                await pilot.pause(0.05)
            cells = [str(c) for c in table.get_row_at(0)]
            assert cells[:3] == ["0", "idle", "tiny0"]
            assert int(cells[5]) >= 4  # the swaps of the tests above
            assert "2 slots · 0 queued ·" in str(table.border_title)
            assert [str(c) for c in table.get_row_at(1)][:3] == ["1", "idle", "small"]
            assert "swaps/min" in str(table.border_title)
            await pilot.press("P")
            assert not screen.has_class("-pool")

    asyncio.run(scenario())


def test_health(server: Server) -> None:
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "slots": 2}


def test_a_pool_of_two_keeps_two_models_and_swaps_the_least_recently_used(
    pool2: Server, reference: dict[str, Any]
) -> None:
    """--pool-size 2 (one architecture): a second model fills the empty slot and stays there;
    asking for both then swaps nothing (affinity); a third model swaps the slot used least
    recently, never the one just used; every answer is its weights' own."""
    weights = {"tiny0": "tiny0", "tiny1": "tiny1", "tiny0-again": "tiny0"}

    def ask(model: str) -> int:
        r = complete(pool2, model, PROMPTS[0])
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == reference[weights[model]][PROMPTS[0]], model
        return int(r.headers["x-thaw-slot"])

    def swaps() -> int:
        return sum(s["swaps"] for s in pool2.admin().get("/pool").json()["slots"])

    assert ask("tiny0") == 0  # loaded at start
    start = swaps()
    assert ask("tiny1") == 1  # the empty slot
    assert swaps() == start + 1
    for _ in range(2):
        assert (ask("tiny0"), ask("tiny1")) == (0, 1)
    assert swaps() == start + 1  # both held: no swap
    assert ask("tiny0-again") == 0  # slot 0 was used before slot 1's last request
    assert ask("tiny1") == 1
    assert ask("tiny0") == 0  # slot 0 again: tiny0-again was used before tiny1
    assert swaps() == start + 3
    slots = pool2.admin().get("/pool").json()["slots"]
    assert [(s["slot"], s["model"]) for s in slots] == [(0, "tiny0"), (1, "tiny1")]
