"""gc_paused: what GraphRunner and the GEMV tuner wrap their CUDA graph captures in."""

import gc

import pytest

from engine.worker.graph_capture import gc_paused


class _Cycle:
    freed: list[str] = []

    def __init__(self, name):
        self.name, self.me = name, self

    def __del__(self):
        _Cycle.freed.append(self.name)


def test_gc_paused_collects_first_then_no_collection_inside():
    _Cycle.freed.clear()
    _Cycle("before")  # a dead cycle: only the collector frees it
    with gc_paused():
        assert _Cycle.freed == ["before"]  # collected on entry, before any capture starts
        assert not gc.isenabled()
        _Cycle("inside")
        assert "inside" not in _Cycle.freed
    assert gc.isenabled()
    gc.collect()
    assert _Cycle.freed == ["before", "inside"]


def test_gc_paused_restores_on_error_and_keeps_a_disabled_collector_disabled():
    with pytest.raises(RuntimeError), gc_paused(collect=False):
        raise RuntimeError("capture failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: left off
    finally:
        gc.enable()
