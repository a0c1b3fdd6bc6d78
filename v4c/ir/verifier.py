"""The IR checker: SSA form, op signatures, types, declared parameters / state, weight shapes.

Runs after every pass in the pipeline. Each message names the instruction (index and text).
"""

import functools

from .builder import operand_types
from .module import Module, ParamRef
from .ops import OPS
from .printer import instr_str
from .types import IRTypeError
from v4c.runtime.dtypes import dtype_name


class VerifyError(ValueError):
    pass


def _fail(where: str, msg: str):
    raise VerifyError(f"{where}: {msg}")


def verify(m: Module) -> None:
    defined = {}
    for v in m.func.inputs:
        if v.name in defined:
            raise VerifyError(f"function input %{v.name} is declared twice")
        defined[v.name] = v
    for i, ins in enumerate(m.func.body):
        fail = functools.partial(_fail, f"instruction {i} `{instr_str(ins)}`")
        opdef = OPS.get(ins.op)
        if opdef is None:
            fail(f"unknown op {ins.op!r}; registered ops: {', '.join(sorted(OPS))}")
        if not opdef.min_operands <= len(ins.operands) <= len(opdef.operands):
            fail(f"{ins.op} takes operands ({', '.join(opdef.operands)}), got {len(ins.operands)}")
        for o in ins.operands:
            if isinstance(o, ParamRef):
                if o.name not in m.params:
                    fail(f"parameter @{o.name} is not declared")
            elif o.name not in defined:
                fail(f"%{o.name} is used before it is defined")
            elif defined[o.name] != o:
                fail(f"%{o.name} used as {o.type} but defined as {defined[o.name].type}")
        missing = [a for a in opdef.attrs if a not in ins.attrs]
        if missing:
            fail(f"missing attributes {missing}")
        for s in ins.state:
            if s not in m.states:
                fail(f"state @{s} is not declared")
        roles = opdef.state(ins.attrs)
        if len(ins.state) != len(roles):
            fail(f"{ins.op} needs state ({', '.join(roles) or 'none'}), got {len(ins.state)} slots")
        try:
            inferred = opdef.infer(operand_types(m.params, ins.operands, len(opdef.operands)),
                                   [m.states[s] for s in ins.state], ins.attrs)
        except IRTypeError as e:
            fail(str(e))
        except (KeyError, TypeError, ValueError) as e:
            fail(f"malformed operands or attributes ({type(e).__name__}: {e})")
        annotated = [r.type for r in ins.results]
        if inferred != annotated:
            fail(f"result types {', '.join(map(str, annotated)) or 'none'} do not match the inferred "
                 f"{', '.join(map(str, inferred)) or 'none'}")
        for r in ins.results:
            if r.name in defined:
                fail(f"%{r.name} is defined twice")
            defined[r.name] = r
    out = m.func.output
    if defined.get(out.name) != out:
        raise VerifyError(f"the function returns %{out.name}, which is not defined (as {out.type})")
    if m.weights:
        missing = [p for p in m.params if p not in m.weights]
        extra = [w for w in m.weights if w not in m.params]
        if missing or extra:
            raise VerifyError(f"weights do not match parameters: missing {missing[:5]}, undeclared {extra[:5]}")
        for name, w in m.weights.items():
            shape, dtype = tuple(w.shape), dtype_name(w.dtype)  # a Tensor or a WeightSource
            t = m.params[name]
            if shape != t.shape or dtype != t.dtype:
                raise VerifyError(f"weight @{name} is {dtype}{list(shape)} but declared {t}")
