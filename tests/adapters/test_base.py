"""The adapter contract's helpers: registry errors, availability that never raises, GenResult timing, stream()."""

from __future__ import annotations

import pytest

from adapters import base
from adapters.base import Adapter, GenRequest, GenResult, ModelSpec


def test_unknown_engine_lists_the_known_ones():
    with pytest.raises(KeyError, match="known engines: .*anvil.*hf"):
        base.get("warp")


def test_availability_never_raises(monkeypatch):
    monkeypatch.setitem(base.REGISTRY, "broken", "adapters.does_not_exist:Nope")
    avail = base.availability()
    assert set(avail) == set(base.REGISTRY)
    ok, why = avail["broken"]
    assert not ok and "adapter failed to import" in why
    assert base.package_version("surely_not_a_module_xyz")[0] is False


def test_genresult_ttft_and_itl():
    r = GenResult(output_ids=[1, 2, 3], text=None, submit_time=1.0, first_token_time=1.5,
                  token_times=[1.5, 1.75, 2.25], finish_reason="length", prompt_tokens=4)
    assert r.ttft == 0.5 and r.itl == [0.25, 0.5]


def test_model_spec_synthetic():
    assert ModelSpec("synthetic:llama-3-8b", None).synthetic == "llama-3-8b"
    assert ModelSpec("tiny", "/x").synthetic is None


class Echo(Adapter):
    name = "echo"

    @classmethod
    def available(cls):
        return True, "echo 0"

    def load(self, model, opts=None):
        pass

    def generate(self, requests):
        return [GenResult(list(r.prompt_ids), None, 0.0, 0.1, [0.1 * (i + 1) for i in range(len(r.prompt_ids))],
                          "length", len(r.prompt_ids)) for r in requests]


def test_default_stream_replays_generate_and_defaults():
    a = Echo()
    assert list(a.stream(GenRequest([4, 5], 2))) == [(4, 0.1), (5, 0.2)]
    assert a.version() == "echo 0" and a.info() == {}
    with pytest.raises(NotImplementedError):
        a.logits([1])
    a.close()
