"""The one Server-Sent Events parser: bytes as they arrive -> complete events (WHATWG EventSource rules).

Use it wherever an SSE stream is read (HTTP adapters, load generators) so framing bugs are fixed once:
lines end in \\n, \\r\\n or \\r (possibly split across network chunks); `data:` lines of one event are joined with
\\n; `:` lines are comments (keep-alives); a blank line ends an event; one space after the colon is dropped;
UTF-8 sequences split across chunks are reassembled.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Any

DONE = "[DONE]"  # OpenAI-style end-of-stream sentinel


@dataclass(frozen=True)
class SSEEvent:
    data: str  # the data lines joined with "\n"
    event: str = "message"  # the `event:` field, "message" when absent
    id: str | None = None  # the `id:` field, if the event had one

    @property
    def done(self) -> bool:
        return self.data.strip() == DONE

    def json(self) -> Any:
        """The data parsed as JSON (raises json.JSONDecodeError / ValueError on bad payloads)."""
        return json.loads(self.data)


class SSEParser:
    """Incremental parser: `feed(chunk)` returns the events completed by that chunk; `close()` flushes the rest."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None

    def feed(self, chunk: bytes | str) -> list[SSEEvent]:
        self._buf += self._decoder.decode(chunk) if isinstance(chunk, bytes | bytearray) else chunk
        events: list[SSEEvent] = []
        start = 0
        buf = self._buf
        n = len(buf)
        while True:
            i_n, i_r = buf.find("\n", start), buf.find("\r", start)
            if i_n < 0 and i_r < 0:
                break
            end = min(i for i in (i_n, i_r) if i >= 0)
            if buf[end] == "\r":
                if end + 1 == n:  # a lone \r at the end may be the first half of \r\n: wait for more bytes
                    break
                nxt = end + 2 if buf[end + 1] == "\n" else end + 1
            else:
                nxt = end + 1
            ev = self._line(buf[start:end])
            if ev is not None:
                events.append(ev)
            start = nxt
        self._buf = buf[start:]
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: a trailing line without terminator is processed; a pending event without its blank line is
        dispatched (servers that close right after the last data line still deliver it)."""
        rest = self._buf + self._decoder.decode(b"", final=True)
        self._buf = ""
        events = []
        for line in rest.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
            ev = self._line(line) if line else None
            if ev is not None:
                events.append(ev)
        ev = self._line("")
        if ev is not None:
            events.append(ev)
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            ev = SSEEvent("\n".join(self._data), self._event or "message", self._id)
            self._data, self._event = [], ""
            return ev
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None  # `retry:` and unknown fields are ignored, as the spec says


def parse_all(payload: bytes | str) -> list[SSEEvent]:
    """Every event in a complete stream body (tests, recorded responses)."""
    p = SSEParser()
    return p.feed(payload) + p.close()
