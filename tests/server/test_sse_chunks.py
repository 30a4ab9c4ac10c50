"""The SSE token chunk assembled from the head's JSON and the encoded text (Serving._chunk's fast path) is the same
bytes as the general path that builds and encodes the whole chunk dict: completions and chat, any choice index,
text with quotes, backslashes, newlines and non-ASCII, finish reasons; chat's first chunk (the role) and its finish
chunk (an empty delta) stay on the general path."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from engine.async_llm import StreamOutput
from engine.request import SamplingParams
from engine.server.serving import Job, Serving, _Usage

TEXTS = ["", " hello", 'a "quoted" \\ back\nslash', "caf\u00e9 \u2581 \U0001f600", "\t\x00\x1f"]


def _serving() -> Serving:
    return Serving(SimpleNamespace(tokenizer=None), "tiny", metrics=None)


def _job(kind: str) -> Job:
    return Job(kind, [[1, 2]], SamplingParams(), [8], [], [], True, None, None, True)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_fast_token_chunk_equals_the_general_path(kind):
    s, job = _serving(), _job(kind)
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    head = {"id": "cmpl-x", "object": obj, "created": 1700000000, "model": "tiny"}
    head_json = json.dumps(head, separators=(",", ":")).encode()[:-1]
    checked = 0
    for i in (0, 3):
        for text in TEXTS:
            for reason in (None, "length", "stop"):
                out = StreamOutput("r", text, [5], [0.0], None, reason is not None, reason, 2, 1)
                for started in ([True] * 4, [False] * 4):
                    sent_a, sent_b = [0] * 4, [0] * 4
                    st_a, st_b = list(started), list(started)
                    fast = s._chunk(job, head, i, out, sent_a, _Usage(4), started=st_a, head_json=head_json)
                    slow = s._chunk(job, head, i, out, sent_b, _Usage(4), started=st_b)
                    assert fast == slow, (kind, i, text, reason, started, fast, slow)
                    assert sent_a == sent_b and st_a == st_b
                    body = json.loads(fast[len(b"data: ") :])
                    assert body["choices"][0]["index"] == i and body["choices"][0]["finish_reason"] == reason
                    checked += 1
    assert checked == 2 * len(TEXTS) * 3 * 2
