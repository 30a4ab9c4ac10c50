"""The OpenAI-compatible HTTP server over AsyncLLM (`bench serve`): build_app(llm, model_name, api_key) and
run_server(app, host, port). Needs the `serve` extra: fastapi, uvicorn, pydantic, prometheus-client."""

from engine.server.app import build_app, run_server

__all__ = ["build_app", "run_server"]
