"""The one contract every engine adapter implements, its hand-off dataclasses, and the lazy registry."""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None  # same seed + same request = same tokens (per engine)


@dataclass
class GenRequest:
    prompt_ids: list[int]  # token ids; every engine receives exactly these
    max_new_tokens: int
    prompt_text: str | None = None  # for engines that only accept text (some HTTP servers)
    ignore_eos: bool = True  # benchmarks generate exactly max_new_tokens unless told otherwise
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: list[int] = field(default_factory=list)  # extra stop token ids (EOS is implied unless ignore_eos)


@dataclass
class GenResult:
    output_ids: list[int]  # generated ids only (prompt excluded)
    text: str | None  # decoded output, where the engine has a tokenizer
    submit_time: float  # host perf_counter() seconds when the request was handed to the engine
    first_token_time: float | None  # when the first generated token was available on the host
    token_times: list[float]  # one perf_counter() per generated token (device-synchronised)
    finish_reason: str  # "length" | "stop" | "error"
    prompt_tokens: int
    error: str | None = None  # set when finish_reason == "error"

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds."""
        return None if self.first_token_time is None else self.first_token_time - self.submit_time

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies, seconds (len = tokens - 1)."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


@dataclass(frozen=True)
class ModelSpec:
    """What to load. `name` is 'tiny', 'tiny-draft', a local directory, an HF repo id found in the local HF
    cache, or 'synthetic:<preset>'. `path` is the resolved local directory (None for synthetic)."""

    name: str
    path: str | None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda
    quant: str | None = None  # rtn | awq | gptq | nf4 (weight-only 4-bit); an engine that cannot apply it refuses

    @property
    def synthetic(self) -> str | None:
        return self.name.split(":", 1)[1] if self.name.startswith("synthetic:") else None


class EngineNotAvailable(RuntimeError):
    """The engine's package is missing or unusable here; the message says why and how to install it."""


def now() -> float:
    return time.perf_counter()


class Adapter(ABC):
    """One engine behind one interface. Subclasses import their engine lazily, inside load()."""

    name: str = ""
    install_hint: str = ""
    supports_quant = False  # True: load() applies ModelSpec.quant itself

    @classmethod
    @abstractmethod
    def available(cls) -> tuple[bool, str]:
        """(True, version string) or (False, 'not installed: <hint>' / another reason). Never raises."""

    @classmethod  # noqa: B027 - an optional hook, not abstract
    def validate_options(cls, opts: dict[str, Any]) -> None:
        """Check a suite's [options.<engine>] table in the parent, before any worker starts (the suite loader
        calls it; a failure is a suite error, exit 2). Raise ValueError(key, message) to name the bad option
        (a one-argument ValueError whose message starts with the key works too). Default: accept anything."""

    def version(self) -> str:
        ok, why = self.available()
        return why if ok else "unavailable"

    @abstractmethod
    def load(self, model: ModelSpec, opts: dict[str, Any] | None = None) -> None: ...

    @abstractmethod
    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Run the requests as one batch; per-token times are taken on the host after a device sync."""

    def logits(self, prompt_ids: list[int]):
        """Full-sequence next-token logits [len(prompt_ids), vocab] as a float32 CPU tensor, for parity."""
        raise NotImplementedError(f"{self.name} does not expose logits")

    def hidden_states(self, prompt_ids: list[int]) -> list:
        """Per decoder layer, the hidden states of every position after that layer's residual add (before the final
        norm): a list of n_layers float32 CPU tensors [len(prompt_ids), hidden], for layer-wise parity."""
        raise NotImplementedError(f"layers not supported by {self.name}")

    def stream(self, request: GenRequest) -> Iterator[tuple[int, float]]:
        """Yield (token id, host time) as tokens arrive. Default: one-request generate, replayed."""
        (res,) = self.generate([request])
        yield from zip(res.output_ids, res.token_times, strict=False)

    def info(self) -> dict[str, Any]:
        """Facts recorded beside each result once loaded (e.g. kernel backend, attention implementation)."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release the engine (memory, processes). Default: nothing to release."""


def package_version(module: str) -> tuple[bool, str]:
    """(True, version) if `module` imports, else (False, 'not installed'). For available() implementations."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising something else
        return False, f"not installed ({type(exc).__name__}: {exc})"
    return True, str(getattr(mod, "__version__", "unknown"))


class LLMClassAdapter(Adapter):
    """An engine whose Python API is `<package>.LLM(**kwargs)` (vLLM, TensorRT-LLM): availability, load and info
    are the same; subclasses set `package`, `install_hint` and `llm_kwargs`, and write generate()."""

    package: str = ""

    def __init__(self) -> None:
        self.llm = None
        self._kwargs: dict[str, Any] = {}

    @staticmethod
    def llm_kwargs(model: ModelSpec, opts: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, ver = package_version(cls.package)
        return (True, f"{cls.package} {ver}") if ok else (False, f"not installed: {cls.install_hint} [{ver}]")

    def load(self, model: ModelSpec, opts: dict[str, Any] | None = None) -> None:
        ok, why = self.available()
        if not ok:
            raise EngineNotAvailable(why)
        self._kwargs = self.llm_kwargs(model, dict(opts or {}))
        self.llm = importlib.import_module(self.package).LLM(**self._kwargs)

    def info(self) -> dict[str, Any]:
        return {k: v for k, v in self._kwargs.items() if k != "model"}


# name -> "module:Class"; modules are imported only when the adapter is asked for.
REGISTRY: dict[str, str] = {
    "anvil": "adapters.anvil:AnvilAdapter",
    "hf": "adapters.hf:HFAdapter",
    "llamacpp": "adapters.llamacpp:LlamaCppAdapter",
    "openai_http": "adapters.openai_http:OpenAIHTTPAdapter",
    "vllm": "adapters.vllm:VLLMAdapter",
    "tensorrt_llm": "adapters.tensorrt_llm:TensorRTLLMAdapter",
}


def adapter_class(name: str) -> type[Adapter]:
    if name not in REGISTRY:
        raise KeyError(f"unknown engine {name!r}; known engines: {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get(name: str) -> Adapter:
    """A fresh adapter instance for engine `name`."""
    return adapter_class(name)()


def availability() -> dict[str, tuple[bool, str]]:
    """Every registered engine -> (available, version or reason). Never raises."""
    out = {}
    for name in REGISTRY:
        try:
            out[name] = adapter_class(name).available()
        except Exception as exc:  # the adapter module itself failed to import
            out[name] = (False, f"adapter failed to import: {type(exc).__name__}: {exc}")
    return out
