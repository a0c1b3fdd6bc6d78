"""`TensorType`: a shape of ints and symbols (`B` batch, `S` new tokens) and a dtype name."""

import re
from dataclasses import dataclass

from v4c.runtime.dtypes import TORCH_DTYPES

Dim = int | str
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


class IRTypeError(ValueError):
    """A type does not check; raised by type inference with a message naming the mismatch."""


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str

    def __post_init__(self):
        if self.dtype not in TORCH_DTYPES:
            raise IRTypeError(f"unknown dtype {self.dtype!r}; known: {', '.join(TORCH_DTYPES)}")
        for d in self.shape:
            if isinstance(d, bool) or not (isinstance(d, int) and d >= 0 or isinstance(d, str) and _SYMBOL.match(d)):
                raise IRTypeError(f"bad dimension {d!r} in shape {self.shape}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_shape(self, *shape: Dim) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


def f32(*shape: Dim) -> TensorType:
    return TensorType(tuple(shape), "f32")


def i64(*shape: Dim) -> TensorType:
    return TensorType(tuple(shape), "i64")
