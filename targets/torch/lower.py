"""Lower an IR module to a runtime `Program` whose steps call the torch kernels."""

from v4c.ir import Module, ParamRef
from v4c.runtime.program import Program, Step, TensorSpec

DEFAULT_PREFILL_CHUNK = 256


def lower(m: Module, *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Program:
    plan = m.plans.get("memory")
    values = {r.name: r.type for ins in m.func.body for r in ins.results}
    if plan is None or set(plan["buffers"]) | set(plan["views"]) != set(values):
        raise ValueError("the module has no up-to-date memory plan; run the memory_plan pass last")
    slots: dict[str, int] = {}

    def slot(name: str) -> int:
        return slots.setdefault(name, len(slots))

    inputs = {v.name: slot(v.name) for v in m.func.inputs}
    steps = []
    for ins in m.func.body:
        args = [f"@{o.name}" if isinstance(o, ParamRef) else slots[o.name] for o in ins.operands]
        steps.append(Step(ins.op, args, [slot(r.name) for r in ins.results], dict(ins.attrs), list(ins.state)))
    spec = lambda t: TensorSpec(list(t.shape), t.dtype)  # noqa: E731
    buffers = {str(slots[v]): {"offset": b["offset"], "bytes": b["bytes"], "shape": list(values[v].shape),
                               "dtype": values[v].dtype} for v, b in plan["buffers"].items()}
    kv = m.plans.get("kv")
    kv_plan = None if kv is None else {
        "budgets": {k: kv["budgets"][k] for k in ("device", "host")},
        "page_cache_pages": kv["page_cache_pages"],
        "slots": {name: {k: s[k] for k in ("tier", "page_entries")}
                  for name, s in kv["slots"].items() if s["tier"] != "device"}}
    return Program(inputs=inputs, output=slots[m.func.output.name], steps=steps, kv_plan=kv_plan,
                   params={k: spec(t) for k, t in m.params.items()},
                   states={k: spec(t) for k, t in m.states.items()},
                   max_context=m.max_context, num_values=len(slots), prefill_chunk=prefill_chunk,
                   memory={"bytes_per_token": plan["bytes_per_token"], "buffers": buffers})
