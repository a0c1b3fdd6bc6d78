"""The residual streams' two ends, one launch each: the triton target's fifth rewrite (after compress_pair.py).

    %x = embed*(%tok, @W..) {a}                   ->   %s = embed*(%tok, @W..) {a, hc: n}
    %s = hc_expand(%x) {hc: n}

    %n = hc_post(%o, %s, %p, %c, %a?)             ->   %h = hc_post_head(%o, %s, %p, %c, @fn, @base, @scale, %a?)
    %h = hc_head(%n, @fn, @base, @scale) {b}                                {b}

where the first op's result is read by the second alone (and is not the program's output), at the second's place.
In V4 the embedding rows only enter the hc streams (the first block's hc_pre reads the expanded streams), and the
last block's new streams only feed hc_head: each is one launch of a decode step fewer (a `small` step's 96 -> 94).
The numbers do not change: the embedding kernel stores its row hc times as hc_expand copies it, and hc_head's
kernel computes its input tiles as hc_post does (kernels/hyper_head.py, as hc_post_pre's kernel does for hc_pre).
"""

from v4c.ir import Function, Instr, Module, Value
from v4c.passes.fuse import readers

EMBEDS = ("embed", "embed_fp8")


def _alone(value: Value, reader: Instr, uses: dict, output: str) -> bool:
    return value.name != output and [ins for ins, _ in uses.get(value.name, [])] == [reader]


def fold(m: Module) -> tuple[Module, dict]:
    """-> (the module with each embedding+hc_expand and hc_post+hc_head pair as one op, {"embeds": n, "heads": n})."""
    uses = readers(m.func.body)
    made = {r.name: ins for ins in m.func.body for r in ins.results}
    output = m.func.output.name
    replaced: dict[int, Instr] = {}
    dropped: set[int] = set()
    counts = {"embeds": 0, "heads": 0}
    for ins in m.func.body:
        x = ins.operands[0] if ins.op in ("hc_expand", "hc_head") else None
        first = made.get(x.name) if isinstance(x, Value) else None
        if first is None or not _alone(x, ins, uses, output):
            continue
        if ins.op == "hc_expand" and first.op in EMBEDS and "hc" not in first.attrs:
            replaced[id(ins)] = Instr(first.op, first.operands, ins.results, {**first.attrs, "hc": ins.attrs["hc"]})
            counts["embeds"] += 1
        elif ins.op == "hc_head" and first.op == "hc_post":
            out, streams, post, comb, *addend = first.operands
            replaced[id(ins)] = Instr("hc_post_head", [out, streams, post, comb, *ins.operands[1:], *addend],
                                      ins.results, dict(ins.attrs))
            counts["heads"] += 1
        else:
            continue
        dropped.add(id(first))
    body = [replaced.get(id(ins), ins) for ins in m.func.body if id(ins) not in dropped]
    return m.replace(func=Function(m.func.inputs, body, m.func.output)), counts
