"""Weight bandwidth and peak memory in the throughput scenario: bytes per step from the model's shape, GB/s from
the measured step time, % of the run's measured copy bandwidth, torch's peak allocation beside NVML's."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from adapters.base import Adapter, GenResult, ModelSpec
from harness import envinfo, telemetry
from harness.scenarios import throughput
from harness.workload import Context, weight_bytes_per_step

ROOT = Path(__file__).resolve().parents[2]
TINY = ModelSpec("tiny", str(ROOT / "models" / "tiny"), dtype="bfloat16")


class PlantedSteps(Adapter):
    """Every request's tokens arrive exactly `step` seconds apart after a 50 ms prefill (host times are planted)."""

    name = "planted"

    def __init__(self, step: float):
        self.step = step

    @classmethod
    def available(cls):
        return True, "planted"

    def load(self, model, opts=None):
        pass

    def generate(self, requests):
        t0 = 100.0
        times = [t0 + 0.05 + i * self.step for i in range(requests[0].max_new_tokens)]
        return [GenResult(output_ids=[1] * r.max_new_tokens, text=None, submit_time=t0, first_token_time=times[0],
                          token_times=times, finish_reason="length", prompt_tokens=len(r.prompt_ids))
                for r in requests]


def ctx(**kw) -> Context:
    return Context(engine="planted", case_id="c", vocab_size=50, out_dir=Path("."), **kw)


PARAMS = {"batch": 4, "prompt_len": 8, "gen_len": 9, "warmup": 0, "repeats": 2, "seed": 0}


def test_weight_bandwidth_and_share_of_copy_follow_the_step_time():
    m, samples = throughput.run(PlantedSteps(0.010), dict(PARAMS), ctx(weight_bytes=15_000_000_000, copy_gb_s=3000.0))
    assert m["step_ms"] == pytest.approx(10.0)
    assert m["weight_gb_s"] == pytest.approx(1500.0)  # 15 GB per 10 ms step
    assert m["weight_pct_copy"] == pytest.approx(50.0)
    assert m["decode_tok_s"] == pytest.approx(400.0)  # 4 requests x 100 steps/s
    assert samples["step_s"] == pytest.approx([0.010, 0.010])


def test_bandwidth_metrics_are_absent_when_their_inputs_are():
    m, _ = throughput.run(PlantedSteps(0.004), dict(PARAMS), ctx(weight_bytes=1_000_000))
    assert m["step_ms"] == pytest.approx(4.0) and m["weight_gb_s"] == pytest.approx(0.25)
    assert "weight_pct_copy" not in m  # no GPU copy bandwidth measured (a CPU run)
    m, _ = throughput.run(PlantedSteps(0.004), dict(PARAMS), ctx())
    assert "weight_gb_s" not in m and "weight_pct_copy" not in m
    m, _ = throughput.run(PlantedSteps(0.004), {**PARAMS, "gen_len": 1}, ctx(weight_bytes=10))
    assert m["step_ms"] is None and "weight_gb_s" not in m  # one token: no decode step to time


def test_weight_bytes_per_step_matches_the_real_checkpoint():
    import engine

    model = engine.load(TINY.path, "bfloat16", "cpu").model
    every = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.tok_embeddings.weight
    assert weight_bytes_per_step(TINY) == every - emb.numel() * emb.element_size()  # untied: no embedding table
    f32 = ModelSpec("tiny", TINY.path, dtype="float32")
    assert weight_bytes_per_step(f32) == 2 * weight_bytes_per_step(TINY)


@pytest.mark.parametrize(
    "preset,total",  # the published parameter counts of the real checkpoints
    [("llama-3-8b", 8_030_261_248), ("llama-2-7b", 6_738_415_616), ("mistral-7b", 7_241_732_096)],
)
def test_synthetic_presets_have_the_real_parameter_counts(preset, total):
    spec = ModelSpec(f"synthetic:{preset}", None, dtype="bfloat16", device="cuda")
    from harness.workload import model_config

    cfg = model_config(spec)
    assert cfg.num_params == total
    assert weight_bytes_per_step(spec) == 2 * (total - cfg.vocab_size * cfg.dim)


def test_weight_bytes_is_none_for_what_is_not_a_llama_config(tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 100}')
    assert weight_bytes_per_step(ModelSpec("x", str(tmp_path))) is None
    assert weight_bytes_per_step(ModelSpec("synthetic:nope", None)) is None
    with pytest.raises(ValueError, match="unknown synthetic preset 'nope'"):
        from harness.workload import model_config

        model_config(ModelSpec("synthetic:nope", None))


def test_copy_bandwidth_without_a_gpu_is_a_note_not_an_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the measurement itself runs in the GPU tests")
    out = envinfo.measure_copy_bandwidth(timeout_s=120)
    assert set(out) == {"gpu_copy_note"} and out["gpu_copy_note"].startswith("copy bandwidth not measured: exit 1")


@pytest.mark.gpu
def test_copy_bandwidth_is_measured_on_the_gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = envinfo.measure_copy_bandwidth()
    assert 100 < out["gpu_copy_gb_s"] < 20_000, out


def test_measure_cell_records_torch_peak_allocation_only_where_cuda_is_initialised(monkeypatch):
    calls = []
    cuda = types.SimpleNamespace(is_initialized=lambda: True, reset_peak_memory_stats=lambda: calls.append("reset"),
                                 max_memory_allocated=lambda: 3 * 2**30)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    m, s = telemetry.measure_cell(lambda a, p, c: ({"x": 1.0}, {}), object(), {}, None)
    assert calls == ["reset"] and m["torch_peak_alloc_mb"] == 3072.0
    assert s["telemetry"]["torch_peak_alloc_mb"] == 3072.0
    cuda.is_initialized = lambda: False  # e.g. llama.cpp, or torch on the CPU: telemetry never starts CUDA itself
    m, _ = telemetry.measure_cell(lambda a, p, c: ({"x": 1.0}, {}), object(), {}, None)
    assert "torch_peak_alloc_mb" not in m


def test_runner_hands_the_weight_bytes_to_the_scenario(tmp_path, monkeypatch):
    from adapters import base
    from harness.runner import run_suite
    from harness.suite import parse

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))  # spawned workers import fault_adapters
    monkeypatch.setitem(base.REGISTRY, "fake", "fault_adapters:FakeAdapter")
    suite = parse(f"""
[suite]
name = "bw"
engines = ["fake"]
engine_warmup_s = 0

[[models]]
name = "{TINY.path}"
dtype = "bfloat16"

[[scenarios]]
type = "throughput"
batch = 2
prompt_len = 8
gen_len = 6
warmup = 0
repeats = 1
""", "bw.toml")
    (r,) = run_suite(suite, tmp_path / "run").records
    m = r.metrics
    assert r.status == "ok" and m["step_ms"] > 0
    assert m["weight_gb_s"] == pytest.approx(weight_bytes_per_step(TINY) / (m["step_ms"] * 1e-3) / 1e9, rel=1e-4)
    assert "weight_pct_copy" not in m and "gpu_copy_gb_s" not in r.env  # a CPU run measures no GPU copy bandwidth


def test_anvil_commit_names_the_commit_of_a_copied_checkout(monkeypatch):
    monkeypatch.delenv("ANVIL_COMMIT", raising=False)
    real = envinfo.snapshot()
    assert real["commit"] and "commit_source" not in real
    monkeypatch.setenv("ANVIL_COMMIT", "93a8c4d")
    env = envinfo.snapshot()
    assert env["commit"] == "93a8c4d" and env["dirty"] is None and env["commit_source"] == "ANVIL_COMMIT"
    import engine
    from adapters.anvil import AnvilAdapter

    assert AnvilAdapter.available() == (True, f"anvil {engine.__version__}+93a8c4d")  # the engine version names it too
