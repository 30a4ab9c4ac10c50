"""Medusa heads (Cai et al., arXiv 2401.10774; FasterDecoding/Medusa) as a proposer: K extra heads on the target's
final normed hidden state h at position t; head i (1-based) predicts the token at t+1+i (the target's own head
predicts t+1), each one residual SiLU block, h + silu(W_i h + b_i), into the target's lm_head (shared and frozen:
Medusa-1 with one block per head; the heads are then a few hundred KB). Drafts are the heads' argmax, a chain
verified by the same greedy / rejection rule (tree verification is not done).

On disk, HF layout beside the model: `<model>/medusa/config.json` (medusa_num_heads, medusa_num_layers,
hidden_size, shared_lm_head) and `model.safetensors` with `medusa_head.{i}.0.linear.weight` / `.bias`, the names
of FasterDecoding/Medusa's checkpoints. scripts/train_medusa.py trains them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.request import Request
from engine.spec.proposer import Draft, Proposer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class MedusaHeads(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads, dim, dim))  # zero init: each head starts as the base head
        self.bias = nn.Parameter(torch.zeros(num_heads, dim))

    @property
    def num_heads(self) -> int:
        return self.weight.shape[0]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [N, dim] -> [N, K, dim], the hidden state each head feeds to the lm_head."""
        z = torch.einsum("nd,ked->nke", h, self.weight) + self.bias
        return h[:, None, :] + torch.nn.functional.silu(z)


def save_heads(heads: MedusaHeads, path: str | Path, dtype: torch.dtype = torch.bfloat16, **meta) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    k, dim = heads.num_heads, heads.weight.shape[1]
    cfg = {"medusa_num_heads": k, "medusa_num_layers": 1, "hidden_size": dim, "shared_lm_head": True,
           "input": "final normed hidden state", **meta}  # fmt: skip
    (path / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    state = {}
    for i in range(k):
        state[f"medusa_head.{i}.0.linear.weight"] = heads.weight[i].detach().to(dtype).contiguous()
        state[f"medusa_head.{i}.0.linear.bias"] = heads.bias[i].detach().to(dtype).contiguous()
    save_file(state, str(path / WEIGHTS), metadata={"format": "pt"})
    return path


def heads_dir(name: str | Path) -> Path:
    """The heads' folder: `name` itself when it holds a Medusa config, else its (or the resolved model's) medusa/."""
    p = Path(name)
    for c in (p, p / "medusa"):
        if (c / CONFIG).is_file() and "medusa_num_heads" in json.loads((c / CONFIG).read_text()):
            return c
    if not p.exists():
        from engine.hub import resolve

        q = resolve(str(name)) / "medusa"
        if (q / CONFIG).is_file():
            return q
    raise ValueError(f"draft_model: no Medusa heads (config.json with medusa_num_heads) in {name} or {name}/medusa")


def load_heads(name: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> MedusaHeads:
    p = heads_dir(name)
    cfg = json.loads((p / CONFIG).read_text())
    if cfg.get("medusa_num_layers", 1) != 1 or not cfg.get("shared_lm_head", False):
        raise ValueError(f"{p}: only one residual block per head with the shared lm_head is supported")
    state = load_file(str(p / WEIGHTS))
    k, dim = cfg["medusa_num_heads"], cfg["hidden_size"]
    heads = MedusaHeads(dim, k)
    with torch.no_grad():
        heads.weight.copy_(torch.stack([state[f"medusa_head.{i}.0.linear.weight"] for i in range(k)]))
        heads.bias.copy_(torch.stack([state[f"medusa_head.{i}.0.linear.bias"] for i in range(k)]))
    return heads.to(device=device, dtype=dtype).requires_grad_(False).eval()


class MedusaProposer(Proposer):
    name = "medusa"
    needs_hidden = True

    def __init__(self, heads: MedusaHeads, model) -> None:
        if heads.weight.shape[1] != model.config.dim:
            raise ValueError(f"draft_model: Medusa heads of hidden size {heads.weight.shape[1]} for a model of "
                             f"{model.config.dim}")  # fmt: skip
        self.heads, self.model = heads, model
        self.hidden: dict[str, torch.Tensor] = {}  # request id -> normed hidden state at its last accepted token

    @torch.inference_mode()
    def propose(self, reqs: list[Request], ks: list[int]) -> list[Draft]:
        out = [Draft([]) for _ in reqs]
        live = [i for i, (r, k) in enumerate(zip(reqs, ks, strict=True)) if k > 0 and r.request_id in self.hidden]
        if not live:
            return out
        h = torch.stack([self.hidden[reqs[i].request_id] for i in live])  # [n, dim]
        z = self.heads(h)  # [n, K, dim]
        logits = torch.nn.functional.linear(z, self.model.lm_head_weight())  # [n, K, V]
        toks = logits.argmax(dim=-1).tolist()
        for j, i in enumerate(live):
            out[i] = Draft(toks[j][: ks[i]])
        return out

    def on_verified(self, req, drafts, accepted, argmax, hidden) -> None:
        if hidden is not None:
            self.hidden[req.request_id] = hidden

    def release(self, req: Request) -> None:
        self.hidden.pop(req.request_id, None)
