"""Targets: lower an IR module for one kind of kernel. `TARGETS` maps the names model.yaml accepts
to functions `(module, *, prefill_chunk, tune, decode_batch, tvm_target, progress) -> Lowered` (a target
ignores the options it has no use for)."""

from dataclasses import dataclass, field
from pathlib import Path

from v4c.ir import Module
from v4c.runtime.program import Program


@dataclass
class Lowered:
    program: Program
    files: dict[str, Path | bytes] = field(default_factory=dict)  # artifact path -> source file or contents
    manifest: dict = field(default_factory=dict)  # merged into the manifest's "target" entry
    module: Module | None = None  # the module the program was lowered from, when the target rewrote it first


def _torch(module, *, prefill_chunk: int, **_) -> Lowered:
    from .torch import lower
    return Lowered(lower(module, prefill_chunk=prefill_chunk))


def _triton(module, *, prefill_chunk: int, tune: str = "auto", decode_batch: int = 1, progress=None, **_) -> Lowered:
    try:
        from .triton import lower  # imports triton: only when this target is asked for
    except ImportError as e:
        if e.name != "triton":
            raise
        from v4c.runtime.errors import V4CError
        raise V4CError("target: triton needs the triton package on the compiling machine: "
                       "pip install 'v4c[triton]'") from None
    return lower(module, prefill_chunk=prefill_chunk, tune=tune, decode_batch=decode_batch, progress=progress)


def _tvm(module, *, prefill_chunk: int, tvm_target=None, progress=None, **_) -> Lowered:
    try:
        from .tvm.lower import lower  # imports tvm: only when this target is asked for
    except ImportError as e:
        if e.name is None or not e.name.startswith("tvm"):
            raise
        from v4c.runtime.errors import V4CError
        raise V4CError("target: tvm needs apache-tvm on the compiling machine: pip install 'v4c[tvm]'") from None
    return lower(module, prefill_chunk=prefill_chunk, target=tvm_target, progress=progress)


TARGETS = {"torch": _torch, "triton": _triton, "tvm": _tvm}
