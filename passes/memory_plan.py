"""Plan the activation buffers: one arena, with buffers reused by liveness.

Every activation is [B, S, ...constants], so its size is linear in the tokens of a call (B*S). The
plan is made once in bytes per token: buffer i lives at offset_i * B * S in an arena of
bytes_per_token * B * S bytes, which is valid for any B*S (all sizes scale together). Views
(`reshape`) share their operand's buffer, extending its lifetime.

Placement: largest buffers first, each at the lowest aligned offset that does not overlap a
buffer whose lifetime (definition .. last use, inclusive) intersects its own.
"""

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from v4c.ir import Module, OPS, ParamRef
from v4c.runtime.dtypes import torch_dtype

ALIGN = 16  # bytes per token; scaled offsets stay 16-byte aligned


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlanError(ValueError):
    pass


@dataclass
class Buffer:
    value: str  # the value that owns the buffer
    size: int  # bytes per token
    start: int  # instruction index that defines it
    end: int  # last instruction index that reads it (or any view of it)
    offset: int = -1


def _bytes_per_token(name: str, t) -> int:
    if t.shape[:2] != ("B", "S") or not all(isinstance(d, int) for d in t.shape[2:]):
        raise PlanError(f"%{name} has shape {t}; the memory plan needs [B, S, constants...]")
    n = torch_dtype(t.dtype).itemsize
    for d in t.shape[2:]:
        n *= d
    return n


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan_buffers(m: Module) -> tuple[dict[str, Buffer], dict[str, str]]:
    """-> (owner value -> Buffer, every planned value -> its owner)."""
    owner, buffers = {}, {}
    for i, ins in enumerate(m.func.body):
        for o in ins.operands:
            if not isinstance(o, ParamRef) and o.name in owner:
                buffers[owner[o.name]].end = i
        for r in ins.results:
            if OPS[ins.op].view and not isinstance(ins.operands[0], ParamRef) and ins.operands[0].name in owner:
                owner[r.name] = owner[ins.operands[0].name]
            else:
                owner[r.name] = r.name
                buffers[r.name] = Buffer(r.name, _bytes_per_token(r.name, r.type), i, i)
    out = m.func.output.name
    if out in owner:
        buffers[owner[out]].end = len(m.func.body)  # the result outlives the program
    placed: list[Buffer] = []
    for b in sorted(buffers.values(), key=lambda b: (-b.size, b.start, b.value)):
        offset = 0
        for p in sorted((p for p in placed if p.start <= b.end and b.start <= p.end), key=lambda p: p.offset):
            if offset + b.size <= p.offset:
                break
            offset = max(offset, _align(p.offset + p.size))
        b.offset = offset
        placed.append(b)
    return buffers, owner


def run(m: Module, options: Options, progress=None) -> Module:
    buffers, owner = plan_buffers(m)
    peak = max((_align(b.offset + b.size) for b in buffers.values()), default=0)
    naive = sum(b.size for b in buffers.values())
    out = m.replace()
    out.plans["memory"] = {
        "bytes_per_token": peak,
        "alignment": ALIGN,
        # value -> offset and size (bytes per token), first and last instruction that use the buffer
        "buffers": {b.value: {"offset": b.offset, "bytes": b.size, "first": b.start, "last": b.end}
                    for b in sorted(buffers.values(), key=lambda b: b.start)},
        "views": {v: o for v, o in owner.items() if o != v},  # value -> the value whose buffer it views
    }
    out.counters["memory_plan"] = {"buffers": len(buffers), "bytes_per_token": peak,
                                   "bytes_per_token_without_reuse": naive}
    return out
