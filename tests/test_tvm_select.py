"""TVM CPU selection kernels (targets/tvm/select.py) against the runtime's torch references:
attention.index_topk, moe.route_topk and moe.route_hash.

All kernels are built once, into one shared library, loaded with tvm_ffi and called with torch tensors.
Sizes are odd on purpose: H=3, Di=40 (a partial 16-channel block), topk 5 with queries that see fewer
entries (-1 slots) or none, B=2, S up to 37 (several query blocks, two 128-entry chunks); H=10, Di=136
(two fp8 scale groups, a partial head group); routers with E=7, k=3, D=100 and M in {1, 5, 13}.

Tolerances: the kernels decode keys exactly (f32, bf16, e4m3 x fp32 scale) and differ from the
references only in fp32 summation order (scores, logits). So
  - indices are compared exactly wherever the reference's best k + 1 scores are 1e-5 (relative) apart
    (asserted on the data: random inputs, fixed seeds), and on small-integer data, whose scores are
    exact in any order (ties included: lower index first, -0.0 = 0.0, NaN first);
  - at the bench size (512 entries, top 64, where near-ties can flip), the scores of the selected
    entries, recomputed by the reference, equal its top-64 scores to rtol 1e-5 (measured on this
    machine: identical picks on 9 random cases of 1 to 64 queries);
  - router weights: rtol 1e-5, atol 1e-5 * max|ref| (measured: <= 1.9e-7 * max|ref|).
"""

import pytest
import torch
import tvm  # noqa: F401  (apache-tvm: a test dependency; the compiler needs it, the runtime does not)
import tvm_ffi
from v4c.runtime.kernels.attention import index_scores, index_topk
from v4c.runtime.kernels.moe import SCORE_FUNCS, route_hash, route_topk
from v4c.runtime.quant import decode_entries, encode_entries
from v4c.targets.tvm import build_library, select

FORMATS = ("f32", "bf16", "fp8_block")
SCALES = {"score_scale": 0.5, "weight_scale": 0.25}
SMALL = {"heads": 3, "dim": 40, "topk": 5, "rate": 4}
WIDE = {"heads": 10, "dim": 136, "topk": 20, "rate": 2}
BENCH = {"heads": 8, "dim": 64, "topk": 64, "rate": 4}
D, E, K, V, SCALE = 100, 7, 3, 11, 2.5
MS = (1, 5, 13)


def _kernels():
    ks = {f"index_{fmt}": select.index_topk(**SMALL, key_format=fmt, **SCALES) for fmt in FORMATS}
    ks["index_wide"] = select.index_topk(**WIDE, key_format="fp8_block", **SCALES)
    ks["index_bench"] = select.index_topk(**BENCH, key_format="fp8_block", **SCALES)
    for sf in select.SCORE_FUNCS:
        ks[f"topk_{sf}"] = select.route_topk(D, E, K, score_func=sf, scale=SCALE)
        ks[f"hash_{sf}"] = select.route_hash(D, E, K, V, score_func=sf, scale=SCALE)
    ks["topk_bf16"] = select.route_topk(D, E, K, score_func="sigmoid", scale=SCALE, weight_dtype="bfloat16")
    ks["hash_bf16"] = select.route_hash(D, E, K, V, score_func="sigmoid", scale=SCALE, weight_dtype="bfloat16")
    return ks


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return tvm_ffi.load_module(build_library(_kernels(), str(tmp_path_factory.mktemp("tvm") / "select.so")))


# --- index_topk -------------------------------------------------------------------------------
def _index_case(fmt, batch, s, capacity, heads, dim, seed, integer=False):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randint(-2, 3, shape, generator=g).float() if integer else torch.randn(*shape, generator=g)
    return draw(batch, s, heads, dim), draw(batch, s, heads), encode_entries(draw(batch, capacity, dim), fmt, 0)


def _reference_scores(q, w, keys, fmt, pos0, rate, scales=SCALES):
    n = (pos0 + q.shape[1]) // rate
    return index_scores(q, w, decode_entries(keys[:, :n], fmt, q.shape[-1], 0), **scales)  # [B, S, n]


def _assert_separated(q, w, keys, fmt, pos0, rate, topk):
    """Per query, the best topk + 1 causal scores are 1e-5 apart (relative), except exact zeros (every
    head's relu at 0), which tie exactly in both."""
    scores = _reference_scores(q, w, keys, fmt, pos0, rate)
    for b in range(q.shape[0]):
        for s in range(q.shape[1]):
            row = scores[b, s, :(pos0 + s + 1) // rate].sort(descending=True).values[:topk + 1]
            nonzero = row[row != 0]
            gaps_ok = len(nonzero) < 2 or (-nonzero.diff() > 1e-5 * row.abs().max()).all()
            assert gaps_ok, f"near-tie at b={b} s={s}: pick another seed"


def _run(lib, name, q, w, keys, pos0, topk, rate, fmt, scales=SCALES):
    ref = index_topk(q, w, state=(keys,), pos0=pos0, topk=topk, rate=rate, key_format=fmt, **scales)
    out = torch.full_like(ref, -7)
    lib[name](q, w, keys, pos0, out)
    return out, ref


INDEX_CASES = [  # (batch, S, pos0, capacity): decode; decode with 2 entries < topk; prefill with
    (2, 1, 29, 12),  # growing entries (some < topk); no entry yet; several query blocks and chunks
    (2, 1, 9, 12),
    (2, 9, 3, 12),
    (1, 2, 0, 4),
    (2, 37, 530, 150),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batch, s, pos0, capacity", INDEX_CASES)
def test_index_topk(lib, fmt, batch, s, pos0, capacity):
    q, w, keys = _index_case(fmt, batch, s, capacity, 3, 40, seed=batch + s + pos0)
    _assert_separated(q, w, keys, fmt, pos0, 4, 5)
    out, ref = _run(lib, f"index_{fmt}", q, w, keys, pos0, 5, 4, fmt)
    assert torch.equal(out, ref), f"\nours {out.tolist()}\nref  {ref.tolist()}"


@pytest.mark.parametrize("fmt", ["f32", "bf16"])
def test_index_exact_ties_go_to_the_lower_index(lib, fmt):
    """Small-integer data: scores exact in any summation order; many tie (relu zeros among them)."""
    q, w, keys = _index_case(fmt, 2, 21, 40, 3, 40, seed=3, integer=True)
    out, ref = _run(lib, f"index_{fmt}", q, w, keys, 100, 5, 4, fmt)
    assert torch.equal(out, ref)


def test_index_wide_heads_and_scale_groups(lib):
    q, w, keys = _index_case("fp8_block", 2, 18, 60, 10, 136, seed=5)
    _assert_separated(q, w, keys, "fp8_block", 101, 2, 20)
    out, ref = _run(lib, "index_wide", q, w, keys, 101, 20, 2, "fp8_block")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("s, pos0", [(1, 2047), (3, 2045), (40, 1000)])
def test_index_bench_size_selects_the_top_scores(lib, s, pos0):
    """512 entries, top 64: the picks are distinct causal entries whose reference scores are the
    reference's best 64, best first."""
    q, w, keys = _index_case("fp8_block", 1, s, 512, 8, 64, seed=s)
    out, ref = _run(lib, "index_bench", q, w, keys, pos0, 64, 4, "fp8_block")
    scores = _reference_scores(q, w, keys, "fp8_block", pos0, 4)
    for i in range(s):
        n = (pos0 + i + 1) // 4
        k = min(64, n)
        assert (out[0, i, k:] == -1).all() and len(set(out[0, i, :k].tolist())) == k
        assert ((out[0, i, :k] >= 0) & (out[0, i, :k] < n)).all()
        ours, best = scores[0, i, out[0, i, :k]], scores[0, i, ref[0, i, :k]]
        torch.testing.assert_close(ours, best, rtol=1e-5, atol=1e-5 * best.abs().max().item())
    assert (out == ref).float().mean() > 0.9  # near-ties aside, the same picks


def test_index_zero_and_nan_scores_order_as_torch_sort(lib):
    """A negative weight makes relu's zeros -0.0 (equal to 0.0: lower index first); NaN scores rank first."""
    keys = torch.zeros(1, 12, 40)
    keys[0, :7, 0] = torch.tensor([1.0, -1.0, 2.0, float("nan"), -3.0, -float("nan"), 0.5])
    q = torch.zeros(1, 1, 3, 40)
    q[0, 0, 0, 0] = 1.0  # head 0 reads channel 0; the others score 0 (NaN on the NaN keys)
    for weight in (1.0, -1.0):
        out, ref = _run(lib, "index_f32", q, torch.tensor([[[weight, 0.5, 2.0]]]), keys, 27, 5, 4, "f32")
        assert torch.equal(out, ref), f"{out.tolist()} != {ref.tolist()}"


def test_index_rejects_bad_input(lib):
    q, w, keys = _index_case("fp8_block", 1, 2, 4, 3, 40, seed=0)
    out = torch.empty(1, 2, 5, dtype=torch.long)
    lib["index_fp8_block"](q, w, keys, 14, out)  # (14 + 2) // 4 = 4 entries: fit
    with pytest.raises(RuntimeError, match="capacity"):
        lib["index_fp8_block"](q, w, keys, 18, out)
    with pytest.raises(TypeError, match="dtype"):
        lib["index_fp8_block"](q, w, keys.float(), 0, out)


# --- routers ----------------------------------------------------------------------------------
def _router_case(m, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, D, generator=g), torch.randn(E, D, generator=g) * 0.1, torch.randn(E, generator=g) * 0.1)


def _close(y, ref):
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("sf", select.SCORE_FUNCS)
@pytest.mark.parametrize("m", MS)
def test_route_topk(lib, sf, m):
    x, weight, bias = _router_case(m, seed=m)
    ranked = (SCORE_FUNCS[sf](x @ weight.T) + bias).sort(dim=-1, descending=True).values[:, :K + 1]
    assert (-ranked.diff(dim=-1) > 1e-5 * ranked.abs().max()).all(), "near-tie: pick another seed"
    ref_w, ref_i = route_topk(x, weight, bias, k=K, score_func=sf, scale=SCALE)
    wo, io = torch.empty(m, K), torch.full((m, K), -7, dtype=torch.long)
    lib[f"topk_{sf}"](x, weight, bias, wo, io)
    assert torch.equal(io, ref_i), f"\nours {io.tolist()}\nref  {ref_i.tolist()}"
    _close(wo, ref_w)


@pytest.mark.parametrize("sf", ["sigmoid", "softmax"])
def test_route_topk_ties_go_to_the_lower_index(lib, sf):
    """x = 0: every score is the same, so the bias alone ranks, with ties."""
    bias = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    x, weight = torch.zeros(2, D), torch.randn(E, D)
    wo, io = torch.empty(2, K), torch.empty(2, K, dtype=torch.long)
    lib[f"topk_{sf}"](x, weight, bias, wo, io)
    assert io.tolist() == [[1, 2, 4]] * 2
    _close(wo, route_topk(x, weight, bias, k=K, score_func=sf, scale=SCALE)[0])


@pytest.mark.parametrize("sf", select.SCORE_FUNCS)
@pytest.mark.parametrize("m", MS)
def test_route_hash(lib, sf, m):
    x, weight, _ = _router_case(m, seed=10 + m)
    g = torch.Generator().manual_seed(m)
    table = torch.randint(0, E, (V, K), generator=g, dtype=torch.int32)
    tokens = torch.randint(0, V, (m,), generator=g)
    ref_w, ref_i = route_hash(x, weight, table, tokens, score_func=sf, scale=SCALE)
    wo, io = torch.empty(m, K), torch.empty(m, K, dtype=torch.long)
    lib[f"hash_{sf}"](x, weight, table, tokens, wo, io)
    assert torch.equal(io, ref_i)
    _close(wo, ref_w)


def test_routers_read_bf16_weights(lib):
    """Routers DeepSeek ships in bf16: the weight is read as stored (exact in fp32)."""
    x, weight, bias = _router_case(3, seed=21)
    weight = weight.bfloat16()
    ref_w, ref_i = route_topk(x, weight, bias, k=K, score_func="sigmoid", scale=SCALE)
    wo, io = torch.empty(3, K), torch.empty(3, K, dtype=torch.long)
    lib["topk_bf16"](x, weight, bias, wo, io)
    assert torch.equal(io, ref_i)
    _close(wo, ref_w)
    table = torch.randint(0, E, (V, K), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
    tokens = torch.tensor([0, V - 1, 3])
    ref_w, ref_i = route_hash(x, weight, table, tokens, score_func="sigmoid", scale=SCALE)
    lib["hash_bf16"](x, weight, table, tokens, wo, io)
    assert torch.equal(io, ref_i)
    _close(wo, ref_w)


def test_route_hash_rejects_tokens_outside_the_table(lib):
    x, weight, _ = _router_case(2, seed=0)
    table = torch.zeros(V, K, dtype=torch.int32)
    wo, io = torch.empty(2, K), torch.empty(2, K, dtype=torch.long)
    with pytest.raises(RuntimeError, match="token id"):
        lib["hash_sigmoid"](x, weight, table, torch.tensor([0, V]), wo, io)
    with pytest.raises(RuntimeError, match="table entry"):
        lib["hash_sigmoid"](x, weight, table + E, torch.tensor([0, 1]), wo, io)
