"""`bench serve --option tensor_parallel_size=2` (gloo, CPU): the server is rank 0 and spawns rank 1; its greedy text
equals LLM.generate's on one process, and SIGTERM leaves no rank behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.server.helpers import free_port

pytest.importorskip("fastapi", reason="bench serve needs the serve extra (fastapi, uvicorn)")


def test_tensor_parallel_server_equals_one_process():
    import engine

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    p = subprocess.Popen([sys.executable, "-m", "harness", "serve", "tiny", "--port", str(port),
                          "--option", "tensor_parallel_size=2", "--option", "max_model_len=256"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        body = {"model": "tiny", "prompt": "def fibonacci(n):", "max_tokens": 16, "temperature": 0}
        text = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        lm = engine.load(engine.hub.resolve("tiny"))
        ids = lm.tokenizer.encode("def fibonacci(n):")
        (ref,) = engine.LLM(lm, engine.EngineConfig(max_model_len=256)).generate([ids], max_tokens=16)
        assert text == lm.tokenizer.decode(ref.tokens)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    left = ["?"]
    for _ in range(40):  # rank 1 and multiprocessing's resource tracker exit within seconds of the server
        left = subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True, text=True).stdout.split()
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"processes of the server's group still running 20 s after it exited: {left}"
