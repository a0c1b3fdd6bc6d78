"""The IR module: parameters, state slots and one SSA function.

    Module
      params:  name -> TensorType             weights (data lives in `Module.weights`, not in the text)
      states:  name -> TensorType             incremental state slots, read and written by stateful ops
      func:    inputs (%tokens, %positions), a list of `Instr` in program order, one output value

An `Instr` applies a registered op to operands (SSA values or `@param` references), with
attributes and the state slots it touches, and defines its result values.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .types import TensorType


@dataclass(frozen=True)
class Value:
    name: str  # printed as %name
    type: TensorType


@dataclass(frozen=True)
class ParamRef:
    name: str  # printed as @name


Operand = Value | ParamRef


@dataclass
class Instr:
    op: str
    operands: list[Operand]
    results: list[Value]
    attrs: dict = field(default_factory=dict)
    state: list[str] = field(default_factory=list)


@dataclass
class Function:
    inputs: list[Value]
    body: list[Instr]
    output: Value


class WeightSource:
    """A tensor loaded on demand (memory-mapped checkpoint slice, dequantized FP8, stacked experts)."""

    def __init__(self, shape, dtype: torch.dtype, load: Callable[[], torch.Tensor], origin: str = ""):
        self.shape, self.dtype, self._load, self.origin = tuple(shape), dtype, load, origin

    def load(self) -> torch.Tensor:
        t = self._load()
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise ValueError(f"{self.origin or 'weight'}: loaded {t.dtype}{list(t.shape)}, "
                             f"expected {self.dtype}{list(self.shape)}")
        return t


def load_weight(w: "torch.Tensor | WeightSource") -> torch.Tensor:
    return w.load() if isinstance(w, WeightSource) else w


@dataclass
class Module:
    name: str
    config: dict  # ModelConfig.to_dict() of the model this module computes
    params: dict[str, TensorType]
    states: dict[str, TensorType]
    func: Function
    max_context: int
    weights: dict = field(default_factory=dict, compare=False)  # name -> Tensor | WeightSource
    counters: dict = field(default_factory=dict, compare=False)  # what passes did, by pass name
    plans: dict = field(default_factory=dict, compare=False)  # e.g. "memory": the activation buffer plan
    stats: dict = field(default_factory=dict, compare=False)  # e.g. "calibration": observed statistics

    def replace(self, **changes) -> "Module":
        """A copy with some fields replaced (passes return new modules; containers are copied)."""
        fields_ = dict(name=self.name, config=dict(self.config), params=dict(self.params),
                       states=dict(self.states), func=self.func, max_context=self.max_context,
                       weights=dict(self.weights), counters=dict(self.counters), plans=dict(self.plans),
                       stats=dict(self.stats))
        fields_.update(changes)
        return Module(**fields_)
