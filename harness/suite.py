"""TOML suite schema as frozen dataclasses; validation naming file and key in every error; sweep expansion into cells.

A suite file:

    [suite]
    name = "smoke"
    description = "what it is for"
    engines = ["anvil", "hf"]        # registry names (adapters.base.REGISTRY)
    cell_timeout_s = 600             # optional: a worker silent this long is killed, its cells fail
    engine_warmup_s = 3.0            # optional: small generate calls after load, before the first cell
                                     # (default 3 s for cuda models, 0 for cpu: clocks, lazy kernel loading)

    [options.anvil]                  # optional: load options handed to that engine's adapter.load(), checked
    max_seq_len = 512                # at load by the adapter class's validate_options()

    [[models]]
    name = "tiny"                    # 'tiny', a local directory, an HF repo id in the local cache, 'synthetic:<preset>'
    dtype = "float32"                # float32 | bfloat16 | float16
    device = "cpu"                   # cpu | cuda

    [[scenarios]]
    type = "throughput"              # parity | throughput | latency
    engines = ["anvil"]              # optional subset of [suite].engines
    batch = [1, 4]                   # a list on a sweepable parameter expands: one cell per value (cartesian)
    prompt_len = 64

Cells are engine x model x scenario x expanded params. Relative model paths are taken from the current directory.
The suite name names the run folder, so it is a plain token ([A-Za-z0-9._-], no path). Throughput and latency cells
whose prompt_len + gen_len exceed the model's known context are refused here, as long_context refuses at run time.
"""

from __future__ import annotations

import itertools
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters import base as adapter_base
from adapters.base import REGISTRY, ModelSpec
from harness import scenarios as scenario_registry
from harness.scenarios import REQUIRED, Param

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
SUITE_KEYS = {"name", "description", "engines", "cell_timeout_s", "engine_warmup_s"}
TOP_KEYS = {"suite", "models", "scenarios", "options"}
QUANT_METHODS = ("rtn", "awq", "gptq", "nf4")
MODEL_KEYS = {"name", "dtype", "device", "quant"}
SCENARIO_COMMON_KEYS = {"type", "engines"}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a run folder name: no separators, no '..'
# Sanity bounds on lengths: a typo like gen_len = 10000000 must not run for a day before anyone notices.
MAX_LEN = {"gen_len": 1_000_000, "output_len": 1_000_000, "decode_tokens": 1_000_000, "n_tokens": 1_000_000,
           "prompt_len": 10_000_000}
CONTEXT_CHECKED = ("throughput", "latency")  # prompt_len + gen_len must fit the model's context


class SuiteError(ValueError):
    """A suite that must not run; the message starts with '<file>: <key>: '."""


@dataclass(frozen=True)
class ModelEntry:
    name: str  # as written in the suite
    path: str | None  # resolved local directory (None for synthetic:<preset>)
    dtype: str = "float32"
    device: str = "cpu"
    quant: str | None = None  # rtn | awq | gptq | nf4: weight-only 4-bit, applied by engines that support it

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(name=self.name, path=self.path, dtype=self.dtype, device=self.device, quant=self.quant)

    @property
    def label(self) -> str:
        return f"{self.name} {self.dtype} {self.device}" + (f" {self.quant}" if self.quant else "")


@dataclass(frozen=True)
class ScenarioEntry:
    type: str
    engines: tuple[str, ...]
    params: tuple[tuple[str, Any], ...]  # (name, value or tuple of sweep values), schema order, defaults filled


@dataclass(frozen=True)
class Cell:
    """One measurement: an engine running one scenario with fixed params on one model."""

    index: int  # position in Suite.cells (report order)
    engine: str
    model_index: int
    model: ModelEntry
    scenario_index: int
    scenario: str
    params: tuple[tuple[str, Any], ...]

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def param_label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params)

    @property
    def case_id(self) -> str:
        """Same for every engine measuring the same thing (rows to compare)."""
        return f"s{self.scenario_index}.{self.scenario}/m{self.model_index}/" + ",".join(f"{k}={v}" for k, v in self.params)

    @property
    def cell_id(self) -> str:
        return f"{self.case_id}/{self.engine}"


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    engines: tuple[str, ...]
    models: tuple[ModelEntry, ...]
    scenarios: tuple[ScenarioEntry, ...]
    source: str  # the file it came from
    text: str  # the file's text, copied into the run folder
    cell_timeout_s: float = 1800.0
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # engine -> adapter.load opts
    engine_warmup_s: float | None = None  # None = 3 s on cuda, 0 on cpu

    def warmup_s(self, model: ModelEntry) -> float:
        if self.engine_warmup_s is not None:
            return self.engine_warmup_s
        return 3.0 if model.device == "cuda" else 0.0

    @property
    def cells(self) -> list[Cell]:
        out: list[Cell] = []
        for si, sc in enumerate(self.scenarios):
            names = [k for k, _ in sc.params]
            axes = [v if isinstance(v, tuple) else (v,) for _, v in sc.params]
            for combo in itertools.product(*axes):
                params = tuple(zip(names, combo, strict=True))
                for mi, model in enumerate(self.models):
                    for engine in sc.engines:
                        out.append(Cell(len(out), engine, mi, model, si, sc.type, params))
        return out


def _tname(v: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "table"}.get(type(v), type(v).__name__)


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, msg: str) -> SuiteError:
        return SuiteError(f"{self.source}: {key}: {msg}" if key else f"{self.source}: {msg}")

    def expect(self, key: str, value: Any, typ: type) -> Any:
        ok = isinstance(value, typ) and not (typ in (int, float) and isinstance(value, bool))
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise self.fail(key, f"expected {typ.__name__}, got {_tname(value)}")
        return value

    def table(self, key: str, value: Any, allowed: set[str], required: tuple[str, ...] = ()) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a table, got {_tname(value)}")
        for k in value:
            if k not in allowed:
                raise self.fail(f"{key}.{k}" if key else k, f"unknown key; expected one of {', '.join(sorted(allowed))}")
        for k in required:
            if k not in value:
                raise self.fail(key, f"missing required key '{k}'")
        return value

    def str_list(self, key: str, value: Any) -> list[str]:
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list of str, got {_tname(value)}")
        return [self.expect(f"{key}[{i}]", v, str) for i, v in enumerate(value)]

    def engine_list(self, key: str, value: Any) -> tuple[str, ...]:
        names = self.str_list(key, value)
        if not names:
            raise self.fail(key, "expected at least one engine")
        for i, n in enumerate(names):
            if n not in REGISTRY:
                raise self.fail(f"{key}[{i}]", f"unknown engine {n!r}; known engines: {', '.join(sorted(REGISTRY))}")
        return tuple(dict.fromkeys(names))

    def choice(self, key: str, value: Any, choices: tuple[str, ...]) -> str:
        self.expect(key, value, str)
        if value not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def param(self, key: str, value: Any, p: Param) -> Any:
        value = self.expect(key, value, p.type)
        if isinstance(value, float) and math.isnan(value):
            raise self.fail(key, "must be a number, got nan")
        if p.min is not None and value < p.min:
            raise self.fail(key, f"must be >= {p.min}, got {value}")
        bound = MAX_LEN.get(key.rsplit(".", 1)[-1].split("[", 1)[0])
        if bound is not None and value > bound:
            raise self.fail(key, f"must be <= {bound:,}, got {value:,}")
        return value


def resolve_model(name: str) -> str | None:
    """Local directory for a model name (None for synthetic). Raises FileNotFoundError / KeyError with the reason."""
    if name.startswith("synthetic:"):
        preset = name.split(":", 1)[1]
        try:
            from engine.presets import PRESETS
        except ImportError:
            return None  # engine not built yet: the adapter will say
        if preset not in PRESETS:
            raise KeyError(f"unknown synthetic preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        return None
    if name.startswith(("/", "./", "../", "~")) or Path(name).is_dir():
        p = Path(name).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"model directory {name!r} does not exist")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model directory {name!r} has no config.json")
        return str(p.resolve())
    from engine.hub import resolve

    return str(resolve(name))


def parse(text: str, source: str, resolve: bool = True) -> Suite:
    c = _Checker(source)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise c.fail("", f"TOML syntax error: {exc}") from None
    c.table("", doc, TOP_KEYS, required=("suite", "models", "scenarios"))
    head = c.table("suite", doc["suite"], SUITE_KEYS, required=("name", "engines"))
    name = c.expect("suite.name", head["name"], str)
    if not NAME_RE.fullmatch(name):
        raise c.fail("suite.name", f"{name!r} is not a plain name: use letters, digits, '.', '_' and '-' (at most "
                                   "100, starting with a letter or digit); it names the run folder")
    description = c.expect("suite.description", head.get("description", ""), str)
    engines = c.engine_list("suite.engines", head["engines"])
    timeout = c.expect("suite.cell_timeout_s", head.get("cell_timeout_s", 1800.0), float)
    if not timeout > 0:
        raise c.fail("suite.cell_timeout_s", f"must be > 0 seconds, got {timeout}")
    warmup = head.get("engine_warmup_s")
    if warmup is not None:
        warmup = c.expect("suite.engine_warmup_s", warmup, float)
        if not 0 <= warmup < math.inf:
            raise c.fail("suite.engine_warmup_s", f"must be a finite number >= 0 seconds, got {warmup}")

    options = c.table("options", doc.get("options", {}), set(engines))
    options = {e: dict(c.table(f"options.{e}", o, set(o) if isinstance(o, dict) else set())) for e, o in options.items()}
    for e, o in options.items():
        _validate_options(c, e, o)

    models_raw = doc["models"]
    if not isinstance(models_raw, list) or not models_raw:
        raise c.fail("models", f"expected a non-empty array of tables ([[models]]), got {_tname(models_raw)}")
    models = []
    for i, m in enumerate(models_raw):
        key = f"models[{i}]"
        c.table(key, m, MODEL_KEYS, required=("name",))
        mname = c.expect(f"{key}.name", m["name"], str)
        dtype = c.choice(f"{key}.dtype", m.get("dtype", "float32"), DTYPES)
        device = c.choice(f"{key}.device", m.get("device", "cpu"), DEVICES)
        quant = c.choice(f"{key}.quant", m["quant"], QUANT_METHODS) if "quant" in m else None
        path = None
        if resolve:
            try:
                path = resolve_model(mname)
            except (FileNotFoundError, KeyError, ValueError) as exc:
                raise c.fail(f"{key}.name", f"model {mname!r} not found: {exc}") from None
        models.append(ModelEntry(mname, path, dtype, device, quant))

    scen_raw = doc["scenarios"]
    if not isinstance(scen_raw, list) or not scen_raw:
        raise c.fail("scenarios", f"expected a non-empty array of tables ([[scenarios]]), got {_tname(scen_raw)}")
    entries = [_scenario(c, f"scenarios[{i}]", s, engines) for i, s in enumerate(scen_raw)]
    for i, entry in enumerate(entries):
        _check_context(c, f"scenarios[{i}]", entry, models)
    return Suite(name, description, engines, tuple(models), tuple(entries), source, text, timeout, options, warmup)


def _scenario(c: _Checker, key: str, s: Any, engines: tuple[str, ...]) -> ScenarioEntry:
    if not isinstance(s, dict):
        raise c.fail(key, f"expected a table, got {_tname(s)}")
    if "type" not in s:
        raise c.fail(key, "missing required key 'type'")
    typ = c.expect(f"{key}.type", s["type"], str)
    try:
        schema: dict[str, Param] = scenario_registry.get(typ).PARAMS
    except KeyError as exc:
        raise c.fail(f"{key}.type", exc.args[0]) from None
    c.table(key, s, SCENARIO_COMMON_KEYS | set(schema))
    sc_engines = engines
    if "engines" in s:
        sc_engines = c.engine_list(f"{key}.engines", s["engines"])
        for i, e in enumerate(sc_engines):
            if e not in engines:
                raise c.fail(f"{key}.engines[{i}]", f"engine {e!r} is not in suite.engines")
    params = []
    for pname, p in schema.items():
        pkey = f"{key}.{pname}"
        if pname not in s:
            if p.default is REQUIRED:
                raise c.fail(key, f"missing required key '{pname}'")
            params.append((pname, p.default))
            continue
        v = s[pname]
        if isinstance(v, list):
            if not p.sweep:
                raise c.fail(pkey, f"expected {p.type.__name__}, got list ({pname} cannot be swept)")
            if not v:
                raise c.fail(pkey, "empty sweep list")
            params.append((pname, tuple(c.param(f"{pkey}[{j}]", x, p) for j, x in enumerate(v))))
        else:
            params.append((pname, c.param(pkey, v, p)))
    entry = ScenarioEntry(typ, sc_engines, tuple(params))
    check = getattr(scenario_registry.get(typ), "validate", None)
    if check is not None:
        problem = check(dict(entry.params), sc_engines)  # (key, message) or None
        if problem:
            raise c.fail(f"{key}.{problem[0]}", problem[1])
    return entry


def _validate_options(c: _Checker, engine: str, opts: dict[str, Any]) -> None:
    """The adapter class's own check of its [options.<engine>] (imported through the lazy registry; an adapter
    module that cannot be imported here is not checked: its cells will say why at run time)."""
    try:
        cls = adapter_base.adapter_class(engine)
    except Exception:
        return
    try:
        cls.validate_options(dict(opts))
    except ValueError as exc:
        key, msg = _option_key(exc, opts)
        raise c.fail(f"options.{engine}" + (f".{key}" if key else ""), msg) from None


def _option_key(exc: ValueError, opts: dict[str, Any]) -> tuple[str, str]:
    """(option key, message) from ValueError(key, message), or from a message that starts with a known key."""
    if len(exc.args) == 2 and all(isinstance(a, str) for a in exc.args):
        return exc.args[0], exc.args[1]
    msg = str(exc)
    for k in sorted(opts, key=len, reverse=True):
        m = re.match(rf"(?:\w+: )?(?:opts |options\.\w+\.)?{re.escape(k)}\b[:=]?\s*", msg)
        if m:
            return k, msg[m.end():] or msg
    return "", msg


def _check_context(c: _Checker, key: str, entry: ScenarioEntry, models: list[ModelEntry]) -> None:
    """Throughput / latency cells whose prompt + generated tokens exceed a model's known context are refused."""
    if entry.type not in CONTEXT_CHECKED:
        return
    from harness.scenarios.long_context import context_limit

    params = dict(entry.params)
    prompt = max(params["prompt_len"] if isinstance(params["prompt_len"], tuple) else (params["prompt_len"],))
    gen = max(params["gen_len"] if isinstance(params["gen_len"], tuple) else (params["gen_len"],))
    for mi, m in enumerate(models):
        try:
            limit, source = context_limit(m.spec, {})
        except (OSError, ValueError):  # an unreadable config.json: the engine's load will say
            continue
        if limit is not None and prompt + gen > limit:
            raise c.fail(f"{key}.prompt_len", f"prompt_len {prompt} + gen_len {gen} = {prompt + gen} exceeds the "
                         f"context of models[{mi}] {m.name!r}: {limit} tokens ({source}); refused, not truncated")


def load(path: str | Path, resolve: bool = True) -> Suite:
    """Read and validate a suite file. Raises SuiteError naming the file and the key."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise SuiteError(f"{path}: cannot read suite file: {exc.strerror or exc}") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raise SuiteError(f"{path}: starts with a UTF-8 byte-order mark (BOM); save the file as UTF-8 without BOM")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SuiteError(f"{path}: line {line}: not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                         "suite files are UTF-8") from None
    return parse(text, str(path), resolve=resolve)


def parse_filters(tokens: list[str]) -> dict[str, Any]:
    """['engine=anvil', 'batch=8'] -> {'engine': 'anvil', 'batch': 8}; values are TOML literals (a bare word is a
    string). Raises SuiteError for a token without '='."""
    out: dict[str, Any] = {}
    for t in tokens:
        if "=" not in t:
            raise SuiteError(f"filter: expected key=value, got {t!r}")
        k, v = t.split("=", 1)
        try:
            out[k.strip()] = tomllib.loads(f"v = {v.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[k.strip()] = v.strip()
    return out


CELL_ATTRS = {"engine": lambda c: c.engine, "scenario": lambda c: c.scenario, "model": lambda c: c.model.name,
              "dtype": lambda c: c.model.dtype, "device": lambda c: c.model.device}


def _kind(v: Any) -> str:
    """Filter values compare within a kind: true is not 1, and 8 matches 8.0."""
    return "bool" if isinstance(v, bool) else "number" if isinstance(v, int | float) else type(v).__name__


def select(cells: list[Cell], filters: dict[str, Any], source: str = "") -> list[Cell]:
    """The cells matching every filter: engine, scenario, model (its name as written in the suite), dtype, device,
    or a scenario parameter (batch=8). No filters: all cells. A key no cell has, or a value of another kind than
    the cells' values (batch=true), raises SuiteError naming `source` and the key."""
    where = f"{source}: " if source else ""
    filters = {k: (str(v).lower() if isinstance(v, bool) else str(v)) if k in CELL_ATTRS else v
               for k, v in filters.items()}
    for k, v in filters.items():
        if k in CELL_ATTRS:
            continue
        values = [c.param_dict[k] for c in cells if k in c.param_dict]
        if not values:
            known = sorted(set(CELL_ATTRS) | {p for c in cells for p in c.param_dict})
            raise SuiteError(f"{where}--only {k}: unknown filter key; expected one of {', '.join(known)}")
        kinds = {_kind(x) for x in values}
        if _kind(v) not in kinds:
            raise SuiteError(f"{where}--only {k}: expected {' or '.join(sorted(kinds))}, got {_kind(v)} {v!r}")
    return [c for c in cells
            if all(_kind(got := (CELL_ATTRS[k](c) if k in CELL_ATTRS else c.param_dict.get(k, _ABSENT))) == _kind(v)
                   and got == v for k, v in filters.items())]


_ABSENT = object()
