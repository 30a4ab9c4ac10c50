"""Calibration data and activation capture for AWQ / GPTQ.

`stdlib_calibration` yields token batches of the CPython standard library the tiny model was trained on, with
the held-out modules (scripts/train_tiny.py HELD_OUT_TEST and HELD_OUT_VAL, and their test_<name> files)
excluded. `capture_inputs` runs calibration batches through the model and hands the input rows of one Linear
(after its norm / SwiGLU prologue: the rows its matmul sees) to a callback, stopping the forward right there.
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


def stdlib_calibration(tokenizer, n_samples: int = 64, seq_len: int = 512, seed: int = 0,
                       batch_size: int = 8) -> Iterator[list[list[int]]]:
    """Batches (lists of batch_size token lists, each seq_len long) from randomly chosen stdlib files: every file
    encoded as BOS + text + EOS, files concatenated in a seeded random order, cut into windows."""
    files = calibration_files()
    random.Random(seed).shuffle(files)
    eos = tokenizer.eos_id
    stream: list[int] = []
    need = n_samples * seq_len
    for f in files:
        try:
            text = f.read_text(encoding="utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError:
            continue
        stream += tokenizer.encode(text) + ([eos] if eos is not None else [])
        if len(stream) >= need:
            break
    windows = [stream[i * seq_len:(i + 1) * seq_len] for i in range(min(n_samples, len(stream) // seq_len))]
    for i in range(0, len(windows), batch_size):
        yield windows[i:i + batch_size]


class _Stop(Exception):
    """Raised by a capture hook once it has the rows it wants: the rest of the forward is skipped."""


def run_forward(model, batch: list[list[int]]) -> None:
    """One prefill of the batch through the model (the engine's reference path)."""
    from engine.generator import Generator

    seq = max(len(p) for p in batch)
    Generator(model, len(batch), seq).logits(batch)


def _prologue(x, norm=None, act=False):
    from engine import ops

    if norm is not None:
        x = ops.rms_norm(x, norm.weight, norm.eps)
    if act:
        x = ops.silu_and_mul(x)
    return x


class _CaptureMethod:
    """Stands in for a Linear's method during capture (duck-typed LinearMethod: apply only)."""

    def __init__(self, sink: Callable[[torch.Tensor], None]):
        self.sink = sink

    def apply(self, layer, x, norm=None, act=False, residual=None):
        y = _prologue(x, norm, act)
        self.sink(y.reshape(-1, y.shape[-1]))
        raise _Stop


def capture_inputs(model, module: torch.nn.Module, calib: Iterable[list[list[int]]],
                   sink: Callable[[torch.Tensor], None]) -> None:
    """sink(x [T, in_features]) for every calibration batch: the rows `module`'s matmul receives."""
    if hasattr(module, "method"):  # engine.model.layers.linear.Linear
        saved = module.method
        module.method = _CaptureMethod(sink)
        handle = None
    else:  # nn.Linear

        def hook(mod, args):
            sink(args[0].reshape(-1, args[0].shape[-1]))
            raise _Stop

        handle = module.register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            for batch in calib:
                try:
                    run_forward(model, batch)
                except _Stop:
                    pass
    finally:
        if handle is not None:
            handle.remove()
        else:
            module.method = saved
