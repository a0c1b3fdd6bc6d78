"""Type inference of the IR's dense ops (and the shape checks every rule uses): one function per op, taking the
operand types (None for an omitted optional operand), the state slot types and the attributes, returning the
result types, raising `IRTypeError` naming the operand or slot that does not fit. The registry (ops.py) names
them; the quantized ops' rules are in infer_quant.py.
"""

from v4c.runtime.quant import entry_layout

from .types import Dim, IRTypeError, TensorType, f32, i64


def same_dim(a: Dim, b: Dim) -> bool:
    return a == b


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise IRTypeError(message)


def expect_shape(role: str, t: TensorType, *shape: Dim) -> None:
    ok = t.rank == len(shape) and all(same_dim(a, b) for a, b in zip(t.shape, shape))
    expect(ok, f"{role} must be [{', '.join(map(str, shape))}], got {t}")


def expect_rank(role: str, t: TensorType, rank: int) -> None:
    expect(t.rank == rank, f"{role} must have rank {rank}, got {t}")


def expect_int(role: str, t: TensorType) -> None:
    expect(t.dtype in ("i64", "i32"), f"{role} must be an integer tensor, got {t}")


# --- inference rules ------------------------------------------------------------------------
def embed(ins, st, a):
    tokens, w = ins
    expect_int("tokens", tokens)
    expect_rank("weight", w, 2)
    return [embedded(tokens, w, a)]


def embedded(tokens, w, a) -> TensorType:
    """An embedding's rows [*tokens, D], or with the optional attr hc (the triton target's embed of the residual
    streams, hc_ends.py) [*tokens, hc, D]."""
    hc = a.get("hc")
    expect(hc is None or (isinstance(hc, int) and not isinstance(hc, bool) and hc >= 1),
           f"hc must be a positive int, got {hc!r}")
    return f32(*tokens.shape, *([] if hc is None else [hc]), w.shape[1])


def linear(ins, st, a):
    x, w = ins
    expect_rank("weight", w, 2)
    expect(x.rank >= 1 and same_dim(x.shape[-1], w.shape[1]), f"input {x} does not match weight {w} ([out, in])")
    return [f32(*x.shape[:-1], w.shape[0])]


def grouped_linear(ins, st, a):
    x, w = ins
    g = a["groups"]
    expect(x.rank >= 2 and x.shape[-2] == g, f"input {x} must be [..., groups={g}, in]")
    expect(w.rank == 2 and w.shape[0] % g == 0 and same_dim(w.shape[1], x.shape[-1]),
           f"weight {w} must be [groups*rank, in] with groups={g} and in={x.shape[-1]}")
    return [f32(*x.shape[:-1], w.shape[0] // g)]


def rms_norm(ins, st, a):
    x, w = ins
    if w is not None:
        expect_shape("weight", w, x.shape[-1])
    return [f32(*x.shape)]


def rope(ins, st, a):
    x, positions, inv_freq = ins
    expect_int("positions", positions)
    expect(x.rank >= 3 and positions.rank == 1 and same_dim(positions.shape[0], x.shape[1]),
           f"input {x} must be [B, S, ..., D] with positions [S], got positions {positions}")
    expect(inv_freq.rank == 1 and 2 * inv_freq.shape[0] <= x.shape[-1],
           f"inv_freq {inv_freq} rotates more channels than {x} has")
    return [f32(*x.shape)]


def numel(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def reshape(ins, st, a):
    (x,) = ins
    shape = list(a["shape"])
    n_sym = next((i for i, d in enumerate(shape) if not isinstance(d, str)), len(shape))
    expect(tuple(shape[:n_sym]) == tuple(x.shape[:n_sym]) and
           all(isinstance(d, int) for d in x.shape[n_sym:] + tuple(shape[n_sym:])) and
           numel(x.shape[n_sym:]) == numel(shape[n_sym:]),
           f"cannot reshape {x} to [{', '.join(map(str, shape))}]")
    return [f32(*shape)]


def elementwise(ins, st, a):
    x, y = ins
    expect_shape("second operand", y, *x.shape)
    return [f32(*x.shape)]


def hc_expand(ins, st, a):
    (x,) = ins
    expect_rank("input", x, 3)
    return [f32(x.shape[0], x.shape[1], a["hc"], x.shape[2])]


def hc_pre(ins, st, a):
    x, fn, base, scale = ins
    expect_rank("streams", x, 4)
    b, s, hc, d = x.shape
    n = (2 + hc) * hc
    expect_shape("fn", fn, n, hc * d)
    expect_shape("base", base, n)
    expect_shape("scale", scale, 3)
    return [f32(b, s, d), f32(b, s, hc), f32(b, s, hc, hc)]


def hc_post(ins, st, a):
    out, streams, post, comb, addend = ins
    expect_rank("streams", streams, 4)
    b, s, hc, d = streams.shape
    expect_shape("block output", out, b, s, d)
    if addend is not None:
        expect_shape("addend", addend, b, s, d)
    expect_shape("post", post, b, s, hc)
    expect_shape("comb", comb, b, s, hc, hc)
    return [f32(b, s, hc, d)]


def hc_post_pre(ins, st, a):
    out, streams, post, comb, fn, base, scale, addend = ins
    (new,) = hc_post([out, streams, post, comb, addend], st, a)
    return [new, *hc_pre([new, fn, base, scale], st, a)]




def hc_head(ins, st, a):
    x, fn, base, scale = ins
    expect_rank("streams", x, 4)
    b, s, hc, d = x.shape
    expect_shape("fn", fn, hc, hc * d)
    expect_shape("base", base, hc)
    expect_shape("scale", scale, 1)
    return [f32(b, s, d)]


def hc_post_head(ins, st, a):
    out, streams, post, comb, fn, base, scale, addend = ins
    (new,) = hc_post([out, streams, post, comb, addend], st, a)
    return hc_head([new, fn, base, scale], st, a)


def hc_post_head_norm(ins, st, a):
    out, streams, post, comb, fn, base, scale, norm_weight, addend = ins
    (collapsed,) = hc_post_head([out, streams, post, comb, fn, base, scale, addend], st, a)
    norm = a["norm"]
    expect(isinstance(norm, dict) and set(norm) == {"eps"}, f"norm must be rms_norm's attributes {{eps}}, got {norm!r}")
    return rms_norm([collapsed, norm_weight], st, norm)


def routed(x, k, a):
    """A router's results for k chosen experts; attribute shared (true): one slot more, the shared expert's (its id
    the number of routed experts, weight 1: the triton target's shared_expert.py)."""
    expect(a.get("shared", False) in (True, False), f"shared: expected true or false, got {a.get('shared')!r}")
    k = k + 1 if a.get("shared") else k
    return [f32(*x.shape[:-1], k), i64(*x.shape[:-1], k)]


def route_topk(ins, st, a):
    x, w, bias = ins
    expect(w.rank == 2 and same_dim(w.shape[1], x.shape[-1]), f"router weight {w} does not match input {x}")
    expect_shape("bias", bias, w.shape[0])
    expect(1 <= a["k"] <= w.shape[0], f"k = {a['k']} must be in [1, experts = {w.shape[0]}]")
    return routed(x, a["k"], a)


def route_hash(ins, st, a):
    x, w, table, tokens = ins
    expect(w.rank == 2 and same_dim(w.shape[1], x.shape[-1]), f"router weight {w} does not match input {x}")
    expect_int("table", table)
    expect_int("tokens", tokens)
    expect_rank("table", table, 2)
    expect_shape("tokens", tokens, *x.shape[:-1])
    return routed(x, table.shape[1], a)


def moe_experts(ins, st, a):
    x, weights, idx, gate_up, down = ins
    d = x.shape[-1]
    expect(gate_up.rank == 3 and gate_up.shape[1] % 2 == 0 and same_dim(gate_up.shape[2], d),
           f"gate_up {gate_up} must be [experts, 2*inter, {d}]")
    expect_shape("down", down, gate_up.shape[0], d, gate_up.shape[1] // 2)
    expect_shape("weights", weights, *idx.shape)
    expect_int("experts", idx)
    return [f32(*x.shape)]


def compress_state(a):
    return ("buf_kv", "buf_gate", "ovl_kv", "ovl_gate", "entries") if a["overlap"] else ("buf_kv", "buf_gate", "entries")


def compress(ins, st, a):
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
    expect_entries(st[-1], b, d, a.get("kv_format", "f32"), 2 * inv_freq.shape[0])
    return []


def compress_pair_state(a):
    return compress_state(a["first"]) + tuple(f"{role}2" for role in compress_state(a["second"]))


def compress_pair(ins, st, a):
    n = len(compress_state(a["first"]))
    compress(ins[:5], st[:n], a["first"])
    return compress(ins[5:], st[n:], a["second"])


def expect_entries(t: TensorType, b: Dim, d: int, fmt: str, rope: int) -> None:
    dtype, width = entry_layout(fmt, d, rope)
    expect(t.rank == 3 and same_dim(t.shape[0], b) and t.shape[2] == width and t.dtype == dtype,
           f"state entries in {fmt} must be {dtype}[{b}, capacity, {width}], got {t}")


def index_topk(ins, st, a):
    q, w = ins
    expect_rank("q", q, 4)
    b, s, h, di = q.shape
    expect_shape("weights", w, b, s, h)
    expect_entries(st[0], b, di, a.get("key_format", "f32"), 0)
    return [i64(b, s, a["topk"])]


def rope_index_topk(ins, st, a):
    q, w, positions, inv_freq = ins
    expect(isinstance(a.get("q_rope"), dict) and set(a["q_rope"]) <= {"inverse", "scale"},
           f"q_rope must be the rope's attributes {{inverse?, scale?}}, got {a.get('q_rope')!r}")
    rope([q, positions, inv_freq], st, a["q_rope"])
    return index_topk([q, w], st, a)


def attention_state(a):
    return ("ring",) if a["rate"] == 0 else ("ring", "entries")


def attention(ins, st, a):
    q, kv, sinks, selected = ins
    expect_rank("q", q, 4)
    b, s, h, d = q.shape
    expect_shape("kv", kv, b, s, d)
    expect_shape("sinks", sinks, h)
    ring_dtype, ring_width = entry_layout(a.get("kv_format", "f32"), d, a.get("rope_dim", 0))
    expect(st[0].dtype == ring_dtype and tuple(st[0].shape) == (b, a["window"] - 1, ring_width),
           f"state ring must be {ring_dtype}[{b}, {a['window'] - 1}, {ring_width}], got {st[0]}")
    if a["rate"]:
        expect_entries(st[1], b, d, a.get("kv_format", "f32"), a.get("rope_dim", 0))
    if selected is not None:
        expect(a["rate"] > 0, "selected entries given to an attention without compressed entries (rate 0)")
        expect_int("selected", selected)
        expect(selected.rank == 3 and tuple(selected.shape[:2]) == (b, s), f"selected {selected} must be [{b}, {s}, k]")
    return [f32(b, s, h, d)]


def attention_rope(ins, st, a):
    q, kv, sinks, positions, inv_freq, selected = ins
    out = attention([q, kv, sinks, selected], st, a)
    expect(isinstance(a.get("out_rope"), dict) and set(a["out_rope"]) <= {"inverse", "scale"},
           f"out_rope must be the rope's attributes {{inverse?, scale?}}, got {a.get('out_rope')!r}")
    return rope([out[0], positions, inv_freq], st, {})


def norm_attention_rope(ins, st, a):
    q, kv, kv_weight, sinks, positions, inv_freq, selected = ins
    for role, x, w in (("q_norm", q, None), ("kv_norm", kv, kv_weight)):
        attrs = a.get(role)
        expect(isinstance(attrs, dict) and "eps" in attrs and set(attrs) <= {"eps", "inverse", "scale"},
               f"{role} must be an rms_norm_rope's attributes {{eps, inverse?, scale?}}, got {attrs!r}")
        rms_norm_rope([x, positions, inv_freq, w], st, attrs)
    return attention_rope([q, kv, sinks, positions, inv_freq, selected], st, a)


def rms_norm_rope(ins, st, a):
    x, positions, inv_freq, w = ins
    rms_norm([x, w], st, a)
    return rope([x, positions, inv_freq], st, a)


def cat_sizes(w: TensorType, a: dict, bo: int | None = None) -> list[int]:
    """linear_cat's sibling widths: at least two positive ints adding up to the weight's rows; with FP8 block
    scales, each but the last a multiple of the block's rows (no scale block spans two siblings)."""
    sizes = a["sizes"]
    expect(isinstance(sizes, list) and len(sizes) >= 2 and all(isinstance(n, int) and n >= 1 for n in sizes),
           f"sizes must be a list of at least two positive ints, got {sizes!r}")
    expect(sum(sizes) == w.shape[0], f"sizes {sizes} add up to {sum(sizes)}, not weight {w}'s rows")
    expect(bo is None or all(n % bo == 0 for n in sizes[:-1]),
           f"sizes {sizes}: each but the last must be a multiple of the block's {bo} rows")
    return sizes


def linear_cat(ins, st, a):
    (y,) = linear(ins, st, a)
    return [f32(*y.shape[:-1], n) for n in cat_sizes(ins[1], a)]
