"""Suite validation: encoding, bounds, context, run-folder-safe names, --only, engine options (validate_options
and openai_http's loopback / environment rules). Every refusal names the file and the key and exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapters import base
from adapters.base import ModelSpec
from adapters.openai_http import OpenAIHTTPAdapter
from harness.cli import app
from harness.suite import SuiteError, load, parse_filters, select

HERE = Path(__file__).resolve().parent

GOOD = """
[suite]
name = "t"
engines = ["anvil", "hf"]

[[models]]
name = "{model}"

[[scenarios]]
type = "throughput"
batch = [1, 2]
prompt_len = [8, 16]
gen_len = 4
"""


@pytest.fixture
def model(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"vocab_size": 64, "max_position_embeddings": 128}))
    return str(d)


def write(tmp_path, text: str | bytes, name="s.toml") -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def refused(path: Path, key: str, words: str) -> str:
    with pytest.raises(SuiteError) as err:
        load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {key}: " if key else f"{path}: "), msg
    assert words in msg, msg
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(path.parent / "out")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert not (path.parent / "out").exists()
    return msg


def test_bom_and_non_utf8_files_are_refused(tmp_path, model):
    text = GOOD.format(model=model)
    refused(write(tmp_path, b"\xef\xbb\xbf" + text.encode()), "", "byte-order mark")
    bad = text.replace('name = "t"', 'name = "t"\ndescription = "caf\xe9"').encode("latin-1")
    refused(write(tmp_path, bad), "line 4", "not valid UTF-8")


@pytest.mark.parametrize("edit, key, words", [
    (lambda t: t.replace('name = "t"', 'name = "t"\ncell_timeout_s = 0'), "suite.cell_timeout_s", "must be > 0"),
    (lambda t: t.replace('name = "t"', 'name = "t"\ncell_timeout_s = -5'), "suite.cell_timeout_s", "must be > 0"),
    (lambda t: t.replace('name = "t"', 'name = "t"\ncell_timeout_s = nan'), "suite.cell_timeout_s", "must be > 0"),
    (lambda t: t.replace('name = "t"', 'name = "t"\nengine_warmup_s = -1'), "suite.engine_warmup_s", ">= 0"),
    (lambda t: t.replace("gen_len = 4", "gen_len = 1_000_001"), "scenarios[0].gen_len", "must be <= 1,000,000"),
    (lambda t: t.replace("gen_len = 4", "gen_len = [4, 99999999]"), "scenarios[0].gen_len[1]", "must be <= 1,000,000"),
    (lambda t: t.replace("gen_len = 4", "gen_len = 120"), "scenarios[0].prompt_len",
     "prompt_len 16 + gen_len 120 = 136 exceeds the context of models[0]"),
    (lambda t: t.replace('type = "throughput"', 'type = "latency"').replace("gen_len = 4", "gen_len = 113"),
     "scenarios[0].prompt_len", "refused, not truncated"),
    (lambda t: t.replace('name = "t"', 'name = "../../x"'), "suite.name", "not a plain name"),
    (lambda t: t.replace('name = "t"', 'name = "a/b"'), "suite.name", "not a plain name"),
    (lambda t: t.replace('name = "t"', 'name = ".."'), "suite.name", "not a plain name"),
    (lambda t: t.replace('name = "t"', 'name = ""'), "suite.name", "not a plain name"),
], ids=["timeout-0", "timeout-negative", "timeout-nan", "warmup-negative", "gen-len-huge", "gen-len-huge-in-sweep",
        "past-context-throughput", "past-context-latency", "name-escapes", "name-slash", "name-dotdot", "name-empty"])
def test_bad_values_name_the_key(tmp_path, model, edit, key, words):
    refused(write(tmp_path, edit(GOOD.format(model=model))), key, words)


def test_within_context_and_unknown_context_pass(tmp_path, model):
    assert load(write(tmp_path, GOOD.format(model=model).replace("gen_len = 4", "gen_len = 112"))).cells
    cfg = Path(model) / "config.json"
    cfg.write_text(json.dumps({"vocab_size": 64}))  # no max_position_embeddings: nothing to check against
    assert load(write(tmp_path, GOOD.format(model=model).replace("gen_len = 4", "gen_len = 5000"))).cells


def test_only_with_an_unknown_key_or_a_bool_for_an_int_exits_2(tmp_path, model):
    path = write(tmp_path, GOOD.format(model=model))
    suite = load(path)
    assert len(select(suite.cells, parse_filters(["batch=2"]), str(path))) == 4
    assert len(select(suite.cells, parse_filters(["engine=hf", "prompt_len=8"]), str(path))) == 2
    for only, words in ((["bacth=2"], "--only bacth: unknown filter key"),
                        (["batch=true"], "--only batch: expected number, got bool")):
        with pytest.raises(SuiteError, match=words) as err:
            select(suite.cells, parse_filters(only), str(path))
        assert str(err.value).startswith(f"{path}: ")
        res = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), "--only", only[0]])
        assert res.exit_code == 2 and words in res.output.replace("\n", "") and "Traceback" not in res.output


# -- engine options ----------------------------------------------------------------------------------------------
OPTS = """
[suite]
name = "o"
engines = ["{engine}"]

[options.{engine}]
{options}

[[models]]
name = "{model}"

[[scenarios]]
type = "throughput"
prompt_len = 8
gen_len = 4
"""


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setitem(base.REGISTRY, "optcheck", "fault_adapters:OptionCheckingAdapter")
    monkeypatch.setitem(base.REGISTRY, "ghost", "no_such_module_anywhere:GhostAdapter")


def test_validate_options_hook_turns_value_error_into_a_suite_error(tmp_path, model, fakes):
    def text(engine, options):
        return OPTS.format(engine=engine, options=options, model=model)

    assert load(write(tmp_path, text("optcheck", "depth = 3"))).options == {"optcheck": {"depth": 3}}
    refused(write(tmp_path, text("optcheck", "depth = 0")), "options.optcheck.depth", "must be >= 1, got 0")
    refused(write(tmp_path, text("optcheck", 'colour = "red"')), "options.optcheck.colour", "not an option")
    # an adapter module that cannot be imported here is not checked (its cells will say why at run time)
    assert load(write(tmp_path, text("ghost", "depth = 0"))).options == {"ghost": {"depth": 0}}
    assert base.Adapter.validate_options({"anything": object()}) is None  # the default accepts anything


@pytest.mark.parametrize("options, key, words", [
    ('base_url = "http://10.1.2.3:8000"', "base_url", "not a loopback address"),
    ('base_url = "http://example.com:8000"', "base_url", "not a loopback address"),
    ('base_url = "http://127.0.0.1.evil.com:80"', "base_url", "not a loopback address"),
    ('base_url = "ftp://127.0.0.1:21"', "base_url", "expected http://HOST:PORT"),
    ('base_url = "http://127.0.0.1:8000"\napi_key_env = "AWS_SECRET_ACCESS_KEY"', "api_key_env",
     "neither OPENAI_API_KEY nor listed in allow_env"),
    ('base_url = "http://127.0.0.1:8000"\napi_key_env = "A"\nallow_env = ["B"]', "api_key_env", "allow_env"),
    ('base_url = "http://127.0.0.1:8000"\nallow_env = ["NOT-A-NAME"]', "allow_env", "not an environment variable"),
    ('base_url = "http://127.0.0.1:8000"\nallow_remote = "yes"', "allow_remote", "expected bool"),
    ('base_url = "http://127.0.0.1:8000"\nbase_ulr = "x"', "base_ulr", "unknown option"),
    ('model = "m"', "base_url", "required"),
], ids=["private-ip", "hostname", "loopback-lookalike", "scheme", "secret-env", "env-not-allowed", "bad-env-name",
        "allow-remote-not-bool", "typo", "no-base-url"])
def test_openai_http_options_are_checked_at_load(tmp_path, model, options, key, words):
    text = OPTS.format(engine="openai_http", options=options, model=model)
    refused(write(tmp_path, text), f"options.openai_http.{key}", words)
    with pytest.raises(ValueError, match=words):  # the adapter applies the same rules on its own
        OpenAIHTTPAdapter().load(ModelSpec("m", None), _opts(text))


def _opts(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)["options"]["openai_http"]


def test_openai_http_allowed_forms(tmp_path, model, monkeypatch):
    monkeypatch.setenv("MY_BENCH_KEY", "s3cret")
    monkeypatch.setenv("OPENAI_API_KEY", "default-key")
    for url in ("http://127.0.0.1:8000", "http://127.8.9.10:1", "http://localhost:80", "http://[::1]:8000/v1"):
        text = OPTS.format(engine="openai_http", options=f'base_url = "{url}"', model=model)
        assert load(write(tmp_path, text)).options["openai_http"]["base_url"] == url
    remote = 'base_url = "http://10.1.2.3:8000"\nallow_remote = true\napi_key_env = "MY_BENCH_KEY"\n' \
             'allow_env = ["MY_BENCH_KEY"]'
    text = OPTS.format(engine="openai_http", options=remote, model=model)
    opts = load(write(tmp_path, text)).options["openai_http"]
    ad = OpenAIHTTPAdapter()
    ad.load(ModelSpec("m", None), opts)
    assert ad.headers == {"Authorization": "Bearer s3cret"}
    ad.load(ModelSpec("m", None), {"base_url": "http://127.0.0.1:1"})
    assert ad.headers == {"Authorization": "Bearer default-key"}
