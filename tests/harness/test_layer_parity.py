"""Layer-wise parity (parity scenario, layers = true): per-layer hidden-state |difference| against the reference
engine, and the first layer past the tolerance; HF's hidden_states hook the decoder layers (before the final norm)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402

from adapters import base  # noqa: E402
from adapters.base import Adapter, ModelSpec  # noqa: E402
from adapters.hf import HFAdapter  # noqa: E402
from harness.scenarios import parity  # noqa: E402
from harness.workload import Context  # noqa: E402

HERE = Path(__file__).resolve().parent
TINY = str(HERE.parents[1] / "models" / "tiny")
PARAMS = {"reference": "hf", "prompt_len": 12, "n_tokens": 6, "seed": 2, "layers": True, "layer_tol": 1e-3}


class PerturbLayer3(HFAdapter):
    """HF with a planted defect: layer 3 (and so every later layer) is off by 0.01 at one position."""

    name = "perturbed"

    def hidden_states(self, prompt_ids):
        hs = super().hidden_states(prompt_ids)
        for h in hs[3:]:
            h[1, 0] += 0.01
        return hs


class NoLayers(HFAdapter):
    name = "nolayers"
    hidden_states = Adapter.hidden_states  # the contract's default


@pytest.fixture(scope="module")
def hf():
    ad = HFAdapter()
    ad.load(ModelSpec("tiny", TINY))
    return ad


def cell(adapter, engine: str, out: Path, **params):
    ctx = Context(engine=engine, case_id="parity-case", vocab_size=4096, out_dir=out)
    return parity.run(adapter, {**PARAMS, **params}, ctx)


def test_hf_hidden_states_are_decoder_outputs_before_the_final_norm(hf):
    ids = list(range(5, 25))
    hs = hf.hidden_states(ids)
    assert len(hs) == 5 and all(h.shape == (20, 384) and h.dtype == torch.float32 for h in hs)
    with torch.inference_mode():
        ref = hf.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    for i in range(4):  # HF's tuple: embeddings, then layers 0..3 as they are ...
        assert torch.equal(hs[i], ref[i + 1][0].float())
    assert not torch.allclose(hs[4], ref[5][0])  # ... but its last entry is after the final norm
    with torch.inference_mode():
        assert torch.allclose(hf.model.model.norm(hs[4][None])[0], ref[5][0], atol=1e-6)


def test_hf_against_hf_has_no_layer_difference(hf, tmp_path):
    ref_m, _ = cell(hf, "hf", tmp_path)
    assert ref_m["first_bad_layer"] is None and ref_m["n_layers"] == 5
    m, s = cell(hf, "hf_again", tmp_path)
    assert m["layer_max_diff"] == 0.0 and m["first_bad_layer"] is None and m["layer_tol"] == 1e-3
    assert [r["max_diff"] for r in s["layers"]] == [0.0] * 5 and [r["mean_diff"] for r in s["layers"]] == [0.0] * 5
    assert len(s["layers"][0]["max_diff_per_position"]) == 12 + 6 - 1  # prompt + continuation[:-1]
    assert m["max_logit_diff"] == 0.0


def test_a_perturbed_layer_3_is_the_first_bad_layer(hf, tmp_path):
    cell(hf, "hf", tmp_path)
    bad = PerturbLayer3()
    bad.model, bad.device = hf.model, "cpu"  # same weights, planted defect in hidden_states only
    m, s = cell(bad, "perturbed", tmp_path)
    assert m["first_bad_layer"] == 3 and m["layer_max_diff"] == pytest.approx(0.01, rel=1e-3)
    assert [r["max_diff"] for r in s["layers"]] == pytest.approx([0.0, 0.0, 0.0, 0.01, 0.01], abs=1e-6)
    assert s["layers"][3]["mean_diff"] == pytest.approx(0.01 / (17 * 384), rel=1e-3)
    assert s["layers"][3]["max_diff_per_position"][1] == pytest.approx(0.01, rel=1e-3)
    m, _ = cell(bad, "perturbed", tmp_path, layer_tol=0.02)  # the tolerance decides
    assert m["first_bad_layer"] is None and m["layer_tol"] == 0.02


def test_an_engine_without_hidden_states_records_why_and_keeps_logit_parity(hf, tmp_path):
    cell(hf, "hf", tmp_path)
    no = NoLayers()
    no.model, no.device = hf.model, "cpu"
    m, _ = cell(no, "nolayers", tmp_path)
    assert m["layers_note"] == "layers not supported by nolayers"
    assert "first_bad_layer" not in m and m["max_logit_diff"] == 0.0
    m, _ = cell(hf, "hf_again", tmp_path, layers=False)
    assert "layers_note" not in m and "first_bad_layer" not in m


def test_first_bad_layer_reaches_the_record_and_the_table(tmp_path, monkeypatch):
    from harness import report
    from harness.runner import run_suite
    from harness.suite import parse

    monkeypatch.syspath_prepend(str(HERE))  # spawned workers import this module for the perturbed engine
    monkeypatch.setitem(base.REGISTRY, "perturbed", "test_layer_parity:PerturbLayer3")
    text = f"""
[suite]
name = "layers"
engines = ["hf", "perturbed"]
engine_warmup_s = 0

[[models]]
name = "{TINY}"

[[scenarios]]
type = "parity"
prompt_len = 12
n_tokens = 6
layers = true
"""
    out = run_suite(parse(text, "layers.toml"), tmp_path / "run")
    by = {r.engine: r for r in out.records}
    assert by["hf"].status == by["perturbed"].status == "ok", [r.reason for r in out.records]
    assert by["perturbed"].metrics["first_bad_layer"] == 3 and by["perturbed"].metrics["layer_tol"] == 1e-3
    header, rows = report.rows(out.records, "parity")
    col = header.index("first_bad_layer")
    assert {r[header.index("engine")]: r[col] for r in rows} == {"hf": "-", "perturbed": "3"}
