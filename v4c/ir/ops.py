"""The op registry: one `OpDef` per op, with its operands, state slots, type inference and its
reference implementation (the runtime's torch kernel of the same name).

Type inference takes the operand types (None for an omitted optional operand), the state slot
types and the attributes, and returns the result types; it raises `IRTypeError` naming the
operand or slot that does not fit.
"""

from collections.abc import Callable
from dataclasses import dataclass

from v4c.runtime.kernels import KERNELS, STATEFUL
from v4c.runtime.quant import FP4_BLOCK, cdiv, entry_layout

from .types import Dim, IRTypeError, TensorType, f32, i64


@dataclass(frozen=True)
class OpDef:
    name: str
    operands: tuple[str, ...]  # role names; a trailing "?" marks an optional operand
    infer: Callable  # (operand types, state types, attrs) -> list[TensorType]
    state: Callable[[dict], tuple[str, ...]] = lambda attrs: ()  # state slot roles for these attrs
    attrs: tuple[str, ...] = ()  # required attribute names
    view: bool = False  # the result is a view of operand 0 (no buffer of its own)

    @property
    def reference(self) -> Callable:
        return KERNELS[self.name]

    @property
    def stateful(self) -> bool:
        return self.name in STATEFUL

    @property
    def min_operands(self) -> int:
        return sum(not r.endswith("?") for r in self.operands)


def _same(a: Dim, b: Dim) -> bool:
    return a == b


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise IRTypeError(message)


def expect_shape(role: str, t: TensorType, *shape: Dim) -> None:
    ok = t.rank == len(shape) and all(_same(a, b) for a, b in zip(t.shape, shape))
    expect(ok, f"{role} must be [{', '.join(map(str, shape))}], got {t}")


def expect_rank(role: str, t: TensorType, rank: int) -> None:
    expect(t.rank == rank, f"{role} must have rank {rank}, got {t}")


def expect_int(role: str, t: TensorType) -> None:
    expect(t.dtype in ("i64", "i32"), f"{role} must be an integer tensor, got {t}")


# --- inference rules ------------------------------------------------------------------------
def _embed(ins, st, a):
    tokens, w = ins
    expect_int("tokens", tokens)
    expect_rank("weight", w, 2)
    return [_embedded(tokens, w, a)]


def _embedded(tokens, w, a) -> TensorType:
    """An embedding's rows [*tokens, D], or with the optional attr hc (the triton target's embed of the residual
    streams, hc_ends.py) [*tokens, hc, D]."""
    hc = a.get("hc")
    expect(hc is None or (isinstance(hc, int) and not isinstance(hc, bool) and hc >= 1),
           f"hc must be a positive int, got {hc!r}")
    return f32(*tokens.shape, *([] if hc is None else [hc]), w.shape[1])


def _linear(ins, st, a):
    x, w = ins
    expect_rank("weight", w, 2)
    expect(x.rank >= 1 and _same(x.shape[-1], w.shape[1]), f"input {x} does not match weight {w} ([out, in])")
    return [f32(*x.shape[:-1], w.shape[0])]


def _grouped_linear(ins, st, a):
    x, w = ins
    g = a["groups"]
    expect(x.rank >= 2 and x.shape[-2] == g, f"input {x} must be [..., groups={g}, in]")
    expect(w.rank == 2 and w.shape[0] % g == 0 and _same(w.shape[1], x.shape[-1]),
           f"weight {w} must be [groups*rank, in] with groups={g} and in={x.shape[-1]}")
    return [f32(*x.shape[:-1], w.shape[0] // g)]


def _rms_norm(ins, st, a):
    x, w = ins
    if w is not None:
        expect_shape("weight", w, x.shape[-1])
    return [f32(*x.shape)]


def _rope(ins, st, a):
    x, positions, inv_freq = ins
    expect_int("positions", positions)
    expect(x.rank >= 3 and positions.rank == 1 and _same(positions.shape[0], x.shape[1]),
           f"input {x} must be [B, S, ..., D] with positions [S], got positions {positions}")
    expect(inv_freq.rank == 1 and 2 * inv_freq.shape[0] <= x.shape[-1],
           f"inv_freq {inv_freq} rotates more channels than {x} has")
    return [f32(*x.shape)]


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _reshape(ins, st, a):
    (x,) = ins
    shape = list(a["shape"])
    n_sym = next((i for i, d in enumerate(shape) if not isinstance(d, str)), len(shape))
    expect(tuple(shape[:n_sym]) == tuple(x.shape[:n_sym]) and
           all(isinstance(d, int) for d in x.shape[n_sym:] + tuple(shape[n_sym:])) and
           _numel(x.shape[n_sym:]) == _numel(shape[n_sym:]),
           f"cannot reshape {x} to [{', '.join(map(str, shape))}]")
    return [f32(*shape)]


def _elementwise(ins, st, a):
    x, y = ins
    expect_shape("second operand", y, *x.shape)
    return [f32(*x.shape)]


def _hc_expand(ins, st, a):
    (x,) = ins
    expect_rank("input", x, 3)
    return [f32(x.shape[0], x.shape[1], a["hc"], x.shape[2])]


def _hc_pre(ins, st, a):
    x, fn, base, scale = ins
    expect_rank("streams", x, 4)
    b, s, hc, d = x.shape
    n = (2 + hc) * hc
    expect_shape("fn", fn, n, hc * d)
    expect_shape("base", base, n)
    expect_shape("scale", scale, 3)
    return [f32(b, s, d), f32(b, s, hc), f32(b, s, hc, hc)]


def _hc_post(ins, st, a):
    out, streams, post, comb, addend = ins
    expect_rank("streams", streams, 4)
    b, s, hc, d = streams.shape
    expect_shape("block output", out, b, s, d)
    if addend is not None:
        expect_shape("addend", addend, b, s, d)
    expect_shape("post", post, b, s, hc)
    expect_shape("comb", comb, b, s, hc, hc)
    return [f32(b, s, hc, d)]


def _hc_post_pre(ins, st, a):
    out, streams, post, comb, fn, base, scale, addend = ins
    (new,) = _hc_post([out, streams, post, comb, addend], st, a)
    return [new, *_hc_pre([new, fn, base, scale], st, a)]


def _hc_post_pre_quant(ins, st, a):
    out, streams, post, comb, fn, base, scale, norm_weight, addend = ins
    mixed = _hc_post_pre([out, streams, post, comb, fn, base, scale, addend], st, a)
    quant = a["quant"]
    expect(isinstance(quant, dict) and {"eps", "group", "scale_format"} <= set(quant) <= {"eps", "group",
                                                                                         "scale_format", "keep"},
           f"quant must be rms_norm_quant's attributes {{eps, group, scale_format, keep?}}, got {quant!r}")
    return [*mixed, *_rms_norm_quant([mixed[1], norm_weight], st, quant)]


def _hc_head(ins, st, a):
    x, fn, base, scale = ins
    expect_rank("streams", x, 4)
    b, s, hc, d = x.shape
    expect_shape("fn", fn, hc, hc * d)
    expect_shape("base", base, hc)
    expect_shape("scale", scale, 1)
    return [f32(b, s, d)]


def _hc_post_head(ins, st, a):
    out, streams, post, comb, fn, base, scale, addend = ins
    (new,) = _hc_post([out, streams, post, comb, addend], st, a)
    return _hc_head([new, fn, base, scale], st, a)


def _hc_post_head_norm(ins, st, a):
    out, streams, post, comb, fn, base, scale, norm_weight, addend = ins
    (collapsed,) = _hc_post_head([out, streams, post, comb, fn, base, scale, addend], st, a)
    norm = a["norm"]
    expect(isinstance(norm, dict) and set(norm) == {"eps"}, f"norm must be rms_norm's attributes {{eps}}, got {norm!r}")
    return _rms_norm([collapsed, norm_weight], st, norm)


def _routed(x, k, a):
    """A router's results for k chosen experts; attribute shared (true): one slot more, the shared expert's (its id
    the number of routed experts, weight 1: the triton target's shared_expert.py)."""
    expect(a.get("shared", False) in (True, False), f"shared: expected true or false, got {a.get('shared')!r}")
    k = k + 1 if a.get("shared") else k
    return [f32(*x.shape[:-1], k), i64(*x.shape[:-1], k)]


def _route_topk(ins, st, a):
    x, w, bias = ins
    expect(w.rank == 2 and _same(w.shape[1], x.shape[-1]), f"router weight {w} does not match input {x}")
    expect_shape("bias", bias, w.shape[0])
    expect(1 <= a["k"] <= w.shape[0], f"k = {a['k']} must be in [1, experts = {w.shape[0]}]")
    return _routed(x, a["k"], a)


def _route_hash(ins, st, a):
    x, w, table, tokens = ins
    expect(w.rank == 2 and _same(w.shape[1], x.shape[-1]), f"router weight {w} does not match input {x}")
    expect_int("table", table)
    expect_int("tokens", tokens)
    expect_rank("table", table, 2)
    expect_shape("tokens", tokens, *x.shape[:-1])
    return _routed(x, table.shape[1], a)


def _moe_experts(ins, st, a):
    x, weights, idx, gate_up, down = ins
    d = x.shape[-1]
    expect(gate_up.rank == 3 and gate_up.shape[1] % 2 == 0 and _same(gate_up.shape[2], d),
           f"gate_up {gate_up} must be [experts, 2*inter, {d}]")
    expect_shape("down", down, gate_up.shape[0], d, gate_up.shape[1] // 2)
    expect_shape("weights", weights, *idx.shape)
    expect_int("experts", idx)
    return [f32(*x.shape)]


def _compress_state(a):
    return ("buf_kv", "buf_gate", "ovl_kv", "ovl_gate", "entries") if a["overlap"] else ("buf_kv", "buf_gate", "entries")


def _compress(ins, st, a):
    kv, gate, ape, norm_w, inv_freq = ins
    rate = a["rate"]
    expect_rank("kv", kv, 3)
    b, _, c = kv.shape
    d = c // 2 if a["overlap"] else c
    expect_shape("gate", gate, *kv.shape)
    expect_shape("ape", ape, rate, c)
    expect_shape("norm weight", norm_w, d)
    expect(inv_freq.rank == 1 and 2 * inv_freq.shape[0] <= d, f"inv_freq {inv_freq} rotates more than {d} channels")
    expect_shape("state buf_kv", st[0], b, rate, c)
    expect_shape("state buf_gate", st[1], b, rate, c)
    if a["overlap"]:
        expect_shape("state ovl_kv", st[2], b, rate, d)
        expect_shape("state ovl_gate", st[3], b, rate, d)
    _expect_entries(st[-1], b, d, a.get("kv_format", "f32"), 2 * inv_freq.shape[0])
    return []


def _compress_pair_state(a):
    return _compress_state(a["first"]) + tuple(f"{role}2" for role in _compress_state(a["second"]))


def _compress_pair(ins, st, a):
    n = len(_compress_state(a["first"]))
    _compress(ins[:5], st[:n], a["first"])
    return _compress(ins[5:], st[n:], a["second"])


def _expect_entries(t: TensorType, b: Dim, d: int, fmt: str, rope: int) -> None:
    dtype, width = entry_layout(fmt, d, rope)
    expect(t.rank == 3 and _same(t.shape[0], b) and t.shape[2] == width and t.dtype == dtype,
           f"state entries in {fmt} must be {dtype}[{b}, capacity, {width}], got {t}")


def _index_topk(ins, st, a):
    q, w = ins
    expect_rank("q", q, 4)
    b, s, h, di = q.shape
    expect_shape("weights", w, b, s, h)
    _expect_entries(st[0], b, di, a.get("key_format", "f32"), 0)
    return [i64(b, s, a["topk"])]


def _rope_index_topk(ins, st, a):
    q, w, positions, inv_freq = ins
    expect(isinstance(a.get("q_rope"), dict) and set(a["q_rope"]) <= {"inverse", "scale"},
           f"q_rope must be the rope's attributes {{inverse?, scale?}}, got {a.get('q_rope')!r}")
    _rope([q, positions, inv_freq], st, a["q_rope"])
    return _index_topk([q, w], st, a)


def _attention_state(a):
    return ("ring",) if a["rate"] == 0 else ("ring", "entries")


def _attention(ins, st, a):
    q, kv, sinks, selected = ins
    expect_rank("q", q, 4)
    b, s, h, d = q.shape
    expect_shape("kv", kv, b, s, d)
    expect_shape("sinks", sinks, h)
    ring_dtype, ring_width = entry_layout(a.get("kv_format", "f32"), d, a.get("rope_dim", 0))
    expect(st[0].dtype == ring_dtype and tuple(st[0].shape) == (b, a["window"] - 1, ring_width),
           f"state ring must be {ring_dtype}[{b}, {a['window'] - 1}, {ring_width}], got {st[0]}")
    if a["rate"]:
        _expect_entries(st[1], b, d, a.get("kv_format", "f32"), a.get("rope_dim", 0))
    if selected is not None:
        expect(a["rate"] > 0, "selected entries given to an attention without compressed entries (rate 0)")
        expect_int("selected", selected)
        expect(selected.rank == 3 and tuple(selected.shape[:2]) == (b, s), f"selected {selected} must be [{b}, {s}, k]")
    return [f32(b, s, h, d)]


def _attention_rope(ins, st, a):
    q, kv, sinks, positions, inv_freq, selected = ins
    out = _attention([q, kv, sinks, selected], st, a)
    expect(isinstance(a.get("out_rope"), dict) and set(a["out_rope"]) <= {"inverse", "scale"},
           f"out_rope must be the rope's attributes {{inverse?, scale?}}, got {a.get('out_rope')!r}")
    return _rope([out[0], positions, inv_freq], st, {})


def _norm_attention_rope(ins, st, a):
    q, kv, kv_weight, sinks, positions, inv_freq, selected = ins
    for role, x, w in (("q_norm", q, None), ("kv_norm", kv, kv_weight)):
        attrs = a.get(role)
        expect(isinstance(attrs, dict) and "eps" in attrs and set(attrs) <= {"eps", "inverse", "scale"},
               f"{role} must be an rms_norm_rope's attributes {{eps, inverse?, scale?}}, got {attrs!r}")
        _rms_norm_rope([x, positions, inv_freq, w], st, attrs)
    return _attention_rope([q, kv, sinks, positions, inv_freq, selected], st, a)


def _expect_fp8(role: str, w: TensorType, scale: TensorType, block, shape) -> None:
    expect(w.dtype == "f8e4m3" and tuple(w.shape) == tuple(shape), f"{role} must be f8e4m3{list(shape)}, got {w}")
    grid = tuple(shape[:-2]) + (cdiv(shape[-2], block[0]), cdiv(shape[-1], block[1]))
    expect(scale.dtype in ("f32", "f8e8m0") and tuple(scale.shape) == grid,
           f"{role} scale must be f32 or f8e8m0 {list(grid)} for {block[0]}x{block[1]} blocks, got {scale}")


def _fake_quant(ins, st, a):
    (x,) = ins
    return [f32(*x.shape)]


def _act_groups(x: TensorType, a: dict) -> int:
    """Scales per row of dynamic activation quantization `a` (act) over x's last dim."""
    expect(a.get("mode") == "dynamic" and isinstance(a.get("group"), int) and a["group"] >= 1,
           f"pre-quantized activations need act mode dynamic with a positive int group, got {a}")
    expect(isinstance(x.shape[-1], int), f"pre-quantized activations need a constant channel count, got {x}")
    return cdiv(x.shape[-1], a["group"])


def _rms_norm_rope(ins, st, a):
    x, positions, inv_freq, w = ins
    _rms_norm([x, w], st, a)
    return _rope([x, positions, inv_freq], st, a)


def _rms_norm_quant(ins, st, a):
    x, w = ins
    _rms_norm(ins, st, a)
    expect(a.get("scale_format") in ("fp32", "ue8m0"), f"scale_format {a.get('scale_format')!r}; allowed: fp32, ue8m0")
    n = _act_groups(x, {"mode": "dynamic", "group": a["group"]})
    expect(isinstance(a.get("keep", False), bool), f"keep must be true or false, got {a.get('keep')!r}")
    kept = [f32(*x.shape)] if a.get("keep") else []  # the norm's output, for readers that take it unquantized
    return [TensorType(tuple(x.shape), "f8e4m3"), f32(*x.shape[:-1], n), *kept]


def _expect_codes(x: TensorType, x_scale: TensorType | None, act: dict) -> None:
    """x is a float input (no x_scale), or e4m3 codes with their group scales x_scale for dynamic `act`."""
    if x_scale is None:
        expect(x.dtype != "f8e4m3", f"input {x} is e4m3 codes: pass their scales as x_scale")
        return
    n = _act_groups(x, act)
    expect(x.dtype == "f8e4m3", f"with x_scale, input must be e4m3 codes, got {x}")
    expect(x_scale.dtype == "f32" and len(x_scale.shape) == x.rank and
           all(_same(p, q) for p, q in zip(x_scale.shape, (*x.shape[:-1], n))),
           f"x_scale must be {f32(*x.shape[:-1], n)} (one scale per {act['group']} channels), got {x_scale}")


def _linear_fp8(ins, st, a):
    x, w, scale, x_scale = ins
    expect(w.rank == 2 and _same(x.shape[-1], w.shape[1]), f"input {x} does not match weight {w} ([out, in])")
    _expect_fp8("weight", w, scale, a["block"], w.shape)
    _expect_codes(x, x_scale, a["act"])
    return [f32(*x.shape[:-1], w.shape[0])]


def _sizes(w: TensorType, a: dict, bo: int | None = None) -> list[int]:
    """linear_cat's sibling widths: at least two positive ints adding up to the weight's rows; with FP8 block
    scales, each but the last a multiple of the block's rows (no scale block spans two siblings)."""
    sizes = a["sizes"]
    expect(isinstance(sizes, list) and len(sizes) >= 2 and all(isinstance(n, int) and n >= 1 for n in sizes),
           f"sizes must be a list of at least two positive ints, got {sizes!r}")
    expect(sum(sizes) == w.shape[0], f"sizes {sizes} add up to {sum(sizes)}, not weight {w}'s rows")
    expect(bo is None or all(n % bo == 0 for n in sizes[:-1]),
           f"sizes {sizes}: each but the last must be a multiple of the block's {bo} rows")
    return sizes


def _linear_cat(ins, st, a):
    (y,) = _linear(ins, st, a)
    return [f32(*y.shape[:-1], n) for n in _sizes(ins[1], a)]


def _swiglu_linear_fp8(ins, st, a):
    gate, up, w, scale = ins
    _elementwise([gate, up], st, a)
    return _linear_fp8([gate, w, scale, None], st, a)


def _linear_fp8_cat(ins, st, a):
    (y,) = _linear_fp8(ins, st, a)
    return [f32(*y.shape[:-1], n) for n in _sizes(ins[1], a, a["block"][0])]


def _norm_linear_fp8(ins, st, a):
    x, norm_weight, w, scale = ins
    _rms_norm([x, norm_weight], st, a)
    expect(isinstance(a["act"], dict) and a["act"].get("mode") == "dynamic",
           f"act must be dynamic (the norm's quantization), got {a['act']!r}")
    return (_linear_fp8_cat if "sizes" in a else _linear_fp8)([x, w, scale, None], st, a)


def _grouped_linear_fp8(ins, st, a):
    x, w, scale = ins
    _expect_fp8("weight", w, scale, a["block"], w.shape)
    return _grouped_linear([x, w], st, a)


def _embed_fp8(ins, st, a):
    tokens, w, scale = ins
    expect_int("tokens", tokens)
    _expect_fp8("weight", w, scale, a["block"], w.shape)
    return [_embedded(tokens, w, a)]


def _expect_expert(role: str, w: TensorType, scale: TensorType, fmt: str, block, shape) -> None:
    if fmt == "fp8":
        _expect_fp8(role, w, scale, block, shape)
        return
    e, rows, cols = shape
    expect(w.dtype == "i8" and tuple(w.shape) == (e, rows, cols // 2), f"{role} must be i8[{e}, {rows}, {cols // 2}] "
           f"(FP4, two per byte), got {w}")
    expect(scale.dtype == "f8e8m0" and tuple(scale.shape) == (e, rows, cdiv(cols, FP4_BLOCK)),
           f"{role} scale must be f8e8m0[{e}, {rows}, {cdiv(cols, FP4_BLOCK)}], got {scale}")


def _moe_experts_q(ins, st, a):
    x, weights, idx, gate_up, gate_up_scale, down, down_scale, x_scale = ins
    fmt, d = a["format"], x.shape[-1]
    _expect_codes(x, x_scale, a.get("act_in") or {})
    expect(fmt in ("fp8", "fp4"), f"format {fmt!r}; allowed: fp8, fp4")
    expect(gate_up.rank == 3 and down.rank == 3, f"expert weights must be [experts, rows, cols], got {gate_up}, {down}")
    e, inter = gate_up.shape[0], down.shape[2] * (2 if fmt == "fp4" else 1)
    _expect_expert("gate_up", gate_up, gate_up_scale, fmt, a["block"], (e, 2 * inter, d))
    _expect_expert("down", down, down_scale, fmt, a["down_block"], (e, d, inter))
    expect_shape("weights", weights, *idx.shape)
    expect_int("experts", idx)
    return [f32(*x.shape)]


OPS: dict[str, OpDef] = {op.name: op for op in (
    OpDef("embed", ("tokens", "weight"), _embed),
    OpDef("linear", ("x", "weight"), _linear),
    OpDef("grouped_linear", ("x", "weight"), _grouped_linear, attrs=("groups",)),
    OpDef("rms_norm", ("x", "weight?"), _rms_norm, attrs=("eps",)),
    OpDef("rope", ("x", "positions", "inv_freq"), _rope),
    OpDef("reshape", ("x",), _reshape, attrs=("shape",), view=True),
    OpDef("add", ("a", "b"), _elementwise),
    OpDef("swiglu", ("gate", "up"), _elementwise),
    OpDef("hc_expand", ("x",), _hc_expand, attrs=("hc",)),
    OpDef("hc_pre", ("streams", "fn", "base", "scale"), _hc_pre, attrs=("iters", "eps", "norm_eps")),
    OpDef("hc_post", ("out", "streams", "post", "comb", "addend?"), _hc_post),
    OpDef("hc_post_pre", ("out", "streams", "post", "comb", "fn", "base", "scale", "addend?"), _hc_post_pre,
          attrs=("iters", "eps", "norm_eps")),
    OpDef("hc_post_pre_quant", ("out", "streams", "post", "comb", "fn", "base", "scale", "norm_weight", "addend?"),
          _hc_post_pre_quant, attrs=("iters", "eps", "norm_eps", "quant")),
    OpDef("hc_head", ("streams", "fn", "base", "scale"), _hc_head, attrs=("eps", "norm_eps")),
    OpDef("hc_post_head", ("out", "streams", "post", "comb", "fn", "base", "scale", "addend?"), _hc_post_head,
          attrs=("eps", "norm_eps")),
    OpDef("hc_post_head_norm", ("out", "streams", "post", "comb", "fn", "base", "scale", "norm_weight", "addend?"),
          _hc_post_head_norm, attrs=("eps", "norm_eps", "norm")),
    OpDef("route_topk", ("x", "weight", "bias"), _route_topk, attrs=("k", "score_func", "scale")),
    OpDef("route_hash", ("x", "weight", "table", "tokens"), _route_hash, attrs=("score_func", "scale")),
    OpDef("moe_experts", ("x", "weights", "experts", "gate_up", "down"), _moe_experts),
    OpDef("compress", ("kv", "gate", "ape", "norm_weight", "inv_freq"), _compress, _compress_state,
          attrs=("rate", "overlap", "eps")),
    OpDef("compress_pair", ("kv", "gate", "ape", "norm_weight", "inv_freq", "kv2", "gate2", "ape2", "norm_weight2",
                            "inv_freq2"), _compress_pair, _compress_pair_state, attrs=("first", "second")),
    OpDef("index_topk", ("q", "weights"), _index_topk, lambda a: ("entries",),
          attrs=("topk", "rate", "score_scale", "weight_scale")),
    OpDef("rope_index_topk", ("q", "weights", "positions", "inv_freq"), _rope_index_topk, lambda a: ("entries",),
          attrs=("topk", "rate", "score_scale", "weight_scale", "q_rope")),
    OpDef("attention", ("q", "kv", "sinks", "selected?"), _attention, _attention_state,
          attrs=("window", "rate", "scale")),
    OpDef("attention_rope", ("q", "kv", "sinks", "positions", "inv_freq", "selected?"), _attention_rope,
          _attention_state, attrs=("window", "rate", "scale", "out_rope")),
    OpDef("norm_attention_rope", ("q", "kv", "kv_weight", "sinks", "positions", "inv_freq", "selected?"),
          _norm_attention_rope, _attention_state, attrs=("window", "rate", "scale", "out_rope", "q_norm", "kv_norm")),
    OpDef("fake_quant", ("x",), _fake_quant, attrs=("act",)),
    OpDef("rms_norm_quant", ("x", "weight?"), _rms_norm_quant, attrs=("eps", "group", "scale_format")),
    OpDef("rms_norm_rope", ("x", "positions", "inv_freq", "weight?"), _rms_norm_rope, attrs=("eps",)),
    OpDef("linear_fp8", ("x", "weight", "scale", "x_scale?"), _linear_fp8, attrs=("block", "act")),
    OpDef("swiglu_linear_fp8", ("gate", "up", "weight", "scale"), _swiglu_linear_fp8, attrs=("block", "act")),
    OpDef("grouped_linear_fp8", ("x", "weight", "scale"), _grouped_linear_fp8, attrs=("groups", "block", "act")),
    OpDef("linear_cat", ("x", "weight"), _linear_cat, attrs=("sizes",)),
    OpDef("linear_fp8_cat", ("x", "weight", "scale", "x_scale?"), _linear_fp8_cat, attrs=("sizes", "block", "act")),
    OpDef("norm_linear_fp8", ("x", "norm_weight", "weight", "scale"), _norm_linear_fp8, attrs=("eps", "block", "act")),
    OpDef("embed_fp8", ("tokens", "weight", "scale"), _embed_fp8, attrs=("block",)),
    OpDef("moe_experts_q",
          ("x", "weights", "experts", "gate_up", "gate_up_scale", "down", "down_scale", "x_scale?"), _moe_experts_q,
          attrs=("format", "block", "down_block", "act_in", "act_mid")),
)}

missing_kernels = set(OPS) - set(KERNELS)
assert not missing_kernels, f"ops without a reference kernel: {missing_kernels}"
