"""The residual streams' two ends, one launch each: the triton target's fifth rewrite (after compress_pair.py).

    %x = embed*(%tok, @W..) {a}                   ->   %s = embed*(%tok, @W..) {a, hc: n}
    %s = hc_expand(%x) {hc: n}

    %n = hc_post(%o, %s, %p, %c, %a?)             ->   %h = hc_post_head(%o, %s, %p, %c, @fn, @base, @scale, %a?)
    %h = hc_head(%n, @fn, @base, @scale) {b}                                {b}

    %h = hc_post_head(.., @scale, %a?) {b}        ->   %y = hc_post_head_norm(.., @scale, @w, %a?) {b, norm: {eps}}
    %y = rms_norm(%h, @w) {eps}

where the first op's result is read by the second alone (and is not the program's output), at the second's place.
The last fold finds the final norm where no FP8 lm_head took it first (norm_gemm.py): a bf16 lm_head, as in
DeepSeek's release.
In V4 the embedding rows only enter the hc streams (the first block's hc_pre reads the expanded streams), and the
last block's new streams only feed hc_head: each is one launch of a decode step fewer (a `small` step's 96 -> 93
with its bf16 lm_head). The numbers do not change: the embedding kernel stores its row hc times as hc_expand copies
it, hc_head's kernel computes its input tiles as hc_post does (kernels/hyper_head.py, as hc_post_pre's kernel does
for hc_pre) and norms its collapsed row with the rms_norm kernel's row code.
"""

from v4c.ir import Function, Instr, Module, Value
from v4c.passes.fuse import readers

EMBEDS = ("embed", "embed_fp8")


def _alone(value: Value, reader: Instr, uses: dict, output: str) -> bool:
    return value.name != output and [ins for ins, _ in uses.get(value.name, [])] == [reader]


def fold(m: Module) -> tuple[Module, dict]:
    """-> (the module with each embedding+hc_expand and hc_post+hc_head pair as one op, and the final norm in the
    latter, {"embeds": n, "heads": n, "norms": n})."""
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
    counts["norms"] = 0
    body = _final_norm(body, output, counts)
    return m.replace(func=Function(m.func.inputs, body, m.func.output)), counts


def _final_norm(body: list[Instr], output: str, counts: dict) -> list[Instr]:
    """hc_post_head then an rms_norm (with a weight) that alone reads its row -> hc_post_head_norm."""
    uses = readers(body)
    made = {r.name: ins for ins in body for r in ins.results}
    replaced: dict[int, Instr] = {}
    dropped: set[int] = set()
    for ins in body:
        x = ins.operands[0] if ins.op == "rms_norm" and len(ins.operands) == 2 else None
        head = made.get(x.name) if isinstance(x, Value) else None
        if head is None or head.op != "hc_post_head" or not _alone(x, ins, uses, output):
            continue
        operands = [*head.operands[:7], ins.operands[1], *head.operands[7:]]  # the norm weight before the addend
        replaced[id(ins)] = Instr("hc_post_head_norm", operands, ins.results, {**head.attrs, "norm": dict(ins.attrs)})
        dropped.add(id(head))
        counts["norms"] += 1
    return [replaced.get(id(ins), ins) for ins in body if id(ins) not in dropped]
