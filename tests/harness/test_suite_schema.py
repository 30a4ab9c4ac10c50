"""Suite files: every shipped suite validates; each kind of mistake names the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.suite import SuiteError, load, parse

REPO = Path(__file__).resolve().parents[2]
SUITES = sorted((REPO / "suites").glob("*.toml"))


@pytest.mark.parametrize("path", SUITES, ids=[p.name for p in SUITES])
def test_shipped_suite_validates(path):
    suite = load(path)  # models resolved too: 'tiny' builds its random fallback, presets are checked
    assert suite.name and suite.cells
    assert len({c.cell_id for c in suite.cells}) == len(suite.cells)


def test_smoke_resolves_its_model_and_crosses_engines():
    suite = load(REPO / "suites" / "smoke.toml")
    assert set(suite.engines) == {"anvil", "hf", "llamacpp"}
    assert all(m.device == "cpu" and m.dtype == "float32" and m.path for m in suite.models)
    per_engine = {e: [c.case_id for c in suite.cells if c.engine == e] for e in suite.engines}
    assert per_engine["anvil"] == per_engine["hf"] == per_engine["llamacpp"]  # the same cases for every engine


GOOD = """
[suite]
name = "t"
engines = ["anvil", "hf"]

[[models]]
name = "{model}"

[[scenarios]]
type = "throughput"
batch = [1, 2, 4]
prompt_len = [8, 16]
gen_len = 4
"""


@pytest.fixture
def model(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"vocab_size": 64}))
    return str(d)


def test_sweep_expands_engine_x_model_x_params(model):
    suite = parse(GOOD.format(model=model), "t.toml")
    assert len(suite.cells) == 2 * 3 * 2
    c = suite.cells[0]
    assert c.param_dict == {"batch": 1, "prompt_len": 8, "gen_len": 4, "warmup": 1, "repeats": 3, "seed": 0}
    assert c.model.spec.path == str(Path(model).resolve())


def write(tmp_path, text, name="bad.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "edit, key, words",
    [
        (lambda t: t.replace('name = "t"', 'name = "t'), "", "TOML syntax error"),
        (lambda t: t.replace('name = "t"', 'name = "t"\ncolour = "red"'), "suite.colour", "unknown key"),
        (lambda t: t.replace("gen_len = 4", "gen_len = 4\nbatchsize = 2"), "scenarios[0].batchsize", "unknown key"),
        (lambda t: t.replace("gen_len = 4", 'gen_len = "four"'), "scenarios[0].gen_len", "expected int, got str"),
        (lambda t: t.replace("batch = [1, 2, 4]", 'batch = [1, "2"]'), "scenarios[0].batch[1]", "expected int, got str"),
        (lambda t: t.replace("gen_len = 4", "gen_len = 4\nwarmup = [1, 2]"), "scenarios[0].warmup", "cannot be swept"),
        (lambda t: t.replace("gen_len = 4", "gen_len = 0"), "scenarios[0].gen_len", "must be >= 1"),
        (lambda t: t.replace('"hf"]', '"hf", "warp"]'), "suite.engines[2]", "unknown engine 'warp'"),
        (lambda t: t.replace('type = "throughput"', 'type = "speed"'), "scenarios[0].type", "unknown scenario 'speed'"),
        (lambda t: t.replace("{model}", "./no/such/model"), "models[0].name", "not found"),
        (lambda t: t.replace('name = "{model}"', 'dtype = "float32"'), "models[0]", "missing required key 'name'"),
        (lambda t: t.replace('name = "{model}"', 'name = "{model}"\ndtype = "fp8"'), "models[0].dtype", "expected one of"),
        (lambda t: t.replace('engines = ["anvil", "hf"]', 'engines = "hf"'), "suite.engines", "expected a list of str"),
        (lambda t: t.replace("[[scenarios]]", "[[scenarios]]\nengines = [\"llamacpp\"]"), "scenarios[0].engines[0]",
         "not in suite.engines"),
        (lambda t: t + '\n[[scenarios]]\ntype = "parity"\nreference = "vllm"\n', "scenarios[1].reference",
         "reference engine 'vllm'"),
    ],
    ids=["syntax", "unknown-suite-key", "unknown-param", "wrong-type", "wrong-type-in-sweep", "not-sweepable",
         "below-min", "unknown-engine", "unknown-scenario", "missing-model-path", "missing-model-name", "bad-dtype",
         "engines-not-list", "scenario-engine-not-in-suite", "parity-reference-not-an-engine"],
)
def test_malformed_suite_names_file_and_key(tmp_path, model, edit, key, words):
    path = write(tmp_path, edit(GOOD).replace("{model}", model))
    with pytest.raises(SuiteError) as err:
        load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {key}: " if key else f"{path}: "), msg
    assert words in msg, msg


def test_unreadable_file(tmp_path):
    with pytest.raises(SuiteError, match="cannot read suite file"):
        load(tmp_path / "absent.toml")


def test_cli_exits_2_with_the_message_and_no_traceback(tmp_path, model):
    from typer.testing import CliRunner

    from harness.cli import app

    path = write(tmp_path, GOOD.replace("{model}", model).replace("gen_len = 4", 'gen_len = "x"'))
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    out = res.output  # stdout and stderr together
    assert "scenarios[0].gen_len: expected int, got str" in out
    assert "Traceback" not in out
    assert not (tmp_path / "out").exists()
