"""Passes: one per file, each a pure `Module -> Module` function with a pydantic `Options` model.

`PASSES` is the registry model.yaml's `passes:` list and `v4c schema` are built from.
"""

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from . import calibrate, dce, fp8, fuse, kv_plan, memory_plan


@dataclass(frozen=True)
class PassDef:
    run: Callable  # (Module, Options, progress=None) -> Module
    options: type[BaseModel]
    summary: str
    listable: bool = True  # may appear in model.yaml's `passes:` (calibrate comes from `calibration:`)
    # (its options, the passes listed before it as [(name, validated options)]) -> why that order cannot
    # work, or None; the spec reports it at the pass's line
    check_order: Callable | None = None


PASSES: dict[str, PassDef] = {
    "calibrate": PassDef(calibrate.run, calibrate.Options,
                         "run calibration data through the model and record activation / routing statistics "
                         "(added from model.yaml's calibration section)", listable=False),
    "fp8": PassDef(fp8.run, fp8.Options, "FP8 weights (FP4 experts optional), FP8 activations and FP8 KV entries"),
    "fuse": PassDef(fuse.run, fuse.Options,
                    "kernel fusion: a norm quantizes its output once for the FP8 projections that read it (after fp8)",
                    check_order=fuse.check_order),
    "dce": PassDef(dce.run, dce.Options, "remove unused instructions, parameters and state slots"),
    "kv_plan": PassDef(kv_plan.run, kv_plan.Options,
                       "place each layer's KV state on a tier (from model.yaml's kv section)", listable=False),
    "memory_plan": PassDef(memory_plan.run, memory_plan.Options,
                           "place activation buffers in one arena, reused by liveness (runs last)"),
}
LISTABLE = [name for name, d in PASSES.items() if d.listable]
