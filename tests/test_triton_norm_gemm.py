"""The triton target's norm_gemm rewrite (targets/triton/norm_gemm.py): an rms_norm_quant whose codes and scales one
FP8 projection alone reads goes into it (norm_linear_fp8), after the sibling join; everything else stays; the
numbers do not change (the launcher against the two kernels: test_triton_gemm_fused.py)."""

import pytest
import torch

from conftest import tokens
from v4c.frontend import import_checkpoint
from v4c.interpret import interpret
from v4c.ir import Function, Instr, TensorType, Value, parse_module, print_module, verify
from v4c.pipeline import run_pipeline
from v4c.spec import PassSpec
from v4c.targets.triton.norm_gemm import fold
from v4c.targets.triton.siblings import join

NAME = "hc4_mixed"


@pytest.fixture(scope="module")
def fused(hf_checkpoints):
    """hc4_mixed after fp8 (every projection quantized) and fuse, then the sibling join."""
    module = import_checkpoint(hf_checkpoints[NAME], max_context=48)[0]
    fp8 = {"activations": {"mode": "dynamic", "group": 16}, "weights": {"block": [16, 16]}, "skip": []}
    return join(run_pipeline(module, [PassSpec(name="fp8", options=fp8), PassSpec(name="fuse")]))[0]


def _readers(m, name: str) -> list[Instr]:
    return [ins for ins in m.func.body if any(isinstance(o, Value) and o.name == name for o in ins.operands)]


def test_fold_puts_each_lone_norm_into_its_projection_and_changes_no_number(fused):
    folded, n = fold(fused)
    verify(folded)
    assert parse_module(print_module(folded)) == folded
    ops = [ins for ins in folded.func.body if ins.op == "norm_linear_fp8"]
    assert n == len(ops) > 0 and len(folded.func.body) == len(fused.func.body) - n
    assert any("sizes" in ins.attrs for ins in ops)  # a norm read by siblings (q_b_proj and the indexer's)
    norms = {ins.results[0].name: ins for ins in fused.func.body if ins.op == "rms_norm_quant"}
    by_result = {ins.results[0].name: ins for ins in fused.func.body if ins.results}
    for ins in ops:
        reader = by_result[ins.results[0].name]
        norm = norms[reader.operands[0].name]
        assert ins.operands == [*norm.operands, *reader.operands[1:3]] and ins.results == reader.results
        assert ins.attrs == {"eps": norm.attrs["eps"], **reader.attrs}
    left = [ins for ins in folded.func.body if ins.op == "rms_norm_quant"]
    assert len(left) == len(norms) - n
    for norm in left:  # each kept a float output, or its codes have several readers
        assert norm.attrs.get("keep") or len(_readers(folded, norm.results[0].name)) > 1
    ids = tokens(1, 12, seed=5)
    assert torch.equal(interpret(folded).forward(ids), interpret(fused).forward(ids))


def test_fold_leaves_shared_mismatched_output_weightless_and_kept_norms_alone(fused):
    _, n = fold(fused)
    target = next(ins for ins in fused.func.body if ins.op == "linear_fp8_cat" and len(ins.operands) == 4
                  and len(_readers(fused, ins.operands[0].name)) == 1)
    codes, scales = target.operands[0], target.operands[3]

    def variant(body=None, output=None):
        m = fused.replace(func=Function(fused.func.inputs, body or list(fused.func.body), output or fused.func.output))
        verify(m)
        return fold(m)[1]

    body = list(fused.func.body)  # a second reader of the codes: the same projection again
    y = target.results[0].type
    whole = TensorType((*y.shape[:-1], sum(target.attrs["sizes"])), y.dtype)
    attrs = {k: v for k, v in target.attrs.items() if k != "sizes"}
    body.insert(body.index(target) + 1, Instr("linear_fp8", list(target.operands), [Value("extra", whole)], attrs))
    assert variant(body) == n - 1
    body = list(fused.func.body)  # the projection quantizes in another activation format than the norm
    other = {**target.attrs, "act": {**target.attrs["act"], "scale_format": "fp32"}}
    body[body.index(target)] = Instr(target.op, target.operands, target.results, other)
    assert fold(fused.replace(func=Function(fused.func.inputs, body, fused.func.output)))[1] == n - 1
    assert variant(output=scales) == n - 1  # the scales are the program's output
    norm = next(ins for ins in fused.func.body if ins.results and ins.results[0].name == codes.name)
    body = list(fused.func.body)  # a norm without a weight
    body[body.index(norm)] = Instr("rms_norm_quant", norm.operands[:1], norm.results, dict(norm.attrs))
    assert variant(body) == n - 1
    body = list(fused.func.body)  # a norm that keeps its float output too (for an unquantized reader)
    kept = Value("kept", TensorType(codes.type.shape, "f32"))
    body[body.index(norm)] = Instr("rms_norm_quant", norm.operands, [*norm.results, kept], {**norm.attrs, "keep": True})
    assert variant(body) == n - 1
