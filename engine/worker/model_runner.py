"""Runs the one forward for a scheduled step: builds the ForwardBatch (pinned host tensors, non_blocking copies),
replays a captured CUDA graph for decode-only steps or runs eagerly, samples, and starts the copy of the sampled
tokens to the host without waiting for it (the engine core reads them one step later).

Tokens sampled in step N are not known on the host when step N+1 is built: their rows of step N+1's input_ids are
filled on the device from step N's token tensor (StepHandle.rows), so the host never waits for the GPU to
schedule the next step.
"""

from __future__ import annotations

import array
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from engine.attention import get_backend
from engine.attention.metadata import AttentionMetadata, ForwardBatch
from engine.config import EngineConfig
from engine.core.scheduler import SchedulerOutput
from engine.model.llama import Transformer
from engine.request import Request
from engine.sampling import make_generator, sample
from engine.worker.graphs import DecodeGraphs
from engine.worker.kv_pool import KVPool, bytes_per_block, plan_kv_blocks

log = logging.getLogger(__name__)

CPU_KV_BYTES = 4 << 30  # a CPU pool never takes more than this unless num_kv_blocks says so
_ARRAY_CODES = {torch.int64: "q", torch.int32: "i"}  # array.array typecodes (8 / 4 bytes on the platforms we run)


@dataclass
class StepHandle:
    """A launched step: which requests sample, their tokens on the device and (soon) on the host."""

    requests: list[Request]  # requests that sample in this step, in token-row order
    tokens: torch.Tensor  # [N] int64 on the device
    host: torch.Tensor  # [N] int64 (pinned on CUDA), valid once `event` has completed
    event: torch.cuda.Event | None
    rows: dict[str, int] = field(default_factory=dict)  # request_id -> row of `tokens`
    launched: float = 0.0

    def wait(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def model_lock(model: Transformer) -> threading.RLock:
    """The lock of a model object, shared by every runner over it (created with the first)."""
    lock = model.__dict__.get("_anvil_lock")
    if lock is None:
        lock = threading.RLock()
        object.__setattr__(model, "_anvil_lock", lock)
    return lock


class ModelRunner:
    def __init__(self, model: Transformer, config: EngineConfig, max_model_len: int) -> None:
        self.lock = model_lock(model)
        with self.lock:  # the warm-up, pool binding, tuning and graph capture run the shared model over this runner's
            self._setup(model, config, max_model_len)  # pools: not while another runner's forward is on it

    def _setup(self, model: Transformer, config: EngineConfig, max_model_len: int) -> None:
        self.model, self.config, self.max_model_len = model, config, max_model_len
        c = self.mc = model.config
        self.device, self.dtype = model.device, model.dtype
        cuda = self.cuda = self.device.type == "cuda"
        self.report: dict = {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", "")}
        model.ensure_rope(max_model_len + 1)

        # ---- attention backend
        name = config.attention_backend
        if name == "auto":
            name = "triton" if cuda else "torch"
        try:
            one_step = min(config.prefill_chunk or config.max_num_batched_tokens, max_model_len)
            self.backend = get_backend(name, config.fresh_attention, config.fresh_pad, one_step)
        except Exception as e:
            if not config.allow_fallback or name == "torch":
                raise RuntimeError(f"attention backend {name!r} unavailable: {type(e).__name__}: {e}") from e
            self.report["backend_fallback"] = f"{name}: {type(e).__name__}: {e}"
            log.warning("attention backend %s unavailable (%s); using torch", name, e)
            self.backend = get_backend("torch")
        self.report["attention_backend"] = self.backend.name
        if self.backend.name == "triton":
            self.report["fresh_attention"] = config.fresh_attention
            self.report["fresh_pad"] = config.fresh_pad

        # ---- KV pool: after a warm-up forward on CUDA, so the activation peak stays reserved
        bs = config.block_size
        self.max_blocks_per_seq = math.ceil(max_model_len / bs)
        bpb = bytes_per_block(c.n_layers, c.n_kv_heads, c.head_dim, bs, self.dtype)
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
            self.report["kv"] = {"num_blocks": num_blocks, "bytes_per_block": bpb, "sized_by": "num_kv_blocks"}
        elif cuda:  # never more than max_num_seqs full-length sequences need
            self._warmup()
            need = config.max_num_seqs * self.max_blocks_per_seq + 1
            plan = plan_kv_blocks(bpb, config.kv_fraction, self.device, max_blocks=need)
            num_blocks = plan.num_blocks
            self.report["kv"] = plan.as_dict()
        else:
            want = config.max_num_seqs * self.max_blocks_per_seq + 1
            num_blocks = max(2, min(want, CPU_KV_BYTES // bpb))
            self.report["kv"] = {"num_blocks": num_blocks, "bytes_per_block": bpb, "sized_by": "cpu cap"}
        if num_blocks < 2:
            raise MemoryError(f"KV cache: no room for 2 blocks of {bpb} bytes in {config.kv_fraction:.0%} of the GPU")
        self.pool = KVPool(c.n_layers, c.n_kv_heads, c.head_dim, num_blocks, bs, self.dtype, self.device)
        self.report["kv"].update(block_size=bs, max_tokens=(num_blocks - 1) * bs, kv_gb=round(self.pool.nbytes() / 1e9, 3))
        model.bind(self.backend, self.pool.k, self.pool.v)
        if cuda:
            self._compile_kernels()

        # ---- GEMV choice per decode bucket, then graph capture (CUDA)
        self.buckets = self._buckets()
        self.tuner = None
        if cuda and self.backend.name == "triton" and config.gemv != "cublas":
            from engine.worker import tuning

            with torch.inference_mode():
                self.tuner, self.report["gemv"] = tuning.install(model, self.buckets, config.gemv)
            if config.cuda_graphs and config.gemv == "tune":
                self._refine_gemv()
        self.steps = {"graph": 0, "graph_mixed": 0, "eager": 0}  # execute()'s forwards by path
        self.graphs: DecodeGraphs | None = None
        if cuda and config.cuda_graphs:
            self.graphs = DecodeGraphs(self, self.buckets)
            self.report["graphs"] = list(self.graphs.buckets) or None
            self.report["graph_fallback"] = self.graphs.fallback
            if self.graphs.fallback and not config.allow_fallback:
                raise RuntimeError(f"CUDA graph capture failed: {self.graphs.fallback} (allow_fallback = true runs eagerly)")
        else:
            self.report["graph_fallback"] = "disabled" if cuda else "not a CUDA device"
        self.default_gen = make_generator(config.seed, self.device)
        self._argmax = lambda logits: logits.argmax(dim=-1)
        if cuda and self.backend.name == "triton":  # two small Triton launches instead of torch's reduction
            from engine.kernels.triton.fused import argmax

            self._argmax = argmax

    def _refine_gemv(self) -> None:
        """The per-role GEMV choice checked on the captured step (engine/worker/step_tune.py) for the buckets of
        env ANVIL_STEP_TUNE (default "1"; "0" off)."""
        from engine.worker import step_tune, tuning

        spec = os.environ.get("ANVIL_STEP_TUNE", "1")
        want = [] if spec in ("", "0") else [int(x) for x in spec.split(",")]
        t0 = time.perf_counter()
        rows = []
        for bs in (b for b in want if b in self.buckets and b <= tuning.MAX_TUNED_M):
            try:
                rows.append(step_tune.refine(self, self.tuner, bs))
            except Exception as e:  # e.g. no graph capture on this device: the per-role choice stays
                rows.append({"bs": bs, "skipped": f"{type(e).__name__}: {e}"})
                log.warning("GEMV step check skipped for bucket %d: %s", bs, e)
        if rows:
            self.report["gemv_step"] = rows
            self.report["gemv_step_s"] = round(time.perf_counter() - t0, 2)

    @torch.inference_mode()
    def _compile_kernels(self) -> None:
        """Let the backend compile the kernel variants steps may need, once per distinct layer spec."""
        t0 = time.perf_counter()
        seen = set()
        for blk in self.model.layers:
            a = blk.attention
            if a.spec not in seen:
                seen.add(a.spec)
                self.backend.warmup(a.spec, a.k_cache, a.v_cache)
        torch.cuda.synchronize(self.device)
        self.report["kernel_warmup_s"] = round(time.perf_counter() - t0, 2)

    # ---------------------------------------------------------------- setup
    def _buckets(self) -> list[int]:
        mx = self.config.max_num_seqs
        b = self.config.graph_buckets or tuple(x for x in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256) if x < mx)
        out = sorted({x for x in b if x <= mx})
        if self.config.graph_buckets is None and (not out or out[-1] < mx):
            out.append(mx)
        extra = min(mx + self.config.graph_mixed_tokens, self.config.max_num_batched_tokens)
        if self.config.graph_buckets is None and extra > out[-1]:  # a full decode batch beside a few prompt tokens
            out.append(extra)
        return out

    def num_splits(self, batch_size: int) -> int:
        return self.backend.num_splits(batch_size, self.mc.n_kv_heads, self.max_model_len)

    @torch.inference_mode()
    def _warmup(self) -> None:
        """The largest step the scheduler can build (one prompt chunk of the full token budget, logits at up to
        max_num_seqs rows), over a 2-block pool whose scratch block takes every write."""
        torch.cuda.reset_peak_memory_stats(self.device)
        c = self.mc
        tmp = KVPool(c.n_layers, c.n_kv_heads, c.head_dim, 2, self.config.block_size, self.dtype, self.device)
        self.model.bind(self.backend, tmp.k, tmp.v)
        t = min(self.config.max_num_batched_tokens, self.max_model_len)
        n_logits = min(self.config.max_num_seqs, t)
        batch = self.build_batch([1] * t, list(range(t)), [0] * t, [0, t], [t], [[0] * math.ceil(t / self.config.block_size)],
                            0, list(range(t - n_logits, t)))  # fmt: skip
        self.model(batch)
        torch.cuda.synchronize(self.device)
        del tmp, batch

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """The model over this runner's KV pool: every eager forward comes here. The pool and backend are re-attached
        to the model's layers first when another runner over the same model object (a second LLM) has taken them
        (captured graphs keep the pointers they were captured with); the model's lock makes that re-attach and the
        forward one step for runners stepping in different threads (a server's engine thread beside a reference
        LLM in the same process)."""
        with self.lock:
            att = self.model.layers[0].attention
            if att.k_cache is None or att.k_cache.data_ptr() != self.pool.k.data_ptr() or att.backend is not self.backend:
                self.model.bind(self.backend, self.pool.k, self.pool.v)
            return self.model(batch)

    # ---------------------------------------------------------------- batches
    def _tensor(self, data, dtype) -> torch.Tensor:
        """A host list -> a tensor on the device (through pinned memory and a non_blocking copy on CUDA). Flat int
        lists go through array.array (C speed: ~4x torch.tensor's per-element conversion, ~0.15 ms less for each
        2k-token list of a long prompt's step)."""
        code = _ARRAY_CODES.get(dtype)
        if code is not None and data and not isinstance(data[0], list):
            flat = torch.frombuffer(array.array(code, data), dtype=dtype)
            t = torch.empty(flat.shape, dtype=dtype, pin_memory=True).copy_(flat) if self.cuda else flat
        else:
            t = torch.tensor(data, dtype=dtype, pin_memory=self.cuda)
        return t.to(self.device, non_blocking=True) if self.cuda else t

    def build_batch(self, ids, positions, seq_idx, query_start, seq_lens, tables, num_decodes, logits_rows) -> ForwardBatch:
        ncols = -(-max(1, max(len(t) for t in tables)) // 16) * 16  # a multiple of 16: one Triton specialization
        padded = [t + [0] * (ncols - len(t)) for t in tables]
        meta = AttentionMetadata(
            num_seqs=len(seq_lens), num_decodes=num_decodes, query_start=query_start, seq_lens_host=seq_lens,
            cu_seqlens_q=self._tensor(query_start, torch.int32), seq_lens=self._tensor(seq_lens, torch.int32),
            block_tables=self._tensor(padded, torch.int32),
            max_q_len=max(b - a for a, b in zip(query_start[:-1], query_start[1:], strict=True)),
            max_seq_len=max(seq_lens), num_splits=self.num_splits(max(1, num_decodes)),
        )
        rows = None if logits_rows is None else self._tensor(logits_rows, torch.int64)
        return ForwardBatch(input_ids=self._tensor(ids, torch.int64), positions=self._tensor(positions, torch.int64),
                            seq_idx=self._tensor(seq_idx, torch.int32), attn=meta, logits_indices=rows)  # fmt: skip

    def _inputs(self, sched: SchedulerOutput, prev: StepHandle | None):
        """Host lists of the step, plus the (batch row, prev row) pairs whose token is still on the device."""
        ids, pos, seq, qs, lens, tables, rows, sampled, patch = [], [], [], [0], [], [], [], [], []
        for b, (req, n) in enumerate(zip(sched.requests, sched.num_new, strict=True)):
            c0 = req.num_computed_tokens
            p = req.prompt_ids
            d = req.spec_tokens  # speculative drafts after the last token (verified at their rows), usually none
            m = n - len(d)
            toks = p[c0 : c0 + m] if c0 + m <= len(p) else (p + req.output_ids)[c0 : c0 + m]
            if len(toks) < m:  # the last one was sampled in the previous step and is not on the host yet
                patch.append((len(ids) + m - 1, prev.rows[req.request_id]))
                toks = toks + [0]
            ids += toks + d if d else toks
            pos += range(c0, c0 + n)
            seq += [b] * n
            qs.append(len(ids))
            lens.append(c0 + n)
            tables.append(req.block_ids[: math.ceil((c0 + n) / self.config.block_size)])
            if sched.samples(b):
                rows.extend(range(len(ids) - 1 - len(d), len(ids)) if d else (len(ids) - 1,))
                sampled.append(req)
        return ids, pos, seq, qs, lens, tables, rows, sampled, patch

    # ---------------------------------------------------------------- one step
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, prev: StepHandle | None) -> StepHandle:
        ids, pos, seq, qs, lens, tables, rows, sampled, patch = self._inputs(sched, prev)
        nd = sched.num_decodes
        b = len(lens)
        if self.graphs is not None and nd == b and self.graphs.bucket(b) is not None:
            logits = self.graphs.run(ids, pos, lens, tables, patch, prev)  # [b, V]: every row samples
            self.steps["graph"] += 1
        elif self._mixed_fits(sched, len(ids)):  # one row per token: row p attends 0..p over the cache
            logits = self.graphs.run(ids, pos, [p + 1 for p in pos], [tables[s] for s in seq], patch, prev)
            if len(rows) < len(ids):  # rows: increasing token indices; mid-prompt rows sample nothing
                logits = logits[self._tensor(rows, torch.int64)]
            self.steps["graph_mixed"] += 1
        else:
            self.steps["eager"] += 1
            batch = self.build_batch(ids, pos, seq, qs, lens, tables, nd, rows)
            if patch:
                self._patch(batch.input_ids, patch, prev)
            logits = self.forward(batch)  # [N, V]
        tokens = self.sample(logits, sampled)
        host = torch.empty(tokens.shape[0], dtype=torch.int64, pin_memory=self.cuda)
        host.copy_(tokens, non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        return StepHandle(sampled, tokens, host, event, {r.request_id: i for i, r in enumerate(sampled)},
                          time.perf_counter())  # fmt: skip

    def _mixed_fits(self, sched: SchedulerOutput, num_tokens: int) -> bool:
        """Whether a step with prompt rows replays a decode graph: at most graph_mixed_tokens of them, no drafts,
        and a bucket for all its tokens."""
        if self.graphs is None or num_tokens - sched.num_decodes > self.config.graph_mixed_tokens:
            return False
        return self.graphs.bucket(num_tokens) is not None and not any(r.spec_tokens for r in sched.requests)

    @torch.inference_mode()
    def execute_verify(self, sched: SchedulerOutput, want_hidden: bool = False):
        """The speculative path's forward, synchronous: (logits [R, V] at every sampling request's last row and its
        drafts' rows, in batch order; the requests; their final normed hidden states [R, dim] or None).
        Decode-only steps without drafts still replay a CUDA graph when no hidden state is wanted."""
        ids, pos, seq, qs, lens, tables, rows, sampled, _ = self._inputs(sched, None)
        b, nd = len(lens), sched.num_decodes
        if not want_hidden and self.graphs is not None and nd == b and self.graphs.bucket(b) is not None:
            return self.graphs.run(ids, pos, lens, tables, [], None), sampled, None
        batch = self.build_batch(ids, pos, seq, qs, lens, tables, nd, rows)
        with self.lock:  # capture_hidden and hidden are the model's, shared with any other runner over it
            self.model.capture_hidden = want_hidden
            try:
                logits = self.forward(batch)
                hidden = self.model.norm(self.model.hidden[-1][batch.logits_indices]) if want_hidden else None
            finally:
                self.model.capture_hidden, self.model.hidden = False, []
        return logits, sampled, hidden

    def _patch(self, input_ids: torch.Tensor, patch: list[tuple[int, int]], prev: StepHandle) -> None:
        dst, src = zip(*patch, strict=True)
        k = len(patch)
        if list(dst) == list(range(k)) and list(src) == list(range(k)):
            input_ids[:k].copy_(prev.tokens[:k])  # the steady decode batch: same requests, same order
        else:
            input_ids[self._tensor(list(dst), torch.int64)] = prev.tokens[self._tensor(list(src), torch.int64)]

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """logits [N, V] -> tokens [N] int64 on the device; each request with its own params and generator."""
        out = self._argmax(logits)
        for i, r in enumerate(reqs):
            s = r.sampling
            if s.greedy:
                continue
            if r.generator is None:
                r.generator = make_generator(s.seed, self.device) if s.seed is not None else self.default_gen
            out[i : i + 1] = sample(logits[i : i + 1].float(), s.temperature, s.top_k, s.top_p, r.generator)
        if any(r.logprobs is not None for r in reqs):
            self._logprobs(logits, out, reqs)
        return out

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, reqs: list[Request]) -> None:
        """Top-k logprobs of the raw distribution for the requests that ask, packed into one tensor whose copy to the
        host is started here without a sync (the step's event, recorded after it, says when it is readable)."""
        rows = [i for i, r in enumerate(reqs) if r.logprobs is not None]
        k = max(reqs[i].logprobs for i in rows)
        idx = self._tensor(rows, torch.int64)
        lp = torch.log_softmax(logits[idx].float(), dim=-1)  # [m, V]
        parts = [lp.gather(1, tokens[idx].unsqueeze(1))]
        if k:
            top = lp.topk(k, dim=-1)
            parts += [top.values, top.indices.float()]
        packed = torch.cat(parts, dim=1)  # [m, 1 + 2k]
        host = torch.empty(packed.shape, dtype=torch.float32, pin_memory=self.cuda)
        host.copy_(packed, non_blocking=self.cuda)
        for j, i in enumerate(rows):
            r = reqs[i]
            r.logprob_rows[len(r.output_ids) + r.num_pending] = (host, j, r.logprobs, k)

    def info(self) -> dict:
        return {**self.report, **self.backend.info(), "steps": dict(self.steps)}
