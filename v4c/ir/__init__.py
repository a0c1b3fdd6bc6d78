"""v4c's IR: a typed SSA graph of registered ops over named parameters and state slots."""

from .builder import Builder
from .module import Function, Instr, Module, ParamRef, Value, WeightSource, load_weight
from .ops import OPS, OpDef
from .parser import ParseError, parse_module
from .printer import print_module
from .types import IRTypeError, TensorType
from .verifier import VerifyError, verify

__all__ = ["Builder", "Function", "Instr", "Module", "ParamRef", "Value", "WeightSource", "load_weight",
           "OPS", "OpDef", "ParseError", "parse_module", "print_module", "IRTypeError", "TensorType",
           "VerifyError", "verify"]
