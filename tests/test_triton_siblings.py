"""Sibling projections as one GEMM launch (targets/triton/siblings.py, kernels/gemm.py's linear_cat and
linear_fp8_cat): the launchers give each sibling's separate launch bit for bit at the same launch config, under
TRITON_INTERPRET=1; the rewrite joins exactly the projections of one input with the same attributes, whose weights
no other op reads, concatenating their weights (and FP8 block scales) and leaving the numbers unchanged."""

import pytest
import torch

from conftest import tokens
from v4c.frontend import import_checkpoint
from v4c.interpret import interpret
from v4c.ir import (OPS, Function, Instr, IRTypeError, ParamRef, TensorType, Value, load_weight, parse_module,
                    print_module, verify)
from v4c.pipeline import run_pipeline
from v4c.runtime.kernels.basic import linear_cat as ref_linear_cat
from v4c.runtime.kernels.quantized import linear_fp8_cat as ref_linear_fp8_cat
from v4c.runtime.kernels.quantized import rms_norm_quant
from v4c.runtime.quant import quant_fp8
from v4c.spec import PassSpec
from v4c.targets.triton.kernels.gemm import MAX_SIBLINGS, linear, linear_cat, linear_fp8, linear_fp8_cat
from v4c.targets.triton.siblings import JOINED, join, joined_name

NAME = "hc4_mixed"
g = torch.Generator().manual_seed(7)
ACT = {"mode": "dynamic", "group": 16, "scale_format": "ue8m0"}


def _fp8_weights(sizes, k, bo=16):
    out = [quant_fp8(torch.randn(n, k, generator=g), (bo, 16), "ue8m0") for n in sizes]
    return [q for q, _ in out], [s for _, s in out]


# --- launchers -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes, config", [
    ([40, 17, 64, 3], {"BLOCK_N": 16}),  # widths that are not multiples of the tile, one narrower than it
    ([5, 9], {"BLOCK_N": 32, "BLOCK_M": 16}),
    ([3, 1, 16, 7, 2, 33, 8, 4], {"BLOCK_N": 16}),  # MAX_SIBLINGS
    ([40, 17, 64, 3], {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3, "SUM_IN_KERNEL": True}),
    ([40, 17, 64, 3], {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3, "SUM_IN_KERNEL": False}),
])
def test_linear_cat_is_each_siblings_launch(sizes, config):
    assert len(sizes) <= MAX_SIBLINGS
    x = torch.randn(3, 5, 48, generator=g)
    ws = [torch.randn(n, 48, generator=g) for n in sizes]
    ys = linear_cat(x, torch.cat(ws), sizes=sizes, config=config)
    assert len(ys) == len(sizes)
    for w, y in zip(ws, ys):
        assert y.shape == (3, 5, w.shape[0]) and y.is_contiguous()
        assert torch.equal(y, linear(x, w, config=config))
    ref = ref_linear_cat(x, torch.cat(ws), sizes=sizes)
    for y, r in zip(ys, ref):
        torch.testing.assert_close(y, r, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("codes", [False, True])
@pytest.mark.parametrize("sizes, config", [([32, 16, 20], {"BLOCK_N": 16}),
                                           ([16, 48, 5], {"BLOCK_N": 32, "SPLIT_K": 2, "BLOCK_K": 16})])
def test_linear_fp8_cat_is_each_siblings_launch(sizes, config, codes):
    x = torch.randn(2, 3, 40, generator=g) * 3  # K 40: a partial activation group and scale block
    qs, ss = _fp8_weights(sizes, 40)
    args = rms_norm_quant(x, eps=1e-6, group=16, scale_format="ue8m0") if codes else (x,)
    xs = args[1] if codes else None
    ys = linear_fp8_cat(args[0], torch.cat(qs), torch.cat(ss), xs, sizes=sizes, block=[16, 16], act=ACT, config=config)
    for q, s, y in zip(qs, ss, ys):
        assert torch.equal(y, linear_fp8(args[0], q, s, xs, block=[16, 16], act=ACT, config=config))
    ref = ref_linear_fp8_cat(args[0], torch.cat(qs), torch.cat(ss), xs, sizes=sizes, block=[16, 16], act=ACT)
    for y, r in zip(ys, ref):
        torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-4)


def test_linear_cat_writes_into_the_planned_buffers_and_handles_no_tokens():
    x, w = torch.randn(4, 24, generator=g), torch.randn(30, 24, generator=g)
    into = (torch.empty(4, 10), torch.empty(4, 20))
    ys = linear_cat(x, w, sizes=[10, 20], into=into)
    assert ys[0] is into[0] and ys[1] is into[1]
    empty = linear_cat(x[:0], w, sizes=[10, 20])
    assert [tuple(y.shape) for y in empty] == [(0, 10), (0, 20)]


def test_linear_cat_launchers_reject_what_they_cannot_do():
    x, w = torch.randn(2, 24, generator=g), torch.randn(30, 24, generator=g)
    q, s = quant_fp8(torch.randn(30, 24, generator=g), (16, 16), "fp32")
    for call, message in [
        (lambda: linear_cat(x, w, sizes=[30]), "sizes: expected 2 to 8"),
        (lambda: linear_cat(x, w, sizes=[10, 10]), "add up to 20, but the weight has 30 rows"),
        (lambda: linear_cat(x, w, sizes=[10, 0, 20]), "positive ints"),
        (lambda: linear_cat(x, torch.randn(9, 24), sizes=[1] * 9), "2 to 8"),
        (lambda: linear_cat(x, w, sizes=[10, 20], into=(torch.empty(2, 10),)), "into: expected 2 tensors"),
        (lambda: linear_fp8_cat(x, q, s, sizes=[10, 20], block=[16, 16], act=ACT), "multiple of the block's 16 rows"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()
    assert len(linear_fp8_cat(x, q, s, sizes=[16, 14], block=[16, 16], act=ACT)) == 2  # the last may be partial


# --- the op ------------------------------------------------------------------------------------------------
def test_the_ops_type_their_results_and_check_their_sizes():
    x, w = TensorType(("B", "S", 24), "f32"), TensorType((30, 24), "f32")
    assert [t.shape for t in OPS["linear_cat"].infer([x, w], [], {"sizes": [10, 20]})] == [("B", "S", 10),
                                                                                         ("B", "S", 20)]
    for sizes in ([10, 10], [30], [10, -1, 21]):
        with pytest.raises(IRTypeError, match="sizes"):
            OPS["linear_cat"].infer([x, w], [], {"sizes": sizes})
    q, s = TensorType((30, 24), "f8e4m3"), TensorType((2, 2), "f32")
    attrs = {"block": [16, 16], "act": {"mode": "dynamic", "group": 16}}
    assert len(OPS["linear_fp8_cat"].infer([x, q, s, None], [], {**attrs, "sizes": [16, 14]})) == 2
    with pytest.raises(IRTypeError, match="multiple of the block's 16 rows"):
        OPS["linear_fp8_cat"].infer([x, q, s, None], [], {**attrs, "sizes": [14, 16]})


# --- the rewrite ----------------------------------------------------------------------------------------------
def test_joined_names():
    assert joined_name(["a.b.x.weight", "a.b.y.z.weight"]) == "a.b.x+y.z.weight"
    assert joined_name(["l.1.q_a_proj.scale", "l.1.kv_proj.scale"]) == "l.1.q_a_proj+kv_proj.scale"
    assert joined_name(["p.weight", "p.w.weight"]) == "p.weight+w.weight"  # no common suffix left


@pytest.fixture(scope="module")
def module(hf_checkpoints):
    return import_checkpoint(hf_checkpoints[NAME], max_context=48)[0]


def _fp8(module, **fp8):
    fp8 = {"activations": {"mode": "dynamic", "group": 16}, "weights": {"block": [16, 16]}, **fp8}
    return run_pipeline(module, [PassSpec(name="fp8", options=fp8), PassSpec(name="fuse")])


@pytest.mark.parametrize("recipe", ["f32", "fp8_default_skip", "fp8_all"])
def test_join_merges_same_input_projections_and_changes_no_number(module, recipe):
    m = {"f32": lambda: module, "fp8_default_skip": lambda: _fp8(module),
         "fp8_all": lambda: _fp8(module, skip=[])}[recipe]()
    joined, stats = join(m)
    verify(joined)
    assert parse_module(print_module(joined)) == joined  # '+' in the joined weights' names
    cats = [ins for ins in joined.func.body if ins.op in JOINED.values()]
    assert stats == {"launches": len(cats), "saved": sum(len(c.results) - 1 for c in cats)} and cats
    assert len(joined.func.body) == len(m.func.body) - stats["saved"]
    made = {r.name: ins for ins in m.func.body for r in ins.results}
    for cat in cats:
        parts = [made[r.name] for r in cat.results]
        assert {p.op for p in parts} == {next(k for k, v in JOINED.items() if v == cat.op)}
        assert len({p.operands[0].name for p in parts}) == 1 and all(p.attrs == parts[0].attrs for p in parts)
        names = [p.operands[1].name for p in parts]
        assert cat.attrs["sizes"] == [m.params[n].shape[0] for n in names]
        assert torch.equal(load_weight(joined.weights[cat.operands[1].name]),
                           torch.cat([load_weight(m.weights[n]) for n in names]))
        assert not set(names) & set(joined.params)  # the separate weights are gone
        if cat.op == "linear_fp8_cat":
            bo = cat.attrs["block"][0]
            assert all(n % bo == 0 for n in cat.attrs["sizes"][:-1])
            assert torch.equal(load_weight(joined.weights[cat.operands[2].name]),
                               torch.cat([load_weight(m.weights[p.operands[2].name]) for p in parts]))
    ids = tokens(1, 12, seed=5)
    want, got = interpret(m).forward(ids), interpret(joined).forward(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # (the torch kernels: one BLAS call vs several)


def test_join_leaves_shared_weights_different_inputs_and_extra_partial_blocks_alone(module):
    m = _fp8(module, skip=[])
    joined, _ = join(m)
    bodies = {ins.results[0].name: ins for ins in joined.func.body if ins.results}
    for ins in m.func.body:  # every projection still separate has no sibling it could have joined
        if ins.op == "linear_fp8" and ins.results[0].name in bodies and bodies[ins.results[0].name].op == "linear_fp8":
            rows = m.params[ins.operands[1].name].shape[0]
            peers = [o for o in m.func.body if o is not ins and o.op == "linear_fp8"
                     and o.operands[0].name == ins.operands[0].name and o.attrs == ins.attrs]
            assert not peers or rows % ins.attrs["block"][0]  # only a second partial-block sibling stays out
    # a weight that a second op reads is not copied into a joined one
    shared = next(ins for ins in m.func.body if ins.op == "linear_fp8")
    dup = Instr(shared.op, list(shared.operands), [Value(shared.results[0].name + "_dup", shared.results[0].type)],
                dict(shared.attrs))
    body = list(m.func.body)
    body.insert(body.index(shared) + 1, dup)
    again, _ = join(m.replace(func=Function(m.func.inputs, body, m.func.output)))
    assert shared.operands[1].name in again.params
    assert [ins.op for ins in again.func.body if shared.operands[1] in ins.operands] == ["linear_fp8"] * 2


def test_join_places_the_joined_op_before_every_reader(module):
    """The FP8 sibling with a partial last block goes last in the joined weight, wherever it is in the program; the
    joined op still comes before the first reader of any sibling's result."""
    m = _fp8(module, skip=[])
    joined, _ = join(m)
    verify(joined)  # (every operand defined before use)
    cats = [ins for ins in joined.func.body if ins.op == "linear_fp8_cat"]
    assert any(ins.attrs["sizes"][-1] % ins.attrs["block"][0] for ins in cats)  # hc4_mixed: q_a_proj rows 20
    assert isinstance(cats[0].operands[1], ParamRef)
