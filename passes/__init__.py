"""Passes: one per file, each a pure `Module -> Module` function with a pydantic `Options` model.

`PASSES` is the registry model.yaml's `passes:` list and `v4c schema` are built from.
"""

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from . import dce, memory_plan


@dataclass(frozen=True)
class PassDef:
    run: Callable  # (Module, Options) -> Module
    options: type[BaseModel]
    summary: str


PASSES: dict[str, PassDef] = {
    "dce": PassDef(dce.run, dce.Options, "remove unused instructions, parameters and state slots"),
    "memory_plan": PassDef(memory_plan.run, memory_plan.Options,
                           "place activation buffers in one arena, reused by liveness (runs last)"),
}
