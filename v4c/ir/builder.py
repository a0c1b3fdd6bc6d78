"""`Builder`: constructs a module instruction by instruction, inferring result types as it goes."""

import json

from .module import Function, Instr, Module, ParamRef, Value
from .ops import OPS
from .types import IRTypeError, TensorType


def operand_types(module_params: dict, operands, n_roles: int) -> list:
    """Types of an instruction's operands, padded with None for omitted optional operands."""
    types = [module_params[o.name] if isinstance(o, ParamRef) else o.type for o in operands]
    return types + [None] * (n_roles - len(types))


class Builder:
    def __init__(self):
        self.params: dict[str, TensorType] = {}
        self.states: dict[str, TensorType] = {}
        self.weights: dict = {}
        self.inputs: list[Value] = []
        self.body: list[Instr] = []

    def input(self, name: str, type_: TensorType) -> Value:
        v = Value(name, type_)
        self.inputs.append(v)
        return v

    def param(self, name: str, type_: TensorType, weight=None) -> ParamRef:
        if name in self.params:
            raise ValueError(f"parameter @{name} declared twice")
        self.params[name] = type_
        if weight is not None:
            self.weights[name] = weight
        return ParamRef(name)

    def state(self, name: str, type_: TensorType) -> str:
        if name in self.states:
            raise ValueError(f"state @{name} declared twice")
        self.states[name] = type_
        return name

    def op(self, op: str, *operands, state=(), **attrs):
        """Append `op` and return its result (a Value, a tuple of Values, or None)."""
        opdef = OPS[op]
        attrs = json.loads(json.dumps(attrs))  # the attribute values exactly as the text will hold them
        try:
            types = opdef.infer(operand_types(self.params, operands, len(opdef.operands)),
                                [self.states[s] for s in state], attrs)
        except IRTypeError as e:
            raise IRTypeError(f"{op}: {e}") from None
        start = len(self.inputs) + sum(len(i.results) for i in self.body)
        results = [Value(str(start + k), t) for k, t in enumerate(types)]
        self.body.append(Instr(op, list(operands), results, attrs, list(state)))
        return None if not results else results[0] if len(results) == 1 else tuple(results)

    def finish(self, name: str, config: dict, output: Value, max_context: int) -> Module:
        return Module(name, config, self.params, self.states, Function(self.inputs, self.body, output),
                      max_context, weights=self.weights)
