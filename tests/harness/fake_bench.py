"""`bench` with the test-only fault adapters registered, for tests that signal a real `bench run` process:
python tests/harness/fake_bench.py run SUITE.toml --out DIR"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # spawned workers inherit it and import fault_adapters

from adapters import base  # noqa: E402

ENGINES = {"fake": "FakeAdapter", "mark": "MarkingAdapter", "spawner": "SpawningAdapter"}
for _name, _cls in ENGINES.items():
    base.REGISTRY[_name] = f"fault_adapters:{_cls}"

from harness.cli import app  # noqa: E402

if __name__ == "__main__":
    app()
