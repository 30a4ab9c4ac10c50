"""The versioned result record (one per engine per cell) and its JSONL storage: append + flush, load."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("ok", "failed", "skipped")


@dataclass
class Record:
    run_id: str  # one id per `bench run`, shared by all its records
    suite: str  # [suite] name
    cell_id: str  # stable key of the cell: scenario index, type, engine, model, params
    scenario: str  # parity | throughput | latency
    engine: str  # registry name (adapters.base.REGISTRY)
    engine_version: str  # adapter.available()[1] when available, else "unavailable"
    model: str  # model name as written in the suite ('tiny', a path, 'synthetic:llama-3-8b')
    dtype: str  # precision the engine ran in: float32 | bfloat16 | float16
    device: str  # cpu | cuda
    params: dict[str, Any]  # scenario parameters of this cell, defaults filled in
    status: str = "ok"  # ok | failed | skipped
    reason: str = ""  # why failed / skipped (exception, exit code, not installed)
    metrics: dict[str, Any] = field(default_factory=dict)  # statistics; units in the names (ttft_p50_ms)
    samples: dict[str, Any] = field(default_factory=dict)  # raw samples the metrics were computed from
    engine_info: dict[str, Any] = field(default_factory=dict)  # what the adapter says about itself (backend...)
    env: dict[str, Any] = field(default_factory=dict)  # harness.envinfo.snapshot() of the machine
    time: str = ""  # UTC ISO-8601 when the record was made
    duration_s: float = 0.0  # wall time of the cell in the worker (load excluded)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if not self.time:
            self.time = utc_now()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        version = d.get("schema_version", 0)
        if version != SCHEMA_VERSION:
            raise ValueError(f"record schema_version {version} is not supported (this harness reads {SCHEMA_VERSION})")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


class RecordWriter:
    """Appends records to a JSONL file, flushing after each so a crash loses nothing already written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: Record) -> None:
        self._f.write(json.dumps(record.to_dict(), default=_json_default) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy / torch scalars and arrays
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def load_records(path: str | Path) -> list[Record]:
    """Records of a records.jsonl file (or of a run folder holding one). A torn last line is ignored."""
    p = Path(path)
    if p.is_dir():
        p = p / "records.jsonl"
    out = []
    lines = p.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a writer killed mid-line
                continue
            raise ValueError(f"{p}:{i + 1}: not valid JSON") from None
        if not isinstance(d, dict):
            raise ValueError(f"{p}:{i + 1}: expected a JSON object (one record), got {type(d).__name__}")
        try:
            out.append(Record.from_dict(d))
        except (TypeError, ValueError) as exc:  # missing fields, unknown status, another schema version
            raise ValueError(f"{p}:{i + 1}: not a record: {exc}") from None
    return out
