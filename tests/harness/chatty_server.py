"""A fake OpenAI server that writes megabytes to stdout and stderr before and while it serves (a real server's
access and debug logs): python chatty_server.py PORT. Launched through a pipe nobody reads, it blocks."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAIServer  # noqa: E402

LINE = "x" * 1023 + "\n"

if __name__ == "__main__":
    for _ in range(2048):  # 2 MiB to each stream before the server answers
        sys.stdout.write(LINE)
        sys.stderr.write(LINE)
    sys.stdout.flush()
    with FakeOpenAIServer(port=int(sys.argv[1]), ttft=0.005, tpot=0.001):
        end = time.monotonic() + 600
        while time.monotonic() < end:
            sys.stdout.write(LINE * 64)  # 64 KiB more every 10 ms while serving
            sys.stdout.flush()
            time.sleep(0.01)
