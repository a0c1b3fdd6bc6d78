"""What the fuse pass's ops rest on (passes/fuse.py): the reference kernels of rms_norm_quant, and of linear_fp8
and moe_experts_q reading its e4m3 codes, equal the unfused computations; the IR's type rules for the codes and
their scales; and those of the triton lowering's moe_experts_q_shared."""

import pytest
import torch

from v4c.ir import OPS, IRTypeError, TensorType
from v4c.runtime.kernels.basic import rms_norm
from v4c.runtime.kernels.quantized import linear_fp8, moe_experts_q, rms_norm_quant
from v4c.runtime.quant import fake_quant_groups, quant_fp4, quant_fp8

g = torch.Generator().manual_seed(0)


# --- the reference kernels ---------------------------------------------------------------------------
@pytest.mark.parametrize("group, fmt", [(16, "ue8m0"), (7, "fp32"), (128, "fp32")])
def test_rms_norm_quant_reference_is_the_norm_then_the_group_quantization(group, fmt):
    x, w = torch.randn(2, 3, 40, generator=g) * 5, torch.rand(40, generator=g) + 0.5
    codes, scales = rms_norm_quant(x, w, eps=1e-6, group=group, scale_format=fmt)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == (2, 3, -(-40 // group))
    deq = codes.float() * scales.repeat_interleave(group, -1)[..., :40]
    assert torch.equal(deq, fake_quant_groups(rms_norm(x, w, eps=1e-6), group, fmt))
    if fmt == "ue8m0":  # power-of-two scales
        assert torch.equal(scales, torch.exp2(torch.log2(scales).round()))


def test_linear_fp8_on_codes_equals_linear_fp8_on_the_float_input():
    x, w = torch.randn(3, 5, 40, generator=g), torch.randn(24, 40, generator=g)
    q, s = quant_fp8(w, (16, 16), "ue8m0")
    act = {"mode": "dynamic", "group": 16, "scale_format": "ue8m0"}
    codes, scales = rms_norm_quant(x, eps=1e-6, group=16, scale_format="ue8m0")
    y = linear_fp8(codes, q, s, scales, block=[16, 16], act=act)
    assert torch.equal(y, linear_fp8(rms_norm(x, eps=1e-6), q, s, block=[16, 16], act=act))


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
def test_moe_experts_q_on_codes_equals_moe_experts_q_on_the_float_input(fmt):
    experts, d, inter, topk = 5, 40, 32, 2
    x = torch.randn(2, 7, d, generator=g)
    weights = torch.rand(2, 7, topk, generator=g)
    idx = torch.rand(2, 7, experts, generator=g).topk(topk, dim=-1).indices
    gate_up, down = torch.randn(experts, 2 * inter, d, generator=g), torch.randn(experts, d, inter, generator=g)
    quant = (lambda w: quant_fp4(w)) if fmt == "fp4" else (lambda w: quant_fp8(w, (16, 16), "fp32"))
    (gu, gus), (dn, dns) = (zip(*[quant(w[e]) for e in range(experts)]) for w in (gate_up, down))
    gu, gus, dn, dns = (torch.stack(t) for t in (gu, gus, dn, dns))
    act = {"mode": "dynamic", "group": 16, "scale_format": "fp32"}
    kw = dict(format=fmt, block=[16, 16], down_block=[16, 16], act_in=act, act_mid=act, limit=7.0)
    codes, scales, y = rms_norm_quant(x, eps=1e-6, group=16, keep=True)
    want = moe_experts_q(y, weights, idx, gu, gus, dn, dns, **kw)
    assert torch.equal(moe_experts_q(codes, weights, idx, gu, gus, dn, dns, scales, **kw), want)


# --- types --------------------------------------------------------------------------------------------
def _infer(op, *types, **attrs):
    return OPS[op].infer(list(types) + [None] * (len(OPS[op].operands) - len(types)), [], attrs)


def test_rms_norm_quant_and_pre_quantized_linear_fp8_types():
    x = TensorType(("B", "S", 40), "f32")
    codes, scales = _infer("rms_norm_quant", x, TensorType((40,), "f32"), eps=1e-6, group=16, scale_format="ue8m0")
    assert (str(codes), str(scales)) == ("f8e4m3[B, S, 40]", "f32[B, S, 3]")
    w, ws = TensorType((24, 40), "f8e4m3"), TensorType((2, 3), "f8e8m0")
    act = {"mode": "dynamic", "group": 16, "scale_format": "ue8m0"}
    assert str(_infer("linear_fp8", codes, w, ws, scales, block=[16, 16], act=act)[0]) == "f32[B, S, 24]"
    bad = [((codes, w, ws), act, "pass their scales as x_scale"),
           ((x, w, ws, scales), act, "must be e4m3 codes"),
           ((codes, w, ws, TensorType(("B", "S", 2), "f32")), act, r"x_scale must be f32\[B, S, 3\]"),
           ((codes, w, ws, scales), {"mode": "static", "scale": 1.0}, "act mode dynamic")]
    for types, a, message in bad:
        with pytest.raises(IRTypeError, match=message):
            _infer("linear_fp8", *types, block=[16, 16], act=a)
    gu, gus = TensorType((4, 64, 40), "f8e4m3"), TensorType((4, 4, 3), "f8e8m0")
    dn, dns = TensorType((4, 40, 32), "f8e4m3"), TensorType((4, 3, 2), "f8e8m0")
    routing = TensorType(("B", "S", 2), "f32"), TensorType(("B", "S", 2), "i64")
    moe = dict(format="fp8", block=[16, 16], down_block=[16, 16], act_in=act, act_mid=act)
    assert str(_infer("moe_experts_q", codes, *routing, gu, gus, dn, dns, scales, **moe)[0]) == "f32[B, S, 40]"
    for types, message in [((codes, *routing, gu, gus, dn, dns), "pass their scales as x_scale"),
                           ((x, *routing, gu, gus, dn, dns, scales), "must be e4m3 codes")]:
        with pytest.raises(IRTypeError, match=message):
            _infer("moe_experts_q", *types, **moe)
    kept = _infer("rms_norm_quant", x, eps=1e-6, group=16, scale_format="fp32", keep=True)
    assert [str(t) for t in kept] == ["f8e4m3[B, S, 40]", "f32[B, S, 3]", "f32[B, S, 40]"]  # + the norm itself
    with pytest.raises(IRTypeError, match="keep must be true or false"):
        _infer("rms_norm_quant", x, eps=1e-6, group=16, scale_format="fp32", keep="yes")
    with pytest.raises(IRTypeError, match="scale_format"):
        _infer("rms_norm_quant", x, eps=1e-6, group=16, scale_format="e5m2")


def test_moe_experts_q_shared_types():
    """The routed experts' rules, and the shared expert's own FP8 weights: [2I, D] and [D, I] with their blocks."""
    x, routing = TensorType(("B", "S", 64), "f32"), (TensorType(("B", "S", 3), "f32"), TensorType(("B", "S", 3), "i64"))
    gu, gus = TensorType((4, 64, 32), "i8"), TensorType((4, 64, 2), "f8e8m0")  # FP4: [E, 2I, D/2], [E, 2I, D/32]
    dn, dns = TensorType((4, 64, 16), "i8"), TensorType((4, 64, 1), "f8e8m0")
    sgu, sgus = TensorType((64, 64), "f8e4m3"), TensorType((4, 4), "f32")
    sdn, sdns = TensorType((64, 32), "f8e4m3"), TensorType((4, 2), "f32")
    act = {"mode": "dynamic", "group": 16}
    attrs = dict(format="fp4", block=None, down_block=None, shared_block=[16, 16], shared_down_block=[16, 16],
                 act_in=act, act_mid=act)
    assert str(_infer("moe_experts_q_shared", x, *routing, gu, gus, dn, dns, sgu, sgus, sdn, sdns, **attrs)[0]) \
        == "f32[B, S, 64]"
    for types, message in [((gu, gus, dn, dns, TensorType((60, 64), "f8e4m3"), sgus, sdn, sdns), "shared_gate_up"),
                           ((gu, gus, dn, dns, sgu, sgus, sdn, TensorType((4, 3), "f32")), "shared_down scale"),
                           ((gu, gus, dn, dns, sgu, sgus, TensorType((64, 32), "f32"), sdns), "shared_down must")]:
        with pytest.raises(IRTypeError, match=message):
            _infer("moe_experts_q_shared", x, *routing, *types, **attrs)
