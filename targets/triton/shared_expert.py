"""The shared expert as one more routed expert: the triton target's first rewrite (before siblings.py).

    %w, %e = route_*(..) {..}                                   %w, %e = route_*(..) {.., shared: true}   [.., k+1]
    %r = moe_experts_q(%x, %w, %e, @GU, @GU.s, @DN, @DN.s, %xs)       %r = moe_experts_q(%x, %w, %e, @GU+, @GU+.s,
    %g = linear_fp8(%x, @G, @G.s, %xs)                        ->                         @DN+, @DN+.s, %xs)
    %u = linear_fp8(%x, @U, @U.s, %xs)                              hc_post*(%r, ..)
    %s = swiglu_linear_fp8(%g, %u, @D, @D.s) {limit}
    hc_post*(%r, .., %s)          (%s: the addend)

V4's MoE block adds a shared expert to the routed ones: out = sum_j w_j expert_{e_j}(x) + shared(x), the shared
expert a SwiGLU MLP of the experts' shape. Stacked after the E routed experts (GU+ = [GU; G U], DN+ = [DN; D]) and
routed by every token with weight 1 (the router's `shared` slot, id E), it is one more pair of each token for the
two expert GEMMs, which add it last: in ascending expert order, as the hc op added the addend to the routed sum. A
decode step's shared gate+up GEMM and its SwiGLU+down GEMM are no launches of their own: 2 a layer, 16 in a `small`
step, 24 in a `medium` one. The shared expert's dots are then the expert kernel's (kernels/moe.py), whose K sums
are tiled differently from the GEMM kernel's: an fp32 rounding apart.

It applies where the shared expert is FP8 with the experts' activation formats and SwiGLU limit, and its gate rows
fill whole scale blocks. Where it is also quantized as the experts are (FP8 e4m3, the same blocks and scale dtype),
its weights are stacked as expert E, as above. Where they cannot stack (FP4 experts, DeepSeek's release format, or
FP8 experts of other blocks or scale dtype), the op is `moe_experts_q_shared`, which keeps the shared expert's
weights as they are (gate and up joined, [2I, D]) and gives expert E's tiles a K loop of their own
(kernels/moe_quant.py):

    %r = moe_experts_q_shared(%x, %w, %e, @GU, @GU.s, @DN, @DN.s, @G+U, @G+U.s, @D, @D.s, %xs)
         {.., shared_block, shared_down_block}

A weight another op also reads is left alone.
"""

import torch

from v4c.ir import Function, Instr, Module, ParamRef, TensorType, Value, WeightSource, load_weight
from v4c.ir.ops import OPS
from v4c.passes.fp8 import scale_name
from v4c.passes.fuse import readers

from .siblings import concat_rows, joined_name

ROUTERS = ("route_topk", "route_hash")
HC_READERS = ("hc_post", "hc_post_pre", "hc_post_pre_quant")  # ops whose last optional operand is the addend


def _only(uses: dict, value: Value, reader: Instr) -> bool:
    return [ins for ins, _ in uses.get(value.name, [])] == [reader]


def _match(m: Module, experts: Instr, uses: dict, made: dict, output: str) -> dict | None:
    """The router, shared-expert ops and reader around `experts` when the shared expert can join, else None;
    "stack": whether its weights stack with the experts' (else moe_experts_q_shared)."""
    a = experts.attrs
    if a.get("format") not in ("fp8", "fp4") or len(experts.operands) not in (7, 8):
        return None
    x, weights, idx = experts.operands[:3]
    router = made.get(weights.name)
    if router is None or router.op not in ROUTERS or router.attrs.get("shared") or router.results != [weights, idx]:
        return None
    if not (_only(uses, weights, experts) and _only(uses, idx, experts)):
        return None
    routed = experts.results[0]
    hc = [ins for ins, i in uses.get(routed.name, []) if i == 0]
    if output == routed.name or len(uses.get(routed.name, [])) != 1 or not hc or hc[0].op not in HC_READERS:
        return None
    hc = hc[0]
    if len(hc.operands) != len(OPS[hc.op].operands) or not isinstance(hc.operands[-1], Value):
        return None  # no addend
    swiglu = made.get(hc.operands[-1].name)
    if swiglu is None or swiglu.op != "swiglu_linear_fp8" or not _only(uses, swiglu.results[0], hc):
        return None
    gate, up = (made.get(o.name) if isinstance(o, Value) else None for o in swiglu.operands[:2])
    if not all(p is not None and p.op == "linear_fp8" and _only(uses, p.results[0], swiglu) for p in (gate, up)):
        return None
    x_scale = experts.operands[7:]
    for proj in (gate, up):  # the experts' input, quantized alike
        if proj.operands[0] != x or proj.operands[3:] != x_scale or proj.attrs.get("act") != a.get("act_in") \
                or proj.attrs.get("block") != gate.attrs.get("block"):
            return None
    if swiglu.attrs.get("act") != a.get("act_mid") or swiglu.attrs.get("limit") != a.get("limit"):
        return None
    params = [experts.operands[3:7], [*gate.operands[1:3], *up.operands[1:3]], swiglu.operands[2:4]]
    names = [p.name for group in params for p in group]
    if not all(isinstance(p, ParamRef) for group in params for p in group) or len(set(names)) != len(names):
        return None
    gu, gus, dn, dns = (m.params[p.name] for p in params[0])
    g, gs, u, us = (m.params[p.name] for p in params[1])
    d, ds = (m.params[p.name] for p in params[2])
    e, dim, inter = dn.shape[0], dn.shape[1], dn.shape[2] * (2 if a["format"] == "fp4" else 1)
    block, down_block = gate.attrs["block"], swiglu.attrs["block"]
    fits = (g.shape == u.shape == (inter, dim) and d.shape == (dim, inter) and inter % block[0] == 0
            and gs.shape == us.shape and gs.dtype == us.dtype and g.dtype == u.dtype == d.dtype == "f8e4m3")
    if not fits:
        return None
    stack = (a["format"] == "fp8" and block == a["block"] and down_block == a["down_block"]
             and gus.shape[1:] == (2 * gs.shape[0], *gs.shape[1:]) and dns.shape[1:] == ds.shape
             and len({t.dtype for t in (gus, dns, gs, us, ds)}) == 1)
    return {"router": router, "gate": gate, "up": up, "swiglu": swiglu, "hc": hc, "experts": e, "params": params,
            "stack": stack}


def _stacked(m: Module, expert: str, shared: list[str], name: str) -> tuple[TensorType, WeightSource]:
    """The experts' stacked tensor `expert` [E, rows, cols] with the shared expert's (`shared`, [rows, cols] after
    concatenating them) as expert E (loaded when the artifact is written)."""
    t = m.params[expert]
    parts = [m.weights[expert], *(m.weights[n] for n in shared)]
    shape = (t.shape[0] + 1, *t.shape[1:])

    def load():
        stacked, *own = (load_weight(p) for p in parts)
        return torch.cat([stacked, torch.cat(own).unsqueeze(0)])
    return TensorType(shape, t.dtype), WeightSource(shape, parts[0].dtype, load, f"{name} (experts + shared expert)")


def _joined_names(experts: Instr) -> list[str]:
    """`layers.0.mlp.experts.gate_up_proj` -> `layers.0.mlp.experts+shared.gate_up_proj` (and its scale, the down
    projection and its scale)."""
    gate_up, down = experts.operands[3].name, experts.operands[5].name
    names = [n.replace(".experts.", ".experts+shared.", 1) if ".experts." in n else n + "+shared"
             for n in (gate_up, down)]
    return [names[0], scale_name(names[0]), names[1], scale_name(names[1])]


def fold(m: Module) -> tuple[Module, int]:
    """-> (the module with each joinable shared expert routed as expert E, shared experts folded)."""
    uses = readers(m.func.body)
    made = {r.name: ins for ins in m.func.body for r in ins.results}
    counts: dict[str, int] = {}
    for ins in m.func.body:
        for o in ins.operands:
            if isinstance(o, ParamRef):
                counts[o.name] = counts.get(o.name, 0) + 1
    params, weights = dict(m.params), dict(m.weights)
    replaced: dict[int, Instr] = {}
    dropped: set[int] = set()
    for ins in m.func.body:
        if ins.op != "moe_experts_q":
            continue
        found = _match(m, ins, uses, made, m.func.output.name)
        if found is None or any(counts[p.name] > 1 for group in found["params"] for p in group):
            continue
        experts_params, shared_params, down_params = ([p.name for p in group] for group in found["params"])
        if found["stack"]:
            names = _joined_names(ins)
            sources = [(experts_params[0], shared_params[0::2]), (experts_params[1], shared_params[1::2]),
                       (experts_params[2], down_params[:1]), (experts_params[3], down_params[1:])]
            for name, (expert, shared) in zip(names, sources):
                params[name], weights[name] = _stacked(m, expert, shared, name)
                for n in (expert, *shared):
                    del params[n], weights[n]
            op, operands, attrs = ins.op, [ParamRef(n) for n in names], ins.attrs
        else:  # the shared expert's gate and up rows joined, its down projection as it is
            own = []
            for parts in (shared_params[0::2], shared_params[1::2]):
                own.append(joined_name(parts))
                params[own[-1]], weights[own[-1]] = concat_rows(m, parts, own[-1])
                for n in parts:
                    del params[n], weights[n]
            op = "moe_experts_q_shared"
            operands = [*ins.operands[3:7], *(ParamRef(n) for n in (*own, *down_params))]
            attrs = {**ins.attrs, "shared_block": found["gate"].attrs["block"],
                     "shared_down_block": found["swiglu"].attrs["block"]}
        router = found["router"]
        w, e = router.results
        w2, e2 = (Value(v.name, v.type.with_shape(*v.type.shape[:-1], v.type.shape[-1] + 1)) for v in (w, e))
        replaced[id(router)] = Instr(router.op, router.operands, [w2, e2], {**router.attrs, "shared": True},
                                     router.state)
        replaced[id(ins)] = Instr(op, [ins.operands[0], w2, e2, *operands, *ins.operands[7:]], ins.results, attrs,
                                  ins.state)
        hc = found["hc"]
        replaced[id(hc)] = Instr(hc.op, hc.operands[:-1], hc.results, hc.attrs, hc.state)
        dropped.update(id(found[role]) for role in ("gate", "up", "swiglu"))
    body = [replaced.get(id(ins), ins) for ins in m.func.body if id(ins) not in dropped]
    folded = sum(ins.op == "moe_experts_q" and id(ins) in replaced for ins in m.func.body)
    return m.replace(func=Function(m.func.inputs, body, m.func.output), params=params, weights=weights), folded
