"""Wait until URL answers 200 while process PID lives: exit 0 when it does, 1 when the process dies or TIMEOUT
seconds pass. Usage: python3 scripts/wait_http.py URL PID [TIMEOUT]  (the GPU scripts' server start-up wait)."""

import os
import sys
import time
import urllib.request


def main() -> int:
    url, pid = sys.argv[1], int(sys.argv[2])
    deadline = time.monotonic() + (float(sys.argv[3]) if len(sys.argv) > 3 else 600.0)
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return 0
        except OSError:
            pass
        try:
            os.kill(pid, 0)
        except OSError:
            print(f"server (pid {pid}) died before {url} answered: see its log", file=sys.stderr)
            return 1
        time.sleep(0.5)
    print(f"{url} did not answer within the timeout", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
