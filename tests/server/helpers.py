"""A live server for tests: uvicorn on 127.0.0.1 (a free port) in a thread of the test process, so a test can look at
the engine behind it; reference generations on a second LLM over the same weights."""

from __future__ import annotations

import socket
import threading
import time

import httpx

from engine import LLM, EngineConfig
from engine.async_llm import AsyncLLM
from engine.server import build_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, lm, config: EngineConfig, model_name: str = "tiny", api_key: str | None = None,
                 max_waiting: int | None = None) -> None:  # fmt: skip
        import uvicorn

        self.llm = LLM(lm, config)
        self.engine = AsyncLLM(self.llm, max_waiting=max_waiting)
        self.app = build_app(self.engine, model_name, api_key)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False,
                             timeout_graceful_shutdown=5)  # fmt: skip
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=60, trust_env=False, **kw)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name (labels folded into the name)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.base + "/metrics", timeout=10, trust_env=False).text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
                out[key] = s.value
        return out

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the engine has no request and every KV block is free (or idle in the cache)."""
        deadline = time.monotonic() + timeout
        blocks = self.llm.core.blocks
        while time.monotonic() < deadline:
            if self.engine.num_live == 0 and blocks.num_free == blocks.num_usable and not self.llm.has_unfinished():
                return
            time.sleep(0.02)
        raise AssertionError(f"engine not idle: {self.engine.num_live} live, {blocks.num_free}/{blocks.num_usable} free")
