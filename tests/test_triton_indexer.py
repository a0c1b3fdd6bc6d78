"""The Triton `index_topk` launcher (interpreter) against the runtime's torch kernel: exactly the
same indices (best first, lower index on ties, -1 for non-causal picks and padding) for every key
format, prefill and decode, tiered key stores; and clear errors for unsupported input."""

import pytest
import torch
from v4c.runtime.kernels.attention import index_scores as ref_scores
from v4c.runtime.kernels.attention import index_topk as ref_topk
from v4c.runtime.kernels.attention import rope_index_topk as ref_rope_topk
from v4c.runtime.kv_tiers import PagedEntries, PagePool, TierAllocator, TierStats
from v4c.runtime.quant import decode_entries, encode_entries
from v4c.targets.triton.kernels import common
from v4c.targets.triton.kernels import indexer as module
from v4c.targets.triton.kernels import norm
from v4c.targets.triton.kernels.indexer import _config, index_scores, index_topk, rope_index_topk
from v4c.targets.triton.kernels.norm import rope as rope_kernel

FORMATS = ["f32", "bf16", "fp8_block", "fp4_block"]
SCALES = {"score_scale": 0.5, "weight_scale": 0.25}


def make_case(fmt, batch, s, heads, d, capacity, seed, integer=False):
    """Random queries, weights and keys (stored in `fmt`); `integer`: small integers, so every
    score is exact in fp32 whatever the summation order (ties stay ties)."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        def draw(*shape):
            return torch.randint(-2, 3, shape, generator=g).float()
    else:
        def draw(*shape):
            return torch.randn(*shape, generator=g)
    q, w = draw(batch, s, heads, d), draw(batch, s, heads)
    keys = encode_entries(draw(batch, capacity, d), fmt, 0)
    return q, w, keys


def assert_distinct(q, w, keys, fmt, pos0, rate, topk):
    """The data is fit for an exact comparison: per query, the best topk + 1 causal scores are 1e-5
    apart (relative; rounding differs between the kernels), except exact zeros (every head's relu at 0),
    which tie exactly in both."""
    n = (pos0 + q.shape[1]) // rate
    scores = ref_scores(q, w, decode_entries(keys[:, :n], fmt, q.shape[-1], 0), **SCALES)
    for b in range(q.shape[0]):
        for s in range(q.shape[1]):
            row = scores[b, s, :(pos0 + s + 1) // rate].sort(descending=True).values[:topk + 1]
            nonzero = row[row != 0]
            if len(nonzero):
                assert (-nonzero.diff() > 1e-5 * row.abs().max()).all()


def run_both(q, w, keys, *, pos0, topk, rate, fmt, config=None, store=None):
    """The launcher against the reference, with pos0 an int and (dense keys) a device position: the same
    indices, though the latter scores the keys' whole capacity, the kernels masking what is not causal."""
    ref = ref_topk(q, w, state=(keys,), pos0=pos0, topk=topk, rate=rate, key_format=fmt, **SCALES)
    for where in (pos0, torch.tensor([pos0, 99])) if store is None else (pos0,):
        ours = index_topk(q, w, state=(store if store is not None else keys,), pos0=where, topk=topk, rate=rate,
                          key_format=fmt, config=config, **SCALES)
        assert ours.dtype == torch.int64 and ours.shape == ref.shape
        assert torch.equal(ours, ref), f"pos0 {where}\nours {ours.tolist()}\nref  {ref.tolist()}"
    return ours


CASES = [  # (batch, S, pos0, rate, topk): no entry yet, decode, prefill, prefill past the window, topk > entries
    (1, 2, 0, 4, 3),
    (2, 1, 29, 4, 5),
    (2, 9, 0, 2, 4),
    (1, 6, 17, 3, 1),
    (2, 3, 5, 2, 9),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batch, s, pos0, rate, topk", CASES)
def test_matches_reference(fmt, batch, s, pos0, rate, topk):
    seed = 7 * batch + s + pos0 + rate + topk
    q, w, keys = make_case(fmt, batch, s, 3, 20, 12, seed)
    assert_distinct(q, w, keys, fmt, pos0, rate, topk)
    out = run_both(q, w, keys, pos0=pos0, topk=topk, rate=rate, fmt=fmt)
    causal = ((torch.arange(pos0, pos0 + s) + 1) // rate)[None, :, None]
    assert ((out == -1) | ((out >= 0) & (out < causal))).all()


@pytest.mark.parametrize("fmt", ["f32", "bf16", "fp4_block"])
def test_exact_ties_go_to_the_lower_index(fmt):
    """Small-integer data: many scores tie exactly (zeros from the relu among them)."""
    q, w, keys = make_case(fmt, 2, 7, 2, 5, 16, seed=3, integer=True)
    out = run_both(q, w, keys, pos0=25, topk=6, rate=2, fmt=fmt)
    assert (out >= 0).all()


def test_reference_example():
    """test_kernels' hand-made case: ties, padding and causality."""
    keys = torch.zeros(1, 8, 2)
    keys[0, :, 0] = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # entries 0, 2, 3 tie
    q = torch.zeros(1, 14, 1, 2)
    q[..., 0] = 1.0
    out = index_topk(q, torch.ones(1, 14, 1), state=(keys,), pos0=6, topk=3, rate=4, score_scale=1.0, weight_scale=1.0)
    assert out[0, 0].tolist() == [0, -1, -1]
    assert out[0, 5].tolist() == [0, 2, 1]
    assert out[0, 13].tolist() == [0, 2, 3]


def test_zero_and_nan_scores_order_as_torch_sort():
    """With a negative weight relu's zeros become -0.0 (equal to 0.0 for torch's sort: lower index
    first); NaN scores (either sign) rank first, as torch.sort puts them."""
    keys = torch.tensor([[[1.0], [-1.0], [2.0], [float("nan")], [-3.0], [-float("nan")], [0.5]]])
    q = torch.ones(1, 1, 1, 1)
    for weight in (1.0, -1.0):
        for k in (keys, keys[:, [0, 1, 2, 4, 6]]):
            run_both(q, torch.full((1, 1, 1), weight), k.contiguous(), pos0=2 * k.shape[1] - 1, topk=k.shape[1], rate=2,
                     fmt="f32")


@pytest.mark.parametrize("d", [33, 32])  # fp8_block: scales read as bytes (33) or as aligned fp32 words (32)
@pytest.mark.parametrize("fmt", ["fp8_block", "fp4_block"])
def test_scores_match_reference(fmt, d):
    q, w, keys = make_case(fmt, 2, 4, 5, d, 10, seed=8)
    ours = index_scores(q, w, keys, pos0=15, rate=2, key_format=fmt, cfg=_config(None), **SCALES)
    ref = ref_scores(q, w, decode_entries(keys[:, :9], fmt, d, 0), **SCALES)
    limit = ((torch.arange(15, 19) + 1) // 2)[None, :, None]
    causal = torch.arange(9)[None, None, :] < limit
    assert torch.isinf(ours[~causal.expand_as(ours)]).all()
    assert torch.allclose(ours[causal.expand_as(ours)], ref[causal.expand_as(ref)], rtol=1e-5, atol=1e-5 * ref.abs().max())


def make_store(dense, page_entries=4):
    """A tiered store (runtime.kv_tiers.PagedEntries) holding the rows of `dense` [B, T, W]."""
    batch, capacity, width = dense.shape
    stats, device, host = TierStats(), TierAllocator("device", None), TierAllocator("host", None)
    pool = PagePool(2, (page_entries, width), dense.dtype, device, stats)
    store = PagedEntries("keys", batch, capacity, width, dense.dtype, page_entries, pool, host)
    store.write(0, dense)
    return store


def test_tiered_keys_and_low_precision_inputs():
    q, w, keys = make_case("fp8_block", 2, 3, 4, 24, 9, seed=11)
    run_both(q.bfloat16(), w.half(), keys, pos0=12, topk=4, rate=2, fmt="fp8_block", store=make_store(keys),
             config={"BLOCK_T": 16, "num_warps": 2})


def test_at_a_device_position_a_few_programs_score_every_causal_tile():
    """The score grid at a device position does not grow with the keys' capacity: off a GPU 2 programs a query,
    each looping over every other causal tile (here 5 tiles of 16 keys, 4 of them causal)."""
    q, w, keys = make_case("fp8_block", 2, 2, 3, 24, 80, seed=21)
    assert_distinct(q, w, keys, "fp8_block", 119, 2, 5)
    run_both(q, w, keys, pos0=119, topk=5, rate=2, fmt="fp8_block", config={"BLOCK_T": 16, "num_warps": 2})


@pytest.mark.parametrize("pos0", [7, torch.tensor([7, 0])])
def test_the_last_score_program_selects(pos0, monkeypatch):
    """SUM_IN_KERNEL: the last of each query's score programs picks its top-k (no top-k launch): the top-k
    kernel's picks exactly, at an int and a device position, with several score programs a query; over counters
    that are the first of a larger buffer whose sentinel past them must stay, and which end zero. Too few
    counters: true names why, 'auto' launches the top-k kernel."""
    q, w, keys = make_case("fp8_block", 2, 3, 3, 24, 40, seed=23)
    kw = dict(state=(keys,), pos0=pos0, topk=4, rate=1, key_format="fp8_block", **SCALES)
    launches = []
    for name in ("_score_kernel", "_topk_kernel"):
        monkeypatch.setattr(module, name, type("Counted", (), {"__getitem__": lambda self, grid, real=getattr(
            module, name), name=name: (launches.append(name), real[grid])[1]})())
    config = {"BLOCK_T": 4}  # 2 to 3 tiles a query (device position: 2 programs a query off a GPU)
    separate = index_topk(q, w, **kw, config={**config, "SUM_IN_KERNEL": False})
    assert launches == ["_score_kernel", "_topk_kernel"]
    needed = 2 * 3
    buffer = torch.full((16,), 7, dtype=torch.int32)
    buffer[:needed] = 0
    monkeypatch.setattr(common, "_COUNTERS", {torch.device("cpu"): buffer[:needed]})
    monkeypatch.setattr(common, "TILE_COUNTERS", needed)
    assert torch.equal(index_topk(q, w, **kw, config={**config, "SUM_IN_KERNEL": True}), separate)
    assert launches[2:] == ["_score_kernel"]
    assert not buffer[:needed].any() and (buffer[needed:] == 7).all()
    assert torch.equal(separate, ref_topk(q, w, **{**kw, "pos0": 7}))
    monkeypatch.setattr(common, "TILE_COUNTERS", needed - 1)
    with pytest.raises(ValueError, match=r"SUM_IN_KERNEL.*at most 5 arrival counters \(6 here\)"):
        index_topk(q, w, **kw, config={**config, "SUM_IN_KERNEL": True})
    assert torch.equal(index_topk(q, w, **kw, config=config), separate)
    assert launches[3:] == ["_score_kernel", "_topk_kernel"]


def test_a_device_position_needs_dense_keys():
    q, w, keys = make_case("f32", 1, 1, 2, 8, 4, seed=0)
    with pytest.raises(ValueError, match="tiered store"):
        index_topk(q, w, state=(make_store(keys),), pos0=torch.tensor([5]), topk=2, rate=2, **SCALES)


def test_launcher_is_registered():
    assert module.LAUNCHERS == {"index_topk": index_topk, "rope_index_topk": rope_index_topk}


@pytest.mark.parametrize("fmt", ["bf16", "fp8_block"])
@pytest.mark.parametrize("config", [{"BLOCK_T": 4}, {"BLOCK_T": 4, "SUM_IN_KERNEL": False}], ids=["select", "apart"])
def test_rope_index_topk_is_the_rope_kernel_then_index_topk(fmt, config, monkeypatch):
    """One launch (with SUM_IN_KERNEL): every score program rotates its query's rows (the rope kernel's code),
    bit for bit the rope kernel then index_topk: the scores and the picks, at an int and a device position, with
    a RoPE scale and an inverse one, over several score programs a query; within the reference's picks. The rope
    kernel is not launched. Decode and a prefill, each token at its own position; 5 heads (a padded head block)
    and 21 (two passes of 16 heads, the second padded)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8)  # 4 pairs: the last 8 of 24 channels
    for batch, s, pos0, seed, heads in [(2, 1, 30, 81, 5), (1, 4, 9, 82, 21)]:
        q, w, keys = make_case(fmt, batch, s, heads, 24, 40, seed=seed)
        positions = torch.arange(pos0, pos0 + s)
        for q_rope in ({"inverse": True}, {"scale": 0.8}):
            roped = rope_kernel(q, positions, inv_freq, **q_rope)
            kw = dict(state=(keys,), topk=5, rate=1, key_format=fmt, config=config, **SCALES)
            for pos in (pos0, torch.tensor([pos0, 7])):
                apart = index_topk(roped, w, **kw, pos0=pos)
                with monkeypatch.context() as m:
                    m.setattr(norm, "_rope_kernel", None)  # (not launched)
                    ours = rope_index_topk(q, w, positions, inv_freq, **kw, pos0=pos, q_rope=q_rope)
                assert torch.equal(ours, apart), (batch, s, pos)
                scores = dict(pos0=pos, rate=1, key_format=fmt, cfg=_config(config), **SCALES)
                rope = (positions, inv_freq, q_rope.get("inverse", False), q_rope.get("scale", 1.0))
                ours_scores, apart_scores = (index_scores(x, w, keys, **scores, rope=r) for x, r in ((q, rope),
                                                                                                    (roped, None)))
                causal = pos0 + 1  # (every token's; at a device position later scores are not written)
                assert torch.equal(ours_scores[..., :causal], apart_scores[..., :causal])
            ref = ref_rope_topk(q, w, positions, inv_freq, state=(keys,), pos0=pos0, topk=5, rate=1, key_format=fmt,
                                q_rope=q_rope, **SCALES)
            assert (ours == ref).float().mean() >= 0.8  # (the rope kernel's rounding may swap a near tie)


def test_rope_index_topk_checks_its_rope():
    q, w, keys = make_case("f32", 1, 2, 3, 24, 8, seed=83)
    kw = dict(state=(keys,), pos0=4, topk=2, rate=1, **SCALES)
    positions, inv_freq = torch.arange(4, 6), torch.ones(4)
    for changes, message in [
        (dict(q_rope={"theta": 1}), "q_rope: expected the rope's attributes"),
        (dict(positions=positions[:1]), r"positions: expected \[2\] \(one per token\)"),
        (dict(positions=positions.float()), "positions: dtype"),
        (dict(inv_freq=torch.ones(13)), "inv_freq: 13 pairs do not fit 24 channels"),
    ]:
        call = {"positions": positions, "inv_freq": inv_freq, "q_rope": {}, **changes}
        with pytest.raises(ValueError, match=message):
            rope_index_topk(q, w, call.pop("positions"), call.pop("inv_freq"), **kw, **call)


def bad(**changes):
    q, w, keys = make_case("fp8_block", 1, 2, 2, 8, 4, seed=0)
    call = dict(q=q, weights=w, state=(keys,), pos0=4, topk=2, rate=2, key_format="fp8_block", **SCALES)
    call.update(changes)
    return call


@pytest.mark.parametrize("changes, message", [
    ({"key_format": "fp8_split"}, "key_format"),
    ({"key_format": "fp4_block"}, "state\\[0\\]"),  # fp8_block storage given as fp4_block
    ({"key_format": "f32"}, "state\\[0\\].*dtype"),
    ({"state": (torch.zeros(1, 4, 12, dtype=torch.uint8).transpose(1, 2),)}, "contiguous"),
    ({"weights": torch.ones(1, 2, 3)}, "weights"),
    ({"q": torch.ones(1, 2, 2, 8, dtype=torch.int64)}, "q: dtype"),
    ({"rate": 0}, "rate"),
    ({"topk": -1}, "topk"),
    ({"pos0": 40}, "capacity"),
    ({"pos0": torch.tensor([4], dtype=torch.int32)}, "int64"),
    ({"pos0": -1}, "pos0"),
    ({"config": {"BLOCK_T": 24}}, "BLOCK_T"),
    ({"config": {"BLOCK_N": 16}}, "unknown keys"),
])
def test_rejects_unsupported_input(changes, message):
    with pytest.raises(ValueError, match=message):
        index_topk(**bad(**changes))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_larger_shapes(fmt):
    """Several key tiles and heads, topk merged over many tiles, and topk larger than a tile."""
    q, w, keys = make_case(fmt, 2, 5, 19, 64, 120, seed=32)  # a seed whose top-41 scores are well apart
    assert_distinct(q, w, keys, fmt, 200, 2, 40)
    run_both(q, w, keys, pos0=200, topk=7, rate=2, fmt=fmt, config={"BLOCK_T": 16})
    run_both(q, w, keys, pos0=200, topk=40, rate=2, fmt=fmt)
    q, w, keys = make_case(fmt, 1, 4, 3, 16, 64, seed=33, integer=True)
    if fmt != "fp8_block":  # fp8_block's fp32 scales make integer data inexact
        run_both(q, w, keys, pos0=120, topk=33, rate=2, fmt=fmt)
