"""Dead-code elimination: drop instructions whose results are never used and that touch no state,
then parameters and state slots nothing references."""

from pydantic import BaseModel, ConfigDict

from v4c.ir import Function, Module, ParamRef


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


def run(m: Module, options: Options, progress=None) -> Module:
    live = {m.func.output.name}
    kept = []
    for ins in reversed(m.func.body):
        if ins.state or any(r.name in live for r in ins.results):
            kept.append(ins)
            live.update(o.name for o in ins.operands if not isinstance(o, ParamRef))
    kept.reverse()
    used_params = {o.name for ins in kept for o in ins.operands if isinstance(o, ParamRef)}
    used_states = {s for ins in kept for s in ins.state}
    params = {k: t for k, t in m.params.items() if k in used_params}
    out = m.replace(func=Function(m.func.inputs, kept, m.func.output), params=params,
                    states={k: t for k, t in m.states.items() if k in used_states},
                    weights={k: w for k, w in m.weights.items() if k in params})
    out.counters["dce"] = {"instructions_removed": len(m.func.body) - len(kept),
                           "params_removed": len(m.params) - len(params),
                           "states_removed": len(m.states) - len(out.states)}
    return out
