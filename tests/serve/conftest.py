"""Fixtures of the `thawctl serve` tests: the tiny models' snapshots in a real thawd, the
reference outputs of an engine loaded directly with each model's weights, and two running
`thawctl serve` processes (the real CLI) shared by the whole module: `server`, one slot per
architecture (the tiny Llama and its one-layer cut), and `pool2`, two slots of one.

Engines are the cost (30-50 s each on the 2-core CI box): six in all. The reference engine
loads seed 0 from its checkpoint, answers, freezes it into thawd, then loads seed 1 with
vLLM's own checkpoint reload (not thaw's restore), answers and freezes again; then one more
for the one-layer model; they stop before the servers' engines start.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.engines.conftest import ENGINE_KWARGS, ROOT, shutdown, tiny_dirs  # noqa: F401
from thawctl.serve.engine import DEFAULT_CHAT_TEMPLATE

START_TIMEOUT = 300.0
MAX_TOKENS = 16
MAX_QUEUE = 4
PROMPTS = ["The river town woke", "Hello world"]
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me about the river."}]  # fmt: skip
MODELS = {"tiny0": 0, "tiny1": 1}


def one_layer_dir(base: Path, source: Path) -> Path:
    """The seed-0 tiny Llama cut to its first layer: another architecture (parameter count)
    whose weights vLLM loads, for a slot of its own."""
    import shutil

    from safetensors.torch import load_file, save_file

    dest = base / "onelayer" / "tiny"
    if dest.exists():
        return dest
    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (dest / "config.json").write_text(json.dumps(config))
    weights = load_file(dest / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.1.")},
              dest / "model.safetensors", metadata={"format": "pt"})  # fmt: skip
    return dest


def _reference_outputs(llm: Any) -> dict[str, Any]:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    out: dict[str, Any] = {
        p: o.outputs[0].text
        for p, o in zip(PROMPTS, llm.generate(PROMPTS, sp, use_tqdm=False), strict=True)
    }
    # vLLM's own chat rendering, with the template the server falls back to.
    chat = llm.chat(CHAT, sp, chat_template=DEFAULT_CHAT_TEMPLATE, use_tqdm=False)
    out["chat"] = chat[0].outputs[0].text
    return out


@pytest.fixture(scope="module")
def reference(tiny_dirs: dict[int, Path], module_thawd: Any) -> dict[str, dict[str, Any]]:  # noqa: F811
    """model name -> {prompt: greedy text, "chat": greedy chat text}; both models frozen into
    thawd as "tiny0" and "tiny1" (pinned)."""
    from vllm import LLM

    import thaw
    import thaw.vllm
    from thaw.demo import tiny

    long_prompt = tiny.make_prompt(tiny.build_tokenizer(), 600, seed=5)
    client = thaw.connect(module_thawd.socket)
    llm = LLM(model=str(tiny_dirs[0]), worker_extension_cls=thaw.vllm.WORKER_EXTENSION,
              **ENGINE_KWARGS)  # fmt: skip
    refs: dict[str, dict[str, Any]] = {}
    try:
        refs["tiny0"] = _reference_outputs(llm)
        client.freeze(llm, "tiny0")
        llm.collective_rpc("reload_weights", kwargs={"weights_path": str(tiny_dirs[1])})
        llm.reset_prefix_cache()
        refs["tiny1"] = _reference_outputs(llm)
        client.freeze(llm, "tiny1")
        shutdown(llm)
        # Another architecture, for the server's second slot.
        small = one_layer_dir(tiny_dirs[0].parents[1], tiny_dirs[0])
        llm = LLM(model=str(small), worker_extension_cls=thaw.vllm.WORKER_EXTENSION,
                  **ENGINE_KWARGS)  # fmt: skip
        refs["small"] = _reference_outputs(llm)
        client.freeze(llm, "small")
    finally:
        shutdown(llm)
        client.close()
    assert refs["tiny0"] != refs["tiny1"]
    refs["long_prompt"] = {"text": long_prompt}
    return refs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A running `thawctl serve`: its URL, admin socket and token."""

    def __init__(self, url: str, admin_socket: str, token: str, log: Path,
                 proc: subprocess.Popen[bytes]) -> None:  # fmt: skip
        self.url, self.admin_socket, self.token, self.log, self.proc = (
            url, admin_socket, token, log, proc)  # fmt: skip

    def admin(self) -> httpx.Client:
        """An admin client on the Unix socket (no token: the socket's mode is the check)."""
        return httpx.Client(transport=httpx.HTTPTransport(uds=self.admin_socket),
                            base_url="http://serve", timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def server(reference: dict[str, Any], tiny_dirs: dict[int, Path], module_thawd: Any,  # noqa: F811
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:  # fmt: skip
    """Two slots, one per architecture: the tiny Llama and its one-layer cut."""
    models = ["--model", str(tiny_dirs[0]),
              "--model", str(one_layer_dir(tiny_dirs[0].parents[1], tiny_dirs[0])),
              "--snapshot", "tiny0", "--register", "tiny1=tiny1",
              "--register", "small=small"]  # fmt: skip
    yield from _serve(module_thawd, tmp_path_factory.mktemp("serve"), models)


@pytest.fixture(scope="module")
def pool2(reference: dict[str, Any], tiny_dirs: dict[int, Path], module_thawd: Any,  # noqa: F811
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:  # fmt: skip
    """--pool-size 2 of one architecture: slot 0 starts with tiny0, slot 1 empty; three
    models ("tiny0-again" is tiny0's weights under another name)."""
    models = ["--model", str(tiny_dirs[0]), "--pool-size", "2", "--snapshot", "tiny0",
              "--register", "tiny1=tiny1", "--register", "tiny0-again=tiny0"]  # fmt: skip
    yield from _serve(module_thawd, tmp_path_factory.mktemp("pool2"), models)


def _serve(module_thawd: Any, work: Path, models: list[str]) -> Iterator[Server]:
    """A `thawctl serve` process on `models` (its --model/--snapshot/--register arguments),
    ready; stopped with SIGTERM afterwards, which must exit 0."""
    token = secrets.token_hex(16)
    token_file = work / "admin.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    admin_socket = str(work / "admin" / "serve.sock")
    port = free_port()
    args = [sys.executable, "-m", "thawctl", "--socket", module_thawd.socket, "serve", *models,
            "--port", str(port), "--admin-socket", admin_socket,
            "--admin-token-file", str(token_file), "--max-queue", str(MAX_QUEUE)]  # fmt: skip
    for key, value in ENGINE_KWARGS.items():
        args += ["--engine-arg", f"{key}={value if not isinstance(value, bool) else 'true'}"]
    log = work / "serve.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=str(ROOT), start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert proc.poll() is None, f"thawctl serve exited:\n{log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, f"not ready:\n{log.read_text()[-6000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield Server(url, admin_socket, token, log, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            rc = proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the engine's processes, whatever happened
        proc.wait()
    # SIGTERM stops the server and its engines, and says so with exit code 0.
    assert rc == 0, f"thawctl serve exited with {rc} on SIGTERM:\n{log.read_text()[-4000:]}"
