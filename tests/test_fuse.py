"""The fuse pass: a norm quantizes its output once for the FP8 projections that read it
(rms_norm_quant + linear_fp8 reading e4m3 codes and their scales). The torch target's numbers are
bit-for-bit those of the unfused module; the rule applies only where every reader allows it."""

import pytest
import torch

from conftest import tokens
from v4c.frontend import import_checkpoint
from v4c.interpret import interpret
from v4c.ir import OPS, IRTypeError, Instr, ParamRef, TensorType, parse_module, print_module, verify
from v4c.pipeline import run_pipeline
from v4c.runtime.kernels.basic import rms_norm
from v4c.runtime.kernels.quantized import linear_fp8, rms_norm_quant
from v4c.runtime.quant import fake_quant_groups, quant_fp8
from v4c.spec import PassSpec

NAME = "hc4_mixed"  # CSA, sliding and HCA layers; hidden 56: with group 16 the last group is partial
g = torch.Generator().manual_seed(0)


def _fp8(module, *passes, **fp8):
    fp8 = {"activations": {"mode": "dynamic", "group": 16}, "skip": [], **fp8}
    return run_pipeline(module, [PassSpec(name="fp8", options=fp8), *(PassSpec(name=p) for p in passes)])


@pytest.fixture(scope="module")
def module(hf_checkpoints):
    return import_checkpoint(hf_checkpoints[NAME], max_context=64)[0]


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
    with pytest.raises(IRTypeError, match="scale_format"):
        _infer("rms_norm_quant", x, eps=1e-6, group=16, scale_format="e5m2")


# --- the pass -----------------------------------------------------------------------------------------
def test_fuse_quantizes_each_norm_once_for_its_fp8_readers_and_changes_no_number(module):
    plain, fused = _fp8(module), _fp8(module, "fuse")
    verify(fused)
    assert parse_module(print_module(fused)) == fused  # the new op and the two-result form round-trip
    body = fused.func.body
    norms = [ins for ins in body if ins.op == "rms_norm_quant"]
    assert fused.counters["fuse"] == {"norm_quant": len(norms)}
    readers = {}
    for ins in body:
        for i, o in enumerate(ins.operands):
            if not isinstance(o, ParamRef):
                readers.setdefault(o.name, []).append((ins, i))
    weights = set()
    for ins in norms:
        codes, scales = ins.results
        assert ins.attrs == {"eps": pytest.approx(1e-6), "group": 16, "scale_format": "ue8m0"}
        uses = readers[codes.name]
        assert {(r.op, i) for r, i in uses} == {("linear_fp8", 0)}
        assert [(r, 3) for r, _ in uses] == readers[scales.name]  # each reader takes both, codes first
        weights |= {r.operands[1].name for r, _ in uses}
    # every layer's q_a_norm (q_b_proj, and the indexer's in CSA layers), the input norms (all readers FP8
    # with skip: []), and the final norm (lm_head); the post-attention norms feed the router: unfused
    layers = module.config["num_layers"]
    assert len(norms) == 2 * layers + 1
    assert {f"layers.{i}.self_attn.q_b_proj.weight" for i in range(layers)} <= weights
    assert "lm_head.weight" in weights and not any("mlp" in w for w in weights)
    assert sum(ins.op == "rms_norm" for ins in body) == sum(ins.op == "rms_norm" for ins in plain.func.body) \
        - len(norms)
    ids = tokens(2, 40, seed=3)
    a, b = interpret(plain, batch=2, prefill_chunk=16), interpret(fused, batch=2, prefill_chunk=16)
    for i in range(0, 40, 16):
        assert torch.equal(a.forward(ids[:, i:i + 16]), b.forward(ids[:, i:i + 16]))


def test_fuse_leaves_norms_with_other_readers_and_needs_fp8_first(module):
    default_skip = run_pipeline(module, [PassSpec(name="fp8", options={}), PassSpec(name="fuse")])
    norms = {ins.operands[1].name for ins in default_skip.func.body if ins.op == "rms_norm_quant"}
    # the default skip list keeps the compressor projections (readers of CSA / HCA input norms) unquantized
    kinds = module.config["attention"]
    assert {f"layers.{i}.self_attn.q_a_norm.weight" for i in range(len(kinds))} <= norms
    assert {f"layers.{i}.input_layernorm.weight" for i, k in enumerate(kinds) if k == "sliding"} <= norms
    assert not any(f"layers.{i}.input_layernorm.weight" in norms for i, k in enumerate(kinds) if k != "sliding")
    assert "norm.weight" not in norms  # lm_head stays f32 by default
    assert run_pipeline(module, [PassSpec(name="fuse")]).counters["fuse"] == {"norm_quant": 0}
    off = run_pipeline(_fp8(module), [PassSpec(name="fuse", options={"norm_quant": False})])
    assert off.counters["fuse"] == {"norm_quant": 0}


def test_fuse_needs_one_activation_format_among_the_readers(module):
    m = _fp8(module)
    body = list(m.func.body)
    assert module.config["attention"][0] == "csa"  # its q_a_norm feeds q_b_proj and the indexer's q_b_proj
    i = next(i for i, ins in enumerate(body)
             if ins.op == "linear_fp8" and ins.operands[1].name == "layers.0.self_attn.q_b_proj.weight")
    ins = body[i]
    body[i] = Instr(ins.op, ins.operands, ins.results, {**ins.attrs, "act": {**ins.attrs["act"], "group": 8}})
    changed = m.replace(func=type(m.func)(m.func.inputs, body, m.func.output))
    verify(changed)
    fused = run_pipeline(changed, [PassSpec(name="fuse")])
    norm = ins.operands[0].name  # the q_a_norm whose readers now differ: kept
    assert any(r.name == norm for x in fused.func.body if x.op == "rms_norm" for r in x.results)
    assert fused.counters["fuse"]["norm_quant"] == _fp8(module, "fuse").counters["fuse"]["norm_quant"] - 1
