"""Type inference of the IR's quantized ops (FP8 / FP4 weights, e4m3 activation codes), as infer.py's rules."""

from v4c.runtime.quant import FP4_BLOCK, cdiv

from .infer import (cat_sizes, elementwise, embedded, expect, expect_int, expect_shape, grouped_linear, hc_post_pre,
                    rms_norm, same_dim)
from .types import TensorType, f32


def expect_fp8(role: str, w: TensorType, scale: TensorType, block, shape) -> None:
    expect(w.dtype == "f8e4m3" and tuple(w.shape) == tuple(shape), f"{role} must be f8e4m3{list(shape)}, got {w}")
    grid = tuple(shape[:-2]) + (cdiv(shape[-2], block[0]), cdiv(shape[-1], block[1]))
    expect(scale.dtype in ("f32", "f8e8m0") and tuple(scale.shape) == grid,
           f"{role} scale must be f32 or f8e8m0 {list(grid)} for {block[0]}x{block[1]} blocks, got {scale}")


def fake_quant(ins, st, a):
    (x,) = ins
    return [f32(*x.shape)]


def act_groups(x: TensorType, a: dict) -> int:
    """Scales per row of dynamic activation quantization `a` (act) over x's last dim."""
    expect(a.get("mode") == "dynamic" and isinstance(a.get("group"), int) and a["group"] >= 1,
           f"pre-quantized activations need act mode dynamic with a positive int group, got {a}")
    expect(isinstance(x.shape[-1], int), f"pre-quantized activations need a constant channel count, got {x}")
    return cdiv(x.shape[-1], a["group"])


def rms_norm_quant(ins, st, a):
    x, w = ins
    rms_norm(ins, st, a)
    expect(a.get("scale_format") in ("fp32", "ue8m0"), f"scale_format {a.get('scale_format')!r}; allowed: fp32, ue8m0")
    n = act_groups(x, {"mode": "dynamic", "group": a["group"]})
    expect(isinstance(a.get("keep", False), bool), f"keep must be true or false, got {a.get('keep')!r}")
    kept = [f32(*x.shape)] if a.get("keep") else []  # the norm's output, for readers that take it unquantized
    return [TensorType(tuple(x.shape), "f8e4m3"), f32(*x.shape[:-1], n), *kept]


def expect_codes(x: TensorType, x_scale: TensorType | None, act: dict) -> None:
    """x is a float input (no x_scale), or e4m3 codes with their group scales x_scale for dynamic `act`."""
    if x_scale is None:
        expect(x.dtype != "f8e4m3", f"input {x} is e4m3 codes: pass their scales as x_scale")
        return
    n = act_groups(x, act)
    expect(x.dtype == "f8e4m3", f"with x_scale, input must be e4m3 codes, got {x}")
    expect(x_scale.dtype == "f32" and len(x_scale.shape) == x.rank and
           all(same_dim(p, q) for p, q in zip(x_scale.shape, (*x.shape[:-1], n))),
           f"x_scale must be {f32(*x.shape[:-1], n)} (one scale per {act['group']} channels), got {x_scale}")


def linear_fp8(ins, st, a):
    x, w, scale, x_scale = ins
    expect(w.rank == 2 and same_dim(x.shape[-1], w.shape[1]), f"input {x} does not match weight {w} ([out, in])")
    expect_fp8("weight", w, scale, a["block"], w.shape)
    expect_codes(x, x_scale, a["act"])
    return [f32(*x.shape[:-1], w.shape[0])]


def swiglu_linear_fp8(ins, st, a):
    gate, up, w, scale = ins
    elementwise([gate, up], st, a)
    return linear_fp8([gate, w, scale, None], st, a)


def linear_fp8_cat(ins, st, a):
    (y,) = linear_fp8(ins, st, a)
    return [f32(*y.shape[:-1], n) for n in cat_sizes(ins[1], a, a["block"][0])]


def norm_linear_fp8(ins, st, a):
    x, norm_weight, w, scale = ins
    rms_norm([x, norm_weight], st, a)
    expect(isinstance(a["act"], dict) and a["act"].get("mode") == "dynamic",
           f"act must be dynamic (the norm's quantization), got {a['act']!r}")
    return (linear_fp8_cat if "sizes" in a else linear_fp8)([x, w, scale, None], st, a)


def grouped_linear_fp8(ins, st, a):
    x, w, scale = ins
    expect_fp8("weight", w, scale, a["block"], w.shape)
    return grouped_linear([x, w], st, a)


def embed_fp8(ins, st, a):
    tokens, w, scale = ins
    expect_int("tokens", tokens)
    expect_fp8("weight", w, scale, a["block"], w.shape)
    return [embedded(tokens, w, a)]


def expect_expert(role: str, w: TensorType, scale: TensorType, fmt: str, block, shape) -> None:
    if fmt == "fp8":
        expect_fp8(role, w, scale, block, shape)
        return
    e, rows, cols = shape
    expect(w.dtype == "i8" and tuple(w.shape) == (e, rows, cols // 2), f"{role} must be i8[{e}, {rows}, {cols // 2}] "
           f"(FP4, two per byte), got {w}")
    expect(scale.dtype == "f8e8m0" and tuple(scale.shape) == (e, rows, cdiv(cols, FP4_BLOCK)),
           f"{role} scale must be f8e8m0[{e}, {rows}, {cdiv(cols, FP4_BLOCK)}], got {scale}")


def moe_experts_q(ins, st, a):
    x, weights, idx, gate_up, gate_up_scale, down, down_scale, x_scale = ins
    fmt, d = a["format"], x.shape[-1]
    expect_codes(x, x_scale, a.get("act_in") or {})
    expect(fmt in ("fp8", "fp4"), f"format {fmt!r}; allowed: fp8, fp4")
    expect(gate_up.rank == 3 and down.rank == 3, f"expert weights must be [experts, rows, cols], got {gate_up}, {down}")
    e, inter = gate_up.shape[0], down.shape[2] * (2 if fmt == "fp4" else 1)
    expect_expert("gate_up", gate_up, gate_up_scale, fmt, a["block"], (e, 2 * inter, d))
    expect_expert("down", down, down_scale, fmt, a["down_block"], (e, d, inter))
    expect_shape("weights", weights, *idx.shape)
    expect_int("experts", idx)
    return [f32(*x.shape)]

def moe_experts_q_shared(ins, st, a):
    x, weights, idx, gate_up, gate_up_scale, down, down_scale, *shared, x_scale = ins
    out = moe_experts_q([x, weights, idx, gate_up, gate_up_scale, down, down_scale, x_scale], st, a)
    inter, d = down.shape[2] * (2 if a["format"] == "fp4" else 1), x.shape[-1]
    expect_fp8("shared_gate_up", shared[0], shared[1], a["shared_block"], (2 * inter, d))
    expect_fp8("shared_down", shared[2], shared[3], a["shared_down_block"], (d, inter))
    return out


def hc_post_pre_quant(ins, st, a):
    out, streams, post, comb, fn, base, scale, norm_weight, addend = ins
    mixed = hc_post_pre([out, streams, post, comb, fn, base, scale, addend], st, a)
    quant = a["quant"]
    expect(isinstance(quant, dict) and {"eps", "group", "scale_format"} <= set(quant) <= {"eps", "group",
                                                                                         "scale_format", "keep"},
           f"quant must be rms_norm_quant's attributes {{eps, group, scale_format, keep?}}, got {quant!r}")
    return [*mixed, *rms_norm_quant([mixed[1], norm_weight], st, quant)]
