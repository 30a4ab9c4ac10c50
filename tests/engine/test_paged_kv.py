"""Paged KV cache on the CPU: allocator, block tables, paged reference ops == contiguous reference ops, and the
paged generator (torch ops, no graphs) == the eager Generator on tiny models."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import reference as R
from engine.kernels import reference_paged as RP
from engine.paged_kv import SCRATCH_BLOCK, BlockAllocator, KVCacheFull, PagedKVCache, bytes_per_block


def test_allocator_allocates_frees_and_never_hands_out_the_scratch_block():
    a = BlockAllocator(6)
    assert a.num_free == 5
    got = a.allocate(3)
    assert SCRATCH_BLOCK not in got and len(set(got)) == 3
    more = a.allocate(2)
    assert a.num_free == 0 and not set(got) & set(more)
    with pytest.raises(KVCacheFull, match="asked for 1"):
        a.allocate(1)
    a.free(got)
    assert a.num_free == 3
    with pytest.raises(ValueError, match="not allocated"):
        a.free([got[0]])
    with pytest.raises(ValueError):
        BlockAllocator(1)


def test_block_tables_grow_release_and_map_slots():
    kv = PagedKVCache(2, 2, 8, num_blocks=10, block_size=4, max_seqs=3, max_seq_len=20, dtype=torch.float32,
                      device="cpu")  # fmt: skip
    assert kv.max_blocks_per_seq == 5
    b0 = kv.reserve(0, 5)  # 2 blocks
    assert len(b0) == 2 and kv.capacity[0] == 8
    assert kv.reserve(0, 8) == b0  # already fits
    b0 = kv.reserve(0, 9)
    assert len(b0) == 3
    kv.reserve(2, 1)
    assert kv.tables_host[0, :3].tolist() == b0 and kv.tables_host[0, 3:].tolist() == [0, 0]
    assert kv.slots([0], [[0, 5, 8]]).tolist() == [b0[0] * 4, b0[1] * 4 + 1, b0[2] * 4]
    kv.sync_tables()
    assert torch.equal(kv.block_tables, kv.tables_host)
    with pytest.raises(ValueError, match="max_seq_len"):
        kv.reserve(1, 21)
    kv.release(0)
    assert kv.tables_host[0].tolist() == [0] * 5 and kv.allocator.num_free == 8
    kv.release_all()
    assert kv.allocator.num_free == 9
    assert torch.all(kv.k[:, SCRATCH_BLOCK] == 0)
    assert bytes_per_block(2, 2, 8, 4, torch.bfloat16) == 2 * 2 * 2 * 4 * 8 * 2


def _paged_copy(kc: torch.Tensor, vc: torch.Tensor, page: int, num_blocks: int, seed: int = 0):
    """Scatter a contiguous cache [B, Hkv, S, D] into random pages; returns (k_pages, v_pages, block_tables)."""
    b, hkv, s, d = kc.shape
    nb = -(-s // page)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks - 1, generator=g)[: b * nb].reshape(b, nb).int() + 1
    kp = torch.randn(num_blocks, hkv, page, d, generator=g, dtype=kc.dtype)  # garbage elsewhere
    vp = torch.randn(num_blocks, hkv, page, d, generator=g, dtype=kc.dtype)
    seq = torch.arange(b).repeat_interleave(s)
    pos = torch.arange(s).repeat(b)
    slots = RP.paged_slots(perm, seq, pos, page)
    RP.write_kv_paged(kp, vp, kc[seq, :, pos], vc[seq, :, pos], slots)
    return kp, vp, perm


@pytest.mark.parametrize("h,hkv,d,page,window", [(4, 2, 16, 4, 0), (6, 6, 12, 8, 0), (8, 2, 32, 16, 5)])
def test_paged_reference_attention_equals_contiguous(h, hkv, d, page, window):
    g = torch.Generator().manual_seed(1)
    b, s = 3, 37
    kc = torch.randn(b, hkv, s, d, generator=g)
    vc = torch.randn(b, hkv, s, d, generator=g)
    q = torch.randn(b, h, d, generator=g)
    lens = torch.tensor([1, 37, 20], dtype=torch.int32)
    kp, vp, bt = _paged_copy(kc, vc, page, num_blocks=40)
    got = RP.paged_decode_attention(q, kp, vp, bt, lens, d**-0.5, window)
    ref = R.decode_attention(q, kc, vc, lens, d**-0.5, window)
    torch.testing.assert_close(got, ref)


def test_paged_write_skips_negative_slots_and_matches_contiguous_write():
    g = torch.Generator().manual_seed(2)
    hkv, d, page = 2, 8, 4
    k = torch.randn(5, hkv, d, generator=g)
    v = torch.randn(5, hkv, d, generator=g)
    bt = torch.tensor([[3, 1], [2, 5]], dtype=torch.int32)
    seq = torch.tensor([0, 0, 1, 1, 1], dtype=torch.int32)
    pos = torch.tensor([0, 6, 1, 4, -1], dtype=torch.int32)
    kp = torch.zeros(6, hkv, page, d)
    vp = torch.zeros_like(kp)
    RP.write_kv_paged(kp, vp, k, v, RP.paged_slots(bt, seq, pos, page))
    kc = torch.zeros(2, hkv, 8, d)
    vc = torch.zeros_like(kc)
    keep = pos >= 0
    R.write_kv(kc, vc, k[keep], v[keep], seq[keep], pos[keep])
    for i in range(2):
        torch.testing.assert_close(RP.gather_paged(kp, bt[i], 8), kc[i])
        torch.testing.assert_close(RP.gather_paged(vp, bt[i], 8), vc[i])
    assert kp[0].abs().sum() == 0 and kp[4].abs().sum() == 0  # untouched blocks


def test_rope_write_kv_reference_matches_split_rope():
    g = torch.Generator().manual_seed(3)
    h, hkv, d, t = 4, 2, 16, 6
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    cs = R.rope_cos_sin(inv, 32)
    pos = torch.tensor([0, 1, 2, 3, 9, 4])
    k_out = torch.empty(t, hkv, d)
    q = RP.rope_write_kv(qkv, cs, pos, h, hkv, d, k_out=k_out)
    qr, kr = R.rope(qkv[:, : h * d].view(t, h, d), qkv[:, h * d : (h + hkv) * d].view(t, hkv, d), pos, cs)
    torch.testing.assert_close(q, qr)
    torch.testing.assert_close(k_out, kr)


@pytest.mark.parametrize("preset", ["tiny-test", "tiny-test-mistral", "tiny-test-qwen2"])
def test_paged_generator_torch_ops_equals_eager_generator(preset):
    from engine.fast_decode import FastGenerator
    from engine.generator import Generator
    from engine.presets import synthetic

    lm = synthetic(preset, "float32", "cpu", seed=1)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, lm.config.vocab_size, (n,), generator=g).tolist() for n in (3, 21)]
    ref = Generator(lm, 2, 40).generate(prompts, 5)
    fast = FastGenerator(lm, 2, 40, block_size=8)
    assert fast.report["backend"] == "torch" and fast.report["graph_fallback"] == "not a CUDA device"
    got = fast.generate(prompts, 5)
    assert [c.tokens for c in got] == [c.tokens for c in ref]
    stop = ref[1].tokens[2]
    seen = []
    got = fast.generate(prompts, 5, stop_ids={stop}, on_token=lambda s, t: seen.append(t))
    ref = Generator(lm, 2, 40).generate(prompts, 5, stop_ids={stop})
    assert [(c.tokens, c.finish_reason) for c in got] == [(c.tokens, c.finish_reason) for c in ref]
    assert len(seen) == max(len(c.tokens) for c in got)


def test_paged_generator_logits_match_eager():
    from engine.fast_decode import FastGenerator
    from engine.generator import Generator
    from engine.presets import synthetic

    lm = synthetic("tiny-test", "float32", "cpu", seed=2)
    prompts = [[5, 9, 200, 7], [1] * 13]
    ref = Generator(lm, 2, 32).logits(prompts)
    got = FastGenerator(lm, 2, 32).logits(prompts)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_create_picks_the_reference_generator_on_cpu_and_the_fast_path_when_asked():
    from engine.fast_decode import FastGenerator
    from engine.generator import Generator, create
    from engine.presets import synthetic

    lm = synthetic("tiny-test", "float32", "cpu", seed=3)
    assert type(create(lm, 2, 32)) is Generator
    assert type(create(lm, 2, 32, fast=False)) is Generator
    fast = create(lm, 2, 32, fast=True, block_size=8)
    assert isinstance(fast, FastGenerator) and fast.kv.block_size == 8
