"""TVM (apache-tvm 0.27) CPU kernels for the KV compressor (runtime/kernels/compressor.py: compress) and the
embedding lookups (basic.embed, quantized.embed_fp8), hand-written loop nests as rowwise.py.

compress does the whole op in one call, per batch row b (B, S, T symbolic; pos0 a scalar argument):
  1. every window w < n_win = (pos0 % rate + S) // rate closed by this call becomes entry pos0 // rate + w,
     one task per (b, w): over the cores from PAR_MIN_WORK (B x n_win x positions x d) on, else on the
     calling thread (decode: no parallel launch). Per 16-lane vector of channels: the max of the logits
     gate + ape over the window's positions, then sums of exp(logit - max) and of kv * exp (two sweeps;
     tokens u < pos0 % rate come from buf_*, overlap's previous-window half of window 0 from ovl_*);
     pooled = acc / sum; rms_norm with weight (rowwise._inv_rms); interleaved RoPE at position
     (pos0 // rate + w) * rate on the trailing rope_dim channels (rowwise._sin_cos, times rope_scale);
     the row encoded bit-identically to quant.encode_entries (f32 / bf16 / fp8_split: attention._codec;
     fp8_block: e4m3 of x / (max(amax, 1e-4) / 448) per 128 channels, then the fp32 scales little-endian);
  2. overlap: ovl_kv / ovl_gate <- Ca of the last closed window (gate + ape), after step 1 has read them;
  3. buf_kv / buf_gate <- the raw rows of the open window's new tokens.
Entries differ from torch's by fp32 summation order and the exp / sin / cos polynomials (<= 2 ulp); fp8 /
bf16 codes only where that moves a value across a rounding boundary. Buffers and overlap state are exact.
A tiered entry store (kv_tiers) is not handled here: the kernel writes rows of a dense [B, T, row] tensor.

  compress   f(kv [B, S, C], gate [B, S, C], ape [rate, C], norm_weight [d], inv_freq [rope_dim/2],
               buf_kv [B, rate, C], buf_gate [B, rate, C], (overlap: ovl_kv [B, rate, d], ovl_gate [B, rate, d],)
               entries [B, T, row], pos0)       C = 2d with overlap, else d; row / dtype: quant.entry_layout
  embed      f(tokens int64 [B, S], weight f32 | bf16 [V, D], out f32 [B, S, D])
  embed_fp8  f(tokens int64 [B, S], weight uint8 [V, D] (e4m3 bits), scale [ceil(V/bv), ceil(D/bd)] f32 |
               uint8 (ue8m0 bytes), out f32 [B, S, D])          bit-identical: e4m3 / 256 times scale * 256

All fp32 (tokens int64), contiguous; the call updates the state in place. compress raises unless pos0 >= 0
and (pos0 + S) // rate <= T; the embeddings raise on a token id outside [0, V).

Measured (2-core AMD EPYC znver4, shared, quiet at the time; B = 1, fp8 entries, rope_dim 16 or 64 alike; in a
process without tvm imported; torch reference in brackets): decode S = 1 appending a token 1.2-1.6 us (14-20),
closing a window 1.8-2.1 us at rate 4 (CSA d 128, indexer d 64), 2.7-3.6 us at rate 32 (HCA) (225-315 us);
prefill S = 512 from pos0 0: CSA 28-39 us, indexer keys 17-19 us, HCA 14-17 us (330-720 us); serial windows
take ~2x that (57 us CSA), but a parallel launch while another process holds a core can cost milliseconds.
embed: 1.5 us a token (3.3-4.6, fp8 25); 512 tokens x 1024: 30-48 us (50-67; fp8 1300-2200).
"""

from tvm.script import tirx as T
from v4c.runtime.quant import INDEX_FP8_GROUP, entry_layout

from .attention import STORAGE as SPLIT_STORAGE
from .attention import _codec, e4m3_byte, neg_inf
from .gemv import VEC, _fast_macros, act_scale, cdiv, e4m3_div256, group_amax, ue8m0_value
from .rowwise import PAR_MIN_ELEMS, _attrs, _each, _exp, _inv_rms, _rows, _sin_cos

STORAGE = {**SPLIT_STORAGE, "fp8_block": "uint8"}
PAR_MIN_WORK = 16384  # windows x positions x channels from which windows go over the cores (2 cores: even at ~16k)


def _fma(a, b, c):
    """a * b + c, rounded once (a fixed choice: LLVM contracts a * b - c * d either way, by its context)."""
    return T.call_llvm_pure_intrin("float32", "llvm.fma.f32", a, b, c)


def _fp8_block_encoder(d):
    """encode(xf, xo, sf, so): xf[xo : xo + d] fp32 -> the fp8_block row sf[so : so + d + 4 * groups]
    (quant._encode_fp8_block: e4m3 of x / scale, scale = max(amax, 1e-4) / 448 per 128 channels)."""
    groups = cdiv(d, INDEX_FP8_GROUP)

    @T.macro
    def encode_group(xf, xo, sf, so, g0, glen):  # channels g0 .. g0 + glen - 1 (one scale)
        amax = T.alloc_buffer((VEC,), "float32")
        group_amax(amax, xf, xo + g0, glen)
        s: T.let[T.float32] = act_scale(amax[0], False)
        for i in T.vectorized(glen):
            sf[so + g0 + i] = e4m3_byte(xf[xo + g0 + i] / s)
        for k in T.unroll(4):  # the fp32 scale, little endian
            sf[so + d + g0 // INDEX_FP8_GROUP * 4 + k] = T.Cast("uint8", T.bitwise_and(
                T.shift_right(T.reinterpret("uint32", s), T.Cast("uint32", 8 * k)), T.uint32(0xFF)))

    @T.macro
    def encode(xf, xo, sf, so):
        for g in range(d // INDEX_FP8_GROUP):
            encode_group(xf, xo, sf, so, g * INDEX_FP8_GROUP, INDEX_FP8_GROUP)
        if d % INDEX_FP8_GROUP > 0:
            encode_group(xf, xo, sf, so, (groups - 1) * INDEX_FP8_GROUP, d % INDEX_FP8_GROUP)
    return encode


# --- compress ----------------------------------------------------------------------------------
@_fast_macros
def compress(d, rate, rope_dim, *, overlap, eps, rope_scale=1.0, kv_format="f32", name):
    """The `compress` op for entry width d, window `rate` tokens, rope_dim RoPE channels (= 2 len(inv_freq)),
    storage `kv_format` (f32, bf16, fp8_split, fp8_block; fp4_block is not supported). Compiled argument
    order: see the module docstring."""
    if kv_format not in STORAGE:
        raise ValueError(f"kv_format {kv_format!r}; the tvm compress kernel supports {', '.join(STORAGE)}")
    if rope_dim % 2 or not 0 < rope_dim <= d:
        raise ValueError(f"rope_dim={rope_dim} must be even and in (0, d={d}]")
    if rate < 1:
        raise ValueError(f"rate={rate} must be >= 1")
    ch, npos, half, nope = (2 if overlap else 1) * d, (2 if overlap else 1) * rate, rope_dim // 2, d - rope_dim
    sdtype, width = STORAGE[kv_format], entry_layout(kv_format, d, rope_dim)[1]
    encode = _fp8_block_encoder(d) if kv_format == "fp8_block" else _codec(kv_format, d, rope_dim)[0]
    dpad = cdiv(d, VEC) * VEC

    @T.macro
    def token(kvf, gf, apef, bkv, bg, kvv, lg, b, seq, nbuf, u, j, col, lanes):
        """kvv / lg[0:lanes] <- kv and gate + ape[j] of token u of the call's stream (buffered ones first),
        channels col .."""
        if u < nbuf:
            for l in T.vectorized(lanes):
                kvv[l] = bkv[(b * rate + u) * ch + col + l]
                lg[l] = bg[(b * rate + u) * ch + col + l] + apef[j * ch + col + l]
        else:
            for l in T.vectorized(lanes):
                kvv[l] = kvf[(b * seq + u - nbuf) * ch + col + l]
                lg[l] = gf[(b * seq + u - nbuf) * ch + col + l] + apef[j * ch + col + l]

    @T.macro
    def fold(m, s, acc, kvv, lg, lanes, second):  # first sweep: the max; second: sums of exp and kv * exp
        for l in T.vectorized(lanes):
            if second:
                lg[l] = _exp(lg[l] - m[l])
                s[l] = s[l] + lg[l]
                acc[l] = acc[l] + kvv[l] * lg[l]
            else:
                m[l] = T.max(m[l], lg[l])

    @T.macro
    def sweep(io, m, s, acc, b, seq, nbuf, first, w, c0, lanes, second):  # every position of window w
        kvv = T.alloc_buffer((VEC,), "float32")
        lg = T.alloc_buffer((VEC,), "float32")
        if overlap:  # (loop extents, not ifs: tvm 0.27's HoistIfThenElse drops loop bodies around nested ifs)
            for j in range(T.Select(w > 0, rate, 0)):  # Ca of window w - 1, closed in this call
                token(*io[:5], kvv, lg, b, seq, nbuf, (w - 1) * rate + j, j, c0, lanes)
                fold(m, s, acc, kvv, lg, lanes, second)
            for j in range(T.Select(T.And(w == 0, first > 0), rate, 0)):  # ... in an earlier one: saved, ape added
                for l in T.vectorized(lanes):
                    kvv[l] = io[5][(b * rate + j) * d + c0 + l]
                    lg[l] = io[6][(b * rate + j) * d + c0 + l]
                fold(m, s, acc, kvv, lg, lanes, second)
        for j in range(rate):  # this window's tokens (Cb with overlap)
            token(*io[:5], kvv, lg, b, seq, nbuf, w * rate + j, j, c0 + ch - d, lanes)
            fold(m, s, acc, kvv, lg, lanes, second)

    @T.macro
    def pool_span(io, pf, b, seq, nbuf, first, w, c0, lanes):  # pf[c0 : c0 + lanes] = the softmax-pooled kv
        m = T.alloc_buffer((VEC,), "float32")
        s = T.alloc_buffer((VEC,), "float32")
        acc = T.alloc_buffer((VEC,), "float32")
        for l in T.vectorized(lanes):
            m[l] = neg_inf()
            s[l] = T.float32(0)
            acc[l] = T.float32(0)
        sweep(io, m, s, acc, b, seq, nbuf, first, w, c0, lanes, False)
        sweep(io, m, s, acc, b, seq, nbuf, first, w, c0, lanes, True)
        for l in T.vectorized(lanes):
            pf[c0 + l] = acc[l] / s[l]

    @T.macro
    def angle(inv, cs, sn, pos, i):
        cs[i] = _sin_cos(pos * inv[i], True) * T.float32(rope_scale)
        sn[i] = _sin_cos(pos * inv[i], False) * T.float32(rope_scale)

    @T.macro
    def normed(pooled, nw, r, j):
        pooled[0, j] = nw[j] * (pooled[0, j] * r)

    @T.macro
    def window(io, nw, inv, entf, b, seq, tcap, nbuf, first, w):  # entry first + w of batch row b
        pooled = T.alloc_buffer((1, dpad), "float32")
        pf = T.decl_buffer((dpad,), "float32", data=pooled.data)
        red = T.alloc_buffer((4 * VEC,), "float32")
        cs = T.alloc_buffer((half,), "float32")
        sn = T.alloc_buffer((half,), "float32")
        for c in range(d // VEC):
            pool_span(io, pf, b, seq, nbuf, first, w, c * VEC, VEC)
        if d % VEC > 0:
            pool_span(io, pf, b, seq, nbuf, first, w, d // VEC * VEC, d % VEC)
        _inv_rms(red, pooled, 0, d, eps)
        _each(normed, (pooled, nw, red[0]), d)
        _each(angle, (inv, cs, sn, T.Cast("float32", (first + w) * rate)), half)
        for i in range(half):  # (a, b) -> (a cos - b sin, b cos + a sin); explicit FMAs: every kernel rounds alike
            a: T.let[T.float32] = pf[nope + 2 * i]
            bb: T.let[T.float32] = pf[nope + 2 * i + 1]
            pf[nope + 2 * i] = _fma(a, cs[i], -(bb * sn[i]))
            pf[nope + 2 * i + 1] = _fma(bb, cs[i], a * sn[i])
        encode(pf, 0, entf, (b * tcap + first + w) * width)

    @T.macro
    def copy(src, so, dst, do, j):
        dst[do + j] = src[so + j]

    @T.macro
    def save_span(io, b, seq, nbuf, nwin, c0, lanes):  # ovl_*[b, :, c0 : c0 + lanes] <- Ca of window nwin - 1
        kvv = T.alloc_buffer((VEC,), "float32")
        lg = T.alloc_buffer((VEC,), "float32")
        for j in range(rate):
            token(*io[:5], kvv, lg, b, seq, nbuf, (nwin - 1) * rate + j, j, c0, lanes)
            for l in T.vectorized(lanes):
                io[5][(b * rate + j) * d + c0 + l] = kvv[l]
                io[6][(b * rate + j) * d + c0 + l] = lg[l]

    @T.macro
    def body(kv, gate, ape, nw, inv, bkv, bg, okv, og, ent, batch, seq, tcap, pos0):
        assert pos0 >= 0, "compress: pos0 must be >= 0"
        assert (pos0 + seq) // rate <= tcap, "compress: entries capacity T < (pos0 + S) // rate"
        kvf = T.decl_buffer((batch * seq * ch,), "float32", data=kv.data)
        gf = T.decl_buffer((batch * seq * ch,), "float32", data=gate.data)
        apef = T.decl_buffer((rate * ch,), "float32", data=ape.data)
        bkvf = T.decl_buffer((batch * rate * ch,), "float32", data=bkv.data)
        bgf = T.decl_buffer((batch * rate * ch,), "float32", data=bg.data)
        okvf = T.decl_buffer((batch * rate * d,), "float32", data=okv.data)
        ogf = T.decl_buffer((batch * rate * d,), "float32", data=og.data)
        entf = T.decl_buffer((batch * tcap * width,), sdtype, data=ent.data)
        io = (kvf, gf, apef, bkvf, bgf, okvf, ogf)
        nbuf: T.let[T.int32] = pos0 % rate
        first: T.let[T.int32] = pos0 // rate
        nwin: T.let[T.int32] = (nbuf + seq) // rate
        keep: T.let[T.int32] = T.max(nwin * rate - nbuf, 0)
        if batch * nwin * (npos * d) >= PAR_MIN_WORK:  # 1. the closed windows' entries
            for i in T.parallel(batch * nwin):
                window(io, nw, inv, entf, i // nwin, seq, tcap, nbuf, first, i % nwin)
        else:
            for i in range(batch * nwin):
                window(io, nw, inv, entf, i // nwin, seq, tcap, nbuf, first, i % nwin)
        if overlap:  # 2. (before 3: may read buffered tokens)
            for b in range(T.Select(nwin > 0, batch, 0)):
                for c in range(d // VEC):
                    save_span(io, b, seq, nbuf, nwin, c * VEC, VEC)
                if d % VEC > 0:
                    save_span(io, b, seq, nbuf, nwin, d // VEC * VEC, d % VEC)
        for b, i in T.grid(batch, seq - keep):  # 3. new tokens of the open window (from token `keep`)
            _each(copy, (kvf, (b * seq + keep + i) * ch, bkvf, (b * rate + nbuf + keep + i - nwin * rate) * ch), ch)
            _each(copy, (gf, (b * seq + keep + i) * ch, bgf, (b * rate + nbuf + keep + i - nwin * rate) * ch), ch)

    if overlap:
        @T.prim_func
        def kernel(kv_h: T.handle, g_h: T.handle, a_h: T.handle, nw_h: T.handle, f_h: T.handle, bk_h: T.handle,
                   bg_h: T.handle, ok_h: T.handle, og_h: T.handle, e_h: T.handle, pos0: T.int32):
            T.func_attr(_attrs(name))
            batch, seq, tcap = T.int32(), T.int32(), T.int32()
            kv = T.match_buffer(kv_h, (batch, seq, ch), "float32", align=4)
            gate = T.match_buffer(g_h, (batch, seq, ch), "float32", align=4)
            ape = T.match_buffer(a_h, (rate, ch), "float32", align=4)
            nw = T.match_buffer(nw_h, (d,), "float32", align=4)
            inv = T.match_buffer(f_h, (half,), "float32", align=4)
            bkv = T.match_buffer(bk_h, (batch, rate, ch), "float32", align=4)
            bg = T.match_buffer(bg_h, (batch, rate, ch), "float32", align=4)
            okv = T.match_buffer(ok_h, (batch, rate, d), "float32", align=4)
            og = T.match_buffer(og_h, (batch, rate, d), "float32", align=4)
            ent = T.match_buffer(e_h, (batch, tcap, width), sdtype, align=1)
            body(kv, gate, ape, nw, inv, bkv, bg, okv, og, ent, batch, seq, tcap, pos0)
    else:
        @T.prim_func
        def kernel(kv_h: T.handle, g_h: T.handle, a_h: T.handle, nw_h: T.handle, f_h: T.handle, bk_h: T.handle,
                   bg_h: T.handle, e_h: T.handle, pos0: T.int32):
            T.func_attr(_attrs(name))
            batch, seq, tcap = T.int32(), T.int32(), T.int32()
            kv = T.match_buffer(kv_h, (batch, seq, ch), "float32", align=4)
            gate = T.match_buffer(g_h, (batch, seq, ch), "float32", align=4)
            ape = T.match_buffer(a_h, (rate, ch), "float32", align=4)
            nw = T.match_buffer(nw_h, (d,), "float32", align=4)
            inv = T.match_buffer(f_h, (half,), "float32", align=4)
            bkv = T.match_buffer(bk_h, (batch, rate, ch), "float32", align=4)
            bg = T.match_buffer(bg_h, (batch, rate, ch), "float32", align=4)
            ent = T.match_buffer(e_h, (batch, tcap, width), sdtype, align=1)
            body(kv, gate, ape, nw, inv, bkv, bg, bkv, bg, ent, batch, seq, tcap, pos0)
    return kernel


# --- embeddings --------------------------------------------------------------------------------
def _embed_kernel(name, dim, vocab, w_dtype, row_macro, scale_args=None):
    """f(tokens [B, S], weight [V, D], (scale,) out [B, S, D]): ids checked, then row_macro(tok, wf, sf, of, t)
    per token (over the cores from PAR_MIN_ELEMS output elements)."""
    @T.macro
    def body(tokens, w, s, out, batch, seq):
        tok = T.decl_buffer((batch * seq,), "int64", data=tokens.data)
        for t in range(batch * seq):
            assert 0 <= tok[t] and tok[t] < T.int64(vocab), f"{name}: token id outside [0, {vocab})"
        wf = T.decl_buffer((vocab * dim,), w_dtype, data=w.data)
        of = T.decl_buffer((batch * seq * dim,), "float32", data=out.data)
        _rows(row_macro, (tok, wf, s, of), batch * seq, batch * seq * dim >= PAR_MIN_ELEMS)

    if scale_args is None:
        @T.prim_func
        def kernel(t_h: T.handle, w_h: T.handle, o_h: T.handle):
            T.func_attr(_attrs(name))
            batch, seq = T.int32(), T.int32()
            tokens = T.match_buffer(t_h, (batch, seq), "int64", align=8)
            w = T.match_buffer(w_h, (vocab, dim), w_dtype, align=2)
            out = T.match_buffer(o_h, (batch, seq, dim), "float32", align=4)
            body(tokens, w, w, out, batch, seq)
    else:
        s_shape, s_dtype = scale_args

        @T.prim_func
        def kernel(t_h: T.handle, w_h: T.handle, s_h: T.handle, o_h: T.handle):
            T.func_attr(_attrs(name))
            batch, seq = T.int32(), T.int32()
            tokens = T.match_buffer(t_h, (batch, seq), "int64", align=8)
            w = T.match_buffer(w_h, (vocab, dim), w_dtype, align=1)
            s = T.match_buffer(s_h, s_shape, s_dtype, align=1)
            out = T.match_buffer(o_h, (batch, seq, dim), "float32", align=4)
            body(tokens, w, T.decl_buffer((s_shape[0] * s_shape[1],), s_dtype, data=s.data), out, batch, seq)
    return kernel


@_fast_macros
def embed(dim, vocab, *, weight_dtype="float32", name):
    """out[b, s] = weight[tokens[b, s]] in fp32 (basic.embed). Compiled: f(tokens int64 [B, S],
    weight f32 | bf16 [V, D], out f32 [B, S, D]); raises on an id outside [0, V)."""
    if weight_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"weight_dtype {weight_dtype!r}; allowed: float32, bfloat16")

    @T.macro
    def elem(wf, row, of, t, j):
        of[t * dim + j] = T.Cast("float32", wf[row * dim + j])

    @T.macro
    def row(tok, wf, s, of, t):
        _each(elem, (wf, T.Cast("int32", tok[t]), of, t), dim)

    return _embed_kernel(name, dim, vocab, weight_dtype, row)


@_fast_macros
def embed_fp8(dim, vocab, *, block, scale_format="fp32", name):
    """out[b, s, j] = e4m3 weight[tok, j] * scale[tok // bv, j // bd], tok = tokens[b, s] (quantized.embed_fp8;
    bit-identical). Compiled: f(tokens int64 [B, S], weight uint8 [V, D], scale [ceil(V/bv), ceil(D/bd)] f32
    (scale_format fp32) | uint8 (ue8m0 bytes), out f32 [B, S, D]); raises on an id outside [0, V)."""
    if scale_format not in ("fp32", "ue8m0"):
        raise ValueError(f"scale_format {scale_format!r}; allowed: fp32, ue8m0")
    bv, bd = block
    sk, ue8m0 = cdiv(dim, bd), scale_format == "ue8m0"
    s_dtype = "uint8" if ue8m0 else "float32"

    def scale_of(sf, r, kb):  # the block scale times 256 (e4m3_div256)
        s = sf[r // bv * sk + kb]
        return (ue8m0_value(s) if ue8m0 else s) * T.float32(256.0)

    @T.macro
    def elem(wf, row, of, t, j0, scale, j):
        of[t * dim + j0 + j] = e4m3_div256(wf[row * dim + j0 + j]) * scale

    @T.macro
    def row(tok, wf, sf, of, t):
        r: T.let[T.int32] = T.Cast("int32", tok[t])
        for kb in range(dim // bd):  # one scale per bd channels
            _each(elem, (wf, r, of, t, kb * bd, scale_of(sf, r, kb)), bd)
        if dim % bd > 0:
            _each(elem, (wf, r, of, t, dim // bd * bd, scale_of(sf, r, sk - 1)), dim % bd)

    return _embed_kernel(name, dim, vocab, "uint8", row, ((cdiv(vocab, bv), sk), s_dtype))
