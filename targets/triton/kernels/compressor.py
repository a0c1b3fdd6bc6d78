"""Triton KV compressor: pools every `rate` tokens into one compressed entry (CSA, HCA, indexer keys).

Same signature, state handling and semantics as runtime/kernels/compressor.py (the reference):
    entry_w = encode(rope(rms_norm(sum_j softmax_j(gate_j + ape_j) * kv_j), position w*rate))
per channel, over the window's positions j; with `overlap` each token carries 2d channels,
Ca = [:d] and Cb = [d:], and entry w pools Ca of window w-1 (the saved `ovl_*` state for the first
window of a call) together with Cb of window w: 2*rate positions.

Device work: `_compress_kernel`, one program per (closed window, batch row), does the gated softmax
pooling (three passes over chunks of window positions: max, sum of exp, weighted sum), RMSNorm with
weight, interleaved RoPE at the window start and the f32 / bf16 / fp8_split encoding, writing the
entry row in place. For fp8_block and fp4_block it writes the f32 row to a scratch tensor and, after a
barrier, encodes it from there (the block scales need the whole row). A decode step at a device position
is this one launch too: the program first puts the token into the window buffers and, with overlap, last
saves the closed window's Ca. Host glue (torch, no arithmetic beyond state bookkeeping):
concatenating the buffered tokens with the new ones, the leftover copy into `buf_*`, saving the
overlap slice (`ovl_gate` = the last window's Ca gate + ape, one fp32 add as in the reference), and
handing rows to a tiered entry store (`state[-1].write(start, rows)`) when state[-1] is not a tensor.

Float8 / bf16 / e2m1 codes are rounded with integer arithmetic (common.e4m3_quant, bf16_bits, e2m1_code:
bit-exact with torch; the Triton 3.9 interpreter's `.to(tl.float8e4nv)` / `.to(tl.bfloat16)` do not round
to nearest even) and UE8M0 scales are exact powers of two (common.group_scale / ceil_log2).
"""

import torch
import triton
import triton.language as tl

from .common import (E4M3_MAX, FP4_BLOCK, FP8_BLOCK, KV_GROUP, bf16_bits, cdiv, ceil_log2, check, check_tensor,
                     e2m1_code, e4m3_quant, entry_layout, group_scale, launch_config, next_pow2, position, pow2,
                     same_device)

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
FMTS = {"f32": 0, "bf16": 1, "fp8_split": 2, "fp8_block": 3, "fp4_block": 4}  # the kernel's FMT
FMT_BF16, FMT_FP8_SPLIT, FMT_FP4_BLOCK = FMTS["bf16"], FMTS["fp8_split"], FMTS["fp4_block"]
KV_FORMATS = tuple(FMTS)


# --- device helpers -----------------------------------------------------------------------------
@triton.jit
def _chunk(kv_ptr, gate_ptr, ape_ptr, ovl_kv_ptr, ovl_gate_ptr, w, first, r0, cols, cmask, RATE: tl.constexpr,
           C: tl.constexpr, D: tl.constexpr, OFF: tl.constexpr, COL_CUR: tl.constexpr, HAS_PREV: tl.constexpr,
           BLOCK_R: tl.constexpr):
    """Positions t = r0 .. r0+BLOCK_R of entry w's window -> (kv, logits) [BLOCK_R, BLOCK_P].
    t in [OFF, OFF+RATE): the window's own tokens, channels COL_CUR + cols, logit gate + ape[t - OFF];
    t < OFF (overlap): Ca of window w-1, or the saved ovl_kv / ovl_gate (ape included) when w == 0 (and the
    call's first entry `first` is not the first of all, which has no window before it).
    Rows outside the window get logit -inf; padded channels get logit 0 and kv 0."""
    t = r0 + tl.arange(0, BLOCK_R)
    row = w * RATE + t - OFF  # token row in kv [L, C], for both the window and its predecessor
    is_cur = (t >= OFF) & (t < OFF + RATE)
    is_prev = (t < OFF) & (row >= 0)  # Ca of window w-1 >= 0
    col = tl.where(is_cur, COL_CUR, 0)[:, None] + cols[None, :]
    src = (is_cur | is_prev)[:, None] & cmask[None, :]
    kv = tl.load(kv_ptr + row[:, None] * C + col, mask=src, other=0.0)
    g = tl.load(gate_ptr + row[:, None] * C + col, mask=src, other=0.0)
    g += tl.load(ape_ptr + (t % RATE)[:, None] * C + col, mask=src, other=0.0)
    valid = is_cur | is_prev
    if HAS_PREV:
        is_ovl = (t < OFF) & (row < 0) & (row + first * RATE >= 0)  # w == 0: the saved Ca of the window before
        saved = is_ovl[:, None] & cmask[None, :]
        kv += tl.load(ovl_kv_ptr + t[:, None] * D + cols[None, :], mask=saved, other=0.0)
        g += tl.load(ovl_gate_ptr + t[:, None] * D + cols[None, :], mask=saved, other=0.0)
        valid = valid | is_ovl
    g = tl.where(valid[:, None], g, float("-inf"))
    return kv, tl.where(cmask[None, :], g, 0.0)


@triton.jit
def _pool(kv_ptr, gate_ptr, ape_ptr, ovl_kv_ptr, ovl_gate_ptr, w, first, cols, cmask, RATE: tl.constexpr,
          C: tl.constexpr, D: tl.constexpr, WIN: tl.constexpr, OFF: tl.constexpr, COL_CUR: tl.constexpr,
          HAS_PREV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """Channels `cols` of entry w: sum_t softmax_t(logit) * kv over the WIN window positions -> [BLOCK_P].
    Softmax as torch: p = exp(l - max) / sum exp(l - max), in three passes over chunks of BLOCK_R."""
    m = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for r0 in range(0, WIN, BLOCK_R):
        _, g = _chunk(kv_ptr, gate_ptr, ape_ptr, ovl_kv_ptr, ovl_gate_ptr, w, first, r0, cols, cmask, RATE, C, D, OFF,
                      COL_CUR, HAS_PREV, BLOCK_R)
        m = tl.maximum(m, tl.max(g, axis=0))
    s = tl.zeros([BLOCK_P], tl.float32)
    for r0 in range(0, WIN, BLOCK_R):
        _, g = _chunk(kv_ptr, gate_ptr, ape_ptr, ovl_kv_ptr, ovl_gate_ptr, w, first, r0, cols, cmask, RATE, C, D, OFF,
                      COL_CUR, HAS_PREV, BLOCK_R)
        s += tl.sum(tl.exp(g - m[None, :]), axis=0)
    acc = tl.zeros([BLOCK_P], tl.float32)
    for r0 in range(0, WIN, BLOCK_R):
        kv, g = _chunk(kv_ptr, gate_ptr, ape_ptr, ovl_kv_ptr, ovl_gate_ptr, w, first, r0, cols, cmask, RATE, C, D, OFF,
                       COL_CUR, HAS_PREV, BLOCK_R)
        acc += tl.sum(kv * (tl.exp(g - m[None, :]) / s[None, :]), axis=0)
    return acc


@triton.jit
def _store_fp8_split(out_row, y0, y1, c0, c1, m0, m1, D: tl.constexpr, NOPE: tl.constexpr,
                     BLOCK_G: tl.constexpr):
    """fp8_split bytes of one entry: [nope e4m3 | rope bf16 | UE8M0 scale per 64 nope channels | zeros].
    y0 / y1 hold channels c0 / c1 (the two halves of each pair)."""
    n0, n1 = m0 & (c0 < NOPE), m1 & (c1 < NOPE)
    grp = tl.arange(0, BLOCK_G)[:, None]
    sel0 = ((c0 // 64)[None, :] == grp) & n0[None, :]  # [BLOCK_G, BLOCK_P]
    sel1 = ((c1 // 64)[None, :] == grp) & n1[None, :]
    amax = tl.maximum(tl.max(tl.where(sel0, tl.abs(y0)[None, :], 0.0), axis=1),
                      tl.max(tl.where(sel1, tl.abs(y1)[None, :], 0.0), axis=1))
    e = ceil_log2(group_scale(amax, E4M3_MAX, False))  # UE8M0 exponent per group, [BLOCK_G], exact
    scale = pow2(e)[:, None]
    s0 = tl.sum(tl.where(sel0, scale, 0.0), axis=0)
    s1 = tl.sum(tl.where(sel1, scale, 0.0), axis=0)
    q0 = e4m3_quant(y0, tl.where(n0, s0, 1.0))
    q1 = e4m3_quant(y1, tl.where(n1, s1, 1.0))
    tl.store(out_row + c0, q0.to(tl.uint8), mask=n0)
    tl.store(out_row + c1, q1.to(tl.uint8), mask=n1)
    r0, r1 = m0 & (c0 >= NOPE), m1 & (c1 >= NOPE)
    b0, b1 = bf16_bits(y0), bf16_bits(y1)
    byte0, byte1 = NOPE + 2 * (c0 - NOPE), NOPE + 2 * (c1 - NOPE)
    tl.store(out_row + byte0, (b0 & 255).to(tl.uint8), mask=r0)
    tl.store(out_row + byte0 + 1, (b0 >> 8).to(tl.uint8), mask=r0)
    tl.store(out_row + byte1, (b1 & 255).to(tl.uint8), mask=r1)
    tl.store(out_row + byte1 + 1, (b1 >> 8).to(tl.uint8), mask=r1)
    G: tl.constexpr = (NOPE + 63) // 64
    RAW: tl.constexpr = NOPE + 2 * (D - NOPE) + G
    tl.store(out_row + NOPE + 2 * (D - NOPE) + grp, (e[:, None] + 127).to(tl.uint8), mask=grp < G)
    pad = tl.arange(0, 8)
    tl.store(out_row + RAW + pad, tl.zeros([8], tl.uint8), mask=pad < (8 - RAW % 8) % 8)


# --- kernels ------------------------------------------------------------------------------------
@triton.jit
def _encode_blocks(x_row, out_row, D: tl.constexpr, FP4: tl.constexpr, BLOCK_G: tl.constexpr):
    """f32 row x_row[:D] -> fp8_block bytes [e4m3 codes | fp32 scale per 128, little endian]
    (scale = max(amax, 1e-4) / 448) or fp4_block bytes [e2m1 pairs, even channel low | UE8M0 per 32]
    (scale = 2^e, e = ceil_log2(max(amax, 1e-4) / 6), exact) at out_row."""
    grp = tl.arange(0, BLOCK_G)[:, None]
    if FP4:
        i = tl.arange(0, 16)[None, :]  # pair i of group grp: channels 32 grp + 2i, +1
        ce = grp * 32 + 2 * i
        xe = tl.load(x_row + ce, mask=ce < D, other=0.0)
        xo = tl.load(x_row + ce + 1, mask=ce + 1 < D, other=0.0)
        amax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))
        e = ceil_log2(group_scale(amax, 6.0, False))[:, None]
        s = pow2(e)
        packed = e2m1_code(tl.math.div_rn(xe, s)) | (e2m1_code(tl.math.div_rn(xo, s)) << 4)
        HALF: tl.constexpr = (D + 1) // 2
        tl.store(out_row + grp * 16 + i, packed.to(tl.uint8), mask=grp * 16 + i < HALF)
        tl.store(out_row + HALF + grp, (e + 127).to(tl.uint8), mask=grp < (D + 31) // 32)
    else:
        i = tl.arange(0, 128)[None, :]
        c = grp * 128 + i
        x = tl.load(x_row + c, mask=c < D, other=0.0)
        s = group_scale(tl.max(tl.abs(x), axis=1), E4M3_MAX, False)[:, None]
        q = e4m3_quant(x, s)
        tl.store(out_row + c, q.to(tl.uint8), mask=c < D)
        sbits = s.to(tl.int32, bitcast=True)
        byte = tl.arange(0, 4)[None, :]
        gmask = (grp < (D + 127) // 128) & (byte < 4)
        tl.store(out_row + D + 4 * grp + byte, ((sbits >> (8 * byte)) & 255).to(tl.uint8), mask=gmask)


@triton.jit
def _compress_kernel(kv_ptr, gate_ptr, ape_ptr, ovl_kv_ptr, ovl_gate_ptr, w_ptr, inv_ptr, out_ptr, enc_ptr, pos_ptr,
                     new_kv_ptr, new_gate_ptr, new_kv_sb, new_kv_sc, new_gate_sb, new_gate_sc, L, stride_ob,
                     stride_ot, stride_eb, stride_et, stride_first, first, eps, rope_scale, RATE: tl.constexpr,
                     C: tl.constexpr, D: tl.constexpr, NOPE: tl.constexpr, WIN: tl.constexpr, OFF: tl.constexpr,
                     COL_CUR: tl.constexpr, HAS_PREV: tl.constexpr, HAS_W: tl.constexpr, FMT: tl.constexpr,
                     DEVICE_POS: tl.constexpr, CARRY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    """_compress_program for program (w, b) = (program 0, program 1)."""
    _compress_program(tl.program_id(0), tl.program_id(1).to(tl.int64), kv_ptr, gate_ptr, ape_ptr, ovl_kv_ptr,
                      ovl_gate_ptr, w_ptr, inv_ptr, out_ptr, enc_ptr, pos_ptr, new_kv_ptr, new_gate_ptr, new_kv_sb,
                      new_kv_sc, new_gate_sb, new_gate_sc, L, stride_ob, stride_ot, stride_eb, stride_et, stride_first,
                      first, eps, rope_scale, RATE, C, D, NOPE, WIN, OFF, COL_CUR, HAS_PREV, HAS_W, FMT, DEVICE_POS,
                      CARRY, BLOCK_R, BLOCK_P, BLOCK_G, BLOCK_E, BLOCK_C)


@triton.jit
def _compress_program(w, b, kv_ptr, gate_ptr, ape_ptr, ovl_kv_ptr, ovl_gate_ptr, w_ptr, inv_ptr, out_ptr, enc_ptr,
                      pos_ptr, new_kv_ptr, new_gate_ptr, new_kv_sb, new_kv_sc, new_gate_sb, new_gate_sc, L, stride_ob,
                      stride_ot, stride_eb, stride_et, stride_first, first, eps, rope_scale, RATE: tl.constexpr,
                      C: tl.constexpr, D: tl.constexpr, NOPE: tl.constexpr, WIN: tl.constexpr, OFF: tl.constexpr,
                      COL_CUR: tl.constexpr, HAS_PREV: tl.constexpr, HAS_W: tl.constexpr, FMT: tl.constexpr,
                      DEVICE_POS: tl.constexpr, CARRY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (w, b) (b int64): entry first + w of batch row b. kv, gate: [B, L, C] fp32; ape: [RATE, C];
    ovl_*: [B, RATE, D]; out row: out_ptr + b*stride_ob + w*stride_ot. Channels are handled as pairs (c0,
    c1 = c0 + 1) aligned with the RoPE pairs (NOPE + 2i, NOPE + 2i + 1), so c0 = 2p - NOPE % 2. FMT 0 / 1 / 2 (f32, bf16, fp8_split)
    write the entry at out; FMT 3 / 4 (fp8_block, fp4_block) write it as f32 to out (a scratch row) and, after
    a barrier, encode that row into enc_ptr + b*stride_eb + w*stride_et.
    DEVICE_POS (a decode step, kv = the window buffers [B, RATE, C], L = RATE; grid (1, B)): the position p is
    read from pos_ptr, and the new token's new_kv[b, 0] and new_gate[b, 0] join the buffers at row p % RATE.
    If token p closes its window, the program then (after a barrier: the pooling reads rows other threads
    stored) writes entry p // RATE, at out_ptr + (p // RATE) * stride_first (0: a scratch row) or, for FMT 3 / 4,
    at row p // RATE of enc. With CARRY (overlap) it last saves the window's Ca for the next entry, after a
    barrier (the pooling read the old one): ovl_kv[b, r] = buf_kv[b, r, :D], ovl_gate[b, r] = buf_gate[b, r, :D]
    + ape[r, :D] (one fp32 add, as the host path)."""
    kv_ptr += b * L * C
    gate_ptr += b * L * C
    ovl_kv_ptr += b * RATE * D
    ovl_gate_ptr += b * RATE * D
    if DEVICE_POS:
        pos = tl.load(pos_ptr).to(tl.int32)
        cc = tl.arange(0, BLOCK_C)
        mc = cc < C
        row = (pos % RATE) * C + cc
        tl.store(kv_ptr + row, tl.load(new_kv_ptr + b * new_kv_sb + cc * new_kv_sc, mask=mc).to(tl.float32), mask=mc)
        tl.store(gate_ptr + row, tl.load(new_gate_ptr + b * new_gate_sb + cc * new_gate_sc, mask=mc).to(tl.float32),
                 mask=mc)
        if (pos + 1) % RATE == 0:  # (no early return: a pair kernel calls this under a branch)
            tl.debug_barrier()
            entry = pos // RATE
            _compress_entry(w, b, entry, kv_ptr, gate_ptr, ape_ptr, ovl_kv_ptr, ovl_gate_ptr, w_ptr, inv_ptr,
                            out_ptr + entry.to(tl.int64) * stride_first, enc_ptr + entry.to(tl.int64) * stride_et,
                            stride_ob, stride_ot, stride_eb, stride_et, eps, rope_scale, RATE, C, D, NOPE, WIN, OFF,
                            COL_CUR, HAS_PREV, HAS_W, FMT, CARRY, BLOCK_P, BLOCK_R, BLOCK_G, BLOCK_E, BLOCK_C)
    else:
        _compress_entry(w, b, first, kv_ptr, gate_ptr, ape_ptr, ovl_kv_ptr, ovl_gate_ptr, w_ptr, inv_ptr, out_ptr,
                        enc_ptr, stride_ob, stride_ot, stride_eb, stride_et, eps, rope_scale, RATE, C, D, NOPE, WIN,
                        OFF, COL_CUR, HAS_PREV, HAS_W, FMT, CARRY, BLOCK_P, BLOCK_R, BLOCK_G, BLOCK_E, BLOCK_C)


@triton.jit
def _compress_entry(w, b, first, kv_ptr, gate_ptr, ape_ptr, ovl_kv_ptr, ovl_gate_ptr, w_ptr, inv_ptr, out_ptr,
                    enc_ptr, stride_ob, stride_ot, stride_eb, stride_et, eps, rope_scale, RATE: tl.constexpr,
                    C: tl.constexpr, D: tl.constexpr, NOPE: tl.constexpr, WIN: tl.constexpr, OFF: tl.constexpr,
                    COL_CUR: tl.constexpr, HAS_PREV: tl.constexpr, HAS_W: tl.constexpr, FMT: tl.constexpr,
                    CARRY: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
                    BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    """Entry first + w of batch row b (kv, gate, ovl_* already at row b): pool, norm, rotate, encode; CARRY then
    saves the window's Ca."""
    # one pooling pass over the contiguous channels -NOPE % 2 .. 2 BLOCK_P - 1, split into the pairs' halves
    # c0 / c1 after: 128-bit loads. The two passes it replaces (c0's, then c1's) read every row's cache lines
    # twice at stride 2, and Triton 3.6 laid their [BLOCK_P] sums out 32 to a thread (the HCA compressor took
    # 238 registers on sm_90a; now 70-76; bench/README.md)
    c = tl.arange(0, 2 * BLOCK_P) - NOPE % 2
    x = _pool(kv_ptr, gate_ptr, ape_ptr, ovl_kv_ptr, ovl_gate_ptr, w, first, c, (c >= 0) & (c < D), RATE, C, D, WIN,
              OFF, COL_CUR, HAS_PREV, BLOCK_R, 2 * BLOCK_P)
    x0, x1 = tl.split(tl.reshape(x, [BLOCK_P, 2]))
    c0 = 2 * tl.arange(0, BLOCK_P) - NOPE % 2
    c1 = c0 + 1
    m0, m1 = (c0 >= 0) & (c0 < D), c1 < D
    # RMSNorm over the D channels: y = x / sqrt(mean(x^2) + eps) * weight
    rstd = tl.math.rsqrt((tl.sum(x0 * x0, axis=0) + tl.sum(x1 * x1, axis=0)) / D + eps)
    y0, y1 = x0 * rstd, x1 * rstd
    if HAS_W:
        y0 = tl.load(w_ptr + c0, mask=m0, other=0.0) * y0
        y1 = tl.load(w_ptr + c1, mask=m1, other=0.0) * y1
    # interleaved RoPE on channels >= NOPE at position (first entry + w) * RATE
    rot = m0 & (c0 >= NOPE)
    freq = tl.load(inv_ptr + (c0 - NOPE) // 2, mask=rot, other=0.0)
    angle = ((first + w) * RATE).to(tl.float32) * freq
    cos, sin = tl.cos(angle) * rope_scale, tl.sin(angle) * rope_scale
    y0, y1 = tl.where(rot, y0 * cos - y1 * sin, y0), tl.where(rot, y1 * cos + y0 * sin, y1)
    out_row = out_ptr + b * stride_ob + w * stride_ot
    if FMT == 1:
        tl.store(out_row + c0, bf16_bits(y0).to(tl.int16), mask=m0)
        tl.store(out_row + c1, bf16_bits(y1).to(tl.int16), mask=m1)
    elif FMT == 2:
        _store_fp8_split(out_row, y0, y1, c0, c1, m0, m1, D, NOPE, BLOCK_G)
    else:
        tl.store(out_row + c0, y0, mask=m0)
        tl.store(out_row + c1, y1, mask=m1)
        if FMT >= 3:  # the block formats' scales need the whole row: encode it from the scratch row
            tl.debug_barrier()
            _encode_blocks(out_row, enc_ptr + b * stride_eb + w * stride_et, D, FMT == 4, BLOCK_E)
    if CARRY:
        tl.debug_barrier()
        cd = tl.arange(0, BLOCK_C)
        md = cd < D
        for r in range(RATE):
            tl.store(ovl_kv_ptr + r * D + cd, tl.load(kv_ptr + r * C + cd, mask=md), mask=md)
            ape = tl.load(ape_ptr + r * C + cd, mask=md).to(tl.float32)
            tl.store(ovl_gate_ptr + r * D + cd, tl.load(gate_ptr + r * C + cd, mask=md) + ape, mask=md)


# --- host side ----------------------------------------------------------------------------------
def _check_inputs(kv, gate, ape, norm_weight, inv_freq, state, rate, overlap, kv_format):
    """Validate everything compress() relies on; returns the state tuple unpacked to 5 (ovl_* None)."""
    check(isinstance(rate, int) and rate >= 1, f"rate: expected a positive int, got {rate!r}")
    check(kv_format in KV_FORMATS, f"kv_format {kv_format!r} is not supported; expected one of {list(KV_FORMATS)}")
    check_tensor("kv", kv, dtypes=FLOATS, dim=3, contiguous=False)
    check_tensor("gate", gate, dtypes=FLOATS, dim=3, contiguous=False)
    check(gate.shape == kv.shape, f"gate: shape {list(gate.shape)} differs from kv's {list(kv.shape)}")
    batch, _, width = kv.shape
    check(not overlap or width % 2 == 0, f"kv: overlap needs an even channel count (Ca | Cb), got {width}")
    d = width // 2 if overlap else width
    check_tensor("ape", ape, dtypes=FLOATS, contiguous=False)
    check(tuple(ape.shape) == (rate, width), f"ape: expected shape [{rate}, {width}], got {list(ape.shape)}")
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, dtypes=FLOATS, contiguous=False)
        check(tuple(norm_weight.shape) == (d,), f"norm_weight: expected shape [{d}], got {list(norm_weight.shape)}")
    check_tensor("inv_freq", inv_freq, dtypes=FLOATS, dim=1, contiguous=False)
    half = inv_freq.shape[0]
    check(1 <= half and 2 * half <= d,
          f"inv_freq: {half} frequencies; expected 1 .. {d // 2} (entries of {d} channels)")
    names = ("buf_kv", "buf_gate", "ovl_kv", "ovl_gate")[:4 if overlap else 2] + ("entries",)
    check(isinstance(state, (tuple, list)) and len(state) == len(names),
          f"state: expected {len(names)} items ({', '.join(names)})")
    shapes = ((batch, rate, width), (batch, rate, width), (batch, rate, d), (batch, rate, d))
    for name, t, shape in zip(names[:-1], state, shapes):
        check_tensor(f"state {name}", t, dtypes=FLOATS, contiguous=False)
        check(tuple(t.shape) == shape, f"state {name}: expected shape {list(shape)}, got {list(t.shape)}")
    full = tuple(state) if overlap else (state[0], state[1], None, None, state[2])
    same_device(kv=kv, gate=gate, ape=ape, norm_weight=norm_weight, inv_freq=inv_freq, buf_kv=full[0],
                buf_gate=full[1], ovl_kv=full[2], ovl_gate=full[3], entries=full[4])
    return full


def _entry_target(entries, first: int, n_win: int, batch: int, dtype, width: int, device):
    """-> (tensor [B, n_win, width] the kernels write, whether it still has to be handed to `entries`).
    A dense entries tensor of the storage dtype is written in place."""
    if isinstance(entries, torch.Tensor):
        check(entries.dim() == 3 and entries.shape[0] == batch and entries.shape[2] == width,
              f"state entries: expected shape [{batch}, T, {width}], got {list(entries.shape)}")
        check(first + n_win <= entries.shape[1],
              f"state entries: capacity {entries.shape[1]} is too small for entries {first} .. {first + n_win - 1}")
        if entries.dtype == dtype and entries.stride(-1) == 1:
            return entries[:, first:first + n_win], False
    else:
        check(callable(getattr(entries, "write", None)), "state entries: expected a tensor or a store with write()")
    return torch.empty(batch, n_win, width, dtype=dtype, device=device), True


def _launch(kv, gate, ape, norm_weight, inv_freq, ovl_kv, ovl_gate, rows, *, first, n_win, rate, overlap, eps,
            rope_scale, kv_format, cfg, new=None, pos=None):
    """Pool, normalize, rotate and encode entries first .. first+n_win-1 into `rows` [B, n_win, W], one launch.
    With a device position `pos` (a decode step, kv = the window buffers, `new` = the token's (kv, gate)): the
    token joins the buffers, and entry pos // rate goes into its row of `rows` (the whole entries tensor) if the
    token closes its window; with overlap that window's Ca is then saved."""
    args, consts = _launch_args(kv, gate, ape, norm_weight, inv_freq, ovl_kv, ovl_gate, rows, first=first,
                                n_win=n_win, rate=rate, overlap=overlap, eps=eps, rope_scale=rope_scale,
                                kv_format=kv_format, cfg=cfg, new=new, pos=pos)
    _compress_kernel[(n_win, kv.shape[0])](*args, **consts, num_warps=cfg["num_warps"])


def _launch_args(kv, gate, ape, norm_weight, inv_freq, ovl_kv, ovl_gate, rows, *, first, n_win, rate, overlap, eps,
                 rope_scale, kv_format, cfg, new=None, pos=None):
    """_compress_kernel's arguments for _launch's work: (runtime arguments, constexprs)."""
    batch, length, width = kv.shape
    d = width // 2 if overlap else width
    rope = 2 * inv_freq.shape[0]
    fmt = FMTS[kv_format]
    direct = fmt <= FMT_FP8_SPLIT
    out = rows if direct else torch.empty(batch, n_win, d, dtype=torch.float32, device=kv.device)
    device_pos = pos is not None
    has_prev = overlap and (first > 0 or device_pos)  # a device position's `first` is the kernel's to read
    win = 2 * rate if overlap else rate
    # BLOCK_P channel pairs c0 = 2p - NOPE % 2: the rope width is even, so NOPE has d's parity and cdiv(d, 2)
    # pairs reach channel d - 1 (it was cdiv(d + 1, 2): at d = 512 a 512-wide tile, half of it masked)
    block_p = next_pow2(cdiv(d, 2))
    # pooled chunks of at most 4096 elements ([BLOCK_R, 2 BLOCK_P]: 32 a thread at 4 warps); on sm_90a the HCA
    # compressor (d 512) takes 114-128 registers with 16-row chunks, 74-76 with 8
    block_r = min(cfg["block_r"], next_pow2(win), max(1, 4096 // (2 * block_p)))
    new_kv, new_gate = new if device_pos else (kv, gate)
    args = (kv, gate, ape.float().contiguous(), ovl_kv if has_prev else kv, ovl_gate if has_prev else gate,
            kv if norm_weight is None else norm_weight.float().contiguous(), inv_freq.float().contiguous(),
            out.view(torch.int16) if fmt == FMT_BF16 else out, rows, pos if device_pos else kv, new_kv, new_gate,
            new_kv.stride(0), new_kv.stride(2), new_gate.stride(0), new_gate.stride(2), length, out.stride(0),
            out.stride(1), rows.stride(0), rows.stride(1), out.stride(1) if direct else 0, 0 if device_pos else first,
            float(eps), float(rope_scale))
    consts = dict(RATE=rate, C=width, D=d, NOPE=d - rope, WIN=win, OFF=rate if overlap else 0,
                  COL_CUR=d if overlap else 0, HAS_PREV=has_prev, HAS_W=norm_weight is not None, FMT=fmt,
                  DEVICE_POS=device_pos, CARRY=device_pos and overlap, BLOCK_R=block_r,
                  BLOCK_P=block_p, BLOCK_G=next_pow2(cdiv(d - rope, KV_GROUP)),
                  BLOCK_E=next_pow2(cdiv(d, FP4_BLOCK if fmt == FMT_FP4_BLOCK else FP8_BLOCK)),
                  BLOCK_C=next_pow2(width) if device_pos else 1)
    return args, consts


def compress(kv, gate, ape, norm_weight, inv_freq, *, state, pos0, rate, overlap, eps, rope_scale=1.0,
             kv_format="f32", config=None):
    """kv, gate: [B, S, C] projections of the new tokens; ape: [rate, C]; norm_weight: [d]; inv_freq: [R/2].
    state (mutated in place): buf_kv, buf_gate [B, rate, C], (ovl_kv, ovl_gate [B, rate, d] with overlap),
    entries [B, T, W] or a store with write(start, rows). Writes the entries of the windows closed by the
    new tokens (pos0 is the position of kv[:, 0]: an int, or for one token a call a device position,
    common.position, the launches then being the same at every position)."""
    cfg = launch_config(config, {"block_r": 16, "num_warps": 4}, "compress")
    buf_kv, buf_gate, ovl_kv, ovl_gate, entries = _check_inputs(kv, gate, ape, norm_weight, inv_freq, state,
                                                                rate, overlap, kv_format)
    batch, s, width = kv.shape
    d = width // 2 if overlap else width
    if position(pos0, kv.device) is None:
        args, consts = device_position_args(kv, gate, ape, norm_weight, inv_freq, buf_kv, buf_gate, ovl_kv, ovl_gate,
                                            entries, pos0, rate=rate, overlap=overlap, eps=eps, rope_scale=rope_scale,
                                            kv_format=kv_format, cfg=cfg)
        _compress_kernel[(1, kv.shape[0])](*args, **consts, num_warps=cfg["num_warps"])
        return
    n_buf = pos0 % rate
    if n_buf + s < rate:  # no window closes (most decode steps): the new tokens only join the window buffer
        buf_kv[:, n_buf:n_buf + s] = kv
        buf_gate[:, n_buf:n_buf + s] = gate
        return
    kv = torch.cat([buf_kv[:, :n_buf].float(), kv.float()], dim=1).contiguous()  # [B, L = n_buf + S, C]
    gate = torch.cat([buf_gate[:, :n_buf].float(), gate.float()], dim=1).contiguous()
    n_win = kv.shape[1] // rate
    used = n_win * rate
    if n_win:
        first = pos0 // rate
        dtype, entry_width = entry_layout(kv_format, d, 2 * inv_freq.shape[0])
        rows, handoff = _entry_target(entries, first, n_win, batch, dtype, entry_width, kv.device)
        _launch(kv, gate, ape, norm_weight, inv_freq, ovl_kv, ovl_gate, rows, first=first, n_win=n_win, rate=rate,
                overlap=overlap, eps=eps, rope_scale=rope_scale, kv_format=kv_format, cfg=cfg)
        if handoff and isinstance(entries, torch.Tensor):
            entries[:, first:first + n_win] = rows
        elif handoff:
            entries.write(first, rows)
        if overlap:  # Ca of the last closed window (gate with ape added) pools into the next entry
            ovl_kv.copy_(kv[:, used - rate:used, :d])
            torch.add(gate[:, used - rate:used, :d], ape[:, :d], out=ovl_gate)
    rest = kv.shape[1] - used
    if rest:
        buf_kv[:, :rest] = kv[:, used:]
        buf_gate[:, :rest] = gate[:, used:]


def device_position_args(kv, gate, ape, norm_weight, inv_freq, buf_kv, buf_gate, ovl_kv, ovl_gate, entries, pos, *,
                         rate, overlap, eps, rope_scale, kv_format, cfg):
    """One token a sequence at a device position p, one launch of grid (1, B) whatever p is: the token joins the
    window buffers, the kernel pools them into entry p // rate if p closes a window (its programs stop after the
    buffers otherwise) and, with overlap, then saves that window's Ca. Checks the state for it and returns
    _compress_kernel's (arguments, constexprs)."""
    batch, s, width = kv.shape
    d = width // 2 if overlap else width
    check(s == 1, f"pos0: a device position serves one token a call (a decode step), got {s}")
    dtype, entry_width = entry_layout(kv_format, d, 2 * inv_freq.shape[0])
    check(isinstance(entries, torch.Tensor), "pos0: a device position needs the entries as a tensor, not a "
                                             "tiered store (written from the host)")
    _, handoff = _entry_target(entries, 0, 0, batch, dtype, entry_width, kv.device)  # (its shape checks)
    check(not handoff, f"pos0: a device position needs the entries as {dtype} with unit channel stride (written "
                       "in place by the kernels)")
    for name, t in (("buf_kv", buf_kv), ("buf_gate", buf_gate), ("ovl_kv", ovl_kv), ("ovl_gate", ovl_gate)):
        if t is not None and not (t.dtype == torch.float32 and t.is_contiguous()):
            raise ValueError(f"state {name}: a device position needs it float32 and contiguous, got {t.dtype}")
    return _launch_args(buf_kv, buf_gate, ape, norm_weight, inv_freq, ovl_kv, ovl_gate, entries, first=0, n_win=1,
                        rate=rate, overlap=overlap, eps=eps, rope_scale=rope_scale, kv_format=kv_format, cfg=cfg,
                        new=(kv, gate), pos=pos)


compress.device_position = True  # takes pos0 as a device tensor (common.position)
LAUNCHERS = {"compress": compress}
