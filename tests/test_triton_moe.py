"""Triton MoE kernels (targets/triton/kernels/moe.py: experts, router.py: routers) against the runtime's
torch kernels, under the Triton interpreter (conftest sets TRITON_INTERPRET=1).

Tolerances: the expert GEMMs sum in another order than torch, so fp32 results agree to
max|ours - ref| <= 1e-5 * max|ref| (bf16 inputs are upcast exactly, so the same bound holds).
The activation fake-quant and the e4m3 rounding are bitwise identical to runtime/quant.py; the
router selects exactly the reference's experts (ties included), weights to 1e-6 relative.
"""

import pytest
import torch
import triton
import triton.language as tl

from v4c.runtime.kernels.moe import moe_experts as ref_experts
from v4c.runtime.kernels.moe import route_hash as ref_hash
from v4c.runtime.kernels.moe import route_topk as ref_topk
from v4c.runtime.kernels.quantized import moe_experts_q as ref_experts_q
from v4c.runtime.quant import fake_quant_act, quant_fp4, quant_fp8
from v4c.targets.triton import kernels
from v4c.targets.triton.kernels import common, moe, moe_quant, router
from v4c.targets.triton.kernels.moe import LAUNCHERS, _act, _load_chunk, _quant_chunk, _segment_scale, moe_experts
from v4c.targets.triton.kernels.moe_quant import moe_experts_q
from v4c.targets.triton.kernels.router import route_hash, route_topk

EXPERTS_RTOL = 1e-5  # relative to max |ref|
ROUTER_RTOL = 1e-6


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_close(ours, ref, rtol):
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    err = float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
    assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"


def problem(b, s, d, inter, e, k, seed, dtype=torch.float32):
    g = gen(seed)
    x = torch.randn(b, s, d, generator=g).to(dtype)
    weights = torch.rand(b, s, k, generator=g).to(dtype)
    idx = torch.randint(0, e, (b, s, k), generator=g)
    gate_up = (torch.randn(e, 2 * inter, d, generator=g) / d ** 0.5).to(dtype)
    down = (torch.randn(e, d, inter, generator=g) / inter ** 0.5).to(dtype)
    return x, weights, idx, gate_up, down


DYN = {"mode": "dynamic", "group": 16}
DYN_UE = {"mode": "dynamic", "group": 20, "scale_format": "ue8m0"}
DYN_WIDE = {"mode": "dynamic", "group": 100}  # several chunks per group, and a group past K
STATIC = {"mode": "static", "scale": 0.01}
NONE = {"mode": "none"}


# --- building blocks -----------------------------------------------------------------------------
def near_pow2_group(row, col, e):
    """At row[col]: an amax one ulp above 448 * 2^e, its UE8M0 scale just above a power of two (exactly
    2^(e+1); exp2(ceil(log2(.))) gives 2^e); after it (3, -5, 7) * 2^(e-9), which quantize differently."""
    row[col] = (torch.tensor(448 * 2.0**e).view(torch.int32) + 1).view(torch.float32)
    row[col + 1:col + 4] = torch.tensor([3.0, -5.0, 7.0]) * 2.0**(e - 9)


@triton.jit
def _fake_quant_kernel(x_ptr, out_ptr, R, K, act_scale, SEG, ACT: tl.constexpr, NCHUNK: tl.constexpr,
                       UE8M0: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """The experts kernels' operand path alone: out = q(x) for x [R, K]."""
    rows = tl.arange(0, BM)
    for k0 in range(0, K, SEG):
        s = _segment_scale(x_ptr, rows, rows < R, k0, K, act_scale, SEG, ACT, NCHUNK, UE8M0, BK)
        for c in tl.static_range(NCHUNK):
            a = _quant_chunk(_load_chunk(x_ptr, rows, rows < R, k0, c, K, SEG, BK), s, ACT, NCHUNK == 1, UE8M0)
            kk = c * BK + tl.arange(0, BK)
            mask = (rows < R)[:, None] & ((kk < SEG) & (k0 + kk < K))[None, :]
            tl.store(out_ptr + rows[:, None] * K + (k0 + kk)[None, :], a, mask=mask)


@pytest.mark.parametrize("act", [DYN, DYN_UE, DYN_WIDE, STATIC, NONE, {"mode": "dynamic", "group": 7},
                                 {"mode": "dynamic", "group": 128, "scale_format": "ue8m0"}])
@pytest.mark.parametrize("block_k", [16, 32])
def test_fused_activation_quant_is_fake_quant_act(act, block_k):
    r, k = 9, 53
    x = torch.randn(r, k, generator=gen(3)) * torch.logspace(-3, 1, k)
    x[2] = 0.0  # amax below the 1e-4 floor
    x[3], x[4] = torch.randn(2, k, generator=gen(4)) * 2.0**-40
    for row, col, e in [(3, 0, -20), (3, 22, -22), (3, 41, -11), (4, 3, -10), (4, 36, -13)]:
        near_pow2_group(x[row], col, e)
    out = torch.empty_like(x)
    _fake_quant_kernel[(1,)](x, out, r, k, BM=16, **_act("act", act, k, block_k))
    assert torch.equal(out, fake_quant_act(x, act))


# --- routed experts ------------------------------------------------------------------------------
EXPERT_CASES = [  # (b, s, d, inter, e, k), limit, act_in, act_mid
    ((2, 7, 48, 40, 5, 3), None, None, None),
    ((1, 5, 33, 17, 7, 2), 0.4, None, None),
    ((3, 4, 40, 24, 3, 1), 1.5, DYN, STATIC),
    ((1, 9, 37, 20, 6, 4), None, DYN_UE, DYN_WIDE),
]


@pytest.mark.parametrize("shape, limit, act_in, act_mid", EXPERT_CASES)
def test_moe_experts_matches_reference(shape, limit, act_in, act_mid):
    x, weights, idx, gate_up, down = problem(*shape, seed=sum(shape))
    ours = moe_experts(x, weights, idx, gate_up, down, limit=limit, act_in=act_in, act_mid=act_mid)
    ref = ref_experts(x, weights, idx, gate_up, down, limit=limit, act_in=act_in, act_mid=act_mid)
    assert_close(ours, ref, EXPERTS_RTOL)


def test_moe_experts_bf16_repeats_and_idle_experts():
    x, weights, idx, gate_up, down = problem(2, 5, 24, 18, 9, 3, seed=5, dtype=torch.bfloat16)
    idx[0, 1] = torch.tensor([4, 4, 2])  # one expert twice for a token (hash tables may repeat)
    idx[idx == 7] = 8  # expert 7 idle
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # a strided view
    ours = moe_experts(x, weights, idx.int(), gate_up, down, limit=0.7)
    assert_close(ours, ref_experts(x, weights, idx, gate_up, down, limit=0.7), EXPERTS_RTOL)


@pytest.mark.parametrize("config", [{"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 16},
                                    {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64},
                                    {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3}])
def test_moe_experts_launch_configs(config):
    x, weights, idx, gate_up, down = problem(3, 11, 50, 36, 4, 2, seed=6)
    ours = moe_experts(x, weights, idx, gate_up, down, act_in=DYN_WIDE, config=config)
    assert_close(ours, ref_experts(x, weights, idx, gate_up, down, act_in=DYN_WIDE), EXPERTS_RTOL)


def quantized(gate_up, down, fmt, block, down_block, scale_format):
    def stack(ws, blk):
        qs = [quant_fp4(w) if fmt == "fp4" else quant_fp8(w, blk, scale_format) for w in ws]
        return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    return (*stack(gate_up, block), *stack(down, down_block))


Q_CASES = [  # fmt, block, down_block, scale_format, act_in, act_mid, limit
    ("fp8", [32, 16], [16, 32], "fp32", DYN, DYN_UE, None),
    ("fp8", [128, 128], [7, 5], "ue8m0", DYN_UE, STATIC, 0.6),
    ("fp4", None, None, "ue8m0", DYN, DYN, None),
    ("fp4", [1, 32], [1, 32], "ue8m0", NONE, DYN_WIDE, 1.2),
]


@pytest.mark.parametrize("fmt, block, down_block, scale_format, act_in, act_mid, limit", Q_CASES)
def test_moe_experts_q_matches_reference(fmt, block, down_block, scale_format, act_in, act_mid, limit):
    x, weights, idx, gate_up, down = problem(2, 6, 64, 34, 5, 2, seed=7)
    q = quantized(gate_up, down, fmt, block, down_block, scale_format)
    kw = {"format": fmt, "block": block, "down_block": down_block, "act_in": act_in, "act_mid": act_mid, "limit": limit}
    assert_close(moe_experts_q(x, weights, idx, *q, **kw), ref_experts_q(x, weights, idx, *q, **kw), EXPERTS_RTOL)


@pytest.mark.parametrize("act_in,act_mid", [({"mode": "dynamic", "group": 32, "scale_format": "ue8m0"}, STATIC),
                                            (STATIC, {"mode": "dynamic", "group": 64})])
def test_fp8_dot_and_fp32_dot_agree(act_in, act_mid):
    """DeepSeek-like blocks (every K chunk in one block column): both GEMMs take the fp8 tensor-core dot
    (checked through _fp8_dot_applies), and FP8_DOT false (fp32 dots over dequantized tiles) gives the same."""
    x, weights, idx, gate_up, down = problem(2, 5, 96, 64, 4, 2, seed=10)
    q = quantized(gate_up, down, "fp8", [32, 32], [64, 32], "ue8m0")
    kw = {"format": "fp8", "block": [32, 32], "down_block": [64, 32], "act_in": act_in, "act_mid": act_mid}
    for w, scale, blk, act, k in ((q[0], q[1], [32, 32], act_in, 96), (q[2], q[3], [64, 32], act_mid, 64)):
        assert moe._fp8_dot_applies(moe._weight(w, scale, "fp8", blk), moe._act("act", act, k, 32), k)
    ref = ref_experts_q(x, weights, idx, *q, **kw)
    for fp8_dot in (True, False):
        assert_close(moe_experts_q(x, weights, idx, *q, **kw, config={"FP8_DOT": fp8_dot}), ref, EXPERTS_RTOL)
    with pytest.raises(ValueError, match="FP8_DOT"):
        moe_experts_q(x, weights, idx, *q, **kw, config={"FP8_DOT": "yes"})


ONCE_CASES = [  # fmt, block, down_block, act_in, act_mid, config
    ("fp8", [32, 32], [64, 32], {"mode": "dynamic", "group": 32, "scale_format": "ue8m0"},
     {"mode": "dynamic", "group": 64}, {"FP8_DOT": True, "BLOCK_K": 32}),
    ("fp8", [32, 16], [16, 32], DYN, DYN_UE, {"FP8_DOT": False}),
    ("fp8", [128, 128], [7, 5], DYN_WIDE, {"mode": "dynamic", "group": 7}, {"BLOCK_K": 16}),
    ("fp4", None, None, DYN_WIDE, DYN, {}),
    ("float", None, None, DYN_UE, DYN_WIDE, {"BLOCK_N": 16}),
]


@pytest.mark.parametrize("fmt, block, down_block, act_in, act_mid, config", ONCE_CASES)
def test_activations_quantized_once_equal_the_fused_path(fmt, block, down_block, act_in, act_mid, config):
    """QUANT_ONCE: dynamic activations quantized once by quantize.act_quant (per token for gate_up, per pair for
    down), then e4m3 codes in the grouped GEMMs: the fused path's output bit for bit, with both dots, groups
    of one chunk, of several chunks, and over all of K, and every weight format."""
    x, weights, idx, gate_up, down = problem(2, 7, 64, 34, 5, 3, seed=12)
    if fmt == "float":
        run, q, kw = moe_experts, (gate_up, down), {"act_in": act_in, "act_mid": act_mid, "limit": 0.8}
        ref = ref_experts(x, weights, idx, *q, **kw)
    else:
        run, q = moe_experts_q, quantized(gate_up, down, fmt, block, down_block, "ue8m0")
        kw = {"format": fmt, "block": block, "down_block": down_block, "act_in": act_in, "act_mid": act_mid}
        ref = ref_experts_q(x, weights, idx, *q, **kw)
    fused = run(x, weights, idx, *q, **kw, config={**config, "QUANT_ONCE": False})
    once = run(x, weights, idx, *q, **kw, config={**config, "QUANT_ONCE": True})
    assert torch.equal(once, fused)
    assert_close(once, ref, EXPERTS_RTOL)


@pytest.mark.parametrize("fmt, block, down_block, act_in, act_mid, config",
                         [c for c in ONCE_CASES if c[0] != "float"])
def test_experts_reading_norm_codes_equal_the_unfused_steps(fmt, block, down_block, act_in, act_mid, config):
    """x_scale (the fuse pass: rms_norm_quant wrote gate_up's input as e4m3 codes and group scales): the experts
    give, bit for bit, what the unfused steps give (the rms_norm kernel, then the experts quantizing its output
    per tile or once), and the reference's result on the reference's codes; strided codes are read."""
    from v4c.runtime.kernels.quantized import rms_norm_quant as ref_rms_norm_quant
    from v4c.targets.triton.kernels.norm import rms_norm, rms_norm_quant
    _, weights, idx, gate_up, down = problem(2, 7, 64, 34, 5, 3, seed=12)
    h = torch.randn(2, 7, 64, generator=gen(14)) * 3
    q = quantized(gate_up, down, fmt, block, down_block, "ue8m0")
    kw = {"format": fmt, "block": block, "down_block": down_block, "act_in": act_in, "act_mid": act_mid}
    norm = {"eps": 1e-6, "group": act_in["group"], "scale_format": act_in.get("scale_format", "fp32")}
    codes, scales = rms_norm_quant(h, **norm)
    pre = moe_experts_q(codes, weights, idx, *q, scales, **kw, config=config)
    for once in (False, True):
        unfused = moe_experts_q(rms_norm(h, eps=1e-6), weights, idx, *q, **kw, config={**config, "QUANT_ONCE": once})
        assert torch.equal(pre, unfused), f"QUANT_ONCE {once}"
    ref_codes, ref_scales = ref_rms_norm_quant(h, **norm)
    assert_close(pre, ref_experts_q(ref_codes, weights, idx, *q, ref_scales, **kw), EXPERTS_RTOL)
    c_t, s_t = codes.transpose(0, 1), scales.transpose(0, 1)  # strided codes and scales
    w_t, i_t = weights.transpose(0, 1), idx.transpose(0, 1)
    assert torch.equal(moe_experts_q(c_t, w_t, i_t, *q, s_t, **kw, config=config),
                       moe_experts_q(c_t.contiguous(), w_t, i_t, *q, s_t.contiguous(), **kw, config=config))


def test_experts_reading_codes_are_checked():
    _, weights, idx, gate_up, down = problem(1, 3, 32, 16, 4, 2, seed=13)
    q = quantized(gate_up, down, "fp8", [16, 16], [16, 16], "fp32")
    kw = {"format": "fp8", "block": [16, 16], "down_block": [16, 16], "act_in": DYN, "act_mid": DYN}
    codes, scales = torch.randn(1, 3, 32, generator=gen(15)).to(torch.float8_e4m3fn), torch.ones(1, 3, 2)
    cases = [
        (lambda: moe_experts_q(codes, weights, idx, *q, **kw), "^x: expected a float"),  # codes need their scales
        (lambda: moe_experts_q(codes.float(), weights, idx, *q, scales, **kw), "^x: expected e4m3 codes"),
        (lambda: moe_experts_q(codes, weights, idx, *q, torch.ones(1, 3, 3), **kw),
         r"^x_scale: expected fp32 \[1, 3, 2\]"),
        (lambda: moe_experts_q(codes, weights, idx, *q, scales.double(), **kw), "^x_scale: dtype"),
        (lambda: moe_experts_q(codes, weights, idx, *q, scales, **{**kw, "act_in": STATIC}), "act_in mode dynamic"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("tokens", [1, 5, 17])
@pytest.mark.parametrize("config", [{}, {"BLOCK_N": 16, "BLOCK_M": 16}])
def test_combine_in_the_down_gemm_equals_the_combine_kernel(tokens, config, monkeypatch):
    """SUM_IN_KERNEL: the last of each down column block's programs adds every token's pair rows (one launch
    fewer): the combine kernel's sums bit for bit, at 1 to 17 tokens (past COMBINE_TOKENS only when asked), over
    counters that are the first of a larger buffer whose sentinel past them must stay, and which end zero."""
    x, weights, idx, gate_up, down = problem(1, tokens, 50, 36, 4, 3, seed=14)
    q = quantized(gate_up, down, "fp8", [32, 16], [16, 32], "fp32")
    kw = {"format": "fp8", "block": [32, 16], "down_block": [16, 32], "act_in": DYN, "act_mid": DYN_UE}
    launches = []
    real = moe._combine_kernel
    monkeypatch.setattr(moe, "_combine_kernel", type("Counted", (), {"__getitem__": lambda self, grid: (
        launches.append(grid), real[grid])[1]})())
    separate = moe_experts_q(x, weights, idx, *q, **kw, config={**config, "SUM_IN_KERNEL": False})
    assert len(launches) == 1
    needed = -(-50 // config.get("BLOCK_N", moe.EXPERT_CONFIG["BLOCK_N"]))
    buffer = torch.full((64,), 7, dtype=torch.int32)
    buffer[:needed] = 0
    monkeypatch.setattr(common, "_COUNTERS", {torch.device("cpu"): buffer[:needed]})
    monkeypatch.setattr(common, "TILE_COUNTERS", needed)
    fused = moe_experts_q(x, weights, idx, *q, **kw, config={**config, "SUM_IN_KERNEL": True})
    auto = moe_experts_q(x, weights, idx, *q, **kw, config=config)
    assert len(launches) == 1 + (tokens > moe.COMBINE_TOKENS)  # 'auto' past COMBINE_TOKENS: the combine kernel
    assert torch.equal(fused, separate) and torch.equal(auto, separate)
    assert not buffer[:needed].any() and (buffer[needed:] == 7).all()
    assert_close(fused, ref_experts_q(x, weights, idx, *q, **kw), EXPERTS_RTOL)


def test_combine_in_the_down_gemm_needs_its_counters(monkeypatch):
    """Fewer arrival counters than down column blocks: SUM_IN_KERNEL true names why not, 'auto' combines in the
    combine kernel (the same result)."""
    x, weights, idx, gate_up, down = problem(2, 3, 50, 36, 4, 2, seed=15)
    expected = moe_experts(x, weights, idx, gate_up, down, config={"SUM_IN_KERNEL": False})
    monkeypatch.setattr(common, "TILE_COUNTERS", 1)  # 50 channels: 2 column blocks of 32
    with pytest.raises(ValueError, match=r"SUM_IN_KERNEL.*at most 1 arrival counters \(2 here\)"):
        moe_experts(x, weights, idx, gate_up, down, config={"SUM_IN_KERNEL": True})
    assert torch.equal(moe_experts(x, weights, idx, gate_up, down), expected)
    with pytest.raises(ValueError, match="SUM_IN_KERNEL"):
        moe_experts(x, weights, idx, gate_up, down, config={"SUM_IN_KERNEL": "yes"})


def test_quant_once_auto_from_64_pairs(monkeypatch):
    """"auto" quantizes once from 64 (token, expert) pairs on, for both GEMMs; true insists on dynamic
    activations and names what it needs."""
    calls = []
    monkeypatch.setattr(moe, "act_quant", lambda a, *args: calls.append(a.shape) or kernels.quantize.act_quant(a, *args))
    dyn = {"act_in": DYN, "act_mid": DYN_UE}
    for tokens, want in ((16, [(16, 1, 48), (64, 1, 40)]), (15, [])):
        x, weights, idx, gate_up, down = problem(1, tokens, 48, 40, 6, 4, seed=13)
        calls.clear()
        ours = moe_experts(x, weights, idx, gate_up, down, **dyn)
        assert calls == want
        assert_close(ours, ref_experts(x, weights, idx, gate_up, down, **dyn), EXPERTS_RTOL)
    with pytest.raises(ValueError, match="QUANT_ONCE.*needs dynamic"):
        moe_experts(x, weights, idx, gate_up, down, act_in=STATIC, act_mid=DYN, config={"QUANT_ONCE": True})
    with pytest.raises(ValueError, match="QUANT_ONCE"):
        moe_experts(x, weights, idx, gate_up, down, **dyn, config={"QUANT_ONCE": "yes"})


@pytest.mark.parametrize("tokens,k,experts,ids", [(1, 6, 64, "distinct"), (3, 6, 256, "distinct"),
                                                  (10, 6, 64, "distinct"), (30, 2, 2, "distinct"),
                                                  (7, 4, 3, "repeats"), (1, 1, 1, "distinct")])
def test_pair_bookkeeping_in_the_gate_up_programs(tokens, k, experts, ids, monkeypatch):
    """PAIRS_IN_KERNEL (auto: up to 64 pairs): no bookkeeping launch; every gate_up program sorts the pairs from
    their [P, P] comparisons (pairs.pair_tiles) and writes the weights, slot rows and tiles the down GEMM and the
    combine read: exactly the torch bookkeeping's (the tile list too, unused tiles included), and the experts' output
    bit for bit as with the _pairs_kernel launch. 30 x 2 pairs over 2 experts: several tiles an expert; a hash table
    may repeat an expert within a token."""
    g = gen(tokens * k)
    d, inter = 40, 24
    if ids == "distinct":
        idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]).view(1, tokens, k)
    else:
        idx = torch.randint(0, experts, (1, tokens, k), generator=g)
    x, weights, _, gate_up, down = problem(1, tokens, d, inter, experts, k, seed=tokens)
    q = quantized(gate_up, down, "fp8", [16, 16], [16, 16], "fp32")
    kw = {"format": "fp8", "block": [16, 16], "down_block": [16, 16], "act_in": DYN, "act_mid": DYN_UE}
    written, sorted_by = [], []
    monkeypatch.setattr(moe, "pair_arrays", lambda *a: written.append(kernels.pairs.pair_arrays(*a)) or written[-1])
    monkeypatch.setattr(moe, "sort_pairs", lambda *a: sorted_by.append(kernels.pairs.sort_pairs(*a)) or sorted_by[-1])
    ours = moe_experts_q(x, weights, idx, *q, **kw)
    separate = moe_experts_q(x, weights, idx, *q, **kw, config={"PAIRS_IN_KERNEL": False})
    assert len(written) == 1 and len(sorted_by) == 1 and torch.equal(ours, separate)
    want = kernels.pairs.sort_pairs_torch(idx.view(tokens, k), weights.view(tokens, k), experts, 16)
    _, pw, slot_rows, tiles = written[0]
    for a, b in zip((pw, slot_rows, *tiles), (want[1], want[2], *want[3])):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert_close(ours, ref_experts_q(x, weights, idx, *q, **kw), EXPERTS_RTOL)


def test_pair_bookkeeping_in_the_gate_up_programs_is_for_a_few_pairs():
    """Past 64 pairs 'auto' launches the bookkeeping kernel; true names the limit."""
    x, weights, idx, gate_up, down = problem(1, 17, 32, 16, 8, 4, seed=16)  # 68 pairs
    expected = moe_experts(x, weights, idx, gate_up, down, config={"PAIRS_IN_KERNEL": False})
    assert torch.equal(moe_experts(x, weights, idx, gate_up, down), expected)
    with pytest.raises(ValueError, match=r"PAIRS_IN_KERNEL.*at most 64 \(token, expert\) pairs \(here 68\)"):
        moe_experts(x, weights, idx, gate_up, down, config={"PAIRS_IN_KERNEL": True})


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("shape", [(2, 13, 96, 72, 11, 4), (1, 3, 32, 16, 2, 2)])
def test_moe_experts_q_larger(fmt, shape):
    x, weights, idx, gate_up, down = problem(*shape, seed=8)
    q = quantized(gate_up, down, fmt, [64, 32], [32, 48], "ue8m0")
    kw = {"format": fmt, "block": [64, 32], "down_block": [32, 48], "act_in": DYN_UE,
          "act_mid": {"mode": "dynamic", "group": 24}}
    assert_close(moe_experts_q(x, weights, idx, *q, **kw), ref_experts_q(x, weights, idx, *q, **kw), EXPERTS_RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_moe_experts_larger(dtype):
    x, weights, idx, gate_up, down = problem(3, 17, 160, 88, 16, 6, seed=9, dtype=dtype)
    for act_in, act_mid in ((None, None), (DYN_UE, {"mode": "dynamic", "group": 40})):
        ours = moe_experts(x, weights, idx, gate_up, down, limit=2.0, act_in=act_in, act_mid=act_mid)
        ref = ref_experts(x, weights, idx, gate_up, down, limit=2.0, act_in=act_in, act_mid=act_mid)
        assert_close(ours, ref, EXPERTS_RTOL)


# --- routers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("e, k", [(5, 2), (37, 6), (16, 16)])
def test_route_topk_matches_reference(score_func, e, k):
    g = gen(e + k)
    x, w, bias = torch.randn(2, 9, 40, generator=g), torch.randn(e, 40, generator=g), torch.randn(e, generator=g) * 0.1
    weights, idx = route_topk(x, w, bias, k=k, score_func=score_func, scale=2.5)
    ref_w, ref_i = ref_topk(x, w, bias, k=k, score_func=score_func, scale=2.5)
    assert idx.dtype == torch.int64 and torch.equal(idx, ref_i)
    assert_close(weights, ref_w, ROUTER_RTOL)


@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
def test_route_topk_ties_go_to_the_lower_index(score_func):
    g = gen(10)  # small integers: exact logits in any summation order, so many exact ties
    x = torch.randint(-1, 2, (3, 11, 6), generator=g).float()
    w = torch.randint(-1, 2, (24, 6), generator=g).to(torch.bfloat16)
    bias = torch.randint(0, 2, (24,), generator=g).float() * 0.25
    weights, idx = route_topk(x, w, bias, k=5, score_func=score_func, scale=1.0, config={"BLOCK_M": 32})
    ref_w, ref_i = ref_topk(x, w, bias, k=5, score_func=score_func, scale=1.0)
    assert torch.equal(idx, ref_i)
    assert_close(weights, ref_w, ROUTER_RTOL)
    _, idx0 = route_topk(torch.zeros(1, 1, 6), w, torch.zeros(24), k=4, score_func=score_func, scale=1.0)
    assert idx0.tolist() == [[[0, 1, 2, 3]]]


@pytest.mark.parametrize("score_func", ["sqrtsoftplus", "sigmoid", "softmax"])
@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_route_hash_matches_reference(score_func, table_dtype):
    g = gen(11)
    x, w = torch.randn(2, 7, 33, generator=g).to(torch.bfloat16), torch.randn(19, 33, generator=g)
    table = torch.randint(0, 19, (50, 3), generator=g).to(table_dtype)
    table[4] = torch.tensor([2, 2, 9])  # a repeated expert
    tokens = torch.randint(0, 50, (2, 7), generator=g)
    tokens[0, 0] = 4
    weights, idx = route_hash(x, w, table, tokens, score_func=score_func, scale=1.5)
    ref_w, ref_i = ref_hash(x, w, table, tokens, score_func=score_func, scale=1.5)
    assert idx.dtype == torch.int64 and torch.equal(idx, ref_i)
    assert_close(weights, ref_w, ROUTER_RTOL)


@pytest.mark.parametrize("hashed", [False, True])
@pytest.mark.parametrize("k", [3, 4])  # k + 1 slots: past a power of two (KP) and within one
def test_routers_append_the_shared_expert(hashed, k):
    """shared: the k routed slots as without it, then expert E (the shared expert's id) with weight 1."""
    g = gen(12 + k)
    x, w = torch.randn(3, 5, 40, generator=g), torch.randn(13, 40, generator=g)
    if hashed:
        table, tokens = torch.randint(0, 13, (30, k), generator=g), torch.randint(0, 30, (3, 5), generator=g)
        run = lambda route, **kw: route(x, w, table, tokens, score_func="sigmoid", scale=1.5, **kw)  # noqa: E731
        ours, ref, plain = run(route_hash, shared=True), run(ref_hash, shared=True), run(route_hash)
    else:
        bias = torch.randn(13, generator=g) * 0.1
        run = lambda route, **kw: route(x, w, bias, k=k, score_func="sigmoid", scale=1.5, **kw)  # noqa: E731
        ours, ref, plain = run(route_topk, shared=True), run(ref_topk, shared=True), run(route_topk)
    assert ours[0].shape == ours[1].shape == (3, 5, k + 1)
    assert torch.equal(ours[1], ref[1]) and torch.equal(ours[1][..., :k], plain[1])
    assert (ours[1][..., k] == 13).all() and (ours[0][..., k] == 1.0).all()
    assert torch.equal(ours[0][..., :k], plain[0])
    assert_close(ours[0], ref[0], ROUTER_RTOL)


# --- contract ------------------------------------------------------------------------------------
def test_launchers_are_registered():
    assert set(LAUNCHERS) == {"moe_experts"}
    assert set(moe_quant.LAUNCHERS) == {"moe_experts_q", "moe_experts_q_shared"}
    assert all(kernels.LAUNCHERS[name] is fn for name, fn in {**LAUNCHERS, **moe_quant.LAUNCHERS}.items())
    assert router.LAUNCHERS == {"route_topk": route_topk, "route_hash": route_hash}
    if "router" in kernels.MODULES:  # a new module: registered once the package lists it
        assert all(kernels.LAUNCHERS[name] is fn for name, fn in router.LAUNCHERS.items())


def test_empty_batch():
    x, weights, idx, gate_up, down = problem(1, 0, 16, 8, 3, 2, seed=12)
    assert moe_experts(x, weights, idx, gate_up, down).shape == (1, 0, 16)
    weights, idx = route_topk(x, torch.randn(4, 16), torch.zeros(4), k=2, score_func="sigmoid", scale=1.0)
    assert weights.shape == idx.shape == (1, 0, 2)


def test_rejects_unsupported_inputs():
    x, weights, idx, gate_up, down = problem(1, 3, 32, 16, 4, 2, seed=13)
    q = quantized(gate_up, down, "fp8", [16, 16], [16, 16], "fp32")
    kw = {"format": "fp8", "block": [16, 16], "down_block": [16, 16], "act_in": DYN, "act_mid": DYN}
    bad = [
        (lambda: moe_experts(x, weights, idx.float(), gate_up, down), "^idx"),
        (lambda: moe_experts(x, weights, idx + 4, gate_up, down), "^idx"),
        (lambda: moe_experts(x, weights, idx, gate_up[:, :, :31].contiguous(), down), "^x:"),
        (lambda: moe_experts(x, weights, idx, gate_up, down[:, :, :8]), "^down"),
        (lambda: moe_experts(x, weights, idx, gate_up.to(torch.float8_e4m3fn), down), "^gate_up"),
        (lambda: moe_experts(x, weights, idx, gate_up.transpose(1, 2), down), "^gate_up"),
        (lambda: moe_experts(x, weights, idx, gate_up, down, act_in={"mode": "int8"}), "^act_in"),
        (lambda: moe_experts(x, weights, idx, gate_up, down, act_mid={"mode": "dynamic", "group": 0}), "^act_mid"),
        (lambda: moe_experts(x, weights, idx, gate_up, down, config={"BLOCK_M": 24}), "BLOCK_M.*power of two"),
        (lambda: moe_experts(x, weights, idx, gate_up, down, config={"TILE": 16}), "unknown keys"),
        (lambda: moe_experts(x, weights, idx, gate_up, down, config={"num_warps": 3}), "num_warps.*power of two"),
        (lambda: moe_experts_q(x, weights, idx, *q, **{**kw, "format": "int4"}), "^format"),
        (lambda: moe_experts_q(x, weights, idx, *q, **{**kw, "block": [32, 16]}), "^gate_up_scale"),
        (lambda: moe_experts_q(x, weights, idx, q[0].float(), *q[1:], **kw), "^gate_up"),
        (lambda: moe_experts_q(x, weights, idx, *q, **{**kw, "act_mid": None}), "^act_mid"),
        (lambda: route_topk(x, torch.randn(4, 32), torch.zeros(4), k=5, score_func="sigmoid", scale=1.0), "^k"),
        (lambda: route_topk(x, torch.randn(4, 32), torch.zeros(4), k=2, score_func="relu", scale=1.0), "^score_func"),
        (lambda: route_topk(x, torch.randn(4, 32), torch.zeros(4), k=2, score_func="sigmoid", scale=1.0, shared=4),
         "^shared"),
        (lambda: route_topk(x, torch.randn(4, 31), torch.zeros(4), k=2, score_func="sigmoid", scale=1.0), "^x:"),
        (lambda: route_topk(x, torch.randn(4, 32), torch.zeros(5), k=2, score_func="sigmoid", scale=1.0), "^bias"),
        (lambda: route_topk(x, torch.randn(2048, 32), torch.zeros(2048), k=2, score_func="sigmoid", scale=1.0),
         "^weight: 2048 experts"),
        (lambda: route_hash(x, torch.randn(4, 32), torch.randint(0, 4, (9, 2)), torch.full((1, 3), 9),
                            score_func="sigmoid", scale=1.0), "^tokens"),
        (lambda: route_hash(x, torch.randn(4, 32), torch.full((9, 2), 4), torch.zeros(1, 3, dtype=torch.long),
                            score_func="sigmoid", scale=1.0), "^table"),
    ]
    for fn, word in bad:
        with pytest.raises(ValueError, match=word):
            fn()
