"""IR: text round trip, the verifier's rejections, parse errors, and a pass (dce) between checks."""

import dataclasses

import pytest

from v4c.frontend import import_checkpoint
from v4c.ir import Instr, ParamRef, ParseError, Value, VerifyError, parse_module, print_module, verify
from v4c.ir.types import TensorType, f32
from v4c.passes import PASSES
from v4c.pipeline import run_pipeline
from v4c.spec import PassSpec


@pytest.fixture(scope="module")
def module(hf_checkpoints):
    return import_checkpoint(hf_checkpoints["hc4_mixed"], max_context=64)[0]


def test_text_round_trips(module):
    text = print_module(module)
    parsed = parse_module(text)
    assert parsed == module  # structural equality: params, states, every instruction, types, attributes
    assert print_module(parsed) == text
    verify(parsed)


def test_ir_text_shows_types_state_and_attributes(module):
    text = print_module(module)
    assert "state @layers.0.self_attn.compressor.indexer.entries : f32[B, 16, 16]" in text
    assert "func (%tokens: i64[B, S], %positions: i64[S]) {" in text
    assert "index_topk(" in text and '"topk": 2' in text


def _broken(module, index, **changes):
    m = module.replace(func=dataclasses.replace(module.func, body=list(module.func.body)))
    m.func.body[index] = dataclasses.replace(m.func.body[index], **changes)
    return m


def _index_of(module, op):
    return next(i for i, ins in enumerate(module.func.body) if ins.op == op)


def test_verifier_names_the_op_with_a_wrong_result_type(module):
    i = _index_of(module, "linear")
    ins = module.func.body[i]
    bad = Value(ins.results[0].name, f32("B", "S", 999))
    with pytest.raises(VerifyError, match=rf"instruction {i} `%\S+ = linear\(.*result types f32\[B, S, 999\]"):
        verify(_broken(module, i, results=[bad]))


def test_verifier_rejects_use_before_definition(module):
    i = _index_of(module, "rms_norm")
    ins = module.func.body[i]
    ghost = Value("ghost", ins.operands[0].type)
    with pytest.raises(VerifyError, match=rf"instruction {i} `.*rms_norm.*%ghost is used before it is defined"):
        verify(_broken(module, i, operands=[ghost] + ins.operands[1:]))


def test_verifier_rejects_unknown_op(module):
    with pytest.raises(VerifyError, match=r"unknown op 'flash_attention'"):
        verify(_broken(module, 0, op="flash_attention"))


def test_verifier_rejects_missing_attribute_and_state(module):
    i = _index_of(module, "attention")
    ins = module.func.body[i]
    with pytest.raises(VerifyError, match=rf"instruction {i} `.*attention.*missing attributes \['window'\]"):
        verify(_broken(module, i, attrs={k: v for k, v in ins.attrs.items() if k != "window"}))
    with pytest.raises(VerifyError, match=r"attention needs state \(ring, entries\), got 1 slots"):
        verify(_broken(module, i, state=ins.state[:1]))


def test_verifier_rejects_mismatched_operand_shapes(module):
    i = _index_of(module, "linear")  # x: [B, S, 56] @ q_a_proj^T
    ins = module.func.body[i]
    wrong = ParamRef("layers.0.mlp.shared_experts.down_proj.weight")  # [56, 20]: inner dim 20 != 56
    with pytest.raises(VerifyError, match=rf"instruction {i} `.*linear.*input f32\[B, S, 56\] does not match "
                                          r"weight f32\[56, 20\]"):
        verify(_broken(module, i, operands=[ins.operands[0], wrong]))


def test_verifier_rejects_weight_of_the_wrong_shape(module):
    m = module.replace(params={**module.params, "norm.weight": TensorType((7,), "f32")})
    with pytest.raises(VerifyError, match=r"rms_norm.*weight must be \[56\], got f32\[7\]"):
        verify(m)


def test_parse_errors_name_line_and_column(module):
    lines = print_module(module).splitlines()
    k = next(i for i, ln in enumerate(lines) if ln.strip().startswith("%") and "linear(" in ln)
    lines[k] = lines[k].replace("linear(", "linear[", 1)
    with pytest.raises(ParseError, match=rf"line {k + 1}, column \d+: expected '\('"):
        parse_module("\n".join(lines))
    with pytest.raises(ParseError, match=r"line 1, column 1: not a v4ir 1 module"):
        parse_module("hello\n")


def test_dce_removes_dead_code_and_the_verifier_runs_after_it(module):
    body = list(module.func.body)
    embed = body[0]
    dead = Instr("linear", [embed.results[0], ParamRef("layers.0.self_attn.kv_proj.weight")],
                 [Value("dead", f32("B", "S", 32))])
    m = module.replace(func=dataclasses.replace(module.func, body=[embed, dead] + body[1:]))
    verify(m)
    out = run_pipeline(m, [PassSpec(name="dce")])
    assert out.counters["dce"] == {"instructions_removed": 1, "params_removed": 0, "states_removed": 0}
    assert print_module(out) == print_module(module)


def test_dce_drops_parameters_nothing_uses(module):
    m = module.replace(params={**module.params, "unused.weight": f32(3)})
    out = PASSES["dce"].run(m, PASSES["dce"].options())
    assert "unused.weight" not in out.params and out.counters["dce"]["params_removed"] == 1
