"""Print a module as text (`module.v4ir`). `parser.parse` reads it back to an equal module.

    v4ir 1
    module @tiny max_context=4096
    config {"hidden_size": 48, ...}
    param @embed_tokens.weight : f32[97, 48]
    state @layers.0.self_attn.ring : f32[B, 7, 32]
    func (%tokens: i64[B, S], %positions: i64[S]) {
      %2 = embed(%tokens, @embed_tokens.weight) : f32[B, S, 48]
      compress(%9, %10, @...ape, @...norm, @rope.compress.inv_freq) {"eps": 1e-06, ...} state(@a, @b, @c)
      return %99
    }
"""

import json

from .module import Instr, Module, ParamRef

IR_VERSION = 1


def operand_str(o) -> str:
    return f"@{o.name}" if isinstance(o, ParamRef) else f"%{o.name}"


def instr_str(ins: Instr) -> str:
    text = f"{ins.op}({', '.join(operand_str(o) for o in ins.operands)})"
    if ins.attrs:
        text += " " + json.dumps(ins.attrs, sort_keys=True)
    if ins.state:
        text += f" state({', '.join('@' + s for s in ins.state)})"
    if ins.results:
        text = f"{', '.join('%' + r.name for r in ins.results)} = {text} : {', '.join(str(r.type) for r in ins.results)}"
    return text


def print_module(m: Module) -> str:
    lines = [f"v4ir {IR_VERSION}", f"module @{m.name} max_context={m.max_context}",
             f"config {json.dumps(m.config, sort_keys=True)}"]
    lines += [f"param @{name} : {t}" for name, t in m.params.items()]
    lines += [f"state @{name} : {t}" for name, t in m.states.items()]
    lines.append(f"func ({', '.join(f'%{v.name}: {v.type}' for v in m.func.inputs)}) {{")
    lines += ["  " + instr_str(ins) for ins in m.func.body]
    lines += [f"  return %{m.func.output.name}", "}"]
    return "\n".join(lines) + "\n"
