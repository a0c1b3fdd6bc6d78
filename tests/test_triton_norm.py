"""The Triton norm / elementwise / RoPE launchers (run in the Triton interpreter) against the runtime's
torch kernels: rms_norm, rms_norm_quant (= fake_quant_groups over rms_norm), swiglu, add, rope,
rms_norm_rope (= rope over rms_norm)."""

import pytest
import torch

from v4c.runtime.kernels import basic
from v4c.runtime.quant import fake_quant_groups, pow2_ceil
from v4c.targets.triton.kernels import norm

g = torch.Generator().manual_seed(1)
TOL = 1e-5  # fp32 math: rtol and atol relative to the reference's scale


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def assert_close(ours, ref, tol=TOL):
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol * max(ref.abs().max().item(), 1e-30))


# --- rms_norm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 7, 33), (5, 1), (2, 3, 2, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighted", [False, True])
def test_rms_norm_matches_reference(shape, dtype, weighted):
    x = randn(*shape, dtype=dtype, scale=3.0)
    w = randn(shape[-1], dtype=dtype) if weighted else None
    assert_close(norm.rms_norm(x, w, eps=1e-6), basic.rms_norm(x, w, eps=1e-6))


def test_rms_norm_non_contiguous_input_and_large_eps():
    x = randn(9, 6, 5).transpose(0, 2)  # [5, 6, 9], strided
    assert_close(norm.rms_norm(x, None, eps=0.5), basic.rms_norm(x, None, eps=0.5))


# --- rms_norm_quant ---------------------------------------------------------------------------
def dequant(q, scales, group):
    """q [..., K] e4m3, scales [..., G] -> q * scale of its group."""
    k = q.shape[-1]
    return q.float() * scales.repeat_interleave(group, dim=-1)[..., :k]


@pytest.mark.parametrize("shape,group", [((2, 5, 45), 16), ((3, 130), 64), ((4, 33), 200), ((1, 2, 7), 1),
                                         ((6, 96), 32)])
@pytest.mark.parametrize("scale_format", ["fp32", "ue8m0"])
@pytest.mark.parametrize("weighted", [False, True])
def test_rms_norm_quant_reproduces_fake_quant_groups(shape, group, scale_format, weighted):
    x = randn(*shape, scale=2.0)
    x[..., 0] = 0.0  # an all-zero group exercises the 1e-4 amax floor when group == 1
    w = randn(shape[-1], dtype=torch.bfloat16) if weighted else None
    q, scales = norm.rms_norm_quant(x, w, eps=1e-6, group=group, scale_format=scale_format)
    n_groups = -(-shape[-1] // group)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (*shape[:-1], n_groups)
    if scale_format == "ue8m0":
        exps = torch.log2(scales)
        assert torch.equal(exps, exps.round())
    ours = dequant(q, scales, group)
    # exact: the quantization of the kernel's own normalized rows is fake_quant_groups, bit for bit
    y = norm.rms_norm(x, w, eps=1e-6)
    assert torch.equal(ours, fake_quant_groups(y, group, scale_format))
    # keep (the fuse pass, for a norm with unquantized readers too): the same codes and scales, and the norm's
    # output exactly as the rms_norm kernel writes it, into the planned buffers when given
    into = (torch.empty_like(q), torch.empty_like(scales), torch.empty_like(y))
    kq, ks, ky = norm.rms_norm_quant(x, w, eps=1e-6, group=group, scale_format=scale_format, keep=True, into=into)
    assert all(a is b for a, b in zip((kq, ks, ky), into))
    assert torch.equal(kq.view(torch.uint8), q.view(torch.uint8)) and torch.equal(ks, scales) and torch.equal(ky, y)
    # against the reference end to end: the normalized rows differ by fp32 rounding (summation order), so
    # an element may land on the neighbouring e4m3 code (one step: 2^-3 relative, or 2^-9 * scale).
    ref = fake_quant_groups(basic.rms_norm(x, w, eps=1e-6), group, scale_format)
    step = torch.maximum(ref.abs() * 2.0**-3, dequant(torch.ones_like(q), scales, group) * 2.0**-9)
    assert ((ours - ref).abs() <= step * 1.001 + 1e-6 * ref.abs()).all()
    assert ((ours - ref).abs() > 1e-5 * ref.abs().max()).float().mean() < 0.02


@pytest.mark.parametrize("group", [16, 32, 64])
def test_rms_norm_quant_ue8m0_scales_just_above_a_power_of_two(group):
    """x = +-1 and eps 0 normalize to exactly +-weight, so the weight sets each group's amax: a few ulps above
    448 * 2^e, followed by values that quantize differently under 2^e and the exact scale 2^(e+1)
    (quant.pow2_ceil; exp2(ceil(log2(.))) gives 2^e). Scales and codes must equal the reference's exactly."""
    k = 160
    w = randn(k) * 2.0**-40
    for n, col in enumerate(range(0, k, 16)):
        e = -24 + 3 * n
        w[col] = (torch.tensor(448 * 2.0**e).view(torch.int32) + 1 + n % 3).view(torch.float32)
        w[col + 1:col + 4] = torch.tensor([3.0, -5.0, 7.0]) * 2.0**(e - 9)
    x = torch.where(torch.rand(3, k, generator=g) < 0.5, -1.0, 1.0)
    q, scales = norm.rms_norm_quant(x, w, eps=0.0, group=group, scale_format="ue8m0")
    y = basic.rms_norm(x, w, eps=0.0)
    assert torch.equal(y.abs(), w.abs().expand_as(y))
    amax = torch.nn.functional.pad(y.abs(), (0, -k % group)).view(3, -1, group).amax(-1)
    assert torch.equal(scales, pow2_ceil(amax.clamp(min=1e-4) / 448))
    assert torch.equal(dequant(q, scales, group), fake_quant_groups(y, group, "ue8m0"))


# --- swiglu / add -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 5, 7), (1037,)])
@pytest.mark.parametrize("limit", [None, 0.7, 10.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_reference(shape, limit, dtype):
    gate, up = randn(*shape, dtype=dtype, scale=3.0), randn(*shape, dtype=dtype, scale=3.0)
    ours = norm.swiglu(gate, up, limit=limit, config={"block": 256})
    assert_close(ours, basic.swiglu(gate, up, limit=limit))


@pytest.mark.parametrize("shape_a,shape_b", [((3, 5, 7), (3, 5, 7)), ((2, 1, 9), (4, 9)), ((1500,), (1500,))])
def test_add_matches_reference(shape_a, shape_b):
    a, b = randn(*shape_a), randn(*shape_b, dtype=torch.bfloat16)
    ours = norm.add(a, b)
    ref = basic.add(a, b)
    assert ours.dtype == torch.float32 and torch.equal(ours, ref)  # one fp32 add: bit-exact


# --- rope -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,half", [((2, 5, 10), 3), ((1, 7, 3, 11), 2), ((2, 3, 2, 2, 8), 4), ((2, 4, 6), 3)])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.83])
def test_rope_matches_reference(shape, half, inverse, scale):
    x = randn(*shape, dtype=torch.bfloat16, scale=2.0)
    positions = torch.arange(shape[1], dtype=torch.int32) * 7 + 1000
    inv = torch.rand(half, generator=g)
    ours = norm.rope(x, positions, inv, inverse=inverse, scale=scale, config={"block_m": 4})
    assert_close(ours, basic.rope(x, positions.long(), inv, inverse=inverse, scale=scale))
    nope = shape[-1] - 2 * half
    assert torch.equal(ours[..., :nope], x[..., :nope].float())  # leading channels are copied


def test_rope_inverse_undoes_rope():
    x, pos, inv = randn(2, 7, 3, 10), torch.arange(5, 12), torch.rand(3, generator=g)
    assert_close(norm.rope(norm.rope(x, pos, inv), pos, inv, inverse=True), x, tol=1e-5)


@pytest.mark.parametrize("shape,half", [((2, 5, 10), 3), ((1, 7, 3, 11), 2), ((2, 3, 2, 2, 8), 4), ((2, 4, 6), 3),
                                        ((1, 3, 19, 37), 5)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("inverse", [False, True])
def test_rms_norm_rope_is_rope_over_rms_norm(shape, half, weighted, inverse):
    """The fuse pass's norm_rope in one kernel: each row normalized over the whole last dim (the rotated channels
    included), then its trailing channels rotated; odd leading widths, none, wide rows."""
    x = randn(*shape, dtype=torch.bfloat16, scale=3.0)
    w = randn(shape[-1], scale=2.0) if weighted else None
    positions = torch.arange(shape[1], dtype=torch.int32) * 5 + 77
    inv = torch.rand(half, generator=g)
    ours = norm.rms_norm_rope(x, positions, inv, w, eps=1e-6, inverse=inverse, scale=0.9)
    assert_close(ours, basic.rms_norm_rope(x, positions.long(), inv, w, eps=1e-6, inverse=inverse, scale=0.9))
    apart = norm.rope(norm.rms_norm(x, w, eps=1e-6), positions, inv, inverse=inverse, scale=0.9)
    assert torch.equal(ours, apart)  # the two launches' result bit for bit: fusing changes no number
    nope = shape[-1] - 2 * half
    if nope:  # the leading channels only normed
        assert_close(ours[..., :nope], basic.rms_norm(x, w, eps=1e-6)[..., :nope])


# --- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("call,match", [
    (lambda: norm.rms_norm(torch.ones(3, 4, dtype=torch.int32), eps=1e-6), "x: dtype"),
    (lambda: norm.rms_norm(torch.ones(3, 4), torch.ones(5), eps=1e-6), "weight: expected shape"),
    (lambda: norm.rms_norm(torch.ones(3, 4), eps=1e-6, config={"bogus": 1}), "config: unknown keys"),
    (lambda: norm.rms_norm(torch.ones(2, 1 << 17), eps=1e-6), "at most"),
    (lambda: norm.rms_norm_quant(torch.ones(3, 4), eps=1e-6, group=2, scale_format="e5m2"), "scale_format"),
    (lambda: norm.rms_norm_quant(torch.ones(3, 4), eps=1e-6, group=0), "group"),
    (lambda: norm.swiglu(torch.ones(3, 4), torch.ones(4)), "no broadcasting"),
    (lambda: norm.add(torch.ones(3, 4), torch.ones(5)), "do not broadcast"),
    (lambda: norm.rope(torch.ones(2, 3), torch.arange(3), torch.ones(1)), "3\\+ dimensions"),
    (lambda: norm.rope(torch.ones(2, 3, 4), torch.arange(4), torch.ones(1)), "positions: expected shape"),
    (lambda: norm.rope(torch.ones(2, 3, 4), torch.arange(3.0), torch.ones(1)), "positions: dtype"),
    (lambda: norm.rope(torch.ones(2, 3, 4), torch.arange(3), torch.ones(3)), "inv_freq: 3 frequencies"),
    (lambda: norm.rope(torch.ones(2, 3, 4), torch.arange(3), torch.ones(0)), "inv_freq: must be non-empty"),
    (lambda: norm.rms_norm_rope(torch.ones(2, 3, 4), torch.arange(3), torch.ones(1), torch.ones(3), eps=1e-6),
     "weight: expected shape \\[4\\]"),
    (lambda: norm.rms_norm_rope(torch.ones(2, 3, 4), torch.arange(3), torch.ones(1), eps=1e-6, config={"block_m": 2}),
     "rms_norm_rope: config: unknown keys"),
])
def test_unsupported_inputs_raise_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_launchers_are_registered():
    assert set(norm.LAUNCHERS) == {"rms_norm", "rms_norm_quant", "swiglu", "add", "rope", "rms_norm_rope"}
