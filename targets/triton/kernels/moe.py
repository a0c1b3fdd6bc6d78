"""Triton kernels for the routed experts of mixture of experts, with the semantics of
runtime/kernels/moe.py (moe_experts) and runtime/kernels/quantized.py (moe_experts_q); fp32 math and
outputs. The routers (route_topk, route_hash) are in router.py.

Experts: a grouped GEMM over the P = T*k (token, slot) pairs, sorted by expert on the device (stable:
each expert's pairs stay in (token, slot) order; pairs.py: up to 64 pairs in the gate_up programs themselves
(PAIRS_IN_KERNEL), at other decode sizes one kernel) and cut into
tiles of <= BLOCK_M pairs of one expert:
  gate_up  grid (tiles, I tiles)  mid[p] = swiglu(q_in(x[tok p]) W_gu[e p]^T)       [P, I]
  down     grid (tiles, D tiles)  y[p] = w[p] * q_mid(mid[p]) W_down[e p]^T          [P, D]
  combine  grid (T, D tiles)      out[t] = sum of y over t's pairs, in ascending expert order
Up to COMBINE_TOKENS tokens (a decode step; SUM_IN_KERNEL) the combine is no launch of its own: the last of each
down column block's programs to finish adds that block for every token (common.arrived_last), the same sums.
Weights are dequantized to fp32 in registers (f32 / bf16 / f16; FP8 e4m3 x block scale, fp32 or
UE8M0; FP4 e2m1, two codes a byte, x per-32 UE8M0 scale). Activation fake-quant (quant.fake_quant_act)
is fused into the operand loads: "dynamic" walks K one group at a time (an amax pass, then the dot
pass), "static" divides by its scale; both round to e4m3 like torch's cast (RTNE) in registers
(common.fake_quant), with exact UE8M0 scales (common.group_scale). From 64 pairs on (QUANT_ONCE), dynamic
activations are instead quantized once by quantize.act_quant (the same codes and scales) and the GEMMs read
1-byte codes: at prefill the fused path would redo each token's quantization k x (N / BLOCK_N) times.
With quantized activations (FP8_DOT) the dots take the activations' e4m3 codes instead, the scale after: fp8
tensor-core dots against e4m3 weights, bf16 ones against FP4 weights (_fp4_dot, exact products).
"""

import torch
import triton
import triton.language as tl

from .common import (E4M3_MAX, FP8_DOT_MIN_K, arrived_last, cdiv, check, check_tensor, config_switch, decode_scale,
                     e2m1_value, fake_quant, fp8_dot_supported, group_scale, host_values, in_kernel_counters,
                     launch_config, native_cvt, next_pow2, result, same_device, swiglu_value, to_e4m3)
from .quantize import act_quant, quant_once
from .pairs import pair_arrays, pair_tiles, sort_pairs

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
INTS = (torch.int32, torch.int64)
ACT_NONE, ACT_STATIC, ACT_DYNAMIC, ACT_CODES = 0, 1, 2, 3  # ACT_CODES: dynamic, quantized once (quantize.act_quant)
W_FLOAT, W_FP8, W_FP4 = 0, 1, 2
EXPERT_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_D": 64, "FP8_DOT": "auto", "QUANT_ONCE": "auto",
                 "SUM_IN_KERNEL": "auto", "PAIRS_IN_KERNEL": "auto", "num_warps": 4,
                 "num_stages": 3}  # num_warps / num_stages: the two expert GEMMs' (Triton's defaults)
COMBINE_TOKENS = 16  # SUM_IN_KERNEL 'auto': the down GEMM combines up to this many tokens (a decode step)
# PAIRS_IN_KERNEL: every gate_up program sorts the pairs itself from [P, P] comparisons, so only for a few: a decode
# step of up to 10 tokens at V4's top-6 (_pairs_kernel, one program, or the torch ops from there on)
PAIRS_IN_KERNEL_MAX = 64


# --- device helpers ------------------------------------------------------------------------------
@triton.jit
def _quant_chunk(a, s, ACT: tl.constexpr, SINGLE: tl.constexpr, UE8M0: tl.constexpr):
    """Fake-quantize an operand tile a [BM, BK]: clamp(a / s, +-448) -> e4m3 -> * s. Dynamic mode
    with the group in this one chunk (SINGLE) takes s from the tile's row amax; else s is given."""
    if ACT == 2 and SINGLE:  # dynamic
        s = group_scale(tl.max(tl.abs(a), axis=1), E4M3_MAX, UE8M0)[:, None]
    if ACT != 0:
        a = fake_quant(a, s)
    return a


@triton.jit
def _load_chunk(ptr, rows, rmask, k0, c, K, SEG, BK: tl.constexpr):
    """Operand chunk c of the K segment starting at k0: ptr[rows, k0 + c*BK + (0..BK)] -> [BM, BK] fp32
    (zero past the segment, past K and on masked rows)."""
    kk = c * BK + tl.arange(0, BK)
    mask = rmask[:, None] & ((kk < SEG) & (k0 + kk < K))[None, :]
    return tl.load(ptr + rows[:, None] * K + (k0 + kk)[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_codes(ptr, rows, rmask, k0, c, K, SEG, BK: tl.constexpr):
    """As _load_chunk over e4m3 codes stored as uint8 (quantize.act_quant) -> float8e4nv [BM, BK] (code 0 = +0.0
    where masked)."""
    kk = c * BK + tl.arange(0, BK)
    mask = rmask[:, None] & ((kk < SEG) & (k0 + kk < K))[None, :]
    return tl.load(ptr + rows[:, None] * K + (k0 + kk)[None, :], mask=mask, other=0).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _segment_scale(ptr, rows, rmask, k0, K, act_scale, SEG, ACT: tl.constexpr, NCHUNK: tl.constexpr,
                   UE8M0: tl.constexpr, BK: tl.constexpr):
    """Scale of one K segment: the static scale, or (dynamic, group over several chunks) the
    group's scale from an amax pass -> scalar or [BM, 1]."""
    s = act_scale
    if ACT == 2 and NCHUNK > 1:  # dynamic
        amax = tl.zeros([rows.shape[0]], dtype=tl.float32)
        for c in tl.static_range(NCHUNK):
            amax = tl.maximum(amax, tl.max(tl.abs(_load_chunk(ptr, rows, rmask, k0, c, K, SEG, BK)), axis=1))
        s = group_scale(amax, E4M3_MAX, UE8M0)[:, None]
    return s


@triton.jit
def _weight_tile(w_ptr, s_ptr, e, rows, cols, rmask, cmask, n_rows, n_cols, s_rows, s_cols,
                 WFMT: tl.constexpr, SCALE_E8M0: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    """Dequantized fp32 tile W_e[rows, cols] -> [BN, BK] (0 where masked) of a stacked weight
    [E, n_rows, n_cols] (FP4: bytes [E, n_rows, n_cols/2]); FP8 / FP4 times the scale
    s_e[row // BO, col // BI] of the scale grid [E, s_rows, s_cols] (UE8M0 bytes: 2^(byte-127))."""
    mask = rmask[:, None] & cmask[None, :]
    e = e.to(tl.int64)
    if WFMT == 2:
        half = n_cols // 2
        byte = tl.load(w_ptr + e * n_rows * half + rows[:, None] * half + cols[None, :] // 2, mask=mask, other=0)
        w = e2m1_value(byte.to(tl.int32) >> ((cols[None, :] & 1) * 4))
    else:
        w = tl.load(w_ptr + e * n_rows * n_cols + rows[:, None] * n_cols + cols[None, :], mask=mask)
        w = tl.where(mask, w.to(tl.float32), 0.0)  # no `other` for fp8 loads; zero the masked lanes
    if WFMT != 0:
        s = tl.load(s_ptr + e * s_rows * s_cols + (rows[:, None] // BO) * s_cols + cols[None, :] // BI, mask=mask,
                    other=0)
        w = w * decode_scale(s, SCALE_E8M0)
    return w


@triton.jit
def _weight_codes(w_ptr, s_ptr, e, rows, cols, rmask, cmask, n_rows, n_cols, s_rows, s_cols, col0,
                  SCALE_E8M0: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    """e4m3 codes of W_e[rows, cols] -> float8e4nv [BN, BK] (0 where masked; bytes read as uint8, so masked
    lanes are zero and not NaN) and the rows' block scales of column block col0 // BI -> fp32 [BN]."""
    e = e.to(tl.int64)
    byte = tl.load(w_ptr + e * n_rows * n_cols + rows[:, None] * n_cols + cols[None, :],
                   mask=rmask[:, None] & cmask[None, :], other=0)
    sc = tl.load(s_ptr + e * s_rows * s_cols + (rows // BO) * s_cols + col0 // BI, mask=rmask, other=0)
    return byte.to(tl.float8e4nv, bitcast=True), decode_scale(sc, SCALE_E8M0)


@triton.jit
def _fp8_dot(aq, s, w_ptr, s_ptr, e, rows, cols, rmask, cmask, n_rows, n_cols, s_rows, s_cols, col0,
             SCALE_E8M0: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr):
    """q(a) W_e[rows, cols]^T with an fp8 tensor-core dot: aq, the e4m3 codes of a / s (common.to_e4m3), times
    the weight codes, then the activation scale s and the weights' block scales."""
    w, ws = _weight_codes(w_ptr, s_ptr, e, rows, cols, rmask, cmask, n_rows, n_cols, s_rows, s_cols, col0,
                          SCALE_E8M0, BO, BI)
    return tl.dot(aq, tl.trans(w), out_dtype=tl.float32) * s * ws[None, :]


@triton.jit
def _fp4_dot(aq, s, w_ptr, s_ptr, e, rows, rmask, col0, n_rows, n_cols, s_rows, s_cols, SCALE_E8M0: tl.constexpr,
             BI: tl.constexpr, NATIVE: tl.constexpr, BK: tl.constexpr):
    """q(a) W_e[rows, col0 + (0..BK)]^T for FP4 weights (col0 even) over the activations' e4m3 codes aq [BM, BK],
    times their scale s after. Each weight byte is loaded once: its low nibble meets the even columns of aq, its
    high one the odd (aq split in two halves of BK / 2). An e2m1 value times its UE8M0 scale and an e4m3 code are
    both exact in bf16, so a GPU (NATIVE) takes bf16 tensor-core dots with exact products and fp32 sums; the
    interpreter, whose bf16 dot is wrong (tests/gpu_semantics.py), fp32 dots of the same values."""
    half = n_cols // 2
    j = col0 // 2 + tl.arange(0, BK // 2)  # byte columns
    mask = rmask[:, None] & (j < half)[None, :]
    e = e.to(tl.int64)
    byte = tl.load(w_ptr + e * n_rows * half + rows[:, None] * half + j[None, :], mask=mask, other=0).to(tl.int32)
    sc = tl.load(s_ptr + e * s_rows * s_cols + rows[:, None] * s_cols + (2 * j[None, :]) // BI, mask=mask, other=0)
    scale = decode_scale(sc, SCALE_E8M0)
    w_even, w_odd = e2m1_value(byte) * scale, e2m1_value(byte >> 4) * scale
    a_even, a_odd = tl.split(tl.reshape(aq.to(tl.float32), [aq.shape[0], BK // 2, 2]))
    if NATIVE:
        d = tl.dot(a_even.to(tl.bfloat16), tl.trans(w_even.to(tl.bfloat16)), out_dtype=tl.float32)
        d = tl.dot(a_odd.to(tl.bfloat16), tl.trans(w_odd.to(tl.bfloat16)), d, out_dtype=tl.float32)
    else:
        d = tl.dot(a_even, tl.trans(w_even), input_precision="ieee")
        d = tl.dot(a_odd, tl.trans(w_odd), d, input_precision="ieee")
    return d * s


@triton.jit
def _pair_dots(a_ptr, sa_ptr, rows, pmask, w_ptr, s_ptr, e, n, nmask, N, K, k_end, s_rows, s_cols, act_scale, SEG,
               SWIGLU: tl.constexpr, ACT: tl.constexpr, NCHUNK: tl.constexpr, UE8M0: tl.constexpr,
               WFMT: tl.constexpr, SCALE_E8M0: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
               FP8_DOT: tl.constexpr, NATIVE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The K loop of one tile (see _experts_gemm_kernel) over the stacked weight w_ptr's expert e ->
    (acc, up) [BM, BN] fp32: the gate (or down) dots and, SWIGLU, the up dots."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    up = tl.zeros([BM, BN], dtype=tl.float32)
    n_rows = 2 * N if SWIGLU else N
    for k0 in range(0, k_end, SEG):
        if ACT == 3:
            s = tl.load(sa_ptr + rows * tl.cdiv(K, SEG) + k0 // SEG, mask=pmask, other=1.0)[:, None]  # [BM, 1]
        else:
            s = _segment_scale(a_ptr, rows, pmask, k0, K, act_scale, SEG, ACT, NCHUNK, UE8M0, BK)
        for c in tl.static_range(NCHUNK):
            k = k0 + c * BK + tl.arange(0, BK)
            if FP8_DOT:
                if ACT == 3:
                    aq = _load_codes(a_ptr, rows, pmask, k0, c, K, SEG, BK)
                else:
                    a = _load_chunk(a_ptr, rows, pmask, k0, c, K, SEG, BK)
                    if ACT == 2 and NCHUNK == 1:  # dynamic, the group in this one chunk
                        s = group_scale(tl.max(tl.abs(a), axis=1), E4M3_MAX, UE8M0)[:, None]
                    aq = to_e4m3(tl.div_rn(a, s), NATIVE)
                col0 = k0 + c * BK
                if WFMT == 2:  # FP4: bf16 tensor-core dots over the codes' and the weights' exact values
                    acc += _fp4_dot(aq, s, w_ptr, s_ptr, e, n, nmask, col0, n_rows, K, s_rows, s_cols, SCALE_E8M0,
                                    BI, NATIVE, BK)
                    if SWIGLU:
                        up += _fp4_dot(aq, s, w_ptr, s_ptr, e, N + n, nmask, col0, n_rows, K, s_rows, s_cols,
                                       SCALE_E8M0, BI, NATIVE, BK)
                else:
                    acc += _fp8_dot(aq, s, w_ptr, s_ptr, e, n, k, nmask, k < K, n_rows, K, s_rows, s_cols, col0,
                                    SCALE_E8M0, BO, BI)
                    if SWIGLU:
                        up += _fp8_dot(aq, s, w_ptr, s_ptr, e, N + n, k, nmask, k < K, n_rows, K, s_rows, s_cols,
                                       col0, SCALE_E8M0, BO, BI)
            else:
                if ACT == 3:  # the code's e4m3 value times its scale = fake_quant(a, s)
                    a = _load_codes(a_ptr, rows, pmask, k0, c, K, SEG, BK).to(tl.float32) * s
                else:
                    a = _quant_chunk(_load_chunk(a_ptr, rows, pmask, k0, c, K, SEG, BK), s, ACT, NCHUNK == 1, UE8M0)
                w = _weight_tile(w_ptr, s_ptr, e, n, k, nmask, k < K, n_rows, K, s_rows, s_cols, WFMT, SCALE_E8M0,
                                 BO, BI)
                acc += tl.dot(a, tl.trans(w), input_precision="ieee")
                if SWIGLU:
                    w = _weight_tile(w_ptr, s_ptr, e, N + n, k, nmask, k < K, n_rows, K, s_rows, s_cols, WFMT,
                                     SCALE_E8M0, BO, BI)
                    up += tl.dot(a, tl.trans(w), input_precision="ieee")
    return acc, up


# --- kernels -------------------------------------------------------------------------------------
@triton.jit
def _experts_gemm_kernel(a_ptr, sa_ptr, rows_ptr, pw_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, w_ptr, s_ptr, out_ptr,
                         slot_rows_ptr, cnt_ptr, res_ptr, wr_ptr, w2_ptr, s2_ptr, T, N, K, E, s_rows, s_cols, s2_rows,
                         s2_cols, act_scale, limit, SEG, SHARED: tl.constexpr, SCALE2_E8M0: tl.constexpr,
                         BO2: tl.constexpr, BI2: tl.constexpr, FP8_DOT2: tl.constexpr,
                         COMBINE: tl.constexpr, KSLOT: tl.constexpr, SWIGLU: tl.constexpr, HAS_LIMIT: tl.constexpr,
                         ACT: tl.constexpr, NCHUNK: tl.constexpr, UE8M0: tl.constexpr, WFMT: tl.constexpr,
                         SCALE_E8M0: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, FP8_DOT: tl.constexpr,
                         NATIVE: tl.constexpr, PAIRS: tl.constexpr, NT: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr):
    """One tile of <= BM pairs p of one expert e x BN outputs n of the grouped GEMM q(A[r_p]) W_e^T over K.
    SWIGLU (gate_up; A = x, r_p = rows[p] its token; W: [E, 2N, K]): out[p, n] =
    silu(min(g, limit)) * clamp(u, +-limit), g / u from W rows n / N + n.
    else (down; A = mid, r_p = p; W: [E, N, K]): out[p, n] = pw[p] * (q(A[p]) . W_e[n]).
    FP8_DOT (e4m3 weights as uint8 bytes, quantized activations, each chunk in one weight block column):
    fp8 tensor-core dots over the codes, scaled after; else fp32 dots over dequantized tiles.
    ACT 3 (ACT_CODES): A holds the e4m3 codes of the dynamic quantization already (uint8) and sa_ptr their
    scales [rows of A, cdiv(K, SEG)], so no tile redoes the amax, division and rounding.
    COMBINE (down): the last of column pid_n's programs to arrive (cnt_ptr[pid_n], common.arrived_last) adds
    that column block of every token's KSLOT pair rows, as _combine_kernel does: res[t] = sum_j out[slot_rows[t,
    j]], j ascending, for the T tokens.
    PAIRS (gate_up, PAIRS_IN_KERNEL; 0: off): no pair bookkeeping ran before; every program does it for the T * KSLOT
    <= PAIRS pairs (pairs.pair_tiles: rows_ptr holds the pairs' expert ids [T * KSLOT], wr_ptr their routing weights,
    E the experts), keeps its own tile and its pairs' tokens in registers and writes pw, slot_rows and the tiles for
    the down GEMM and the combine (every program the same bytes; NT: a power of two >= the tiles).
    SHARED: expert E - 1 is a shared expert with weights of its own (w2_ptr: e4m3 [1, rows, K], block scales s2_ptr
    [1, s2_rows, s2_cols] of blocks (BO2, BI2)); its tiles take that weight's K loop (_pair_dots), the routed
    experts' tiles w_ptr's (FP4 experts, or FP8 ones blocked otherwise)."""
    t, pid_n = tl.program_id(0), tl.program_id(1)
    if PAIRS:
        e, lo, hi, tok = pair_tiles(rows_ptr, wr_ptr, pw_ptr, slot_rows_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, t,
                                    T * KSLOT, E, BM, tl.num_programs(0), KSLOT, PAIRS, BM, NT)
        pairs = lo + tl.arange(0, BM)
        pmask = pairs < hi
        rows = tl.where(pmask, tok, 0).to(tl.int64)
    else:
        e, lo, hi = tl.load(tile_e_ptr + t), tl.load(tile_lo_ptr + t), tl.load(tile_hi_ptr + t)
        pairs = lo + tl.arange(0, BM)
        pmask = pairs < hi
        rows = pairs.to(tl.int64)
        if SWIGLU:
            rows = tl.load(rows_ptr + pairs, mask=pmask, other=0).to(tl.int64)  # [BM] tokens
    n = pid_n * BN + tl.arange(0, BN)
    nmask = n < N
    k_end = tl.where(lo < hi, K, 0)  # an empty tile (fixed-size tile list) loads nothing
    if SHARED:  # the last expert id, E - 1, is the shared expert: its own e4m3 weights [1, rows, cols]
        if e == E - 1:
            acc, up = _pair_dots(a_ptr, sa_ptr, rows, pmask, w2_ptr, s2_ptr, e - (E - 1), n, nmask, N, K, k_end,
                                 s2_rows, s2_cols, act_scale, SEG, SWIGLU, ACT, NCHUNK, UE8M0, 1, SCALE2_E8M0, BO2,
                                 BI2, FP8_DOT2, NATIVE, BM, BN, BK)
        else:
            acc, up = _pair_dots(a_ptr, sa_ptr, rows, pmask, w_ptr, s_ptr, e, n, nmask, N, K, k_end, s_rows, s_cols,
                                 act_scale, SEG, SWIGLU, ACT, NCHUNK, UE8M0, WFMT, SCALE_E8M0, BO, BI, FP8_DOT,
                                 NATIVE, BM, BN, BK)
    else:
        acc, up = _pair_dots(a_ptr, sa_ptr, rows, pmask, w_ptr, s_ptr, e, n, nmask, N, K, k_end, s_rows, s_cols,
                             act_scale, SEG, SWIGLU, ACT, NCHUNK, UE8M0, WFMT, SCALE_E8M0, BO, BI, FP8_DOT, NATIVE,
                             BM, BN, BK)
    if SWIGLU:
        acc = swiglu_value(acc, up, limit, HAS_LIMIT)
    else:
        acc = acc * tl.load(pw_ptr + pairs, mask=pmask, other=0.0)[:, None]
    tl.store(out_ptr + pairs.to(tl.int64)[:, None] * N + n[None, :], acc, mask=pmask[:, None] & nmask[None, :])
    if COMBINE:
        if arrived_last(cnt_ptr + pid_n, tl.num_programs(0)):
            zero = (pid_n * 0).to(tl.int64)  # the token index as int64 (the interpreter's loop variable is an int)
            for tok in range(T):  # .cg: other SMs wrote y
                _combine_row(out_ptr, slot_rows_ptr, res_ptr, zero + tok, n, nmask, N, KSLOT, ".cg")


@triton.jit
def _combine_row(y_ptr, slot_rows_ptr, out_ptr, t, d, dmask, D, K: tl.constexpr, CACHE: tl.constexpr):
    """out[t, d] = sum_j y[slot_rows[t, j], d], j ascending (= ascending expert, as the reference adds); t: int64."""
    acc = tl.zeros(d.shape, dtype=tl.float32)
    for j in tl.static_range(K):
        row = tl.load(slot_rows_ptr + t * K + j).to(tl.int64)
        acc += tl.load(y_ptr + row * D + d, mask=dmask, other=0.0, cache_modifier=CACHE)
    tl.store(out_ptr + t * D + d, acc, mask=dmask)


@triton.jit
def _combine_kernel(y_ptr, slot_rows_ptr, out_ptr, D, K: tl.constexpr, BD: tl.constexpr):
    """_combine_row for token t = program 0, channels of block program 1 (BD wide)."""
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    _combine_row(y_ptr, slot_rows_ptr, out_ptr, tl.program_id(0).to(tl.int64), d, d < D, D, K, "")


# --- host glue -----------------------------------------------------------------------------------
def _act(name, act, k, block_k):
    """Activation fake-quant dict (None = none) -> the kernels' operand-path arguments for K = k:
    K walked in segments of SEG (a dynamic group, else one chunk), each in NCHUNK chunks of BK."""
    act = {"mode": "none"} if act is None else act
    check(isinstance(act, dict) and act.get("mode") in ("dynamic", "static", "none"),
          f"{name}: expected None or a dict with mode 'dynamic', 'static' or 'none', got {act!r}")
    plain = {"act_scale": 1.0, "SEG": block_k, "ACT": ACT_NONE, "NCHUNK": 1, "UE8M0": False, "BK": block_k}
    if act["mode"] == "static":
        scale = act.get("scale")
        check(isinstance(scale, (int, float)) and scale > 0, f"{name}: static scale must be positive, got {scale!r}")
        return {**plain, "act_scale": float(scale), "ACT": ACT_STATIC}
    if act["mode"] == "none":
        return plain
    group, fmt = act.get("group"), act.get("scale_format", "fp32")
    check(isinstance(group, int) and group >= 1, f"{name}: dynamic group must be a positive int, got {group!r}")
    check(fmt in ("fp32", "ue8m0"), f"{name}: scale_format {fmt!r}; supported: fp32, ue8m0")
    seg = min(group, k)  # one group over all of K quantizes like one of exactly K
    width = max(16, min(block_k, next_pow2(seg)))
    return {**plain, "SEG": seg, "ACT": ACT_DYNAMIC, "NCHUNK": cdiv(seg, width), "UE8M0": fmt == "ue8m0",
            "BK": width}


def _weight(w, scale, fmt, block):
    """A stacked expert weight -> the kernels' weight arguments (FP4 bytes and UE8M0 scales as uint8)."""
    if fmt == "float":
        return {"w_ptr": w, "s_ptr": w, "s_rows": 1, "s_cols": 1, "WFMT": W_FLOAT, "SCALE_E8M0": False,
                "BO": 1, "BI": 1}
    s = scale.view(torch.uint8) if scale.dtype == torch.float8_e8m0fnu else scale
    return {"w_ptr": w.view(torch.uint8) if fmt == "fp4" else w, "s_ptr": s, "s_rows": scale.shape[1],
            "s_cols": scale.shape[2], "WFMT": W_FP4 if fmt == "fp4" else W_FP8, "SCALE_E8M0": s.dtype == torch.uint8,
            "BO": block[0], "BI": block[1]}


def _fp8_dot_applies(weight, act, k: int, want="auto", name: str = "moe_experts_q") -> bool:
    """The tensor-core dots over the activations' e4m3 codes serve quantized activations, BK >= 32 and a device
    that has them (common.config_switch): for e4m3 weights an fp8 dot where every K chunk lies in one weight block
    column (bi >= K, or chunks start at multiples of BK and BK divides bi), for FP4 weights a bf16 one (_fp4_dot:
    their per-32 scales go into the tile before the dot). On sm_90a an FP4 tile dequantized for an fp32 dot makes
    ptxas spill kilobytes (bench/results/sm90_static.json)."""
    bk, bi, seg = act["BK"], weight["BI"], act["SEG"]
    if weight["WFMT"] == W_FP4:  # chunks start at even columns (a byte's two codes)
        aligned = seg % 2 == 0 or seg >= k
    else:
        aligned = bi >= k or (bi % bk == 0 and (seg % bk == 0 or seg >= k))
    needs = [(weight["WFMT"] in (W_FP8, W_FP4), "e4m3 or FP4 weights"),
             (act["ACT"] != ACT_NONE, "quantized activations (act mode none)"),
             (bk >= FP8_DOT_MIN_K, f"K chunks of >= {FP8_DOT_MIN_K} (BK is {bk})"),
             (aligned, f"each K chunk in one weight block column (block cols {bi}, BK {bk}), or an FP4 one starting at "
                       f"an even column (group {seg})"),
             (fp8_dot_supported(weight["w_ptr"].device), "an sm_89+ GPU")]
    return config_switch("FP8_DOT", want, needs, name)


def _grouped_gemm(a, out, tiles, weight, act, cfg, *, experts, rows=None, pw=None, limit=None, a_scales=None,
                  combine=None, pairs=None, shared=None, name):
    """out [P, N] over the pair tiles from a [*, K]: with `rows` (each pair's token) the gate_up GEMM
    and its SwiGLU epilogue, with `pw` (each pair's routing weight) the down GEMM, scaled.
    cfg: the launch config (`_run_experts`). QUANT_ONCE ("auto": from 64 pairs on, with more
    than one N tile) quantizes dynamic activations once, one row of `a` at a time (quantize.act_quant), instead of
    in every N tile of every pair: gate_up's input is then quantized once per token, not per (token, expert).
    a_scales: `a` holds those codes already (uint8; the fuse pass's rms_norm_quant), with these scales
    [rows of a, cdiv(K, SEG)] fp32. combine: (slot_rows [T, k], counters, res [T, N]): the down GEMM also adds
    each token's pair rows into res (COMBINE). pairs (gate_up, PAIRS_IN_KERNEL): (expert ids [T, k], routing
    weights [T, k], pw, slot_rows): the programs do the pair bookkeeping into pw, slot_rows and tiles. experts: the
    expert count E; shared: the kernel weight arguments (`_weight`, FP8) of expert E - 1's own weight, or None."""
    swiglu = rows is not None
    weight = _dot_operands(weight, act, a.shape[1], cfg, name)
    if shared is None:
        shared = {"w2_ptr": a, "s2_ptr": a, "s2_rows": 1, "s2_cols": 1, "SHARED": False, "SCALE2_E8M0": False,
                  "BO2": 1, "BI2": 1, "FP8_DOT2": False}
    else:
        own = _dot_operands(shared, act, a.shape[1], cfg, name)
        shared = {"w2_ptr": own["w_ptr"], "s2_ptr": own["s_ptr"], "s2_rows": own["s_rows"], "s2_cols": own["s_cols"],
                  "SHARED": True, "SCALE2_E8M0": own["SCALE_E8M0"], "BO2": own["BO"], "BI2": own["BI"],
                  "FP8_DOT2": own["FP8_DOT"]}
    n_tiles = cdiv(out.shape[1], cfg["BLOCK_N"])
    if a_scales is not None:
        act = {**act, "ACT": ACT_CODES}
    elif quant_once(cfg["QUANT_ONCE"], act["ACT"] == ACT_DYNAMIC, out.shape[0], n_tiles, name):
        codes, a_scales = act_quant(a.unsqueeze(1), act["SEG"], act["UE8M0"])
        a, act = codes.squeeze(1), {**act, "ACT": ACT_CODES}
    else:
        a_scales = a  # (an unused pointer)
    slot_rows, counters, res = combine or (out, out, out)
    ids, routing, pw_out, slots = pairs or (rows if swiglu else a, a, a if swiglu else pw, slot_rows)
    _experts_gemm_kernel[(tiles[0].numel(), n_tiles)](
        a, a_scales, ids, pw_out, *tiles, out_ptr=out, slot_rows_ptr=slots,
        cnt_ptr=counters, res_ptr=res, wr_ptr=routing, T=ids.shape[0] if pairs else res.shape[0], N=out.shape[1],
        K=a.shape[1], E=experts, limit=0.0 if limit is None else float(limit), COMBINE=combine is not None,
        KSLOT=slot_rows.shape[1] if combine else (ids.shape[1] if pairs else 1), SWIGLU=swiglu,
        HAS_LIMIT=limit is not None, PAIRS=next_pow2(ids.numel()) if pairs else 0,
        NT=next_pow2(tiles[0].numel()) if pairs else 1, BM=cfg["BLOCK_M"], BN=cfg["BLOCK_N"],
        NATIVE=native_cvt(a.device), **weight, **shared, **act, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])


def _dot_operands(weight: dict, act: dict, k: int, cfg: dict, name: str) -> dict:
    """Kernel weight arguments with FP8_DOT decided (_fp8_dot_applies; the e4m3 codes then read as bytes)."""
    fp8_dot = _fp8_dot_applies(weight, act, k, cfg["FP8_DOT"], name)
    return {**weight, "FP8_DOT": fp8_dot, **({"w_ptr": weight["w_ptr"].view(torch.uint8)} if fp8_dot else {})}


def _run_experts(name, x, weights, idx, gu, down, inter, *, limit, act_in, act_mid, config, into, x_scale=None,
                 shared=None):
    """Body of the expert launchers. gu / down: kernel weight arguments (`_weight`), already checked
    against D = x.shape[-1] and the intermediate size `inter`; x_scale: x holds act_in's codes (checked);
    shared: (gate_up, down) kernel weight arguments of a shared expert, id E (after gu's E experts), or None."""
    cfg = launch_config(config, EXPERT_CONFIG, name,
                        at_least={k: 16 for k in EXPERT_CONFIG if k.startswith("BLOCK")})
    check_tensor("weights", weights, dtypes=FLOATS, contiguous=False)
    check_tensor("idx", idx, dtypes=INTS, contiguous=False)
    check(idx.dim() == x.dim() and idx.shape[:-1] == x.shape[:-1] and weights.shape == idx.shape,
          f"idx / weights: expected [..., k] over x's leading dims {list(x.shape[:-1])}, got idx {list(idx.shape)}, "
          f"weights {list(weights.shape)}")
    check(limit is None or isinstance(limit, (int, float)), f"limit: expected None or a number, got {limit!r}")
    same_device(x=x, weights=weights, idx=idx, gate_up=gu["w_ptr"], down=down["w_ptr"])
    n_experts, d, k = gu["w_ptr"].shape[0] + (shared is not None), x.shape[-1], idx.shape[-1]
    shared_gu, shared_down = shared or (None, None)
    tokens = x.numel() // max(d, 1)
    res = result(into, x.shape, torch.float32, x.device)
    out = res.view(tokens, d)
    if out.numel() == 0 or k == 0:
        return res.zero_()
    if host_values(idx):  # on a GPU this read would wait for it; the runtime's routers emit ids in range
        check(0 <= int(idx.min()) and int(idx.max()) < n_experts, f"idx: expert ids must be in [0, {n_experts})")
    bk, bd = cfg["BLOCK_K"], cfg["BLOCK_D"]
    ids, routing = idx.reshape(tokens, k).contiguous(), weights.reshape(tokens, k).contiguous()
    in_kernel = config_switch("PAIRS_IN_KERNEL", cfg["PAIRS_IN_KERNEL"], [(
        tokens * k <= PAIRS_IN_KERNEL_MAX, f"at most {PAIRS_IN_KERNEL_MAX} (token, expert) pairs (here {tokens * k})")],
        name)
    if in_kernel:  # the gate_up programs sort the pairs (pairs.pair_tiles): one launch fewer
        rows, pw, slot_rows, tiles = pair_arrays(tokens, k, n_experts, cfg["BLOCK_M"], x.device)
    else:
        rows, pw, slot_rows, tiles = sort_pairs(ids, routing, n_experts, cfg["BLOCK_M"])
    mid = torch.empty(tokens * k, inter, dtype=torch.float32, device=x.device)
    y = torch.empty(tokens * k, d, dtype=torch.float32, device=x.device)
    xf = x.reshape(tokens, d).contiguous()
    if x_scale is not None:
        xf, x_scale = xf.view(torch.uint8), x_scale.reshape(tokens, -1).contiguous()
    _grouped_gemm(xf, mid, tiles, gu, _act("act_in", act_in, d, bk), cfg, experts=n_experts, rows=rows, limit=limit,
                  a_scales=x_scale, pairs=(ids, routing, pw, slot_rows) if in_kernel else None, shared=shared_gu,
                  name=name)
    counters = _combine_counters(cfg["SUM_IN_KERNEL"], x.device, tokens, cdiv(d, cfg["BLOCK_N"]), name)
    _grouped_gemm(mid, y, tiles, down, _act("act_mid", act_mid, inter, bk), cfg, experts=n_experts, pw=pw,
                  combine=None if counters is None else (slot_rows, counters, out), shared=shared_down, name=name)
    if counters is None:
        _combine_kernel[(tokens, cdiv(d, bd))](y, slot_rows, out, d, K=k, BD=bd)
    return res


def _combine_counters(want, device, tokens: int, n_tiles: int, name: str):
    """The arrival counters when the down GEMM adds each token's pair rows itself (SUM_IN_KERNEL; 'auto': up to
    COMBINE_TOKENS tokens, where the last program of each column block adding them all costs less than a
    launch), else None: _combine_kernel adds them, one program per (token, channel block)."""
    if want == "auto" and tokens > COMBINE_TOKENS:
        return None
    return in_kernel_counters(want, device, n_tiles, name)


def _check_x(x, d, what, codes=False):
    dtypes = (torch.float8_e4m3fn,) if codes else FLOATS
    check(isinstance(x, torch.Tensor) and x.dtype in dtypes and x.dim() >= 1 and x.shape[-1] == d,
          f"x: expected {'e4m3 codes' if codes else 'a float tensor'} (one of {list(dtypes)}) with last dim {what} = "
          f"{d}, got {getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")


def moe_experts(x, weights, idx, gate_up, down, *, limit=None, act_in=None, act_mid=None, config=None, into=None):
    """Routed experts. x: [..., D], weights / idx: [..., k], gate_up: [E, 2I, D] (gate rows first),
    down: [E, D, I] (f32 / bf16 / f16) -> [..., D] f32 = sum_j weights[j] * down_e(swiglu(gate_up_e x)),
    e = idx[j]; `act_in` / `act_mid` fake-quantize the inputs of the two projections.
    config: BLOCK_M (pairs a tile), BLOCK_N, BLOCK_K, BLOCK_D (combine), FP8_DOT (as linear_fp8's: auto
    takes fp8 tensor-core dots where _fp8_dot_applies, true insists, false keeps fp32 dots), QUANT_ONCE
    (dynamic activations quantized once by their own kernel, see _grouped_gemm; auto / true / false), num_warps
    and num_stages of the two GEMMs."""
    check_tensor("gate_up", gate_up, dtypes=FLOATS, dim=3)
    check_tensor("down", down, dtypes=FLOATS, dim=3)
    e, two_i, d = gate_up.shape
    check(two_i % 2 == 0, f"gate_up: rows must be 2*inter (gate then up), got {two_i}")
    _check_x(x, d, "gate_up's D")
    check(tuple(down.shape) == (e, d, two_i // 2), f"down: expected shape {[e, d, two_i // 2]}, got {list(down.shape)}")
    return _run_experts("moe_experts", x, weights, idx, _weight(gate_up, None, "float", None),
                        _weight(down, None, "float", None), two_i // 2, limit=limit, act_in=act_in, act_mid=act_mid,
                        config=config, into=into)


LAUNCHERS = {"moe_experts": moe_experts}  # the quantized launchers: moe_quant.py
