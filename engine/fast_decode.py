"""GPU fast path for generation: paged KV cache, Triton decode kernels, and the whole decode step captured as one
CUDA graph per bucketed batch size (nano-vllm / gpt-fast style). Same API as engine.generator.Generator.

The forward is the one of engine/model.py (same weights, same rounding order) re-expressed over the paged
cache: prefill runs cuBLAS GEMMs + SDPA and writes K/V into blocks (a short batch-1 prompt through a captured
graph, engine/prefill_graphs.py); a decode step (embedding, 32 x [norm, QKV GEMV, RoPE+KV write, split-KV paged
attention, O GEMV, add+norm, gate/up GEMV, SwiGLU-fused down GEMV], norm, lm_head, argmax, advance) reads only
static buffers, so it is captured once per bucket and replayed. Greedy
decoding feeds each step's argmax to the next step on the device, and the host reads step s's tokens while the
GPU runs step s+1. Anything the fast path cannot do falls back (eager step, or cuBLAS GEMV) with the reason in
`self.report`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from engine import nvtx, ops
from engine.fast_ops import TorchOps, TritonOps, layer_weights
from engine.generator import Completion, SamplingParams, check_prompts
from engine.graphs import GraphRunner
from engine.model import LoadedModel, Transformer
from engine.paged_kv import PagedKVCache, bytes_per_block, plan_kv_blocks
from engine.prefill_graphs import PREFILL_GRAPH_TOKENS, PrefillGraphs  # noqa: F401 (PREFILL_GRAPH_TOKENS re-exported)
from engine.sampling import make_generator, sample

log = logging.getLogger(__name__)


def default_buckets(max_batch: int) -> list[int]:
    out = [b for b in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if b < max_batch]
    return out + [max_batch]


class FastGenerator:
    """Paged + graph-captured generation for one model. `report` says what runs and why (KV plan, GEMV choices,
    graph buckets or the eager-fallback reason)."""

    def __init__(
        self,
        model: LoadedModel | Transformer,
        max_batch_size: int,
        max_seq_len: int,
        *,
        block_size: int = 16,
        kv_fraction: float = 0.9,
        kv_fill: bool = False,
        cuda_graphs: bool = True,
        gemv: str = "tune",  # tune | cublas | triton
        buckets: list[int] | None = None,
        max_prefill_tokens: int = 16384,
        backend: str | None = None,  # triton | torch (default: triton on CUDA)
        prefill_graphs: bool = True,  # batch-1 prefill of <= 512 tokens from captured graphs
    ) -> None:
        self.model: Transformer = model.model if isinstance(model, LoadedModel) else model
        c = self.config = self.model.config
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.device, self.dtype = self.model.device, self.model.dtype
        self.max_prefill_tokens = max_prefill_tokens
        self.model.ensure_rope(max_seq_len)
        self.cos_sin = self.model._cos_sin  # our own reference: the graphs keep reading this tensor
        self.layers = layer_weights(self.model)
        self.embed = self.model.tok_embeddings.weight
        self.lm_head = self.embed if self.model.output is None else self.model.output.weight
        self.report: dict = {
            "backend": None,
            "kv": None,
            "gemv": [],
            "graphs": None,
            "graph_fallback": None,
            "prefill_graphs": None,
            "prefill_graph_fallback": None,
        }
        self.prefill_graphs: PrefillGraphs | None = None
        cuda = self.device.type == "cuda"
        backend = backend or ("triton" if cuda else "torch")
        if backend == "triton":
            try:
                self.ops = TritonOps()
            except Exception as e:  # Triton missing or broken: the torch ops still give the paged path
                log.warning("Triton unavailable (%s: %s); paged path runs on torch ops", type(e).__name__, e)
                self.report["backend_fallback"] = f"{type(e).__name__}: {e}"
                self.ops = TorchOps()
        else:
            self.ops = TorchOps()
        self.report["backend"] = self.ops.name
        self.buckets = sorted(set(buckets or default_buckets(max_batch_size)))
        if self.buckets[-1] < max_batch_size:
            self.buckets.append(max_batch_size)

        # 1) warm-up prefill (no KV writes) so the peak activation memory is known, 2) size the KV cache
        blocks_per_seq = math.ceil(max_seq_len / block_size)
        need = max_batch_size * blocks_per_seq + 1  # + the scratch block
        bpb = bytes_per_block(c.n_layers, c.n_kv_heads, c.head_dim, block_size, self.dtype)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            warm = min(max_prefill_tokens, max_batch_size * max_seq_len)
            seq = min(max_seq_len, warm)
            with torch.inference_mode():
                self._prefill([[1] * seq for _ in range(max(1, warm // seq))], write=False)
            torch.cuda.synchronize(self.device)
            plan = plan_kv_blocks(bpb, kv_fraction, self.device, None if kv_fill else need)
            if plan.num_blocks < max(2, blocks_per_seq + 1):
                raise MemoryError(f"KV cache: {plan.num_blocks_fit} blocks fit in {kv_fraction:.0%} of the GPU, "
                                  f"one {max_seq_len}-token sequence needs {blocks_per_seq + 1}")  # fmt: skip
            self.report["kv"] = plan.as_dict()
            num_blocks = plan.num_blocks
        else:
            num_blocks = need
            self.report["kv"] = {"num_blocks": need, "bytes_per_block": bpb, "kv_bytes": need * bpb}
        self.kv = PagedKVCache(c.n_layers, c.n_kv_heads, c.head_dim, num_blocks, block_size, max_batch_size,
                               max_seq_len, self.dtype, self.device)  # fmt: skip
        self.report["kv"]["block_size"] = block_size
        self.report["kv"]["max_tokens"] = (num_blocks - 1) * block_size
        log.info("paged KV: %d blocks of %d tokens, %.2f GB", num_blocks, block_size, self.kv.nbytes() / 1e9)

        # static decode inputs (rows >= the live batch are padding: token 0, position 0, scratch block)
        mb = self.buckets[-1]
        i32, i64 = torch.int32, torch.int64
        self.input_ids = torch.zeros(mb, dtype=i64, device=self.device)
        self.positions = torch.zeros(mb, dtype=i32, device=self.device)
        self.seq_lens = torch.ones(mb, dtype=i32, device=self.device)
        self.seq_idx = torch.arange(mb, dtype=i32, device=self.device)
        self.next_tokens = torch.zeros(mb, dtype=i64, device=self.device)
        from engine.kernels.triton.paged_attention import choose_num_splits

        sms = torch.cuda.get_device_properties(self.device).multi_processor_count if cuda else 132
        self.splits = {bs: choose_num_splits(bs, c.n_kv_heads, self.kv.max_blocks_per_seq * block_size, sms)
                       for bs in self.buckets}  # fmt: skip

        # 3) GEMV choice per bucket, 4) graph capture
        self.tuner = None
        if self.ops.name == "triton" and gemv != "cublas":
            from engine.kernels.triton.tune import GemvTuner

            self.tuner = GemvTuner()
            with torch.inference_mode():
                self._choose_gemv(gemv)
        self.fused_b1 = self._fused_b1_ok()  # batch 1: norms and residual adds folded into the GEMVs
        self.report["fused_b1"] = self.fused_b1
        self.runner = GraphRunner(self.device)
        if cuda and cuda_graphs:
            with torch.inference_mode():
                self.runner.capture(self._step, self.buckets, self._reset_inputs)
            self.report["graphs"] = sorted(self.runner.graphs) or None
            self.report["graph_fallback"] = self.runner.fallback
        else:
            self.runner.fallback = self.report["graph_fallback"] = "disabled" if cuda else "not a CUDA device"
        if cuda and cuda_graphs and prefill_graphs:  # no longer than max_prefill_tokens or any sliding window
            cap = min(max_seq_len, max_prefill_tokens, *(lay.window for lay in self.layers if lay.window > 0))
            pg = PrefillGraphs(self._forward_prefill, self.kv, self.device, cap)
            self.prefill_graphs = pg if pg.buckets else None
            self.report["prefill_graphs"] = list(pg.buckets) or None
            self.report["prefill_graph_fallback"] = pg.fallback
        else:
            self.report["prefill_graph_fallback"] = "disabled" if cuda else "not a CUDA device"
        self.last_stats: dict = {}

    # ---------------------------------------------------------------- GEMV choice
    def _roles(self) -> list[tuple[str, list[torch.Tensor], list[torch.Tensor | None] | None, bool]]:
        L = self.layers
        bq = [lay.bqkv for lay in L] if L[0].bqkv is not None else None
        return [
            ("qkv", [lay.wqkv for lay in L], bq, False),
            ("wo", [lay.wo for lay in L], None, False),
            ("w13", [lay.w13 for lay in L], None, False),
            ("w2", [lay.w2 for lay in L], None, True),
            ("lm_head", [self.lm_head], None, False),
        ]

    def _choose_gemv(self, mode: str) -> None:
        from engine.kernels.triton import gemv

        for bs in self.buckets:
            for role, ws, bs_, act in self._roles():
                n, k = ws[0].shape
                if mode == "triton":  # fixed configs, for tests
                    cfg = gemv.FMA_CONFIGS[1] if bs == 1 else gemv.DOT_CONFIGS[0]
                    self.tuner.choice[(bs, n, k, act)] = cfg
                    continue
                if bs > 32:
                    continue
                r = self.tuner.tune(ws, bs, act=act, biases=bs_)
                self.report["gemv"].append({"role": role, **r.__dict__})

    def _fused_b1_ok(self) -> bool:
        """True when bucket 1 exists and every GEMV role there runs the Triton fma kernel (the fusable one)."""
        if self.tuner is None or 1 not in self.buckets:
            return False
        return all(self.tuner.get(1, ws[0].shape[0], ws[0].shape[1], act).kind == "fma"
                   for _, ws, _, act in self._roles())  # fmt: skip

    def _lin(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, act: bool = False):
        m = x.shape[0]
        cfg = self.tuner.get(m, w.shape[0], w.shape[1], act) if self.tuner is not None and m <= 32 else None
        return self.ops.linear(x, w, b, act=act, cfg=cfg)

    # ---------------------------------------------------------------- forward pieces
    def _prefill_attention(self, q, k, v, lens: list[int], window: int) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]; SDPA per run of equal-length prompts (no window)."""
        c = self.config
        if window > 0 or self.device.type != "cuda":
            cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(self.device)
            return ops.prefill_attention(q, k, v, cu, c.attn_scale, True, window)
        out = torch.empty_like(q)
        rep = c.n_rep
        s = 0
        i = 0
        while i < len(lens):
            j = i
            while j < len(lens) and lens[j] == lens[i]:
                j += 1
            n, L = j - i, lens[i]
            e = s + n * L
            qs = q[s:e].view(n, L, c.n_heads, c.head_dim).transpose(1, 2)  # [n, H, L, D]
            ks = k[s:e].view(n, L, c.n_kv_heads, c.head_dim).transpose(1, 2).repeat_interleave(rep, dim=1)
            vs = v[s:e].view(n, L, c.n_kv_heads, c.head_dim).transpose(1, 2).repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=c.attn_scale)  # [n, H, L, D]
            out[s:e] = o.transpose(1, 2).reshape(n * L, c.n_heads, c.head_dim)
            s, i = e, j
        return out

    def _prefill_group(
        self, prompts: list[list[int]], slots: list[int], write: bool, all_logits: bool = False
    ) -> torch.Tensor:
        lens = [len(p) for p in prompts]
        dev = self.device
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64).to(dev, non_blocking=True)
        pos = torch.cat([torch.arange(n, dtype=torch.int32) for n in lens]).to(dev, non_blocking=True)
        seq = torch.cat([torch.full((n,), s, dtype=torch.int32) for n, s in zip(lens, slots, strict=True)]).to(dev)
        last = None if all_logits else torch.tensor(lens).cumsum(0).to(dev) - 1
        return self._forward_prefill(ids, pos, seq, lens, write, last)

    def _forward_prefill(
        self, ids: torch.Tensor, pos: torch.Tensor, seq: torch.Tensor, lens: list[int], write: bool,
        last: torch.Tensor | None, windows: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        """Packed prefill of len(lens) prompts (ids/pos/seq [T] on the device): float32 logits at the `last` rows
        [B, V], or at every row [T, V] when last is None. windows=False ignores sliding windows (callers ensure
        no prompt is longer than one)."""
        c, o = self.config, self.ops
        dev = self.device
        t = ids.shape[0]
        x = F.embedding(ids, self.embed)  # [T, dim]
        residual = None
        q_size, kv_size = c.q_size, c.kv_size
        for i, lay in enumerate(self.layers):
            h, residual = o.rms_norm(x, lay.attn_norm, c.rms_norm_eps, residual)
            if residual is None:
                residual = x
            qkv = F.linear(h, lay.wqkv, lay.bqkv)  # [T, (H + 2 Hkv) D]
            k_out = torch.empty(t, c.n_kv_heads, c.head_dim, dtype=x.dtype, device=dev)
            kc, vc = self.kv.layer(i) if write else (None, None)
            q = o.rope_write_kv(qkv, self.cos_sin, pos, c.n_heads, c.n_kv_heads, c.head_dim,
                                seq, self.kv.block_tables if write else None, kc, vc, k_out=k_out)  # fmt: skip
            v = qkv[:, q_size + kv_size :].view(t, c.n_kv_heads, c.head_dim)
            a = self._prefill_attention(q, k_out, v, lens, lay.window if windows else 0)  # [T, H, D]
            x = F.linear(a.view(t, q_size), lay.wo)
            h, residual = o.rms_norm(x, lay.ffn_norm, c.rms_norm_eps, residual)
            x = F.linear(o.silu_and_mul(F.linear(h, lay.w13)), lay.w2)
        if last is not None:
            x, residual = x[last].contiguous(), residual[last].contiguous()
        h, _ = o.rms_norm(x, self.model.norm.weight, c.rms_norm_eps, residual)
        return F.linear(h, self.lm_head).float()  # [B, V] (last None: [T, V])

    def prefill_bucket(self, n: int) -> int | None:
        """The captured prefill graph a batch-1 prompt of n tokens replays (None: eager prefill)."""
        return self.prefill_graphs.bucket(n) if self.prefill_graphs is not None else None

    @nvtx.annotate("prefill")
    def _prefill(self, prompts: list[list[int]], slots: list[int] | None = None, write: bool = True) -> torch.Tensor:
        """Last-token float32 logits [B, V]; prompts run in groups of <= max_prefill_tokens tokens, or one short
        prompt written to slot 0 through its captured graph."""
        slots = list(range(len(prompts))) if slots is None else slots
        if write and len(prompts) == 1 and slots == [0]:
            t = self.prefill_bucket(len(prompts[0]))
            if t is not None:
                return self.prefill_graphs.run(prompts[0], t)
        out, group, n = [], [], 0
        for i, p in enumerate(prompts):
            if group and n + len(p) > self.max_prefill_tokens:
                out.append(self._prefill_group([prompts[j] for j in group], [slots[j] for j in group], write))
                group, n = [], 0
            group.append(i)
            n += len(p)
        out.append(self._prefill_group([prompts[j] for j in group], [slots[j] for j in group], write))
        return torch.cat(out)

    def _step_fused_b1(self) -> torch.Tensor:
        """_step for batch 1 with 7 kernels a layer instead of 9: each RMSNorm runs inside the GEMV that consumes
        it (qkv, w13, lm_head) and each residual add inside the GEMV that produces it (wo, w2), in place on the
        residual stream r. Same rounding as the unfused step."""
        from engine.kernels.triton.gemv import linear_fused

        c, o, eps = self.config, self.ops, self.config.rms_norm_eps
        cfg = {role: self.tuner.get(1, ws[0].shape[0], ws[0].shape[1], act) for role, ws, _, act in self._roles()}
        bt = self.kv.block_tables[:1]
        r = F.embedding(self.input_ids[:1], self.embed)  # [1, dim], the residual stream from here on
        for i, lay in enumerate(self.layers):
            qkv = linear_fused(r, lay.wqkv, cfg["qkv"], bias=lay.bqkv, norm_weight=lay.attn_norm, eps=eps)
            kc, vc = self.kv.layer(i)
            q = o.rope_write_kv(qkv, self.cos_sin, self.positions[:1], c.n_heads, c.n_kv_heads, c.head_dim,
                                self.seq_idx[:1], bt, kc, vc)  # fmt: skip
            a = o.paged_attention(q, kc, vc, bt, self.seq_lens[:1], c.attn_scale, lay.window, self.splits[1])
            linear_fused(a.view(1, c.q_size), lay.wo, cfg["wo"], residual=r, out=r)
            gu = linear_fused(r, lay.w13, cfg["w13"], norm_weight=lay.ffn_norm, eps=eps)
            linear_fused(gu, lay.w2, cfg["w2"], act=True, residual=r, out=r)
        logits = linear_fused(r, self.lm_head, cfg["lm_head"], norm_weight=self.model.norm.weight, eps=eps)
        torch.argmax(logits, dim=-1, out=self.next_tokens[:1])
        o.advance(self.next_tokens[:1], self.input_ids, self.positions, self.seq_lens)
        return logits

    def _step(self, bs: int) -> torch.Tensor:
        """One decode step over static buffers rows [0, bs); returns logits [bs, V] (model dtype), writes
        next_tokens (argmax) and advances input_ids/positions/seq_lens. No host sync: graph-capturable."""
        if bs == 1 and self.fused_b1:
            return self._step_fused_b1()
        c, o = self.config, self.ops
        ids, pos, lens = self.input_ids[:bs], self.positions[:bs], self.seq_lens[:bs]
        bt = self.kv.block_tables[:bs]
        x = F.embedding(ids, self.embed)  # [bs, dim]
        residual = None
        for i, lay in enumerate(self.layers):
            h, residual = o.rms_norm(x, lay.attn_norm, c.rms_norm_eps, residual)
            if residual is None:
                residual = x
            qkv = self._lin(h, lay.wqkv, lay.bqkv)
            kc, vc = self.kv.layer(i)
            q = o.rope_write_kv(qkv, self.cos_sin, pos, c.n_heads, c.n_kv_heads, c.head_dim,
                                self.seq_idx[:bs], bt, kc, vc)  # fmt: skip
            a = o.paged_attention(q, kc, vc, bt, lens, c.attn_scale, lay.window, self.splits[bs])  # [bs, H, D]
            x = self._lin(a.view(bs, c.q_size), lay.wo)
            h, residual = o.rms_norm(x, lay.ffn_norm, c.rms_norm_eps, residual)
            x = self._lin(self._lin(h, lay.w13), lay.w2, act=True)
        h, _ = o.rms_norm(x, self.model.norm.weight, c.rms_norm_eps, residual)
        logits = self._lin(h, self.lm_head)  # [bs, V]
        torch.argmax(logits, dim=-1, out=self.next_tokens[:bs])
        o.advance(self.next_tokens[:bs], self.input_ids, self.positions, self.seq_lens)
        return logits

    def _reset_inputs(self) -> None:
        self.input_ids.zero_()
        self.positions.zero_()
        self.seq_lens.fill_(1)

    def _run_step(self, bs: int) -> torch.Tensor:
        with nvtx.range("decode_step"):  # a graph replay: the range spans the launch, not the kernels' run
            return self.runner.run(bs, self._step)

    def bucket(self, b: int) -> int:
        return next(x for x in self.buckets if x >= b)

    def begin(self, prompts: list[list[int]], max_new_tokens: int, pick: Callable) -> tuple[int, torch.Tensor]:
        """Reserve blocks, prefill, pick the first tokens [B] and load the decode buffers; returns (bucket, tokens)."""
        b = len(prompts)
        kv = self.kv
        kv.release_all()
        pad = (self.prefill_bucket(len(prompts[0])) or 0) if b == 1 else 0  # graph prefill writes bucket rows
        self.last_stats["prefill_graph"] = pad or None
        for i, p in enumerate(prompts):
            kv.reserve(i, max(len(p) + max_new_tokens - 1, pad))
        kv.sync_tables()
        tok = pick(self._prefill(prompts))  # [B]
        self._reset_inputs()
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
        self.input_ids[:b].copy_(tok)
        self.positions[:b].copy_(lens)
        self.seq_lens[:b].copy_(lens + 1)
        return self.bucket(b), tok

    # ---------------------------------------------------------------- public API (engine.generator.Generator's)
    @torch.inference_mode()
    def logits(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Per prompt, float32 CPU [len, vocab] next-token logits (a prefill that writes no KV)."""
        if prompts:  # one prompt at a time, so any number of them
            check_prompts(prompts, len(prompts), self.max_seq_len, self.config.vocab_size, 0)
        return [self._prefill_group([p], [0], write=False, all_logits=True).cpu() for p in prompts]

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        stop_ids: Iterable[int] = (),
        on_token: Callable[[int, list[int | None]], None] | None = None,
    ) -> list[Completion]:
        b = len(prompts)
        if max_new_tokens <= 0:
            return [Completion([], "length") for _ in prompts]
        check_prompts(prompts, self.max_batch_size, self.max_seq_len, self.config.vocab_size, max_new_tokens - 1)
        stop = set(stop_ids)
        greedy = sampling.temperature <= 0
        gen = None if greedy else make_generator(sampling.seed, self.device)
        stats = self.last_stats = {"batch": b, "graph": False}
        t0 = time.perf_counter()
        bs, tok = self.begin(prompts, max_new_tokens, lambda lg: sample(lg, sampling.temperature, sampling.top_k,
                                                                         sampling.top_p, gen))  # fmt: skip
        stats["bucket"], stats["graph"] = bs, self.runner.has(bs)

        pinned = self.device.type == "cuda"
        host = torch.empty(max_new_tokens, b, dtype=torch.int64, pin_memory=pinned)
        events = [torch.cuda.Event() if pinned else None for _ in range(4)]
        out: list[list[int]] = [[] for _ in range(b)]
        reasons, done = ["length"] * b, [False] * b
        wait = [0.0]

        def fetch(step: int, t: torch.Tensor) -> None:
            host[step].copy_(t, non_blocking=pinned)
            if pinned:
                events[step % 4].record()

        def take(step: int) -> bool:
            if pinned:
                w0 = time.perf_counter()
                events[step % 4].synchronize()
                wait[0] += time.perf_counter() - w0
            toks: list[int | None] = host[step].tolist()
            if step == 0:
                stats["ttft_s"] = time.perf_counter() - t0
            for i, t in enumerate(toks):
                if done[i]:
                    toks[i] = None
                    continue
                out[i].append(t)
                if t in stop:
                    done[i], reasons[i] = True, "stop"
            if on_token is not None:
                on_token(step, toks)
            return all(done)

        fetch(0, tok)
        finished = take(0)
        wait_prefill = wait[0]
        n_steps = 0
        lag = 1 if greedy else 0  # greedy: the device already holds the next input, so run one step ahead
        pending: list[int] = []
        t_dec = time.perf_counter()
        host_s = 0.0
        for step in range(1, max_new_tokens):
            if finished:
                break
            h0 = time.perf_counter()
            n_steps += 1
            logits = self._run_step(bs)
            if greedy:
                fetch(step, self.next_tokens[:b])
            else:
                nxt = sample(logits[:b].float(), sampling.temperature, sampling.top_k, sampling.top_p, gen)
                self.input_ids[:b].copy_(nxt)
                fetch(step, nxt)
            host_s += time.perf_counter() - h0
            pending.append(step)
            while len(pending) > lag and not finished:
                finished = take(pending.pop(0))
        while pending and not finished:
            finished = take(pending.pop(0))
        if pinned:
            w0 = time.perf_counter()
            torch.cuda.synchronize(self.device)
            wait[0] += time.perf_counter() - w0
        stats["decode_s"] = time.perf_counter() - t_dec
        stats["decode_steps"] = n_steps
        stats["launch_host_s"] = host_s  # host time issuing steps (replay + token copy + event record)
        stats["wait_s"] = wait[0] - wait_prefill  # host time blocked on the GPU during decode
        stats["host_overhead_s"] = stats["decode_s"] - stats["wait_s"]  # all other host time during decode
        self.kv.release_all()
        return [Completion(x, r) for x, r in zip(out, reasons, strict=True)]
