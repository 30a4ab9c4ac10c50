"""The versioned result record (one per engine per cell) and its JSONL storage: append + flush, load."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("ok", "partial", "failed", "skipped")  # partial: a serving cell with tolerated failed requests


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
    status: str = "ok"  # ok | partial | failed | skipped (serving: from its failed requests, request_status)
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
        self.status, self.reason = request_status(self)

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
    if p.suffix == ".gz":  # a committed run compressed to keep results/ small
        import gzip

        with gzip.open(p, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    else:
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


def request_status(r: Record) -> tuple[str, str]:
    """(status, reason) of a record given its failed requests. A serving cell that measured requests of which some
    failed is not ok: "partial" when the failed share is at most params max_failed_frac (default 0), else "failed",
    with the count and the first error as the reason. Every other record keeps its own status and reason."""
    if r.scenario != "serving" or r.status != "ok":
        return r.status, r.reason
    failed, completed = r.metrics.get("failed") or 0, r.metrics.get("completed") or 0
    total = failed + completed
    if not failed or total <= 0:
        return r.status, r.reason
    share, limit = failed / total, float(r.params.get("max_failed_frac") or 0.0)
    info = r.samples.get("info") if isinstance(r.samples, dict) else None
    errors = (info.get("errors") if isinstance(info, dict) else None) or []
    why = f"{int(failed)} of {int(total)} requests failed ({share:.1%}, max_failed_frac {limit:g})"
    if errors:
        why += f": {str(errors[0])[:200]}"
    return ("partial" if share <= limit else "failed"), why


def frame(records: list[Record]):
    """Records as a pandas.DataFrame, one row per record: run, cell, engine, engine_version, model, dtype, device,
    scenario, status, reason, then param.<k> per scenario parameter, <metric> per metric, env.<k> per
    environment field (values as recorded: numbers, strings, None, or lists/dicts where the record has them)."""
    import pandas as pd

    rows = []
    for r in records:
        row: dict[str, Any] = {"run": r.run_id, "cell": r.cell_id, "engine": r.engine,
                               "engine_version": r.engine_version, "model": r.model, "dtype": r.dtype,
                               "device": r.device, "scenario": r.scenario, "status": r.status, "reason": r.reason}
        row |= {f"param.{k}": v for k, v in r.params.items()}
        row |= {k: v for k, v in r.metrics.items() if k not in row}
        row |= {f"env.{k}": v for k, v in r.env.items()}
        rows.append(row)
    base = ["run", "cell", "engine", "engine_version", "model", "dtype", "device", "scenario", "status", "reason"]
    return pd.DataFrame(rows, columns=list(dict.fromkeys(base + [k for row in rows for k in row])))


def load(run_dir: str | Path):
    """The records of a run folder (or a records.jsonl) as a pandas.DataFrame (see frame)."""
    return frame(load_records(run_dir))
