"""Sibling projections as one GEMM launch: the triton target's rewrite of the module it lowers.

    %a = linear_fp8(%x, @A, @A.scale, %xs?) {block, act}         %a, %b = linear_fp8_cat(%x, @A+B, @A+B.scale, %xs?)
    %b = linear_fp8(%x, @B, @B.scale, %xs?) {block, act}    ->                   {sizes: [rows of A, rows of B], ..}
    %c = linear(%y, @C)                                          %c, %d = linear_cat(%y, @C+D) {sizes: [.., ..]}
    %d = linear(%y, @D)

Projections of the same input (and x_scale) with the same attributes, weight dtype and input width are siblings:
their weights are concatenated (rows one after another; FP8 block scales likewise, which is why each sibling but the
last must have a multiple of the block's rows: the rows of a scale block belong to one sibling) and one launch
computes all their outputs, each N tile of the kernel lying in one sibling and writing that sibling's result
(kernels/gemm.py, `SEGS`). At most MAX_SIBLINGS a launch, in the earliest sibling's place. A weight that another op
also reads is left alone (it would be stored twice).

In V4 (with fp8's default skip list) a decode step has per layer: the query and KV down-projections of the
normalized input (q_a_proj, kv_proj: FP8), the compressor's projections (kv_proj, gate_proj, and in CSA layers the
indexer's kv_proj, gate_proj and scorer weights_proj: unquantized), and the shared expert's gate and up
projections (FP8): 2 to 6 launches a layer fewer. Each joined op computes its tiles as the separate launches do: at
the same launch config (decode: one BLOCK_N) and split-K factor, the same bits. On a GPU the split-K factor is
chosen for the joined grid, which has more N tiles, so a sibling's K sum may be split differently from its own
launch's (an fp32 sum either way).

The artifact stores the joined weights (`layers.0.self_attn.q_a_proj+kv_proj.weight`); the calibration report is
taken on the module before this rewrite (the same numbers), whose weights have their checkpoint names.
"""

import json

import torch

from v4c.ir import Function, Instr, Module, ParamRef, TensorType, WeightSource, load_weight

MAX_SIBLINGS = 8  # = kernels/gemm.py's MAX_SIBLINGS
JOINED = {"linear": "linear_cat", "linear_fp8": "linear_fp8_cat"}


def _weights(ins: Instr) -> list[str]:
    """The parameters a projection joins: its weight (and an FP8 one's block scales)."""
    return [o.name for o in ins.operands[1:3 if ins.op == "linear_fp8" else 2]]


def _key(m: Module, ins: Instr, uses: dict[str, int]) -> tuple | None:
    """What siblings share, or None for an op that cannot join: a projection of one weight (and its scales) that
    no other op reads."""
    if ins.op not in JOINED or not all(isinstance(o, ParamRef) for o in ins.operands[1:len(_weights(ins)) + 1]):
        return None
    if any(uses[name] > 1 for name in _weights(ins)):
        return None
    w = m.params[ins.operands[1].name]
    scales = m.params[ins.operands[2].name].dtype if ins.op == "linear_fp8" else None
    x_scale = ins.operands[3].name if len(ins.operands) > 3 else None
    return ins.op, ins.operands[0].name, x_scale, json.dumps(ins.attrs, sort_keys=True), w.dtype, w.shape[1], scales


def _ordered(m: Module, group: list[Instr]) -> list[Instr]:
    """The siblings in program order, an FP8 one whose rows are not a multiple of the block's last; of those, only
    the first joins (the others stay as they are)."""
    if group[0].op != "linear_fp8":
        return group
    bo = group[0].attrs["block"][0]
    aligned = [ins for ins in group if m.params[ins.operands[1].name].shape[0] % bo == 0]
    return aligned + [ins for ins in group if ins not in aligned][:1]


def joined_name(names: list[str]) -> str:
    """`a.b.x.weight`, `a.b.y.z.weight` -> `a.b.x+y.z.weight`: the common dotted prefix and suffix, the parts between
    joined by '+'."""
    parts = [n.split(".") for n in names]
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-tail - 1] == parts[0][-tail - 1] for p in parts):
        tail += 1
    middle = "+".join(".".join(p[head:len(p) - tail]) for p in parts)
    return ".".join([*parts[0][:head], middle, *parts[0][len(parts[0]) - tail:]])


def concat_rows(m: Module, names: list[str], name: str) -> tuple[TensorType, WeightSource]:
    """The weights `names` one after another (loaded when the artifact is written)."""
    types, sources = [m.params[n] for n in names], [m.weights[n] for n in names]
    shape = (sum(t.shape[0] for t in types), *types[0].shape[1:])
    return (TensorType(shape, types[0].dtype),
            WeightSource(shape, sources[0].dtype, lambda: torch.cat([load_weight(s) for s in sources]),
                         f"{name} (joined siblings)"))


def join(m: Module) -> tuple[Module, dict]:
    """-> (the module with its sibling projections joined, {"launches": joined ops, "saved": launches saved})."""
    uses: dict[str, int] = {}
    for ins in m.func.body:
        for o in ins.operands:
            if isinstance(o, ParamRef):
                uses[o.name] = uses.get(o.name, 0) + 1
    groups: dict[tuple, list[Instr]] = {}
    for ins in m.func.body:
        if (key := _key(m, ins, uses)) is not None:
            groups.setdefault(key, []).append(ins)
    params, weights = dict(m.params), dict(m.weights)
    order = {id(ins): i for i, ins in enumerate(m.func.body)}
    joined: dict[int, Instr] = {}  # id(the earliest sibling) -> the joined op
    dropped: set[int] = set()
    saved = 0
    for group in groups.values():
        group = _ordered(m, group)
        for lo in range(0, len(group) - 1, MAX_SIBLINGS):
            chunk = group[lo:lo + MAX_SIBLINGS]
            if len(chunk) < 2:
                continue
            first, refs = chunk[0], []
            for role in range(len(_weights(first))):  # the weights, then an FP8 op's block scales
                names = [_weights(ins)[role] for ins in chunk]
                name = joined_name(names)  # (the scales': fp8.scale_name of the joined weight's)
                params[name], weights[name] = concat_rows(m, names, name)
                for n in names:
                    del params[n], weights[n]
                refs.append(ParamRef(name))
            sizes = [m.params[ins.operands[1].name].shape[0] for ins in chunk]
            place = min(chunk, key=lambda ins: order[id(ins)])  # the earliest: some reader may follow it
            joined[id(place)] = Instr(JOINED[first.op], [first.operands[0], *refs, *first.operands[len(refs) + 1:]],
                                      [ins.results[0] for ins in chunk], {**first.attrs, "sizes": sizes})
            dropped.update(id(ins) for ins in chunk if ins is not place)
            saved += len(chunk) - 1
    body = [joined.get(id(ins), ins) for ins in m.func.body if id(ins) not in dropped]
    out = m.replace(func=Function(m.func.inputs, body, m.func.output), params=params, weights=weights)
    return out, {"launches": len(joined), "saved": saved}
