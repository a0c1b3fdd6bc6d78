"""Lower an IR module to a runtime `Program` whose steps call the torch kernels."""

from v4c.ir import Module, ParamRef
from v4c.runtime.program import Program, Step, TensorSpec


def lower(m: Module) -> Program:
    slots: dict[str, int] = {}

    def slot(name: str) -> int:
        return slots.setdefault(name, len(slots))

    inputs = {v.name: slot(v.name) for v in m.func.inputs}
    steps = []
    for ins in m.func.body:
        args = [f"@{o.name}" if isinstance(o, ParamRef) else slots[o.name] for o in ins.operands]
        steps.append(Step(ins.op, args, [slot(r.name) for r in ins.results], dict(ins.attrs), list(ins.state)))
    spec = lambda t: TensorSpec(list(t.shape), t.dtype)  # noqa: E731
    return Program(inputs=inputs, output=slots[m.func.output.name], steps=steps,
                   params={k: spec(t) for k, t in m.params.items()},
                   states={k: spec(t) for k, t in m.states.items()},
                   max_context=m.max_context, num_values=len(slots))
