"""The OpenAI-compatible server on the tiny model (CPU), uvicorn on 127.0.0.1: the official `openai` client
streaming and not, completions and chat, greedy text equal to LLM.generate's; several prompts; stop strings and stop
ids; logprobs; 64 concurrent streams; a client that disconnects frees its blocks; /metrics parses."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from engine import LLM, EngineConfig, SamplingParams
from tests.server.helpers import LiveServer

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

CFG = EngineConfig(max_num_seqs=64, max_model_len=512, max_num_batched_tokens=1024)
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\n", "class Stack:\n    def ", "for i in range(10):\n"]


@pytest.fixture(scope="module")
def server(tiny):
    with LiveServer(tiny, CFG) as s:
        yield s


@pytest.fixture(scope="module")
def ref(tiny):
    """Greedy generations of a second engine over the same weights, one request at a time."""
    llm = LLM(tiny, CFG)
    eos = list(tiny.tokenizer.eos_ids)

    def gen(ids: list[int], max_tokens: int, ignore_eos: bool = False) -> list[int]:
        (out,) = llm.generate([ids], SamplingParams(), max_tokens, [] if ignore_eos else eos)
        return out.tokens

    gen.llm = llm
    return gen


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0,
                      http_client=httpx.Client(trust_env=False, timeout=60))  # fmt: skip
    yield c
    c.close()


def text_of(tok, ids: list[int]) -> str:
    return tok.decode(ids)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with server.client() as c:
        assert c.get("/health").json() == {"status": "ok"}


@pytest.mark.parametrize("stream", [False, True])
def test_completion_greedy_text_equals_llm_generate(server, client, ref, tiny, stream):
    for prompt in PROMPTS[:2]:
        want = ref(tiny.tokenizer.encode(prompt), 24)
        kw = dict(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
        if stream:
            chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)
            assert chunks[-2].choices[0].finish_reason in ("length", "stop")
        else:
            r = client.completions.create(**kw)
            text = r.choices[0].text
            assert r.usage.completion_tokens == len(want) and r.usage.prompt_tokens == len(tiny.tokenizer.encode(prompt))
            assert r.choices[0].finish_reason == ("length" if len(want) == 24 else "stop")
        assert text == text_of(tiny.tokenizer, want)
    server.wait_idle()


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_text_equals_llm_generate(client, ref, tiny, stream):
    msgs = [{"role": "user", "content": "Write a function that adds two numbers."}]
    tok = tiny.tokenizer
    want = ref(tok.encode(tok.apply_chat_template(msgs), add_bos=False), 20)
    if stream:
        chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert chunks[-1].choices[0].finish_reason is not None
    else:
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0)
        assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
        text = r.choices[0].message.content
    assert text == text_of(tok, want)


def test_token_id_prompts_and_several_prompts_give_one_choice_each(client, ref, tiny):
    ids = [tiny.tokenizer.encode(p) for p in PROMPTS]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c, p in zip(r.choices, ids, strict=True):
        assert c.text == text_of(tiny.tokenizer, ref(p, 8, ignore_eos=True))
    assert r.usage.completion_tokens == 32 and r.usage.prompt_tokens == sum(map(len, ids))
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=8, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))  # fmt: skip
    for i in (0, 1):
        text = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
        assert text == text_of(tiny.tokenizer, ref(ids[i], 8, ignore_eos=True))


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_text_before_the_match(client, ref, tiny, stream):
    full = text_of(tiny.tokenizer, ref(tiny.tokenizer.encode(PROMPTS[0]), 40))
    stop = full[12:15]
    want = full[: full.find(stop)]
    kw = dict(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop, "\x00never"])
    if stream:
        chunks = list(client.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        c = client.completions.create(**kw).choices[0]
        text, reason = c.text, c.finish_reason
    assert (text, reason) == (want, "stop")


def test_stop_token_ids_finish_with_stop_and_leave_the_token_text_out(client, ref, tiny):
    ids = tiny.tokenizer.encode(PROMPTS[2])
    out = ref(ids, 12, ignore_eos=True)
    stop_id = out[5]
    k = out.index(stop_id)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True, "stop_token_ids": [stop_id]})  # fmt: skip
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.text == text_of(tiny.tokenizer, out[:k])
    assert r.usage.completion_tokens == k + 1  # the stop token is generated (and counted), its text left out


def test_logprobs_completions_and_chat(client, ref, tiny):
    import torch

    ids = tiny.tokenizer.encode(PROMPTS[0])
    out = ref(ids, 6, ignore_eos=True)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    want = torch.log_softmax(ref.llm.logits(ids + out[:-1]), dim=-1)[len(ids) - 1 :]
    for i, t in enumerate(out):
        assert abs(lp.token_logprobs[i] - want[i, t].item()) < 1e-3
        assert len(lp.top_logprobs[i]) <= 3 and max(lp.top_logprobs[i].values()) == pytest.approx(lp.token_logprobs[i])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_64_concurrent_streams_complete_each_equal_to_its_solo_run(server, ref, tiny):
    from tests.engine.conftest import random_prompts

    prompts = random_prompts([8 + (i * 7) % 40 for i in range(64)], tiny.config.vocab_size, seed=11)
    want = [ref(p, 6, ignore_eos=True) for p in prompts]

    async def one(c: httpx.AsyncClient, p: list[int]) -> tuple[list[str], dict | None]:
        body = {"prompt": p, "max_tokens": 6, "temperature": 0, "stream": True, "ignore_eos": True, "logprobs": 0,
                "stream_options": {"include_usage": True}}  # fmt: skip
        pieces, usage = [], None
        async with c.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                assert "error" not in chunk
                if chunk["choices"]:
                    pieces += chunk["choices"][0]["logprobs"]["tokens"]
                usage = chunk.get("usage") or usage
        return pieces, usage

    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.base, timeout=120, trust_env=False, limits=limits) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    steps = server.llm.core.stats["steps"]
    got = asyncio.run(main())
    assert len(got) == 64
    assert server.llm.core.stats["steps"] - steps < 64 * 6 / 2  # requests shared steps (one at a time: >= 384)
    piece = tiny.tokenizer.id_to_piece
    for (pieces, usage), w in zip(got, want, strict=True):
        assert pieces == [piece(t).replace("\u2581", " ") for t in w]
        assert usage["completion_tokens"] == 6
    server.wait_idle()


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server):
    body = {"prompt": PROMPTS[1], "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
    with server.client() as c, c.stream("POST", "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()  # kept referenced: an abandoned iterator closes the stream at once
        n = 0
        while n < 3:
            n += next(lines).startswith("data: ")
        m = server.metrics()
        assert m["anvil:kv_cache_usage_perc"] > 0 and m["anvil:num_requests_running"] == 1  # streaming, holding blocks
    server.wait_idle(timeout=10)  # aborted at once: far sooner than 400 tokens
    m = server.metrics()
    assert m["anvil:kv_cache_usage_perc"] == 0 and m["anvil:num_requests_running"] == 0
    assert m["anvil:request_success_total{finished_reason=abort}"] >= 1


def test_a_client_that_gives_up_on_a_non_streaming_request_frees_its_blocks(server):
    key = "anvil:request_success_total{finished_reason=abort}"
    before = server.metrics().get(key, 0)
    body = {"prompt": PROMPTS[2], "max_tokens": 480, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.base, timeout=1.0, trust_env=False) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json=body)  # 480 tokens take longer than 1 s here
    server.wait_idle(timeout=10)
    assert server.metrics()[key] == before + 1  # aborted, not run to the end


def test_metrics_parse_and_count(server, client):
    client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    m = server.metrics()
    for name in ("anvil:num_requests_running", "anvil:num_requests_waiting", "anvil:kv_cache_usage_perc",
                 "anvil:generation_tokens_total", "anvil:prompt_tokens_total", "anvil:num_preemptions_total",
                 "anvil:prefix_cache_hit_rate", "anvil:time_to_first_token_seconds_count",
                 "anvil:inter_token_latency_seconds_count", "anvil:e2e_request_latency_seconds_count"):  # fmt: skip
        assert name in m, name
    assert m["anvil:generation_tokens_total"] >= 4 and m["anvil:time_to_first_token_seconds_count"] >= 1
    assert m["anvil:e2e_request_latency_seconds_count"] >= m["anvil:time_to_first_token_seconds_count"]


def test_engine_thread_timing_in_metrics(server, client):
    # the engine thread's step time, the core's device wait within it and the time between steps: on the CPU the
    # forward is host work, so the device wait stays a small share of the step time; every counter grows with work
    before = server.metrics()
    client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    server.wait_idle()
    m = server.metrics()
    step = m["anvil:engine_step_seconds_total"] - before["anvil:engine_step_seconds_total"]
    wait = m["anvil:engine_device_wait_seconds_total"] - before["anvil:engine_device_wait_seconds_total"]
    between = m["anvil:engine_between_steps_seconds_total"] - before["anvil:engine_between_steps_seconds_total"]
    assert step > 0 and 0 <= wait < 0.5 * step and between >= 0, (step, wait, between)
    assert server.engine.timing["steps"] >= 8  # one step per token at least (the prompt in one)
