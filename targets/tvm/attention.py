"""TVM (apache-tvm 0.27) CPU kernel for the `attention` op (runtime/kernels/attention.py): shared-KV
attention with per-head sinks over the sliding window plus compressed entries, fp32 out.

One compiled function per (layer kind, shapes) does the whole op in one call, in three steps:
  1. encode the new keys kv [B, S, D] into their storage rows (a workspace [B*S, row]), bit-identical
     to quant.encode_entries (fp8_split: UE8M0 scale = pow2 ceiling of max(amax, 1e-4) / 448 per 64
     channels, e4m3 round-to-nearest-even with saturation, bf16 RoPE channels round-to-nearest-even);
  2. attention, in parallel over tasks (query token, key part): a query at position t sees window
     positions max(t - window + 1, 0) .. t (from the ring for p < pos0, else from step 1's rows), then
     its entries (CSA: selected[b, s, :], -1 masked; HCA: w < (t + 1) // rate), then the head's sink.
     Keys go in chunks of CHUNK: each is decoded from storage once into fp32 and used by all heads;
     logits are vectors over heads (q transposed, pre-scaled by scale * log2 e), an online softmax
     with exp2 as a polynomial (relative error <= 1.1e-7); values = keys, accumulated as vectors over D.
     With fewer query tokens than `cores`, each token's keys are split into parts (one task each),
     merged after the parallel loop (decode, B = S = 1, uses every core);
  3. write the new tokens' rows into the ring (the last W-1 of them, position p in row p % (W-1)),
     after step 2, so queries of this call still read the rows being overwritten.

Compiled function (static H, D, W, formats, K / rate, scale; symbolic B, S, T; pos0 an int):
  sliding  f(q, kv, sinks, ring, out, pos0)
  csa      f(q, kv, sinks, selected, ring, entries, out, pos0)
  hca      f(q, kv, sinks, ring, entries, out, pos0)
q f32 [B, S, H, D], kv f32 [B, S, D], sinks f32 [H], selected int64 [B, S, K], ring [B, W-1, row],
entries [B, T, row] (row / dtype: quant.entry_layout: f32 / bf16 [.., D], fp8_split uint8 [.., bytes]),
out f32 [B, S, H, D]. The caller passes contiguous tensors (q, kv, sinks as fp32, selected as int64)
and allocates `out`; the call writes the ring in place (nothing else to do around it). CSA indices
outside [0, T) count as -1. A tiered entry store: gather the picks into a dense [B, S*K, row] tensor
and pass selected = s*K + k (or -1); HCA: pass the first (pos0 + S) // rate rows (T may be smaller
than a full capacity). The parallel loop runs on the OpenMP pool (torch.set_num_threads).

Measured (bench/tvm_attention.py; 2-core AMD EPYC znver4, shared; H=16, D=128, fp8_split, W=128,
2048 tokens of context): decode 15 / 19 / 15 us (sliding / CSA 64 / HCA; torch 430-730 us), prefill
of 512 tokens 3.7 / 5.4 / 4.1 ms (torch 22 / 56 / 24 ms); both within ~1.3x of the FMA bound (2 H D per key).
"""

import math
import os

from tvm.script import tirx as T
from v4c.runtime.quant import KV_GROUP, entry_layout

from .gemv import VEC, _fast_macros, act_scale, cdiv, e4m3_div256, group_amax, ue8m0_value

CHUNK = 16  # keys decoded per online-softmax step
MODES = ("sliding", "csa", "hca")
STORAGE = {"f32": "float32", "bf16": "bfloat16", "fp8_split": "uint8"}
LOG2E = 1.4426950408889634
PART_M0 = -1e30  # the running max of a key part without the sink (finite: exp2(m - m') stays defined)


# --- scalar / vector expressions --------------------------------------------------------------
def neg_inf():
    return T.reinterpret("float32", T.int32(-8388608))  # 0xFF800000


def exp2(x):
    """2^x for x <= 0 (0 below -126, -inf included): 2^n * poly(r), n = round(x), |r| <= 1/2, the
    degree-7 Taylor series of e^(r ln 2) (truncation < 1e-8; in fp32, max relative error 1.0e-7 over [-126, 0])."""
    xc = T.max(x, T.float32(-126.0))
    n = T.nearbyint(xc)
    y = (xc - n) * T.float32(math.log(2.0))
    p = T.float32(1.0 / 5040)
    for k in (720, 120, 24, 6, 2, 1, 1):
        p = p * y + T.float32(1.0 / k)
    two_n = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + T.int32(127), T.int32(23)))
    return T.Select(x < T.float32(-126.0), T.float32(0.0), p * two_n)


def e4m3_byte(v):
    """fp32 -> the float8_e4m3fn byte of torch's cast of clamp(v, +-448) (round to nearest even): the
    rounded fp32's exponent / top mantissa bits rebiased (|v| >= 2^-6), or nearbyint(|v| * 512) below."""
    bits = T.reinterpret("int32", v)
    abits = T.min(T.bitwise_and(bits, T.int32(0x7FFFFFFF)), T.int32(0x7F800000))
    rne = abits + T.int32(0x7FFFF) + T.bitwise_and(T.shift_right(abits, T.int32(20)), T.int32(1))
    normal = T.min(T.shift_right(rne, T.int32(20)) - T.int32(960), T.int32(126))  # (127 - 7) << 3
    a = T.reinterpret("float32", abits)
    sub = T.Cast("int32", T.nearbyint(a * T.float32(512.0)))
    mag = T.Select(a < T.float32(2.0 ** -6), sub, normal)
    return T.Cast("uint8", T.bitwise_or(mag, T.bitwise_and(T.shift_right(bits, T.int32(24)), T.int32(0x80))))


def bf16_bits(x):
    """fp32 -> its bfloat16 bits (round to nearest even) as uint32."""
    bits = T.reinterpret("uint32", x)
    return T.shift_right(bits + T.uint32(0x7FFF) + T.bitwise_and(T.shift_right(bits, T.uint32(16)), T.uint32(1)),
                         T.uint32(16))


# --- storage codecs ---------------------------------------------------------------------------
def _codec(kv_format, d, rope):
    """-> (encode, decode) macros for one storage row.
    encode(xf, xo, sf, so): xf[xo : xo + D] fp32 -> storage sf[so : so + row].
    decode(sf, so, kc, ko): storage row at sf[so] -> fp32 kc[ko : ko + D]."""
    nope = d - rope
    width = entry_layout(kv_format, d, rope)[1]
    groups = cdiv(nope, KV_GROUP)

    if kv_format == "f32":
        @T.macro
        def encode(xf, xo, sf, so):
            for i in T.vectorized(d):
                sf[so + i] = xf[xo + i]

        @T.macro
        def decode(sf, so, kc, ko):
            for i in T.vectorized(d):
                kc[ko + i] = sf[so + i]
        return encode, decode

    if kv_format == "bf16":
        @T.macro
        def encode(xf, xo, sf, so):
            for i in T.vectorized(d):
                sf[so + i] = T.reinterpret("bfloat16", T.Cast("uint16", bf16_bits(xf[xo + i])))

        @T.macro
        def decode(sf, so, kc, ko):
            for i in T.vectorized(d):
                kc[ko + i] = T.Cast("float32", sf[so + i])
        return encode, decode

    # fp8_split: [nope e4m3 | rope bf16 (little endian) | UE8M0 per 64 nope channels | zeros to 8 bytes]
    rope_at, scale_at = nope, nope + 2 * rope
    full_groups, last_group = nope // KV_GROUP, nope % KV_GROUP

    @T.macro
    def encode_group(xf, xo, sf, so, g0, glen):  # channels g0 .. g0 + glen - 1 (one scale)
        amax = T.alloc_buffer((VEC,), "float32")
        group_amax(amax, xf, xo + g0, glen)
        s: T.let[T.float32] = act_scale(amax[0], True)
        inv: T.let[T.float32] = T.float32(1.0) / s
        for i in T.vectorized(glen):
            sf[so + g0 + i] = e4m3_byte(xf[xo + g0 + i] * inv)
        sf[so + scale_at + g0 // KV_GROUP] = T.Cast("uint8", T.shift_right(T.reinterpret("int32", s), T.int32(23)))

    @T.macro
    def encode(xf, xo, sf, so):
        for g in range(full_groups):
            encode_group(xf, xo, sf, so, g * KV_GROUP, KV_GROUP)
        if last_group > 0:
            encode_group(xf, xo, sf, so, full_groups * KV_GROUP, last_group)
        for i in T.vectorized(max(rope, 1)) if rope > 0 else T.serial(0):
            sf[so + rope_at + 2 * i] = T.Cast("uint8", T.bitwise_and(bf16_bits(xf[xo + nope + i]), T.uint32(0xFF)))
            sf[so + rope_at + 2 * i + 1] = T.Cast("uint8", T.shift_right(bf16_bits(xf[xo + nope + i]), T.uint32(8)))
        for i in T.serial(width - scale_at - groups):
            sf[so + scale_at + groups + i] = T.uint8(0)

    @T.macro
    def decode_span(sf, so, kc, ko, o, lanes):  # nope channels o .. o + lanes - 1, in one 64-group
        for i in T.vectorized(lanes):
            kc[ko + o + i] = e4m3_div256(sf[so + o + i]) * (
                ue8m0_value(sf[so + scale_at + o // KV_GROUP]) * T.float32(256.0))

    @T.macro
    def decode(sf, so, kc, ko):
        for c in range(nope // VEC):
            decode_span(sf, so, kc, ko, c * VEC, VEC)
        if nope % VEC > 0:
            decode_span(sf, so, kc, ko, nope // VEC * VEC, nope % VEC)
        for i in T.vectorized(max(rope, 1)) if rope > 0 else T.serial(0):
            kc[ko + nope + i] = T.reinterpret("float32", T.bitwise_or(
                T.shift_left(T.Cast("uint32", sf[so + rope_at + 2 * i + 1]), T.uint32(24)),
                T.shift_left(T.Cast("uint32", sf[so + rope_at + 2 * i]), T.uint32(16))))

    return encode, decode


# --- the kernel -------------------------------------------------------------------------------
@_fast_macros
def attention_kernel(heads, dim, window, *, kv_format="f32", rope_dim=0, mode="sliding", topk=0, rate=0,
                     scale=1.0, cores=None, name=None):
    """The `attention` op for static heads H, head dim D, window W, storage `kv_format` (f32, bf16,
    fp8_split with `rope_dim` bf16 RoPE channels) and `mode`: sliding (ring only), csa (`topk` selected
    entries per query) or hca (all entries w < (t + 1) // `rate`); logits = (q . k) * `scale`. `cores`
    (default: this machine's): a call with B * S < cores splits each token's keys into cores // (B * S)
    parts. Compiled argument order: see the module docstring."""
    if kv_format not in STORAGE:
        raise ValueError(f"kv_format {kv_format!r}; allowed: {', '.join(STORAGE)}")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; allowed: {', '.join(MODES)}")
    if window < 2:
        raise ValueError(f"window {window}: needs >= 2 (a ring of window - 1 rows)")
    if not 0 <= rope_dim <= dim:
        raise ValueError(f"rope_dim {rope_dim}: expected 0 <= rope_dim <= D={dim}")
    if mode == "csa" and topk < 1:
        raise ValueError(f"mode csa needs topk >= 1, got {topk}")
    if mode == "hca" and rate < 1:
        raise ValueError(f"mode hca needs rate >= 1, got {rate}")
    h, d, slots, cores = heads, dim, window - 1, cores or os.cpu_count()
    sdtype, width = STORAGE[kv_format], entry_layout(kv_format, dim, rope_dim)[1]
    hv, dp = cdiv(h, VEC) * VEC, cdiv(d, VEC) * VEC  # heads / channels padded to whole vectors
    kb = max(1, min(8, 128 // hv))  # keys per register block of the logits (kb x hv lanes)
    nvec = dp // VEC
    vb = max(v for v in range(1, min(nvec, 8) + 1) if nvec % v == 0)  # output vectors per register block
    qscale = float(scale) * LOG2E
    encode, decode = _codec(kv_format, d, rope_dim)
    # per-task scratch (fp32): q^T [D, hv] | chunk keys [CHUNK, dp] | logits / probs [CHUNK, hv] | acc [H, dp]
    at_k, at_p, at_acc = d * hv, d * hv + CHUNK * dp, d * hv + CHUNK * dp + CHUNK * hv
    scratch_size = at_acc + h * dp
    part_size = h * dp + 2 * hv  # a key part's acc [H, dp], m [hv], l [hv]

    @T.macro
    def fill(buf, o, n, value):  # buf[o : o + n] = value (n a multiple of VEC)
        for c in range(n // VEC):
            for i in T.vectorized(VEC):
                buf[o + c * VEC + i] = value

    def n_entries(t, tcap):  # entries a query at position t sees
        return T.int32(topk) if mode == "csa" else T.min((t + 1) // rate, tcap) if mode == "hca" else T.int32(0)

    @T.macro
    def load_key(j, kc, ok, jj, ring, stored, ent, sel, b, tok, seq, tcap, pos0, lo, nwin):
        """Chunk row jj <- key j of query token tok (window keys, then entries); ok[jj] = 1 if it is one."""
        ok[jj] = 1
        if j < nwin:
            if lo + j < pos0:
                decode(ring, ((b * slots) + (lo + j) % slots) * width, kc, jj * dp)
            else:
                decode(stored, (b * seq + lo + j - pos0) * width, kc, jj * dp)
        elif mode == "csa":
            idx: T.let[T.int32] = T.Cast("int32", sel[tok * topk + j - nwin])
            if idx >= 0 and idx < tcap:
                decode(ent, (b * tcap + idx) * width, kc, jj * dp)
            else:
                ok[jj] = 0
        else:
            decode(ent, (b * tcap + j - nwin) * width, kc, jj * dp)

    @T.macro
    def chunk(c, n, qt, kc, pr, acc, m, l, ok, ring, stored, ent, sel, b, tok, seq, tcap, pos0, lo, nwin):
        """Fold keys c * CHUNK .. + CHUNK - 1 (those < n) into the running softmax (m, l, acc)."""
        alpha = T.alloc_buffer((hv,), "float32")
        mx = T.alloc_buffer((hv,), "float32")
        for jj in range(CHUNK):
            if c * CHUNK + jj < n:
                load_key(c * CHUNK + jj, kc, ok, jj, ring, stored, ent, sel, b, tok, seq, tcap, pos0, lo, nwin)
            else:
                ok[jj] = 0
            if ok[jj] == 0:  # zeros: p = 0 must not meet stale NaNs
                fill(kc, jj * dp, dp, T.float32(0))
        for jb in range(CHUNK // kb):  # logits (log2 units): pr[j, :] = sum_d k[j, d] q^T[d, :]
            part = T.alloc_buffer((kb, hv), "float32")
            for jj in T.unroll(kb):
                for i in T.vectorized(hv):
                    part[jj, i] = T.float32(0)
            for dd in range(d):
                for jj in T.unroll(kb):
                    for i in T.vectorized(hv):
                        part[jj, i] = part[jj, i] + kc[(jb * kb + jj) * dp + dd] * qt[dd * hv + i]
            for jj in T.unroll(kb):
                for i in T.vectorized(hv):
                    pr[(jb * kb + jj) * hv + i] = T.Select(ok[jb * kb + jj] != 0, part[jj, i], neg_inf())
        for i in T.vectorized(hv):
            mx[i] = m[i]
        for jj in range(CHUNK):
            for i in T.vectorized(hv):
                mx[i] = T.max(mx[i], pr[jj * hv + i])
        for i in T.vectorized(hv):
            alpha[i] = exp2(m[i] - mx[i])
            l[i] = l[i] * alpha[i]
            m[i] = mx[i]
        for jj in range(CHUNK):
            for i in T.vectorized(hv):
                pr[jj * hv + i] = exp2(pr[jj * hv + i] - mx[i])
                l[i] = l[i] + pr[jj * hv + i]
        for hh, blk in T.grid(h, nvec // vb):  # acc[h, :] = acc[h, :] * alpha[h] + sum_j p[j, h] k[j, :]
            accr = T.alloc_buffer((vb * VEC,), "float32")
            for i in T.vectorized(vb * VEC):
                accr[i] = acc[hh * dp + blk * vb * VEC + i] * alpha[hh]
            for jj in range(CHUNK):
                for i in T.vectorized(vb * VEC):
                    accr[i] = accr[i] + pr[jj * hv + hh] * kc[jj * dp + blk * vb * VEC + i]
            for i in T.vectorized(vb * VEC):
                acc[hh * dp + blk * vb * VEC + i] = accr[i]

    @T.macro
    def task(qf, sinkf, ring, stored, ent, sel, outf, parts, tok, part, nsplit, seq, tcap, pos0):
        scratch = T.alloc_buffer((scratch_size,), "float32")
        qt = T.decl_buffer((d * hv,), "float32", data=scratch.data)
        kc = T.decl_buffer((CHUNK * dp,), "float32", data=scratch.data, elem_offset=at_k)
        pr = T.decl_buffer((CHUNK * hv,), "float32", data=scratch.data, elem_offset=at_p)
        acc = T.decl_buffer((h * dp,), "float32", data=scratch.data, elem_offset=at_acc)
        m = T.alloc_buffer((hv,), "float32")
        l = T.alloc_buffer((hv,), "float32")
        ok = T.alloc_buffer((CHUNK,), "int32")
        b: T.let[T.int32] = tok // seq
        s: T.let[T.int32] = tok % seq
        lo: T.let[T.int32] = T.max(pos0 + s - window + 1, 0)
        nwin: T.let[T.int32] = pos0 + s - lo + 1
        nent: T.let[T.int32] = n_entries(pos0 + s, tcap)
        nchunks: T.let[T.int32] = (nwin + nent + CHUNK - 1) // CHUNK
        per: T.let[T.int32] = (nchunks + nsplit - 1) // nsplit
        fill(qt, 0, d * hv, T.float32(0))
        for hh, dd in T.grid(h, d):
            qt[dd * hv + hh] = qf[(tok * h + hh) * d + dd] * T.float32(qscale)
        fill(acc, 0, h * dp, T.float32(0))
        for i in T.vectorized(hv):  # part 0 holds the sink: m = sink, l = 1
            m[i] = T.Select(part == 0, T.float32(0), T.float32(PART_M0))
            l[i] = T.Select(part == 0, T.float32(1), T.float32(0))
        if part == 0:
            for hh in range(h):
                m[hh] = sinkf[hh] * T.float32(LOG2E)
        for c in range(part * per, T.min(nchunks, part * per + per)):
            chunk(c, nwin + nent, qt, kc, pr, acc, m, l, ok, ring, stored, ent, sel, b, tok, seq, tcap, pos0, lo, nwin)
        if nsplit == 1:
            for hh in range(h):
                for i in T.vectorized(d):
                    outf[(tok * h + hh) * d + i] = acc[hh * dp + i] / l[hh]
        else:
            for c in range(h * dp // VEC):
                for i in T.vectorized(VEC):
                    parts[(tok * nsplit + part) * part_size + c * VEC + i] = acc[c * VEC + i]
            for i in T.vectorized(hv):
                parts[(tok * nsplit + part) * part_size + h * dp + i] = m[i]
                parts[(tok * nsplit + part) * part_size + h * dp + hv + i] = l[i]

    @T.macro
    def merge(parts, outf, tok, nsplit):  # out = sum_p acc_p 2^(m_p - M) / sum_p l_p 2^(m_p - M)
        mm = T.alloc_buffer((hv,), "float32")
        den = T.alloc_buffer((hv,), "float32")
        w = T.alloc_buffer((hv,), "float32")
        num = T.alloc_buffer((h * dp,), "float32")
        for i in T.vectorized(hv):
            mm[i] = T.float32(PART_M0)
            den[i] = T.float32(0)
        for p in range(nsplit):
            for i in T.vectorized(hv):
                mm[i] = T.max(mm[i], parts[(tok * nsplit + p) * part_size + h * dp + i])
        fill(num, 0, h * dp, T.float32(0))
        for p in range(nsplit):
            for i in T.vectorized(hv):
                w[i] = exp2(parts[(tok * nsplit + p) * part_size + h * dp + i] - mm[i])
                den[i] = den[i] + w[i] * parts[(tok * nsplit + p) * part_size + h * dp + hv + i]
            for hh, c in T.grid(h, nvec):
                for i in T.vectorized(VEC):
                    num[hh * dp + c * VEC + i] = num[hh * dp + c * VEC + i] \
                        + w[hh] * parts[(tok * nsplit + p) * part_size + hh * dp + c * VEC + i]
        for hh in range(h):
            for i in T.vectorized(d):
                outf[(tok * h + hh) * d + i] = num[hh * dp + i] / den[hh]

    def zigzag(k, n):  # 0, n-1, 1, n-2, ...
        return T.Select(k % 2 == 0, k // 2, n - 1 - k // 2)

    @T.macro
    def body(q, kv, sinks, sel, ring, ent, out, batch, seq, tcap, pos0):
        ntok: T.let[T.int32] = batch * seq
        qf = T.decl_buffer((ntok * h * d,), "float32", data=q.data)
        kvf = T.decl_buffer((ntok * d,), "float32", data=kv.data)
        outf = T.decl_buffer((ntok * h * d,), "float32", data=out.data)
        ringf = T.decl_buffer((batch * slots * width,), sdtype, data=ring.data)
        entf = T.decl_buffer((batch * tcap * width,), sdtype, data=ent.data) if mode != "sliding" else ringf
        selb = T.decl_buffer((ntok * topk,), "int64", data=sel.data) if mode == "csa" else kvf
        stored = T.alloc_buffer((ntok * width,), sdtype)
        parts = T.alloc_buffer((cores * part_size,), "float32")
        nsplit: T.let[T.int32] = T.max(1, cores // T.max(ntok, 1))
        for t in range(ntok):  # 1. the new keys' storage rows
            encode(kvf, t * d, stored, t * width)
        for i in T.parallel(ntok * nsplit):  # 2. attention; tokens 0, n-1, 1, n-2, ..: each core's range costs the same
            task(qf, sinks, ringf, stored, entf, selb, outf, parts, zigzag(i // nsplit, ntok), i % nsplit, nsplit, seq,
                 tcap, pos0)
        if nsplit > 1:
            for t in range(ntok):
                merge(parts, outf, t, nsplit)
        for bb, i in T.grid(batch, T.min(seq, slots)):  # 3. the ring keeps the last W-1 tokens
            for e in range(width):
                ringf[(bb * slots + (pos0 + seq - T.min(seq, slots) + i) % slots) * width + e] = \
                    stored[(bb * seq + seq - T.min(seq, slots) + i) * width + e]

    fname = name or f"attention_{mode}_{kv_format}_h{h}_d{d}_w{window}_r{rope_dim}_k{topk}_rate{rate}"
    if mode == "csa":
        @T.prim_func
        def kernel(q_h: T.handle, kv_h: T.handle, sinks_h: T.handle, sel_h: T.handle, ring_h: T.handle,
                   ent_h: T.handle, out_h: T.handle, pos0: T.int32):
            T.func_attr({"global_symbol": fname, "tir.noalias": True})
            batch, seq, tcap = T.int32(), T.int32(), T.int32()
            q = T.match_buffer(q_h, (batch, seq, h, d), "float32", align=4)
            kv = T.match_buffer(kv_h, (batch, seq, d), "float32", align=4)
            sinks = T.match_buffer(sinks_h, (h,), "float32", align=4)
            sel = T.match_buffer(sel_h, (batch, seq, topk), "int64", align=8)
            ring = T.match_buffer(ring_h, (batch, slots, width), sdtype, align=1)
            ent = T.match_buffer(ent_h, (batch, tcap, width), sdtype, align=1)
            out = T.match_buffer(out_h, (batch, seq, h, d), "float32", align=4)
            body(q, kv, sinks, sel, ring, ent, out, batch, seq, tcap, pos0)
    elif mode == "hca":
        @T.prim_func
        def kernel(q_h: T.handle, kv_h: T.handle, sinks_h: T.handle, ring_h: T.handle, ent_h: T.handle,
                   out_h: T.handle, pos0: T.int32):
            T.func_attr({"global_symbol": fname, "tir.noalias": True})
            batch, seq, tcap = T.int32(), T.int32(), T.int32()
            q = T.match_buffer(q_h, (batch, seq, h, d), "float32", align=4)
            kv = T.match_buffer(kv_h, (batch, seq, d), "float32", align=4)
            sinks = T.match_buffer(sinks_h, (h,), "float32", align=4)
            ring = T.match_buffer(ring_h, (batch, slots, width), sdtype, align=1)
            ent = T.match_buffer(ent_h, (batch, tcap, width), sdtype, align=1)
            out = T.match_buffer(out_h, (batch, seq, h, d), "float32", align=4)
            body(q, kv, sinks, q, ring, ent, out, batch, seq, tcap, pos0)
    else:
        @T.prim_func
        def kernel(q_h: T.handle, kv_h: T.handle, sinks_h: T.handle, ring_h: T.handle, out_h: T.handle,
                   pos0: T.int32):
            T.func_attr({"global_symbol": fname, "tir.noalias": True})
            batch, seq = T.int32(), T.int32()
            q = T.match_buffer(q_h, (batch, seq, h, d), "float32", align=4)
            kv = T.match_buffer(kv_h, (batch, seq, d), "float32", align=4)
            sinks = T.match_buffer(sinks_h, (h,), "float32", align=4)
            ring = T.match_buffer(ring_h, (batch, slots, width), sdtype, align=1)
            out = T.match_buffer(out_h, (batch, seq, h, d), "float32", align=4)
            body(q, kv, sinks, q, ring, ring, out, batch, seq, 0, pos0)
    return kernel
