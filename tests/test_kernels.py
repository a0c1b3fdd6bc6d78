"""Semantics of the reference kernels that the oracle tests cannot pin down alone:
tie-breaks, state across call boundaries, window edge cases, quantized formats."""

import itertools

import ml_dtypes
import numpy as np
import pytest
import torch

from v4c.runtime.kernels.attention import attention, index_topk
from v4c.runtime.kernels.basic import rope
from v4c.runtime.kernels.compressor import compress
from v4c.runtime.kernels.moe import route_topk, select_topk
from v4c.runtime.quant import (FP4_VALUES, dequant_fp4, dequant_fp8, expand_scales, infer_block, quant_fp4,
                               quant_fp8, unpack_fp4)

g = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=g)


def test_ties_go_to_the_lower_index():
    scores = torch.tensor([[0.0, 1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0]])
    assert select_topk(scores, 4).tolist() == [[1, 4, 5, 0]]
    zeros = torch.zeros(1, 40)
    zeros[0, 5] = 1
    assert select_topk(zeros, 5).tolist() == [[5, 0, 1, 2, 3]]


def test_router_ties_follow_the_rule():
    x, w = torch.ones(1, 1, 4), torch.ones(6, 4)  # every expert scores the same
    bias = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.1, 0.0])
    weights, idx = route_topk(x, w, bias, k=3, score_func="sigmoid", scale=1.0)
    assert idx.tolist() == [[[2, 4, 0]]]
    assert torch.allclose(weights.sum(-1), torch.ones(1, 1))


def test_index_topk_ties_padding_and_causality():
    rate, topk = 4, 3
    keys = torch.zeros(1, 8, 2)
    keys[0, :, 0] = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # entries 0, 2, 3 tie
    q = torch.zeros(1, 14, 1, 2)
    q[..., 0] = 1.0
    out = index_topk(q, torch.ones(1, 14, 1), state=(keys,), pos0=6, topk=topk, rate=rate,
                     score_scale=1.0, weight_scale=1.0)
    # query t (positions 6..19) sees entries w < (t + 1) // 4
    assert out[0, 0].tolist() == [0, -1, -1]  # t=6: entry 0 only; the rest padded
    assert out[0, 5].tolist() == [0, 2, 1]  # t=11: entries 0..2; 0 and 2 tie at 1, then 1
    assert out[0, 13].tolist() == [0, 2, 3]  # t=19: 0, 2, 3 tie; 1 and 4 are lower


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("rate", [3, 4])
def test_compressor_is_independent_of_call_boundaries(overlap, rate):
    b, s, d = 2, 29, 6
    c = 2 * d if overlap else d
    kv, gate, ape, norm_w, inv = randn(b, s, c), randn(b, s, c), randn(rate, c), randn(d), torch.rand(2)

    def state():
        shapes = [(b, rate, c), (b, rate, c)] + ([(b, rate, d), (b, rate, d)] if overlap else []) + [(b, 16, d)]
        return tuple(torch.zeros(sh) for sh in shapes)

    one = state()
    compress(kv, gate, ape, norm_w, inv, state=one, pos0=0, rate=rate, overlap=overlap, eps=1e-6)
    for sizes in ([1], [5, 1, 2, 7]):
        split, pos = state(), 0
        for size in itertools.cycle(sizes):
            if pos >= s:
                break
            compress(kv[:, pos:pos + size], gate[:, pos:pos + size], ape, norm_w, inv, state=split, pos0=pos,
                     rate=rate, overlap=overlap, eps=1e-6)
            pos += size
        n = s // rate
        assert torch.allclose(split[-1][:, :n], one[-1][:, :n], atol=1e-6)
        assert torch.equal(split[0][:, : s % rate], one[0][:, : s % rate])  # same buffered tail
    assert one[-1][:, s // rate:].abs().sum() == 0  # nothing written past the closed windows


@pytest.mark.parametrize("window", [1, 2, 5])
def test_attention_ring_is_independent_of_call_boundaries(window):
    b, s, h, d = 1, 13, 2, 4
    q, kv, sinks = randn(b, s, h, d), randn(b, s, d), randn(h)
    full = attention(q, kv, sinks, state=(torch.zeros(b, window - 1, d),), pos0=0, window=window, scale=0.5)
    ring, outs = torch.zeros(b, window - 1, d), []
    for t in range(s):
        outs.append(attention(q[:, t:t + 1], kv[:, t:t + 1], sinks, state=(ring,), pos0=t, window=window, scale=0.5))
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-6)
    if window == 1:  # only the token itself: softmax over (self, sink)
        p = torch.sigmoid((q * kv[:, :, None]).sum(-1) * 0.5 - sinks)
        assert torch.allclose(full, p[..., None] * kv[:, :, None], atol=1e-6)


def test_rope_inverse_undoes_rope():
    x, pos, inv = randn(2, 7, 3, 10), torch.arange(5, 12), torch.rand(3)
    y = rope(x, pos, inv)
    assert torch.equal(y[..., :4], x[..., :4])  # leading channels untouched
    assert torch.allclose(rope(y, pos, inv, inverse=True), x, atol=1e-6)


# --- quantized formats ------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (31, 200), (130, 129), (256, 96)])
@pytest.mark.parametrize("block", [(128, 128), (1, 32), (1, 128)])
@pytest.mark.parametrize("fmt", ["fp32", "ue8m0"])
def test_fp8_round_trip_against_ml_dtypes(shape, block, fmt):
    w = randn(*shape) * 3
    q, scale = quant_fp8(w, block, fmt)
    assert tuple(scale.shape) == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    if fmt == "ue8m0":
        assert scale.dtype == torch.float8_e8m0fnu
        exps = torch.log2(scale.float())
        assert torch.equal(exps, exps.round())
    # the e4m3 codes are what ml_dtypes makes of the scaled weights
    scaled = (w / expand_scales(scale, shape, block)).numpy()
    expected = scaled.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert np.array_equal(q.float().numpy(), expected)
    deq, s = dequant_fp8(q, scale, block), expand_scales(scale, shape, block)
    # e4m3: 3 mantissa bits -> half an ulp is 2^-4 relative; subnormals step by 2^-9 (x scale)
    assert bool(((deq - w).abs() <= 2 ** -4 * w.abs() + 2 ** -10 * s).all())
    assert infer_block(shape, scale.shape, block) == block


def test_fp4_codes_and_packing_order():
    assert FP4_VALUES[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    packed = torch.tensor([[0x21, 0xF7]], dtype=torch.uint8).view(torch.int8)  # low nibble = even column
    assert unpack_fp4(packed).tolist() == [[0.5, 1.0, 6.0, -6.0]]
    w = randn(5, 70)
    q, scale = quant_fp4(w)
    assert q.shape == (5, 35) and scale.shape == (5, 3) and scale.dtype == torch.float8_e8m0fnu
    grid = FP4_VALUES.unique()
    codes = dequant_fp4(q, scale) / expand_scales(scale, (5, 70), (1, 32))
    assert torch.isin(codes, grid).all()
    # nearest code: no grid value is closer to the scaled input than the chosen one
    x = w / expand_scales(scale, (5, 70), (1, 32))
    best = (x.unsqueeze(-1) - grid).abs().min(-1).values
    assert torch.allclose((x - codes).abs(), best)
