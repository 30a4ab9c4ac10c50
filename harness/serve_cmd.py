"""`bench serve MODEL`: anvil's engine behind its OpenAI-compatible server (engine/server/), on loopback by default.

MODEL is 'tiny', a local HF-layout folder (or a name engine.hub.resolve knows) or synthetic:<preset> (random weights
of a real shape: speed only). `--option key=value` sets EngineConfig fields (values read as JSON: 8, true, [1, 2],
else a string). Automatic prefix caching is on unless `--option enable_prefix_caching=false` (as `vllm serve`).
Exit 2 for a bad option or a model that cannot be loaded.
"""

from __future__ import annotations

import json
import os

import typer


def parse_options(pairs: list[str]) -> dict:
    opts = {"enable_prefix_caching": True}  # a server's default, as vLLM's (EngineConfig's is off)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {pair!r}: expected key=value")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    return opts


def load_llm(model: str, dtype: str, device: str, opts: dict):
    """engine.LLM for the model argument of `bench serve`."""
    import engine
    from engine.config import EngineConfig

    config = EngineConfig.from_options(opts)
    if config.tensor_parallel_size > 1:  # this process is rank 0; the other ranks are spawned and mirror it
        from engine.distributed import driver

        syn = model.startswith("synthetic:")
        src = model.removeprefix("synthetic:") if syn else str(engine.hub.resolve(model))
        return driver.start(src, dtype, device, config, synthetic=syn)
    if model.startswith("synthetic:"):
        from engine.presets import synthetic

        lm = synthetic(model.removeprefix("synthetic:"), dtype, device, seed=config.seed)
    else:
        lm = engine.load(model, dtype, device)
    return engine.LLM(lm, config)


def serve(
    model: str = typer.Argument(..., help="'tiny', a model folder, or synthetic:<preset> (e.g. synthetic:llama-3-8b)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (loopback by default)"),
    port: int = typer.Option(8000, "--port"),
    api_key: str | None = typer.Option(None, "--api-key", help="require Authorization: Bearer KEY (or ANVIL_API_KEY)"),
    max_queue: int = typer.Option(1024, "--max-queue", min=1, help="waiting requests at most; more get HTTP 503"),
    option: list[str] = typer.Option([], "--option", metavar="KEY=VALUE", help="an EngineConfig field (repeatable)"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N"),
    served_model_name: str | None = typer.Option(None, "--served-model-name", help="the model id clients send"),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Serve a model over HTTP: /v1/completions, /v1/chat/completions (SSE streaming), /v1/models, /health,
    /metrics. Stops on SIGINT / SIGTERM (in-flight streams end with an error chunk)."""
    from rich.console import Console

    err = Console(stderr=True)
    try:
        opts = parse_options(option)
        llm = load_llm(model, dtype, device, opts)
    except (ValueError, FileNotFoundError, OSError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    try:
        from engine.async_llm import AsyncLLM
        from engine.server import build_app, run_server
        from engine.server.app import server_io
    except ModuleNotFoundError as exc:
        err.print(f"[red]error:[/red] {exc.name} is missing: pip install -e '.[serve]'", highlight=False)
        raise typer.Exit(2) from None
    key = api_key or os.environ.get("ANVIL_API_KEY") or None
    app = build_app(AsyncLLM(llm, max_waiting=max_queue), served_model_name or model, key)
    loop, http = server_io()
    err.print(f"anvil serving {served_model_name or model} on http://{host}:{port} (max_model_len "
              f"{llm.core.max_model_len}, {llm.core.blocks.num_usable} KV blocks; event loop {loop}, HTTP {http})",
              highlight=False)  # fmt: skip
    run_server(app, host, port, log_level)
