"""`vllm serve DIR --hf-overrides '{"fopru": ...}'`, vLLM's OpenAI-compatible server on 127.0.0.1
(issue 10): a chat completion with a base64 PNG costs exactly 576 - K prompt tokens less than on the
stock server, and both servers stop cleanly on SIGINT."""
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import cases
from checkpoint import PATCHES

START_TIMEOUT = 300  # s; a start takes about 25 s on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vllm serve` in a session of its own (so every worker it starts can be checked gone)."""

    def __init__(self, model_dir, log_path, extra=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        vllm = shutil.which("vllm", path=os.path.dirname(sys.executable))
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [vllm, "serve", model_dir, "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager",
             "--dtype", "float32", "--max-model-len", "2048", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(log_path),
            start_new_session=True,
        )
        self.log_path = log_path

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}:\n{self.tail()}"
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise AssertionError(f"server not ready after {START_TIMEOUT} s:\n{self.tail()}")

    def chat(self, model_dir: str, png: bytes) -> dict:
        image = "data:image/png;base64," + base64.b64encode(png).decode()
        body = {
            "model": model_dir, "max_tokens": 4, "temperature": 0.0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "text", "text": "What is shown in this picture?"},
            ]}],
        }
        req = urllib.request.Request(self.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)

    def stop(self) -> int:
        """SIGINT, as Ctrl-C; returns the exit code. Kills the session only if it fails to stop."""
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"server did not stop within 60 s of SIGINT:\n{self.tail()}")
        finally:
            self.log.close()
        return code

    def leftovers(self) -> bool:
        """Whether any process of the server's session is still alive (workers, engine core)."""
        for _ in range(20):
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return False
            time.sleep(0.5)
        return True

    def tail(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-4000:]


@pytest.fixture(scope="module")
def png() -> bytes:
    buf = io.BytesIO()
    cases.images(1, seed=7)[0].save(buf, format="PNG")
    return buf.getvalue()


def serve_one_chat(model_dir, tmp_path, png, name, extra=()):
    server = Server(model_dir, str(tmp_path / f"{name}.log"), extra)
    try:
        server.wait_ready()
        reply = server.chat(model_dir, png)
    finally:
        code = server.stop()
    assert code == 0, server.tail()
    assert not server.leftovers(), "processes of the server's session still alive after it exited"
    return reply


def test_chat_completion_costs_576_minus_k_fewer_prompt_tokens(model_dir, tmp_path, png):
    stock = serve_one_chat(model_dir, tmp_path, png, "stock")
    fopru = json.dumps({"fopru": {"keep": cases.KEEP}})
    pruned = serve_one_chat(model_dir, tmp_path, png, "pruned", ("--hf-overrides", fopru))
    assert stock["usage"]["prompt_tokens"] - pruned["usage"]["prompt_tokens"] == PATCHES - cases.KEEP
    assert stock["usage"]["prompt_tokens"] > PATCHES
    assert pruned["choices"][0]["message"]["content"] is not None
