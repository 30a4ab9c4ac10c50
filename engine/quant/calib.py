"""Calibration data and activation capture for AWQ / GPTQ.

`stdlib_calibration` yields token batches of the CPython standard library the tiny model was trained on, with
the held-out modules (scripts/train_tiny.py HELD_OUT_TEST and HELD_OUT_VAL, and their test_<name> files)
excluded. `capture_inputs` runs calibration sequences through the model and hands the input rows of some Linears
(after their norm / SwiGLU prologue: the rows their matmul sees) to callbacks, stopping the forward after the last.
"""

from __future__ import annotations

import random
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

# the same names as scripts/train_tiny.py (tests/engine/quant/test_calib.py checks they agree)
HELD_OUT = ("argparse", "json", "shlex", "fractions", "dataclasses", "zipfile", "calendar", "string",
            "csv", "difflib", "logging", "pprint", "textwrap", "wave", "heapq")  # fmt: skip


def _module_of(rel: Path) -> str:
    parts = rel.parts
    if len(parts) > 1 and parts[0] == "test":
        return parts[1].removesuffix(".py").removeprefix("test_")
    return parts[0].removesuffix(".py")


def calibration_files(root: Path | None = None) -> list[Path]:
    """The stdlib .py files a calibration may read: sorted, no site-packages / __pycache__, no held-out module."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(s in ("site-packages", "__pycache__") or s.startswith("config-3") for s in rel.parts):
            continue
        if _module_of(rel) in HELD_OUT or p.is_symlink() or p.stat().st_size > 500_000:
            continue
        out.append(p)
    return out


def stdlib_calibration(tokenizer, n_samples: int = 128, seq_len: int = 512, seed: int = 0,
                       batch_size: int = 8) -> Iterator[list[list[int]]]:
    """Batches (lists of batch_size token lists, each seq_len long) of stdlib code. Files are visited in a seeded
    random order and each contributes one random run of at most seq_len tokens (encoded as BOS + text + EOS), so
    the n_samples windows span at least n_samples files: a narrow calibration set (a handful of long files) makes
    GPTQ fit those files and lose on others (measured on the tiny model)."""
    rng = random.Random(seed)
    files = calibration_files()
    rng.shuffle(files)
    eos = tokenizer.eos_id
    stream: list[int] = []
    need = n_samples * seq_len
    for f in files:
        try:
            text = f.read_text(encoding="utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError:
            continue
        ids = tokenizer.encode(text) + ([eos] if eos is not None else [])
        start = rng.randrange(0, max(1, len(ids) - seq_len + 1))
        stream += ids[start:start + seq_len]
        if len(stream) >= need:
            break
    windows = [stream[i * seq_len:(i + 1) * seq_len] for i in range(min(n_samples, len(stream) // seq_len))]
    for i in range(0, len(windows), batch_size):
        yield windows[i:i + batch_size]


class _Stop(Exception):
    """Raised by a capture hook once it has the rows it wants: the rest of the forward is skipped."""


def _forwarder(model, calib: list[list[list[int]]]):
    """A function running one token list through the model (the engine's reference Generator: one prefill)."""
    from engine.generator import Generator

    gen = Generator(model, 1, max(len(p) for batch in calib for p in batch))
    return lambda ids: gen.logits([ids])


def _prologue(x, norm=None, act=False):
    from engine import ops

    if norm is not None:
        x = ops.rms_norm(x, norm.weight, norm.eps)
    if act:
        x = ops.silu_and_mul(x)
    return x


class _CaptureMethod:
    """Stands in for a Linear's method during capture (duck-typed LinearMethod): records the matmul's input, then
    stops the forward (the last module of a capture) or computes the layer with its own method."""

    def __init__(self, inner, sink: Callable[[torch.Tensor], None], stop: bool):
        self.inner, self.sink, self.stop = inner, sink, stop

    def apply(self, layer, x, norm=None, act=False, residual=None):
        y = _prologue(x, norm, act)
        self.sink(y.reshape(-1, y.shape[-1]))
        if self.stop:
            raise _Stop
        out = self.inner.matmul(layer, y)
        return out if residual is None else residual + out


def _hook(sink, stop: bool):
    def hook(mod, args):
        sink(args[0].reshape(-1, args[0].shape[-1]))
        if stop:
            raise _Stop

    return hook


def capture_inputs(model, modules: torch.nn.Module | list[torch.nn.Module], calib: Iterable[list[list[int]]],
                   sinks: Callable[[torch.Tensor], None] | list[Callable]) -> None:
    """sinks[i](x [T, in_features]) for every calibration sequence: the rows modules[i]'s matmul receives. The
    forward stops at the last module in forward order (give the modules in that order)."""
    modules = modules if isinstance(modules, list) else [modules]
    sinks = sinks if isinstance(sinks, list) else [sinks]
    saved, handles = {}, []
    for i, (mod, sink) in enumerate(zip(modules, sinks, strict=True)):
        stop = i == len(modules) - 1
        if hasattr(mod, "method"):  # engine.model.layers.linear.Linear
            saved[mod] = mod.method
            mod.method = _CaptureMethod(mod.method, sink, stop)
        else:  # nn.Linear
            handles.append(mod.register_forward_pre_hook(_hook(sink, stop)))
    calib = list(calib)
    forward = _forwarder(model, calib)
    try:
        with torch.inference_mode():
            for ids in (p for batch in calib for p in batch):  # one sequence per forward: the hook stops it
                try:
                    forward(ids)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        for mod, method in saved.items():
            mod.method = method
