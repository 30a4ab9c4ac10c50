"""Bad input and overload never crash the server: every case gets its status code and an OpenAI error body
{"error": {"message", "type", "param", "code"}}; a full waiting queue is 503 with Retry-After; the API key is
enforced; the session cache hits on a second turn over HTTP and is evicted under a small pool; SIGTERM ends an
in-flight stream with an error chunk and the process exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from engine import LLM, EngineConfig, SamplingParams
from tests.server.helpers import LiveServer, free_port

pytest.importorskip("fastapi")

CFG = EngineConfig(max_num_seqs=8, max_model_len=256, max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def server(tiny):
    with LiveServer(tiny, CFG) as s:
        yield s


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


BAD = [  # (body or raw bytes, param named in the error or None, words in the message)
    (b"{not json", None, "malformed JSON"),
    (b"[1, 2]", None, "object"),
    (b"", None, ""),
    ({"prompt": "x", "bogus": 1}, "bogus", "unknown field"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "integer"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens", "integer"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "number"),
    ({"prompt": "x", "stream": "yes"}, "stream", "boolean"),
    ({"prompt": 5}, "prompt", ""),
    ({"max_tokens": 4}, "prompt", "required"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "at least 1"),
    ({"prompt": "x", "max_tokens": -3}, "max_tokens", "at least 1"),
    ({"prompt": "x", "temperature": 2.5}, "temperature", "[0, 2]"),
    ({"prompt": "x", "temperature": -0.1}, "temperature", "[0, 2]"),
    ({"prompt": "x", "top_p": 0}, "top_p", "(0, 1]"),
    ({"prompt": "x", "top_k": -5}, "top_k", "top_k"),
    ({"prompt": "x", "n": 2}, "n", "n > 1 is not supported"),
    ({"prompt": "x", "logprobs": 50}, "logprobs", "[0, 20]"),
    ({"prompt": "x", "stop": ["", "a"]}, "stop", "empty"),
    ({"prompt": "x", "stop_token_ids": [99999]}, "stop_token_ids", "vocabulary"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"prompt": "x", "echo": True}, "echo", "not supported"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream = true"),
    ({"prompt": "x", "min_tokens": 4}, "min_tokens", "ignore_eos"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": [1, 2, 99999]}, "prompt", "vocabulary"),
    ({"prompt": [1, True]}, "prompt", ""),
    ({"prompt": list(range(1, 300))}, "prompt", "max_model_len"),
    ({"prompt": list(range(1, 200)), "max_tokens": 100}, "max_tokens", "maximum context length"),
]


@pytest.mark.parametrize("body,param,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_completion_bodies_are_400_with_an_openai_error(server, body, param, words):
    with server.client() as c:
        r = c.post("/v1/completions", content=body) if isinstance(body, bytes) else c.post("/v1/completions", json=body)
    e = error_of(r, 400)
    assert e["type"] == "invalid_request_error"
    if param is not None:
        assert e["param"] == param, e
    assert words.lower() in e["message"].lower(), e


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}], "n": 3}, "n"),
    ({"messages": [{"role": "user", "content": "hi", "extra": 1}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": "hi"}, "messages"),
])  # fmt: skip
def test_bad_chat_bodies_are_400(server, body, param):
    with server.client() as c:
        assert error_of(c.post("/v1/chat/completions", json=body), 400)["param"].startswith(param)


def test_unknown_model_is_404_and_the_server_keeps_serving(server):
    with server.client() as c:
        e = error_of(c.post("/v1/completions", json={"model": "gpt-9", "prompt": "x", "max_tokens": 2}), 404)
        assert e["code"] == "model_not_found"
        assert error_of(c.get("/v1/nope"), 404)["type"] == "not_found_error"
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    server.wait_idle()


def test_a_full_waiting_queue_is_503_with_retry_after(tiny):
    cfg = EngineConfig(max_num_seqs=1, max_model_len=256, max_num_batched_tokens=256)
    body = {"prompt": "def f(x):", "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
    with LiveServer(tiny, cfg, max_waiting=1) as s, s.client() as c:
        with c.stream("POST", "/v1/completions", json=body) as a, c.stream("POST", "/v1/completions", json=body) as b:
            assert a.status_code == 200 and b.status_code == 200  # one running, one waiting
            r = c.post("/v1/completions", json=body)
            e = error_of(r, 503)
            assert r.headers["retry-after"] == "1" and e["code"] == "queue_full"
        s.wait_idle()
        assert s.metrics()["anvil:request_rejected_total{reason=queue_full}"] == 1


def test_api_key_is_required_when_set(tiny):
    openai = pytest.importorskip("openai")
    with LiveServer(tiny, CFG, api_key="sekret") as s:
        with s.client() as c:
            e = error_of(c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}), 401)
            assert e["type"] == "authentication_error"
            error_of(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
            assert c.get("/health").status_code == 200  # health and metrics stay open for probes
        good = openai.OpenAI(base_url=s.base + "/v1", api_key="sekret", max_retries=0,
                             http_client=httpx.Client(trust_env=False))  # fmt: skip
        assert good.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens >= 1
        bad = openai.OpenAI(base_url=s.base + "/v1", api_key="nope", max_retries=0, http_client=httpx.Client(trust_env=False))
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="x", max_tokens=2)


def test_session_turns_reuse_the_prefix_over_http_and_are_evicted_under_pressure(tiny):
    from tests.engine.conftest import random_prompts

    cfg = EngineConfig(max_num_seqs=4, max_model_len=256, max_num_batched_tokens=256, num_kv_blocks=17)  # 16 usable
    ref = LLM(tiny, cfg)
    p1, extra, p_big = random_prompts([50, 9, 230], tiny.config.vocab_size, seed=21)
    (o1,) = ref.generate([p1], SamplingParams(), 12)
    turn2 = p1 + o1.tokens + extra  # 71 tokens; turn 1 computed 50 + 11: 3 full blocks
    (o2,) = ref.generate([turn2], SamplingParams(), 8)

    def ask(c, prompt, max_tokens, **kw):
        r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                            "ignore_eos": True, "logprobs": 0, **kw})  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()

    piece = tiny.tokenizer.id_to_piece
    with LiveServer(tiny, cfg) as s, s.client() as c:
        first = ask(c, p1, 12, user="alice")
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        second = c.post("/v1/completions", headers={"X-Session-Id": "alice"},
                        json={"prompt": turn2, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 0}).json()
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 48
        assert second["choices"][0]["logprobs"]["tokens"] == [piece(t).replace("\u2581", " ") for t in o2.tokens]
        m = s.metrics()
        assert m["anvil:prefix_cache_hits_total"] == 48 and 0 < m["anvil:prefix_cache_hit_rate"] < 1
        # the CPU has no graphs: every forward of the two requests (12 + 8 tokens, prompts in one step each) eager
        assert m['anvil:engine_steps_total{path=eager}'] == 20 and m['anvil:engine_steps_total{path=graph}'] == 0
        # turn 2 left 4 idle cached blocks (78 tokens computed), 12 free; a 238-token request without a session needs
        # 15: the 3 least recently used idle blocks go, the chain's tail first, so only its first block is left
        ask(c, p_big, 8)
        s.wait_idle()
        assert s.metrics()["anvil:prefix_cache_evictions_total"] == 3
        third = ask(c, turn2, 8, user="alice")
        assert third["usage"]["prompt_tokens_details"]["cached_tokens"] == 16
        assert third["choices"][0]["logprobs"]["tokens"] == second["choices"][0]["logprobs"]["tokens"]


def test_detokenizer_streams_multibyte_text_exactly_and_holds_back_stop_prefixes(tiny):
    from engine.async_llm import IncrementalDetokenizer

    tok = tiny.tokenizer
    text = "x = 'caf\u00e9 \u20ac \U0001f600 \u4e2d\u6587'\n    return x\n"
    ids = tok.encode(text, add_bos=False)
    d = IncrementalDetokenizer(tok)
    out = ""
    for i, t in enumerate(ids):
        d.add([t], final=i == len(ids) - 1)
        out += d.take(final=i == len(ids) - 1)[0]
        assert "\ufffd" not in out
    assert out == tok.decode(ids)
    d = IncrementalDetokenizer(tok, stop=["return"])
    sent = ""
    for t in ids:
        d.add([t])
        piece, hit = d.take(final=False)
        sent += piece
        assert not "return".startswith(sent[-3:]) or hit or len(sent) < 3
        if hit:
            break
    assert hit and sent == tok.decode(ids).split("return")[0]


def test_sigterm_ends_an_in_flight_stream_with_an_error_chunk_and_exits():
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "harness", "serve", "tiny", "--port", str(port), "--option",
                             "max_model_len=512", "--option", "max_num_seqs=4", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(base + "/health", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        body = {"prompt": "def f(x):", "max_tokens": 480, "temperature": 0, "stream": True, "ignore_eos": True}
        lines = []
        with httpx.Client(base_url=base, timeout=30, trust_env=False) as c, c.stream("POST", "/v1/completions", json=body) as r:
            it = r.iter_lines()
            while len([x for x in lines if x.startswith("data: ")]) < 3:
                lines.append(next(it))
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            lines += list(it)
        data = [x for x in lines if x.startswith("data: ")]
        assert data[-1] == "data: [DONE]" and '"error"' in data[-2] and "shutting down" in data[-2]
        # uvicorn re-raises the signal once it has shut down: the conventional exit status of a SIGTERM
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM) and time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_model_without_a_tokenizer_serves_token_ids():
    import json

    from engine.presets import synthetic

    lm = synthetic("tiny-test", seed=7)  # random weights, no tokenizer: how synthetic:llama-3-8b is served
    with LiveServer(lm, CFG, model_name="synthetic:tiny-test") as s, s.client() as c:
        body = {"prompt": [5, 6, 7, 8], "max_tokens": 5, "stream": True, "ignore_eos": True, "min_tokens": 5,
                "temperature": 0, "stream_options": {"include_usage": True}, "model": "synthetic:tiny-test"}  # fmt: skip
        with c.stream("POST", "/v1/completions", json=body) as r:
            chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        tokens = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["finish_reason"] is None]
        # one chunk per token when the client keeps up; a stream that falls behind (a busy machine) gets its
        # pending tokens merged into fewer chunks, never more chunks than tokens; usage counts every token
        assert 1 <= len(tokens) <= 5 and all(ch["choices"][0]["text"] == "" for ch in tokens)
        assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 5
        r = c.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2, "logprobs": 1})
        assert r.json()["choices"][0]["logprobs"]["tokens"][0].startswith("token_id:")
        assert "no tokenizer" in error_of(c.post("/v1/completions", json={"prompt": "text"}), 400)["message"]
        assert "no tokenizer" in error_of(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}), 400)["message"]
