"""TVM (apache-tvm 0.27) CPU kernels for the linear ops: y[M, N] = q(x)[M, K] @ dq(W)[N, K]^T, fp32 out.

Each builder returns a TIR PrimFunc for static shapes (N, K, M tokens), scheduled by construction for
a multi-core AVX-512 CPU (hand-written loop nests, not a schedule search):
  - output rows are split over the cores (`T.parallel`), two rows per iteration N/2 apart, so each
    core streams two weight ranges (adjacent rows interleaved defeat the hardware prefetcher), with a
    software prefetch 1 KB ahead in each;
  - the reduction over K runs in 16-lane fp32 vectors: per weight block, partial dot products in
    registers (two interleaved for M <= 2, against FMA latency), then acc += partial * block scale;
    the lanes are summed once per row; tokens go in blocks of 4 (accumulators stay in registers; the
    rows' weights stay in cache between blocks);
  - weights are read once, in their stored format, and decoded in the loop without tables: an e4m3
    byte sign-extended to int16, shifted left 7, bit 14 cleared, is the float16 of its value / 256
    (exact, subnormals included); e2m1 likewise (/ 2^14); the power of two goes into the block scale.

  dense_gemv  fp32 / bf16 weights                        basic.linear / grouped_linear
  fp8_gemv    e4m3 weights, fp32 or UE8M0 block scales   quantized.linear_fp8 / grouped_linear_fp8
  fp4_gemv    e2m1 weights, two per byte, per-32 UE8M0   dequant_fp4 (expert weights)

FP8 / FP4 kernels fuse the op's activation quantization (`act`, quant.fake_quant_act) as a first,
vectorized stage over x, bit-identical to torch's: scales max(amax, 1e-4) / 448 or their UE8M0 power of
two, e4m3 round-to-nearest-even in integer arithmetic. (NaN activations saturate to +-448 * scale;
NaN weight / scale codes are not special-cased.)

Compiled functions take torch tensors (DLPack): contiguous, any alignment (expert slices of a stacked
weight are fine); wrong shapes / dtypes raise. `build_library` (package __init__) puts a set of them
into one shared library that `tvm_ffi.load_module` loads alone.
"""

import functools
import sys

from tvm.script import tirx as T
from tvm.script.parser.core.parser import ScriptMacro

from . import build_library, host_target  # noqa: F401  (the library builder, re-exported)

VEC = 16  # fp32 lanes per vector (one AVX-512 register; two AVX2 ones)
E4M3_MAX = 448.0
SCALE_FLOOR = 1e-4
FP4_BLOCK = 32
TOKEN_BLOCK = 4  # tokens per pass over a row's weights
PREFETCH_BYTES = 1024  # software prefetch distance in each weight stream (+20% at M = 4 from DRAM)


def cdiv(a, b):
    return -(-a // b)


def _find_parser(self):
    """ScriptMacro._find_parser_def without inspect.getouterframes, which reads source context for
    every frame and made parsing these macro-heavy kernels ~3x slower. Same search: the innermost
    frame whose globals hold the parser."""
    frame = sys._getframe(1)
    while frame is not None:
        parser = frame.f_globals.get(ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")


def _fast_macros(builder):
    """Run a kernel builder with the faster macro expansion (_find_parser) patched in."""
    @functools.wraps(builder)
    def wrapper(*args, **kwargs):
        saved = ScriptMacro._find_parser_def
        ScriptMacro._find_parser_def = _find_parser
        try:
            return builder(*args, **kwargs)
        finally:
            ScriptMacro._find_parser_def = saved
    return wrapper


# --- scalar / vector expressions --------------------------------------------------------------
def _f16_bits_value(bits16):
    """int16 float16 bits -> fp32 (exact)."""
    return T.Cast("float32", T.reinterpret("float16", bits16))


def e4m3_div256(b):
    """e4m3fn byte (uint8 expr) -> its value / 256 in fp32: the int8 sign-extended and shifted left 7
    puts sign/exponent/mantissa where float16 has them (bias 15 = 7 + 8); bit 14 (a sign copy) is cleared."""
    return _f16_bits_value(T.bitwise_and(T.shift_left(T.Cast("int16", T.reinterpret("int8", b)), T.int16(7)),
                                         T.int16(-16385)))


def e2m1_div16384(byte, high):
    """The e2m1 code in the low (high=False) or high nibble of a uint8 expr -> its value / 2^14 in fp32:
    float16 bits sign << 15 | eem << 9 (e2m1 subnormal 0.5 = float16 subnormal 2^-15, exactly)."""
    b = T.Cast("uint16", byte)
    sign, mag = (T.uint16(8), T.uint16(5)) if high else (T.uint16(12), T.uint16(9))
    return _f16_bits_value(T.bitwise_or(T.bitwise_and(T.shift_left(b, sign), T.uint16(0x8000)),
                                        T.bitwise_and(T.shift_left(b, mag), T.uint16(0x0E00))))


def ue8m0_value(b):
    """UE8M0 byte -> 2^(b - 127) in fp32 (b = 0 -> 2^-127; 255 is not special-cased)."""
    b32 = T.Cast("int32", b)
    return T.reinterpret("float32", T.Select(b32 == 0, T.int32(0x00400000), T.shift_left(b32, T.int32(23))))


def pow2_ceil(s):
    """Smallest power of two >= s (positive normal fp32), exactly as quant.pow2_ceil."""
    bits = T.reinterpret("int32", s)
    up = T.Cast("int32", T.bitwise_and(bits, T.int32(0x7FFFFF)) != 0)
    return T.reinterpret("float32", T.shift_left(T.shift_right(bits, T.int32(23)) + up, T.int32(23)))


def round_e4m3(v):
    """fp32 -> the float8_e4m3fn value of torch's cast of clamp(v, +-448): round to nearest even. |v| >= 2^-6:
    at fp32 mantissa bit 20 in integer arithmetic; below, the quantum is 2^-9 (nearbyint(|v| * 512) / 512)."""
    bits = T.reinterpret("int32", v)
    abits = T.min(T.bitwise_and(bits, T.int32(0x7FFFFFFF)), T.int32(0x7F800000))
    rne = abits + T.int32(0x7FFFF) + T.bitwise_and(T.shift_right(abits, T.int32(20)), T.int32(1))
    normal = T.reinterpret("float32", T.bitwise_and(rne, T.int32(-0x100000)))
    a = T.reinterpret("float32", abits)
    sub = T.nearbyint(a * T.float32(512.0)) * T.float32(1.0 / 512.0)
    r = T.min(T.Select(a < T.float32(2.0 ** -6), sub, normal), T.float32(E4M3_MAX))
    return T.reinterpret("float32", T.bitwise_or(T.reinterpret("int32", r), T.bitwise_and(bits, T.int32(-0x80000000))))


def act_scale(amax, ue8m0):
    """Dynamic activation scale of a group: max(amax, 1e-4) / 448, or its UE8M0 power of two."""
    s = T.max(amax, T.float32(SCALE_FLOOR)) / T.float32(E4M3_MAX)
    return pow2_ceil(s) if ue8m0 else s


def _normalize_act(act):
    act = dict(act or {"mode": "none"})
    if act["mode"] not in ("none", "dynamic", "static"):
        raise ValueError(f"act mode {act['mode']!r}; allowed: none, dynamic, static")
    if act.get("scale_format", "fp32") not in ("fp32", "ue8m0"):
        raise ValueError(f"act scale_format {act['scale_format']!r}; allowed: fp32, ue8m0")
    if act["mode"] == "static" and "scale" not in act:
        raise ValueError("act mode static needs its 'scale'")
    return act


@T.macro
def group_amax(amax, xf, o, length):  # amax[0] = max |xf[o : o + length]|; amax: a [VEC] scratch buffer
    for l in T.vectorized(VEC):
        amax[l] = T.float32(0)
    for c in range(length // VEC):
        for l in T.vectorized(VEC):
            amax[l] = T.max(amax[l], T.abs(xf[o + c * VEC + l]))
    for t in range(length % VEC):
        amax[t] = T.max(amax[t], T.abs(xf[o + length // VEC * VEC + t]))
    for h in T.unroll(1, VEC):
        amax[0] = T.max(amax[0], amax[h])


# --- stage 1: activation quantization ------------------------------------------------------------
def _act_stage(rows, k, act):
    """A macro writing xq[rows * k] = fake_quant_act(x) for x flat [rows * k] (rows = M * groups), on the
    calling thread before the parallel row loop (~0.4 ns per element here: ~3 us for 8192)."""
    mode = act["mode"]
    gs = min(act.get("group", k), k) if mode == "dynamic" else k
    ue8m0 = act.get("scale_format", "fp32") == "ue8m0"
    static_s = float(act.get("scale", 0.0))
    ngroups, last = k // gs, k % gs  # full groups, length of the partial last one

    @T.macro
    def quant_group(xf, xq, o, length):  # one activation group [o, o + length)
        amax = T.alloc_buffer((VEC,), "float32")
        amax[0] = T.float32(0)
        if mode == "dynamic":
            group_amax(amax, xf, o, length)
        s: T.let[T.float32] = act_scale(amax[0], ue8m0) if mode == "dynamic" else T.float32(static_s)
        for c in range(length // VEC):
            for l in T.vectorized(VEC):
                xq[o + c * VEC + l] = round_e4m3(xf[o + c * VEC + l] / s) * s
        for t in range(length % VEC):
            xq[o + length // VEC * VEC + t] = round_e4m3(xf[o + length // VEC * VEC + t] / s) * s

    @T.macro
    def stage(xf, xq):
        for r in range(rows):
            for j in range(ngroups):
                quant_group(xf, xq, r * k + j * gs, gs)
            if last > 0:
                quant_group(xf, xq, r * k + ngroups * gs, last)

    return stage


# --- stage 2: the row loop --------------------------------------------------------------------
@T.macro
def hsum(acc, r, mb, yf, t0, n, n_total):  # yf[(t0 + m) * N + n] = sum of the VEC lanes of acc[0, r, m]
    for m in T.unroll(mb):
        for l in T.vectorized(8):
            acc[0, r, m, l] = acc[0, r, m, l] + acc[0, r, m, l + 8]
        for l in T.vectorized(4):
            acc[0, r, m, l] = acc[0, r, m, l] + acc[0, r, m, l + 4]
        for l in T.vectorized(2):
            acc[0, r, m, l] = acc[0, r, m, l] + acc[0, r, m, l + 2]
        yf[(t0 + m) * n_total + n] = acc[0, r, m, 0] + acc[0, r, m, 1]


def _token_blocks(row_macro, m_tokens, nrows, rstride):
    """A macro running row_macro's rows for all tokens, in blocks of <= TOKEN_BLOCK tokens (accumulators
    for nrows x block x VEC lanes stay in registers); the rows' weights stay in cache between blocks."""
    mb = min(m_tokens, TOKEN_BLOCK)
    full, rem = row_macro(nrows, rstride, mb), row_macro(nrows, rstride, m_tokens % mb or mb)

    @T.macro
    def blocks(xs, wf, sf, yf, n0):
        for tb in range(m_tokens // mb):
            full(xs, wf, sf, yf, n0, tb * mb, 0)
        if m_tokens % mb > 0:
            rem(xs, wf, sf, yf, n0, m_tokens // mb * mb, 0)
    return blocks


def _rows_kernel(name, n, k, m_tokens, groups, w_args, decode, block, scale_of, act, *, row_macros=False):
    """The template of dense_gemv / fp8_gemv. decode(wf, i) -> fp32 weight element i of the flat weight,
    divided by the format's power of two; scale_of(sf, n, kb) -> block scale * that power for weight
    row n, K block kb (None: unscaled). Per K block, partial dot products, then acc += partial * scale;
    for blocks of <= 2 vectors and several tokens, each weight vector is scaled instead (fewer FMAs).
    A block covering K (per-channel; dense) runs as 128-wide tiles of scale block 0. `row_macros`: return
    the row macro factory row_macro(nrows, rstride, mb) -> rows(xs, wf, sf, yf, n0, t0, w0) instead."""
    act = _normalize_act(act)
    if n % groups:
        raise ValueError(f"N={n} is not a multiple of groups={groups}")
    if block[1] >= k:  # one scale column: loop over 128-wide K tiles, all in scale block 0
        bk, skb = 128, (lambda kb: 0)
    elif block[1] % VEC:
        raise ValueError(f"block K {block[1]} must be a multiple of {VEC} (or cover K={k})")
    else:
        bk, skb = block[1], (lambda kb: kb)
    rows_per_group, xrows = n // groups, m_tokens * groups
    x_shape = (m_tokens, k) if groups == 1 else (m_tokens, groups, k)
    y_shape = (m_tokens, n) if groups == 1 else (m_tokens, groups, rows_per_group)
    nfull, last = k // bk, k % bk  # full K blocks; length of the partial last block
    cpb = bk // VEC  # vectors per full block
    # Two rows per iteration, N/2 apart: two weight streams per core (adjacent rows interleaved defeat
    # the hardware prefetcher).
    nrows_par = 2 if n >= 2 else 1
    # grouped: pair rows inside a group (R/2 apart), so both use the same x
    in_group = groups > 1 and rows_per_group % 2 == 0
    half = rows_per_group // 2 if in_group else n // nrows_par
    quant = act["mode"] != "none"
    stage1 = _act_stage(xrows, k, act) if quant else None
    w_dtype, s_shape, s_dtype = w_args
    esize = 4 if w_dtype == "float32" else 2 if w_dtype == "bfloat16" else 1
    pf_dist, pf_lines = PREFETCH_BYTES // esize, max(1, bk * esize // 64)
    has_scale = scale_of is not None
    s_size = s_shape[0] * s_shape[1] if has_scale else n * k
    s_dtype = s_dtype if has_scale else w_dtype

    def scale(sf, row, kb):
        return scale_of(sf, row, skb(kb)) if has_scale else T.float32(1.0)

    def x_at(n0, r, rstride, m, kk):  # flat index of x[m, group of row n0 + r * rstride, kk]
        group = n0 // rows_per_group if in_group else (n0 + r * rstride) // rows_per_group
        return (m * groups + group) * k + kk

    def row_macro(nrows, rstride, mb):  # rows n0 + r * rstride (r < nrows), tokens t0 .. t0 + mb - 1
        nparts = 2 if mb <= 2 and cpb % 2 == 0 else 1  # two interleaved partial sums (FMA latency)
        per_vec = has_scale and cpb <= 2 and mb > 1  # small blocks, several tokens: scale each vector

        @T.macro
        def vec_chunk(dst, xs, wf, sf, n0, t0, k0, kb, scaled, p, w0):  # dst[p, r, m] += x[t0+m, k0:+VEC] w[row, k0:+VEC]
            wv = T.alloc_buffer((nrows, VEC), "float32")
            for r in T.unroll(nrows):
                for l in T.vectorized(VEC):
                    if scaled:
                        wv[r, l] = decode(wf, (w0 + n0 + r * rstride) * k + k0 + l) \
                            * scale(sf, w0 + n0 + r * rstride, kb)
                    else:
                        wv[r, l] = decode(wf, (w0 + n0 + r * rstride) * k + k0 + l)
            for m, r in T.grid(mb, nrows):
                for l in T.vectorized(VEC):
                    dst[p, r, m, l] = dst[p, r, m, l] + xs[x_at(n0, r, rstride, t0 + m, k0 + l)] * wv[r, l]

        @T.macro
        def rows(xs, wf, sf, yf, n0, t0, w0):  # w0: weight row offset (experts)
            acc = T.alloc_buffer((1, nrows, mb, VEC), "float32")
            part = T.alloc_buffer((nparts, nrows, mb, VEC), "float32")
            for r, m, l in T.grid(nrows, mb, VEC):
                acc[0, r, m, l] = T.float32(0)
            for kb in range(nfull):
                for r, line in T.grid(nrows, pf_lines):  # software prefetch, pf_dist elements ahead
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                        wf[(w0 + n0 + r * rstride) * k + kb * bk + line * (64 // esize) + pf_dist]), 0, 3, 1))
                if per_vec:
                    for c in T.unroll(cpb):
                        vec_chunk(acc, xs, wf, sf, n0, t0, kb * bk + c * VEC, kb, True, 0, w0)
                else:
                    for p, r, m, l in T.grid(nparts, nrows, mb, VEC):
                        part[p, r, m, l] = T.float32(0)
                    for c in T.unroll(cpb // nparts):
                        vec_chunk(part, xs, wf, sf, n0, t0, kb * bk + c * nparts * VEC, kb, False, 0, w0)
                        if nparts == 2:
                            vec_chunk(part, xs, wf, sf, n0, t0, kb * bk + (c * 2 + 1) * VEC, kb, False, 1, w0)
                    for r, m in T.grid(nrows, mb):
                        for l in T.vectorized(VEC):
                            if nparts == 2:
                                acc[0, r, m, l] = acc[0, r, m, l] + (part[0, r, m, l] + part[1, r, m, l]) \
                                    * scale(sf, w0 + n0 + r * rstride, kb)
                            else:
                                acc[0, r, m, l] = acc[0, r, m, l] + part[0, r, m, l] * scale(sf, w0 + n0 + r * rstride, kb)
            if last > 0:  # partial last block (or all of K for a block covering K): vectors, scalar lanes
                for p, r, m, l in T.grid(nparts, nrows, mb, VEC):
                    part[p, r, m, l] = T.float32(0)
                for c in range(last // VEC):
                    vec_chunk(part, xs, wf, sf, n0, t0, nfull * bk + c * VEC, nfull, False, 0, w0)
                for t, r, m in T.grid(last % VEC, nrows, mb):
                    part[0, r, m, t] = part[0, r, m, t] + xs[x_at(n0, r, rstride, t0 + m, k - last % VEC + t)] \
                        * decode(wf, (w0 + n0 + r * rstride) * k + k - last % VEC + t)
                for r, m in T.grid(nrows, mb):
                    for l in T.vectorized(VEC):
                        acc[0, r, m, l] = acc[0, r, m, l] + part[0, r, m, l] * scale(sf, w0 + n0 + r * rstride, nfull)
            for r in T.unroll(nrows):
                hsum(acc, r, mb, yf, t0, n0 + r * rstride, n)

        return rows

    if row_macros:
        return row_macro
    rows_main, rows_one = _token_blocks(row_macro, m_tokens, nrows_par, half), _token_blocks(row_macro, m_tokens, 1, 1)

    @T.macro
    def row_loop(xs, wf, sf, yf):
        for i in T.parallel(n // nrows_par):
            rows_main(xs, wf, sf, yf, i // half * rows_per_group + i % half if in_group else i)
        for i in range(n % nrows_par):
            rows_one(xs, wf, sf, yf, n // nrows_par * nrows_par + i)

    @T.macro
    def body(x, w, s, y):
        xf = T.decl_buffer((xrows * k,), "float32", data=x.data)
        wf = T.decl_buffer((n * k,), w_dtype, data=w.data)
        sf = T.decl_buffer((s_size,), s_dtype, data=s.data)
        yf = T.decl_buffer((m_tokens * n,), "float32", data=y.data)
        if quant:
            xq = T.alloc_buffer((xrows * k,), "float32")
            stage1(xf, xq)
            row_loop(xq, wf, sf, yf)
        else:
            row_loop(xf, wf, sf, yf)

    if has_scale:
        @T.prim_func
        def kernel(x_h: T.handle, w_h: T.handle, s_h: T.handle, y_h: T.handle):
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            x = T.match_buffer(x_h, x_shape, "float32", align=4)
            w = T.match_buffer(w_h, (n, k), w_dtype, align=1)
            s = T.match_buffer(s_h, s_shape, s_dtype, align=1)
            y = T.match_buffer(y_h, y_shape, "float32", align=4)
            body(x, w, s, y)
    else:
        @T.prim_func
        def kernel(x_h: T.handle, w_h: T.handle, y_h: T.handle):
            T.func_attr({"global_symbol": name, "tir.noalias": True})
            x = T.match_buffer(x_h, x_shape, "float32", align=4)
            w = T.match_buffer(w_h, (n, k), w_dtype, align=1)
            y = T.match_buffer(y_h, y_shape, "float32", align=4)
            body(x, w, w, y)
    return kernel


# --- public builders ---------------------------------------------------------------------------
@_fast_macros
def dense_gemv(n, k, m=1, *, weight_dtype="float32", groups=1, name=None):
    """y = x W^T with fp32 or bf16 weights (basic.linear; groups > 1: basic.grouped_linear).
    Compiled: f(x f32 [M, K] | [M, G, K], w <weight_dtype> [N, K], y f32 [M, N] | [M, G, N/G])."""
    if weight_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"weight_dtype {weight_dtype!r}; allowed: float32, bfloat16")
    return _rows_kernel(name or f"dense_{weight_dtype}_n{n}_k{k}_m{m}_g{groups}", n, k, m, groups,
                        (weight_dtype, None, None), lambda wf, i: T.Cast("float32", wf[i]), (n, k), None, None)


@_fast_macros
def fp8_gemv(n, k, m=1, *, block=(128, 128), scale_format="fp32", act=None, groups=1, name=None):
    """y = fake_quant_act(x, act) dq(W)^T, W e4m3 with block scales (quantized.linear_fp8; groups > 1:
    grouped_linear_fp8). Compiled: f(x f32 [M, K] | [M, G, K], w uint8 [N, K] (the e4m3 bits),
    s [ceil(N/bn), ceil(K/bk)] f32 (scale_format fp32) or uint8 (ue8m0: the float8_e8m0fnu bytes),
    y f32 [M, N] | [M, G, N/G])."""
    bn, bk = block
    act_name = _normalize_act(act)["mode"]
    return _rows_kernel(name or f"fp8_{scale_format}_b{bn}x{bk}_{act_name}_n{n}_k{k}_m{m}_g{groups}", n, k, m, groups,
                        *fp8_format(n, k, block, scale_format), block, fp8_scale(k, block, scale_format), act)


def fp8_format(n, k, block, scale_format):
    """(w_args, decode) of e4m3 weights [N, K] with [ceil(N/bn), ceil(K/bk)] block scales."""
    if scale_format not in ("fp32", "ue8m0"):
        raise ValueError(f"scale_format {scale_format!r}; allowed: fp32, ue8m0")
    s_dtype = "float32" if scale_format == "fp32" else "uint8"
    return ("uint8", (cdiv(n, block[0]), cdiv(k, block[1])), s_dtype), lambda wf, i: e4m3_div256(wf[i])


def fp8_scale(k, block, scale_format):
    """scale_of(sf, row, kb): the block scale of weight row `row`, K block kb, times 256 (e4m3_div256)."""
    bn, sk = block[0], cdiv(k, block[1])
    if scale_format == "fp32":
        return lambda sf, row, kb: sf[row // bn * sk + kb] * T.float32(256.0)
    return lambda sf, row, kb: ue8m0_value(sf[row // bn * sk + kb]) * T.float32(256.0)


@_fast_macros
def fp4_gemv(n, k, m=1, *, act=None, name=None):
    """y = fake_quant_act(x, act) dequant_fp4(W)^T, W e2m1 packed two per byte (even column in the low
    nibble), one UE8M0 scale per row per 32 inputs (the expert weights of quantized.moe_experts_q).
    Compiled: f(x f32 [M, K], w uint8 [N, K/2], s uint8 [N, ceil(K/32)] (float8_e8m0fnu bytes), y f32 [M, N]).
    Stage 1 quantizes x (if `act`) and de-interleaves each 32-block (even columns, then odd) so the row
    loop reads x contiguously against the low / high nibbles of 16 weight bytes."""
    act = _normalize_act(act)
    if k % 2:
        raise ValueError(f"FP4 packs two values per byte; K={k} is odd")
    kh, nb = k // 2, cdiv(k, FP4_BLOCK)
    nfull, last = k // FP4_BLOCK, k % FP4_BLOCK  # full 32-blocks; elements in the partial last one
    hv = FP4_BLOCK // 2  # bytes per block (= VEC)
    quant = act["mode"] != "none"
    stage1 = _act_stage(m, k, act) if quant else None

    @T.macro
    def deinterleave(xs, xd):  # xd[r, b*32 + i] = xs[r, b*32 + 2i], xd[r, b*32 + 16 + i] = xs[r, b*32 + 2i + 1]
        for r, b in T.grid(m, nfull):
            for i in T.vectorized(hv):
                xd[r * nb * FP4_BLOCK + b * FP4_BLOCK + i] = xs[r * k + b * FP4_BLOCK + 2 * i]
                xd[r * nb * FP4_BLOCK + b * FP4_BLOCK + hv + i] = xs[r * k + b * FP4_BLOCK + 2 * i + 1]
        for r, i in T.grid(m, FP4_BLOCK * (last > 0)):  # the partial last block: zero padding, then values
            xd[r * nb * FP4_BLOCK + nfull * FP4_BLOCK + i] = T.float32(0)
        for r, i in T.grid(m, last // 2):
            xd[r * nb * FP4_BLOCK + nfull * FP4_BLOCK + i] = xs[r * k + nfull * FP4_BLOCK + 2 * i]
            xd[r * nb * FP4_BLOCK + nfull * FP4_BLOCK + hv + i] = xs[r * k + nfull * FP4_BLOCK + 2 * i + 1]

    def row_macro(nrows, rstride, mb):  # rows n0 + r * rstride (r < nrows), tokens t0 .. t0 + mb - 1
        @T.macro
        def block(acc, xd, wf, sf, n0, t0, b, nbytes, w0):  # one 32-block (nbytes <= 16 bytes per row)
            wv = T.alloc_buffer((nrows, 2, VEC), "float32")
            for r in T.unroll(nrows):
                for l in T.vectorized(hv):
                    wv[r, 0, l] = T.float32(0)
                    wv[r, 1, l] = T.float32(0)
                for l in T.vectorized(nbytes) if nbytes == hv else T.serial(nbytes):
                    wv[r, 0, l] = e2m1_div16384(wf[(w0 + n0 + r * rstride) * kh + b * hv + l], False) \
                        * (ue8m0_value(sf[(w0 + n0 + r * rstride) * nb + b]) * T.float32(16384.0))
                    wv[r, 1, l] = e2m1_div16384(wf[(w0 + n0 + r * rstride) * kh + b * hv + l], True) \
                        * (ue8m0_value(sf[(w0 + n0 + r * rstride) * nb + b]) * T.float32(16384.0))
            for h, i, r in T.grid(2, mb, nrows):
                for l in T.vectorized(hv):
                    acc[h, r, i, l] = acc[h, r, i, l] + xd[(t0 + i) * nb * FP4_BLOCK + b * FP4_BLOCK + h * hv + l] \
                        * wv[r, h, l]

        @T.macro
        def rows(xd, wf, sf, yf, n0, t0, w0):  # lanes: acc[0] against the low nibbles, acc[1] the high ones
            acc = T.alloc_buffer((2, nrows, mb, VEC), "float32")
            for h, r, i, l in T.grid(2, nrows, mb, VEC):
                acc[h, r, i, l] = T.float32(0)
            for b in range(nfull):
                for r in T.unroll(nrows):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                        wf[(w0 + n0 + r * rstride) * kh + b * hv + PREFETCH_BYTES]), 0, 3, 1))
                block(acc, xd, wf, sf, n0, t0, b, hv, w0)
            if last > 0:
                block(acc, xd, wf, sf, n0, t0, nfull, last // 2, w0)
            for r, i in T.grid(nrows, mb):
                for l in T.vectorized(VEC):
                    acc[0, r, i, l] = acc[0, r, i, l] + acc[1, r, i, l]
            for r in T.unroll(nrows):
                hsum(acc, r, mb, yf, t0, n0 + r * rstride, n)

        return rows

    nrows_par = 2 if m <= 2 and n >= 2 else 1  # (m > 2: two rows spill registers)
    rows_main, rows_one = _token_blocks(row_macro, m, nrows_par, n // nrows_par), _token_blocks(row_macro, m, 1, 1)

    @T.prim_func
    def kernel(x_h: T.handle, w_h: T.handle, s_h: T.handle, y_h: T.handle):
        T.func_attr({"global_symbol": name or f"fp4_{act['mode']}_n{n}_k{k}_m{m}", "tir.noalias": True})
        x = T.match_buffer(x_h, (m, k), "float32", align=4)
        w = T.match_buffer(w_h, (n, kh), "uint8", align=1)
        s = T.match_buffer(s_h, (n, nb), "uint8", align=1)
        y = T.match_buffer(y_h, (m, n), "float32", align=4)
        xf = T.decl_buffer((m * k,), "float32", data=x.data)
        wf = T.decl_buffer((n * kh,), "uint8", data=w.data)
        sf = T.decl_buffer((n * nb,), "uint8", data=s.data)
        yf = T.decl_buffer((m * n,), "float32", data=y.data)
        xd = T.alloc_buffer((m * nb * FP4_BLOCK,), "float32")
        if quant:
            xq = T.alloc_buffer((m * k,), "float32")
            stage1(xf, xq)
            deinterleave(xq, xd)
        else:
            deinterleave(xf, xd)
        for i in T.parallel(n // nrows_par):
            rows_main(xd, wf, sf, yf, i)
        for i in range(n % nrows_par):
            rows_one(xd, wf, sf, yf, n // nrows_par * nrows_par + i)

    return kernel
