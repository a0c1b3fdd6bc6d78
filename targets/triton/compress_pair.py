"""Two compressors into one op: the triton target's fourth rewrite (after shared_expert.py, siblings.py, norm_gemm.py).

    compress(%kv, %gate, @ape, @w, @inv) {a} [state A]            ->   compress_pair(%kv, %gate, @ape, @w, @inv,
    ...                                                                  %kv2, %gate2, @ape2, @w2, @inv2)
    compress(%kv2, %gate2, @ape2, @w2, @inv2) {b} [state B]                {first: a, second: b} [state A + B]

for each compress and the next compress of the same rate when nothing between them reads or writes the first's
state, at the second's place (the first's writes are then later, but nothing in between could see them). In V4 that
is a CSA layer's KV compressor and its indexer's key compressor (rate 4 both; the siblings rewrite already made
their four projections one GEMM); an HCA layer's single compressor stays alone, and a layer's attention reads its
entries before the next layer's compressor, so pairs never cross layers. At a decode step in a CUDA graph the pair
is one launch (kernels/compressor_pair.py): a `small` step's 4 CSA layers save 4 launches, `medium`'s 6. The
numbers do not change: each op's programs are compressor.py's, with its own constexprs.
"""

from v4c.ir import Function, Instr, Module


def _touches(ins: Instr, slots: set[str]) -> bool:
    return bool(slots & set(ins.state))


def join(m: Module) -> tuple[Module, int]:
    """-> (the module with each joinable pair of compress ops as one compress_pair, pairs joined)."""
    body = list(m.func.body)
    out: list[Instr] = []
    held: tuple[Instr, int] | None = None  # a compress waiting for a partner, and where it would have been
    for ins in body:
        if held is not None:
            first, _ = held
            if ins.op == "compress" and ins.attrs["rate"] == first.attrs["rate"]:
                out.append(Instr("compress_pair", [*first.operands, *ins.operands], [],
                                 {"first": dict(first.attrs), "second": dict(ins.attrs)}, [*first.state, *ins.state]))
                held = None
                continue
            if ins.op == "compress" or _touches(ins, set(first.state)):  # another rate, or a reader of its state
                out.insert(held[1], first)
                held = None
        if ins.op == "compress":
            held = (ins, len(out))
            continue
        out.append(ins)
    if held is not None:
        out.insert(held[1], held[0])
    joined = sum(ins.op == "compress_pair" for ins in out)
    return m.replace(func=Function(m.func.inputs, out, m.func.output)), joined
