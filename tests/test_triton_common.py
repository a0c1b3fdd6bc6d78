"""The shared device helpers of targets/triton/kernels/common.py (run in the Triton interpreter) against
torch's casts and runtime/quant.py, on every code of each format, the midpoints between neighbouring
codes (ties), their fp32 neighbours and random bit patterns; and the host-side launch_config."""

import pytest
import torch
import triton
import triton.language as tl

from v4c.runtime.quant import FP4_VALUES, entry_layout, pow2_ceil, quant_fp4
from v4c.targets.triton.kernels import common
from v4c.targets.triton.kernels.common import (bf16_bits, bf16_value, ceil_log2, e2m1_code, e2m1_value, e4m3_code,
                                               e4m3_quant, fake_quant, group_scale, launch_config, pow2, round_e4m3,
                                               ue8m0_value)
from v4c.targets.triton.kernels.common import pow2_ceil as kernel_pow2_ceil

INF = torch.tensor(float("inf"))


def boundary_values(values: torch.Tensor) -> torch.Tensor:
    """The finite values of a format, the midpoints of neighbours (ties), and the fp32 neighbours of both, +-."""
    vals = values.float()
    vals = vals[vals.isfinite()].unique()
    both = torch.cat([vals, (vals[1:] + vals[:-1]) / 2])
    near = torch.cat([both, both.nextafter(INF), both.nextafter(-INF)])
    return torch.cat([near, -near])


def random_floats(n, seed, hi=0x7F800000):
    """n fp32 values of random bit patterns with |x| below the pattern `hi`, random signs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, hi, (n,), generator=g, dtype=torch.int32).view(torch.float32)
    return x * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)


@triton.jit
def _unary_kernel(x_ptr, out_ptr, n, OP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    if OP == "e4m3_code":
        y = e4m3_code(x)
    elif OP == "round_e4m3":
        y = round_e4m3(x)
    elif OP == "bf16_bits":
        y = bf16_bits(x)
    elif OP == "bf16_value":
        y = bf16_value(x)
    elif OP == "e2m1_code":
        y = e2m1_code(x)
    elif OP == "e2m1_value":
        y = e2m1_value(x)
    elif OP == "pow2":
        y = pow2(x)
    elif OP == "ceil_log2":
        y = ceil_log2(x)
    elif OP == "pow2_ceil":
        y = kernel_pow2_ceil(x)
    elif OP == "ue8m0_value":
        y = ue8m0_value(x)
    elif OP == "group_scale":
        y = group_scale(x, 448.0, False)
    elif OP == "group_scale_ue8m0":
        y = group_scale(x, 448.0, True)
    else:  # group_scale_fp4
        y = group_scale(x, 6.0, True)
    tl.store(out_ptr + offs, y, mask=mask)


def run(op, x, out_dtype):
    out = torch.empty(x.shape, dtype=out_dtype)
    block = 4096
    _unary_kernel[(triton.cdiv(x.numel(), block),)](x.contiguous(), out, x.numel(), OP=op, BLOCK=block)
    return out


def same(a, b):
    """Equal values, NaN where the other is NaN, and the same sign of zero."""
    return torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5)) and torch.equal(a.isnan(), b.isnan()) \
        and torch.equal(torch.signbit(a), torch.signbit(b) | b.isnan() & torch.signbit(a))


# --- float8 e4m3fn ---------------------------------------------------------------------------------
E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)


NANS = torch.tensor([0x7FC00000, 0x7F800001, 0x7FFFFFFF, -1, -0x400000], dtype=torch.int32).view(torch.float32)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, on signalling NaNs and inf
def test_e4m3_code_and_rounding_equal_torchs_cast():
    """Every code, tie and neighbour, random fp32 patterns (all magnitudes), inf and NaNs (torch saturates)."""
    special = torch.tensor([0.0, -0.0, 448.0, 463.99, 464.0, 479.99, 480.0, 1e30, float("inf"), 2.0**-10,
                            2.0**-9 * 1.5, 2.0**-9 * 0.5, 1e-30, 2.0**-6, 2.0**-6 * (1 - 2.0**-5)])
    x = torch.cat([boundary_values(E4M3), special, -special, NANS, random_floats(1 << 15, 1, 0x43E00001),
                   random_floats(1 << 13, 2)])
    ref = x.to(torch.float8_e4m3fn)
    assert torch.equal(run("e4m3_code", x, torch.int32).to(torch.uint8), ref.view(torch.uint8))
    assert same(run("round_e4m3", x, torch.float32), ref.float())


@triton.jit
def _quant_kernel(x_ptr, s_ptr, code_ptr, fq_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x, s = tl.load(x_ptr + offs, mask=mask), tl.load(s_ptr + offs, mask=mask, other=1.0)
    tl.store(code_ptr + offs, e4m3_quant(x, s), mask=mask)
    tl.store(fq_ptr + offs, fake_quant(x, s), mask=mask)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_e4m3_quant_and_fake_quant_clamp_and_keep_nan():
    x = torch.cat([boundary_values(E4M3) * 3, torch.tensor([1e6, -1e6, float("inf"), 0.0]), NANS])
    s = torch.full_like(x, 3.0)
    s[::7] = 0.37
    code, fq = torch.empty(x.shape, dtype=torch.int32), torch.empty_like(x)
    _quant_kernel[(1,)](x, s, code, fq, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    ref = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(code.to(torch.uint8), ref.view(torch.uint8))
    assert same(fq, ref.float() * s)


# --- bfloat16 --------------------------------------------------------------------------------------
def test_bf16_bits_and_value_equal_torch():
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = torch.cat([boundary_values(every[::3]), random_floats(1 << 14, 3),
                   torch.tensor([float("inf"), -float("inf"), -0.0, 3.3e38, -3.4e38])])
    assert torch.equal(run("bf16_bits", x, torch.int32).to(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    nan = run("bf16_bits", torch.tensor([float("nan"), -float("nan")]), torch.int32)
    assert nan.tolist() == [0x7FC0, 0x7FC0]  # a quiet NaN (torch's own NaN pattern depends on its code path)
    bits = every.view(torch.int16)
    assert same(run("bf16_value", bits, torch.float32), every.float())  # int16: sign-extended loads
    assert same(run("bf16_value", bits.to(torch.int32) & 0xFFFF, torch.float32), every.float())


# --- FP4 e2m1 --------------------------------------------------------------------------------------
def test_e2m1_code_is_quant_fp4s_nearest_code():
    """Rows of one 32-value block whose amax is 6 (scale 1): 31 values (every code, tie, neighbour, random) and 6."""
    x = torch.cat([boundary_values(FP4_VALUES), torch.tensor([1e-30, -1e-30, 0.0, -0.0]),
                   torch.randn(4000, generator=torch.Generator().manual_seed(4)) * 2])
    x = x[x.abs() <= 6]
    x = torch.cat([x, torch.zeros(-x.numel() % 31)]).view(-1, 31)
    x = torch.cat([x, torch.full((x.shape[0], 1), 6.0)], dim=1)
    packed, scale = quant_fp4(x)
    assert torch.equal(scale.float(), torch.ones_like(scale.float()))
    b = packed.view(torch.uint8).to(torch.int32)
    ref = torch.stack([b & 0xF, b >> 4], dim=-1).flatten()
    assert torch.equal(run("e2m1_code", x.flatten(), torch.int32), ref)
    assert run("e2m1_code", torch.tensor([7.0, -9.0, float("inf")]), torch.int32).tolist() == [7, 15, 7]  # saturates


def test_e2m1_value_decodes_every_code():
    assert same(run("e2m1_value", torch.arange(16, dtype=torch.int32), torch.float32), FP4_VALUES)
    assert same(run("e2m1_value", torch.arange(256, dtype=torch.int32).to(torch.uint8), torch.float32),
                FP4_VALUES.repeat(16))  # the low nibble


# --- powers of two, UE8M0 ------------------------------------------------------------------------
def test_pow2_from_bits():
    e = torch.arange(-149, 129, dtype=torch.int32)
    assert torch.equal(run("pow2", e, torch.float32), torch.ldexp(torch.ones(e.numel()), e))


def near_powers_of_two():
    """Positive normal fp32: powers of two 2^-126 .. 2^127, a few ulps either side, random patterns
    and the issue's example 2^-10 * (1 + 2^-23)."""
    p = torch.ldexp(torch.ones(254), torch.arange(-126, 128, dtype=torch.int32))
    bits = p.view(torch.int32)
    near = torch.cat([bits + k for k in (0, 1, 2, 3, -1, -2)]).view(torch.float32)
    x = torch.cat([near, random_floats(1 << 14, 5).abs(), torch.tensor([2.0**-10 * (1 + 2.0**-23)])])
    return x[(x >= 2.0**-126) & x.isfinite()]


def test_pow2_ceil_and_ceil_log2_are_exact():
    x = near_powers_of_two()
    ref = pow2_ceil(x)
    assert torch.equal(run("pow2_ceil", x, torch.float32), ref)
    m, e = torch.frexp(x)
    assert torch.equal(run("ceil_log2", x, torch.int32), e - (m == 0.5).int())
    probe = torch.tensor([2.0**-10 * (1 + 2.0**-23)])
    assert run("pow2_ceil", probe, torch.float32).item() == 2.0**-9  # exp2(ceil(log2(.))) gives 2^-10


def test_group_scale_matches_the_reference():
    """max(amax, 1e-4) / qmax, fp32 or UE8M0, as quant._scale / quant.fp4_scales; amax just above 448 * 2^k."""
    p = torch.ldexp(torch.full((60,), 448.0), torch.arange(-30, 30, dtype=torch.int32))
    amax = torch.cat([(p.view(torch.int32) + k).view(torch.float32) for k in (0, 1, 2, 3, -1)])
    amax = torch.cat([amax, random_floats(1 << 12, 6, 0x5F000000).abs(), torch.tensor([0.0, 1e-5, 1e-4])])
    floor = amax.clamp(min=1e-4)
    assert torch.equal(run("group_scale", amax, torch.float32), floor / 448)
    assert torch.equal(run("group_scale_ue8m0", amax, torch.float32), pow2_ceil(floor / 448))
    assert torch.equal(run("group_scale_fp4", amax, torch.float32), pow2_ceil(floor / 6))


def test_ue8m0_value_decodes_every_byte():
    b = torch.arange(256, dtype=torch.int32)
    ref = b.to(torch.uint8).view(torch.float8_e8m0fnu).float()
    assert same(run("ue8m0_value", b, torch.float32), ref)
    assert same(run("ue8m0_value", b.to(torch.uint8), torch.float32), ref)


# --- launch configs --------------------------------------------------------------------------------
def test_launch_config_merges_and_validates():
    defaults = {"BLOCK_M": 16, "block_r": 4, "num_warps": 4, "num_stages": 2, "other": 3}
    assert launch_config(None, defaults, "op") == defaults
    assert launch_config({"BLOCK_M": 64, "other": 5}, defaults, "op") == {**defaults, "BLOCK_M": 64, "other": 5}
    bad = [
        ({"BLOCK_N": 16}, r"^op: config: unknown keys \['BLOCK_N'\]; supported: \['BLOCK_M', 'block_r'"),
        ({"BLOCK_M": 24}, r"^op: config\['BLOCK_M'\]: expected a positive power of two, got 24 \(keys: \["),
        ({"block_r": 0}, r"config\['block_r'\]: expected a positive power of two"),
        ({"num_warps": 3}, r"config\['num_warps'\]: expected a positive power of two"),
        ({"BLOCK_M": True}, r"config\['BLOCK_M'\]: expected a positive power of two"),
        ({"BLOCK_M": 16.0}, r"config\['BLOCK_M'\]: expected a positive power of two"),
        ({"num_stages": 0}, r"config\['num_stages'\]: expected a positive int"),
        ({"BLOCK_M": 8}, r"^op: config\['BLOCK_M'\]: expected a power of two >= 16, got 8"),
    ]
    for config, message in bad:
        with pytest.raises(ValueError, match=message):
            launch_config(config, defaults, "op", at_least={"BLOCK_M": 16})
    with pytest.raises(ValueError, match="op: config: expected a dict or None"):
        launch_config([("BLOCK_M", 16)], defaults, "op")


def test_entry_layout_is_quants():
    names = {"f32": torch.float32, "bf16": torch.bfloat16, "u8": torch.uint8}
    for fmt in ("f32", "bf16", "fp8_split", "fp8_block", "fp4_block"):
        for d, rope in ((1, 0), (33, 0), (70, 4), (128, 0), (512, 64), (75, 75)):
            dtype, width = entry_layout(fmt, d, rope)
            assert common.entry_layout(fmt, d, rope) == (names[dtype], width), (fmt, d, rope)
    with pytest.raises(ValueError, match="KV format 'fp8' is not supported"):
        common.entry_layout("fp8", 8, 0)


def _into_cases():
    """(launcher name, args, keywords) of every launcher with results, at tiny sizes."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    w8 = r(12, 16).to(torch.float8_e4m3fn)
    streams, hc, d = r(1, 3, 2, 8), 2, 8
    state = (torch.zeros(1, 3, 8),)
    return [
        ("rms_norm", (r(1, 3, 16), r(16)), {"eps": 1e-6}),
        ("rms_norm_quant", (r(1, 3, 16), r(16)), {"eps": 1e-6, "group": 8}),
        ("swiglu", (r(1, 3, 16), r(1, 3, 16)), {"limit": 7.0}),
        ("add", (r(1, 3, 16), r(16)), {}),
        ("rope", (r(1, 3, 2, 16), torch.arange(3), r(4).abs()), {}),
        ("linear", (r(1, 3, 16), r(12, 16)), {}),
        ("grouped_linear", (r(1, 3, 2, 16), r(12, 16)), {"groups": 2}),
        ("linear_fp8", (r(1, 3, 16), w8, r(1, 1).abs()),
         {"block": [128, 128], "act": {"mode": "dynamic", "group": 16}}),
        ("linear_fp8", (r(1, 3, 64), r(12, 64).to(torch.float8_e4m3fn), r(1, 1).abs()),  # split K, summed into it
         {"block": [128, 128], "act": {"mode": "dynamic", "group": 16}, "config": {"SPLIT_K": 4}}),
        ("grouped_linear_fp8", (r(1, 3, 2, 16), w8, r(1, 1).abs()), {"groups": 2, "block": [128, 128],
                                                                     "act": {"mode": "none"}}),
        ("embed", (torch.tensor([[1, 4, 2]]), r(6, 16)), {}),
        ("embed", (torch.tensor([[1, 4, 2]]), r(6, 16)), {"hc": 2}),  # the hc streams (hc_ends.py)
        ("embed_fp8", (torch.tensor([[1, 4, 2]]), w8, r(1, 1).abs()), {"block": [128, 128]}),
        ("route_topk", (r(1, 3, 16), r(6, 16), r(6)), {"k": 2, "score_func": "sigmoid", "scale": 1.5}),
        ("route_hash", (r(1, 3, 16), r(6, 16), torch.tensor([[0, 1], [2, 3], [4, 5]]), torch.tensor([[0, 2, 1]])),
         {"score_func": "softmax", "scale": 1.0}),
        ("moe_experts", (r(1, 3, 16), r(1, 3, 2).abs(), torch.tensor([[[0, 1], [2, 0], [1, 2]]]), r(3, 8, 16),
                         r(3, 16, 4)), {}),
        ("hc_expand", (r(1, 3, d),), {"hc": hc}),
        ("hc_pre", (streams, r((2 + hc) * hc, hc * d), r((2 + hc) * hc), r(3)), {"iters": 3, "eps": 1e-6,
                                                                                "norm_eps": 1e-6}),
        ("hc_post", (r(1, 3, d), streams, r(1, 3, hc), r(1, 3, hc, hc)), {}),
        ("hc_head", (streams, r(hc, hc * d), r(hc), r(1)), {"eps": 1e-6, "norm_eps": 1e-6}),
        ("hc_post_head", (r(1, 3, d), streams, r(1, 3, hc), r(1, 3, hc, hc), r(hc, hc * d), r(hc), r(1)),
         {"eps": 1e-6, "norm_eps": 1e-6}),
        ("hc_post_head_norm", (r(1, 3, d), streams, r(1, 3, hc), r(1, 3, hc, hc), r(hc, hc * d), r(hc), r(1), r(d)),
         {"eps": 1e-6, "norm_eps": 1e-6, "norm": {"eps": 1e-6}}),
        ("attention", (r(1, 3, 2, 8), r(1, 3, 8), r(2)), {"state": state, "pos0": 0, "window": 4, "scale": 0.3}),
    ]


@pytest.mark.parametrize("name,args,kwargs", _into_cases(),
                         ids=[c[0] + ("-split-k" if "config" in c[2] else "") for c in _into_cases()])
def test_launchers_write_into_a_fitting_buffer_and_leave_another_alone(name, args, kwargs):
    """`into` (common.result): a buffer of exactly the result's shape and dtype is written and returned; one of
    another dtype is left as it was and the result comes back as a new tensor, the same values either way."""
    from v4c.targets.triton.kernels import LAUNCHERS
    launcher = LAUNCHERS[name]
    state = kwargs.get("state")
    fresh = {**kwargs, "state": tuple(s.clone() for s in state)} if state else kwargs
    want = launcher(*args, **fresh)
    single = isinstance(want, torch.Tensor)
    want = (want,) if single else want
    into = tuple(torch.full_like(w, 3) if w.dtype.is_floating_point and w.element_size() == 4 else torch.zeros_like(w)
                 for w in want)
    fresh = {**kwargs, "state": tuple(s.clone() for s in state)} if state else kwargs
    got = launcher(*args, **fresh, into=into[0] if single else into)
    got = (got,) if single else got
    for g, buffer, w in zip(got, into, want):
        assert g is buffer and torch.equal(g.view(torch.uint8), w.view(torch.uint8))
    other = tuple(torch.zeros(w.shape, dtype=torch.float64) for w in want)
    fresh = {**kwargs, "state": tuple(s.clone() for s in state)} if state else kwargs
    got = launcher(*args, **fresh, into=other[0] if single else other)
    got = (got,) if single else got
    for g, buffer, w in zip(got, other, want):
        assert g is not buffer and not buffer.any() and torch.equal(g.view(torch.uint8), w.view(torch.uint8))


def test_results_wants_one_buffer_per_result():
    assert common.results(None, 2) == (None, None)
    with pytest.raises(ValueError, match="into: expected 2 tensors"):
        common.results(torch.zeros(3), 2)
