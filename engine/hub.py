"""Model name -> local directory: 'tiny' / 'tiny-draft', a local folder, or an HF repo id in the local HF cache.

Nothing is ever downloaded. When models/tiny is absent, 'tiny' is a deterministic random small Llama built
once under ~/.cache/anvil/tiny-random.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_RANDOM_DIR = Path.home() / ".cache" / "anvil" / "tiny-random"


def _has_config(p: Path) -> bool:
    return (p / "config.json").is_file()


def tiny_random_config():
    """The config of the random 'tiny' fallback (a small GQA Llama)."""
    from engine.testing import tiny_config

    return tiny_config("llama", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=172)


def _build_tiny_random(dest: Path) -> Path:
    """Write the random tiny checkpoint atomically (build in a temp dir, then rename), so concurrent
    first uses never see a half-written folder."""
    from engine.testing import write_random_checkpoint

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-random-", dir=dest.parent))
    try:
        write_random_checkpoint(tmp, tiny_random_config(), seed=0, std=0.02)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not _has_config(dest):  # another process did not win the race either: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home) / "hub"


def _hf_snapshot(repo_id: str, tried: list[str]) -> Path | None:
    repo = hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    tried.append(f"HF cache {repo}")
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        p = snaps / ref.read_text().strip()
        if _has_config(p):
            return p
    candidates = sorted((p for p in snaps.iterdir() if _has_config(p)), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def resolve(name: str) -> Path:
    """Return the local directory (holding config.json) for `name`; FileNotFoundError naming what was tried."""
    tried: list[str] = []
    if name in ("tiny", "tiny-draft"):
        p = REPO_ROOT / "models" / name
        tried.append(str(p))
        if _has_config(p):
            return p
        if name == "tiny":
            return TINY_RANDOM_DIR if _has_config(TINY_RANDOM_DIR) else _build_tiny_random(TINY_RANDOM_DIR)
    else:
        p = Path(name).expanduser()
        tried.append(f"local directory {p}")
        if _has_config(p):
            return p.resolve()
        parts = name.split("/")
        if len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")):
            snap = _hf_snapshot(name, tried)
            if snap is not None:
                return snap
    raise FileNotFoundError(f"model {name!r} not found (tried: {'; '.join(tried)}); nothing is downloaded")
