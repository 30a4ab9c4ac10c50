"""step_tune.refine: coordinate descent over near-tied GEMV configs, judged by the (here simulated) step time."""

import pytest

from engine.kernels.triton import gemv
from engine.kernels.triton.tune import GemvTuner, TuneResult
from engine.worker import step_tune


def _tuner():
    t = GemvTuner()
    big = TuneResult(1, 28672, 4096, False, best="dot:n64k256w8s3",
                     us={"dot:n64k256w8s3": 58.72, "fma:n4k1024w4s3": 58.77, "fma:n4k1024w4s1": 61.0, "cublas": 62.5})
    small = TuneResult(1, 4096, 4096, False, best="fma:n4k1024w4s3",
                       us={"fma:n4k1024w4s3": 9.22, "fma:n4k1024w4s1": 9.24, "cublas": 13.25})
    other_bucket = TuneResult(8, 4096, 4096, False, best="cublas", us={"cublas": 13.0, "dot:n32k256w4s4": 13.1})
    byname = {str(c): c for c in gemv.candidates(1) + gemv.candidates(8)}
    for r in (big, small, other_bucket):
        t.results.append(r)
        t.choice[(r.m, r.n, r.k, r.act)] = byname[r.best]
    return t


def test_refine_keeps_a_faster_step_and_restores_slower_trials(monkeypatch):
    t = _tuner()
    seen = []

    def fake_step(runner, bs, context):  # the step is faster only with w13 on the fused-norm fma config
        choice = (str(t.choice[(1, 28672, 4096, False)]), str(t.choice[(1, 4096, 4096, False)]))
        seen.append(choice)
        ms = 4.30 if choice[0] == "fma:n4k1024w4s3" else 4.49
        return ms - (0.001 if choice[1] == "fma:n4k1024w4s1" else 0.0)  # within min_gain: not kept

    monkeypatch.setattr(step_tune, "_time_step", fake_step)
    rep = step_tune.refine(None, t, 1)
    assert str(t.choice[(1, 28672, 4096, False)]) == "fma:n4k1024w4s3"
    assert str(t.choice[(1, 4096, 4096, False)]) == "fma:n4k1024w4s3"
    assert str(t.choice[(8, 4096, 4096, False)]) == "cublas"  # another bucket untouched
    assert rep["per_role_ms"] == 4.49 and rep["final_ms"] == 4.30
    # the largest role first; only configs within 3% of its best (61.0 and cublas are not tried for w13)
    assert [x["config"] for x in rep["trials"]] == ["fma:n4k1024w4s3", "fma:n4k1024w4s1"]
    assert seen[0] == ("dot:n64k256w8s3", "fma:n4k1024w4s3") and len(seen) == 3
    assert rep["choice"] == {"28672x4096": "fma:n4k1024w4s3", "4096x4096": "fma:n4k1024w4s3"}


def test_refine_without_a_faster_trial_keeps_the_per_role_choice(monkeypatch):
    t = _tuner()
    monkeypatch.setattr(step_tune, "_time_step", lambda runner, bs, context: 4.4)
    rep = step_tune.refine(None, t, 1)
    assert str(t.choice[(1, 28672, 4096, False)]) == "dot:n64k256w8s3"
    assert rep["final_ms"] == rep["per_role_ms"] == 4.4



def test_refine_that_fails_mid_trial_restores_the_choice(monkeypatch):
    t = _tuner()
    n = [0]

    def fail_second(runner, bs, context):
        n[0] += 1
        if n[0] == 2:
            raise RuntimeError("capture failed")
        return 4.4

    monkeypatch.setattr(step_tune, "_time_step", fail_second)
    with pytest.raises(RuntimeError, match="capture failed"):
        step_tune.refine(None, t, 1)
    assert str(t.choice[(1, 28672, 4096, False)]) == "dot:n64k256w8s3"  # not the trial's config
