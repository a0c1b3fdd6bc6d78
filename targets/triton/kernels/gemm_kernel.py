"""The projections' GEMM kernel (gemm.py's launchers run it; gemm.py's docstring says what it computes): one output
tile per program (`_gemm_tile`: the fused activation quantization and the pointer K loop, or the warp-specialized
TMA loop), on a grid of tiles or, persistent, looping over them (`_gemm_kernel`).
"""

import triton
import triton.language as tl

from .common import (E4M3_MAX, arrived_last, decode_scale, fake_quant, group_scale, sum_runs, to_e4m3)
from .norm import row_rstd
from .quantize import load_act


@triton.jit
def _gemm_step(acc, x_rows, u_rows, w_rows, s_ptr, rows_w, kk, K, m_ok, n_ok, s, bo, bi, sxk, swk, ssn, ssk, sx_rows,
               GS, limit, rstd, nw_ptr, ACT: tl.constexpr, ACT_UE8M0: tl.constexpr, W_SCALED: tl.constexpr,
               S_E8M0: tl.constexpr, FP8_DOT: tl.constexpr, NATIVE: tl.constexpr, TILE_GROUP: tl.constexpr,
               SWIGLU: tl.constexpr, HAS_LIMIT: tl.constexpr, NORM: tl.constexpr, BK: tl.constexpr):
    """acc + q(x[:, kk:kk+BK]) dq(W[:, kk:kk+BK])^T. s: the activation scale (scalar or [BM, 1]); with
    TILE_GROUP (dynamic, the group is this one tile) it is taken here from the tile's row amax. ACT 3: x
    holds e4m3 codes already (_act_quant_kernel) and s is read from the rows' group scales `sx_rows`.
    SWIGLU: x is swiglu(x, u); NORM: x is rms_norm(x) (rows' rstd [BM], weight at nw_ptr) (quantize.load_act)."""
    offs_k = kk + tl.arange(0, BK)  # [BK]
    k_ok = offs_k < K
    if ACT == 3:
        xt = tl.load(x_rows + offs_k[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0)
        xt = xt.to(tl.float8e4nv, bitcast=True)  # [BM, BK] codes
        s = tl.load(sx_rows + kk // GS, mask=m_ok, other=1.0)[:, None]  # [BM, 1]
    else:  # [BM, BK] fp32
        xt = load_act(x_rows + offs_k[None, :] * sxk, u_rows + offs_k[None, :] * sxk, m_ok[:, None] & k_ok[None, :],
                      limit, SWIGLU, HAS_LIMIT, rstd, nw_ptr + offs_k, k_ok, NORM)
    if ACT == 1 and TILE_GROUP:
        s = group_scale(tl.max(tl.abs(xt), axis=1), E4M3_MAX, ACT_UE8M0)[:, None]  # [BM, 1]
    wt = tl.load(w_rows + offs_k[:, None] * swk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BK, BN]
    if W_SCALED:  # the tile lies in block column kk // bi; one scale per weight row
        sw = decode_scale(tl.load(s_ptr + (rows_w // bo) * ssn + (kk // bi) * ssk, mask=n_ok, other=0), S_E8M0)
    if FP8_DOT:  # e4m3 codes of x / s meet the weight codes; the scales are applied to the partial sum
        if ACT == 3:
            xq = xt
        else:
            xq = to_e4m3(tl.div_rn(xt, s), NATIVE)
        acc += tl.dot(xq, wt, out_dtype=tl.float32) * s * sw[None, :]
    else:
        if ACT == 3:
            xt = xt.to(tl.float32) * s  # = fake_quant(x, s): the same e4m3 value times the same scale
        elif ACT != 0:
            xt = fake_quant(xt, s)
        wt = wt.to(tl.float32)
        if W_SCALED:
            wt = wt * sw[None, :]
        acc += tl.dot(xt, wt, input_precision="ieee")
    return acc


@triton.jit
def _segment(pid_n, tiles, lo, hi, y_i, first, s_lo, s_hi, s_y, BN: tl.constexpr):
    """One step of finding the segment (sibling weight) of N tile pid_n: segment [lo, hi) of the weight rows, with
    output y_i, has its tiles from `tiles` on. -> (the next segment's first tile, then the (first tile, rows, output)
    of the last segment so far that starts at or before pid_n). An empty segment (lo == hi, padding) starts at the
    grid's end: never taken."""
    inside = pid_n >= tiles
    return (tiles + tl.cdiv(hi - lo, BN), tl.where(inside, tiles, first), tl.where(inside, lo, s_lo),
            tl.where(inside, hi, s_hi), tl.where(inside, y_i, s_y))


@triton.jit
def _gemm_tile(pid_m, pid_n, pid_g, tiles_m, tiles_n, groups, xd, wd, x_ptr, u_ptr, w_ptr, s_ptr, y_ptr, sx_ptr,
               p_ptr, cnt_ptr, M, N, K, GS, spans_per_split, act_scale, limit, bo, bi, sxm, sxg, sxk, swn, swk, ssn,
               ssk, sym, syg, syn, spp, spm, spg, spn, y1, y2, y3, y4, y5, y6, y7, e1, e2, e3, e4, e5, e6, e7, nw_ptr,
               eps, ACT: tl.constexpr, ACT_UE8M0: tl.constexpr, W_SCALED: tl.constexpr, S_E8M0: tl.constexpr,
               FP8_DOT: tl.constexpr, NATIVE: tl.constexpr, FLAT: tl.constexpr, SPLIT: tl.constexpr,
               SUM_IN_KERNEL: tl.constexpr, SEGS: tl.constexpr, SWIGLU: tl.constexpr, HAS_LIMIT: tl.constexpr,
               NORM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TMA_WS: tl.constexpr,
               WS_LOOP: tl.constexpr):
    """Output tile (pid_m, pid_n) of group and split pid_g of _gemm_kernel (which see), on a grid of tiles_m x
    tiles_n tiles per group and split; xd, wd: TMA_WS's tensor descriptors. WS_LOOP: the K loop is the loop Triton
    warp-specializes (TMA_WS without PERSIST)."""
    g, part = pid_g // SPLIT, pid_g % SPLIT
    lo, hi, first, y_base = 0, N, 0, y_ptr  # this tile's sibling: its rows [lo, hi), first tile and output
    if SEGS > 1:  # (unrolled by hand: a loop cannot index the arguments y1.. / e1.. without tuple arguments,
        #            which the lent GPU image's Triton 3.6 has not been tried with)
        t, first, lo, hi, y_base = _segment(pid_n, 0, 0, e1, y_ptr, first, lo, hi, y_base, BN)
        t, first, lo, hi, y_base = _segment(pid_n, t, e1, e2, y1, first, lo, hi, y_base, BN)
        if SEGS > 2:
            t, first, lo, hi, y_base = _segment(pid_n, t, e2, e3, y2, first, lo, hi, y_base, BN)
        if SEGS > 3:
            t, first, lo, hi, y_base = _segment(pid_n, t, e3, e4, y3, first, lo, hi, y_base, BN)
        if SEGS > 4:
            t, first, lo, hi, y_base = _segment(pid_n, t, e4, e5, y4, first, lo, hi, y_base, BN)
        if SEGS > 5:
            t, first, lo, hi, y_base = _segment(pid_n, t, e5, e6, y5, first, lo, hi, y_base, BN)
        if SEGS > 6:
            t, first, lo, hi, y_base = _segment(pid_n, t, e6, e7, y6, first, lo, hi, y_base, BN)
        if SEGS > 7:
            t, first, lo, hi, y_base = _segment(pid_n, t, e7, N, y7, first, lo, hi, y_base, BN)
        sym, syn = hi - lo, 1
    offs_m = pid_m * BM + tl.arange(0, BM)  # [BM]
    offs_n = lo + (pid_n - first) * BN + tl.arange(0, BN)  # [BN] rows of W_g
    m_ok, n_ok = offs_m < M, offs_n < hi
    rows_w = g * N + offs_n  # [BN] rows of the full weight
    x_rows = x_ptr + g * sxg + offs_m[:, None] * sxm  # [BM, 1]
    u_rows = u_ptr + g * sxg + offs_m[:, None] * sxm  # [BM, 1] (SWIGLU)
    w_rows = w_ptr + rows_w[None, :] * swn  # [1, BN]
    sx_rows = sx_ptr + (offs_m * groups + g) * tl.cdiv(K, GS)  # [BM] (ACT 3)
    tl.static_assert(NORM == 0 or (ACT == 1 and not SWIGLU), "NORM: dynamic activations of x itself")
    rstd = tl.zeros((BM,), dtype=tl.float32)
    if NORM:
        for i in range(0, tl.minimum(BM, M - pid_m * BM)):
            r = row_rstd(x_ptr + (pid_m * BM + i).to(tl.int64) * sxm, K, eps, NORM, "")
            rstd = tl.where(tl.arange(0, BM) == i, r, rstd)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_lo = part * spans_per_split * GS
    k_hi = tl.minimum(k_lo + spans_per_split * GS, K)
    if TMA_WS:
        tl.static_assert(ACT == 3 and FP8_DOT and W_SCALED, "TMA_WS: e4m3 codes times e4m3 weights")
        row_w = g * N + lo + (pid_n - first) * BN  # the tile's first weight row (rows past `hi` are never stored)
        for kk in tl.range(k_lo, k_hi, BK, warp_specialize=WS_LOOP):
            xq = xd.load([pid_m * BM, g * K + kk])  # [BM, BK] e4m3 (rows past M read as zeros)
            wt = wd.load([row_w, kk])  # [BN, BK] e4m3
            s = tl.load(sx_rows + kk // GS, mask=m_ok, other=1.0)[:, None]  # [BM, 1]
            sw = decode_scale(tl.load(s_ptr + (rows_w // bo) * ssn + (kk // bi) * ssk, mask=n_ok, other=0), S_E8M0)
            acc += tl.dot(xq, wt.T, out_dtype=tl.float32) * s * sw[None, :]
    elif FLAT:
        for kk in range(k_lo, k_hi, BK):
            acc = _gemm_step(acc, x_rows, u_rows, w_rows, s_ptr, rows_w, kk, K, m_ok, n_ok, act_scale, bo, bi, sxk,
                             swk, ssn, ssk, sx_rows, GS, limit, rstd, nw_ptr, ACT, ACT_UE8M0, W_SCALED, S_E8M0,
                             FP8_DOT, NATIVE, True, SWIGLU, HAS_LIMIT, NORM, BK)
    else:
        for k0 in range(k_lo, k_hi, GS):  # one activation group at a time
            k_end = tl.minimum(k0 + GS, K)
            s = act_scale
            if ACT == 1:  # dynamic: per-token amax over the group, then its scale
                amax = tl.zeros((BM,), dtype=tl.float32)
                for kk in range(k0, k_end, BK):
                    offs_k = kk + tl.arange(0, BK)
                    xt = load_act(x_rows + offs_k[None, :] * sxk, u_rows + offs_k[None, :] * sxk,
                                  m_ok[:, None] & (offs_k < K)[None, :], limit, SWIGLU, HAS_LIMIT, rstd,
                                  nw_ptr + offs_k, offs_k < K, NORM)
                    amax = tl.maximum(amax, tl.max(tl.abs(xt), axis=1))
                s = group_scale(amax, E4M3_MAX, ACT_UE8M0)[:, None]  # [BM, 1]
            for kk in range(k0, k_end, BK):
                acc = _gemm_step(acc, x_rows, u_rows, w_rows, s_ptr, rows_w, kk, K, m_ok, n_ok, s, bo, bi, sxk, swk,
                                 ssn, ssk, sx_rows, GS, limit, rstd, nw_ptr, ACT, ACT_UE8M0, W_SCALED, S_E8M0,
                                 FP8_DOT, NATIVE, False, SWIGLU, HAS_LIMIT, NORM, BK)
    ok = m_ok[:, None] & n_ok[None, :]
    y = y_base + offs_m[:, None] * sym + g * syg + (offs_n - lo)[None, :] * syn
    if SPLIT == 1:
        tl.store(y, acc, mask=ok)
    else:
        partial = p_ptr + offs_m[:, None] * spm + g * spg + offs_n[None, :] * spn
        tl.store(partial + part * spp, acc, mask=ok)
        if SUM_IN_KERNEL:  # the last of the tile's programs adds the partial sums (common.arrived_last)
            if arrived_last(cnt_ptr + (g * tiles_n + pid_n) * tiles_m + pid_m, SPLIT):
                tl.store(y, sum_runs(partial, spp, ok, SPLIT), mask=ok)




@triton.jit
def _gemm_kernel(x_ptr, u_ptr, w_ptr, s_ptr, y_ptr, sx_ptr, p_ptr, cnt_ptr, M, N, K, GS, spans_per_split, act_scale,
                 limit, bo, bi, sxm, sxg, sxk, swn, swk, ssn, ssk, sym, syg, syn, spp, spm, spg, spn,
                 y1, y2, y3, y4, y5, y6, y7, e1, e2, e3, e4, e5, e6, e7, nw_ptr, eps, tiles_m, tiles_n, groups,
                 ACT: tl.constexpr, ACT_UE8M0: tl.constexpr, W_SCALED: tl.constexpr, S_E8M0: tl.constexpr,
                 FP8_DOT: tl.constexpr, NATIVE: tl.constexpr, FLAT: tl.constexpr, SPLIT: tl.constexpr,
                 SUM_IN_KERNEL: tl.constexpr, SEGS: tl.constexpr, SWIGLU: tl.constexpr, HAS_LIMIT: tl.constexpr,
                 NORM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TMA_WS: tl.constexpr,
                 PERSIST: tl.constexpr):
    """y[m, g, n] = sum_k q(x[m, g, k]) * dq(w[g*N + n, k]).  Grid: (cdiv(M, BM), cdiv(N, BN), G * SPLIT).
    GS: K span of one activation group (a multiple of BK, or >= K); ACT 0 none, 1 dynamic, 2 static,
    3 dynamic quantized once (x: e4m3 codes [M, G, K], sx_ptr: their scales [M, G, cdiv(K, GS)] fp32).
    FLAT (GS == BK: each group is one K tile, or no groups): one loop over K tiles, which Triton software-
    pipelines (num_stages); else a loop over groups, each an amax pass then its tiles.
    SPLIT > 1 (split-K): program (.., g * SPLIT + p) sums the activation groups [p * spans_per_split,
    (p + 1) * spans_per_split) into the partial sums p_ptr[p]; SUM_IN_KERNEL: the last of a tile's SPLIT programs
    to arrive (counted in cnt_ptr, int32 zeros that it leaves zero) adds them in split order into y (else the
    launcher adds them: a second kernel).
    FP8_DOT (quantized activations times e4m3 weights): each tile's e4m3 codes meet in an fp8 tensor-core
    dot (exact products, fp32 sums) and the partial sum is scaled by the activation and weight block
    scales, as DeepGEMM does; otherwise both tiles are dequantized to fp32 for an IEEE fp32 dot.
    NATIVE: the hardware e4m3 cast (a GPU) instead of integer rounding (the interpreter).
    SEGS > 1 (G = 1): the weight is SEGS siblings' weights one after another (linear_cat): rows [0, e1) are the
    first's, [e1, e2) the second's, .. [e_{SEGS-1}, N) the last's; each N tile lies in one of them (the grid has
    cdiv(rows, BN) tiles per sibling) and is written to its own output, y_ptr, y1, .. (contiguous [M, rows]).
    SWIGLU (swiglu_linear_fp8): x is swiglu(x, u), u at u_ptr with x's strides, clamped at `limit` with HAS_LIMIT;
    computed where x is loaded (quantize.load_act).
    NORM (norm_linear_fp8; 0: off): x is rms_norm(x, nw_ptr's weight, eps), x contiguous in K (G = 1). Each program
    first takes its rows' 1 / rms with the rms_norm kernel's row code (norm.row_rstd over one [NORM]-wide block),
    then normalizes each tile where it is loaded, as the norm kernel does (x * rstd, then weight times that).
    TMA_WS (ACT 3, FP8_DOT, W_SCALED, FLAT; K a multiple of BK; x e4m3 codes, contiguous): the K loop loads the
    e4m3 tiles through tensor descriptors made here, over the codes as [M, G*K] and the weight as [G*N, K], and is
    warp-specialized (`tl.range(warp_specialize=True)`): on sm_90 Triton gives the TMA loads a producer warp group
    and splits the tile between consumer warp groups, so one group's wgmma runs while another applies its block
    scales (each waits for its own wgmma before scaling, as the pointer path's K loop does, but overlapped).
    The descriptors are made in the kernel, not on the host, because that split changes their block shape (a
    host descriptor's is fixed: Triton 3.6 and 3.9 refuse the split then).
    PERSIST (TMA_WS, SPLIT 1): a persistent kernel, grid (programs,): each program takes the tiles t = its id, + the
    number of programs, .. of the tiles_m x tiles_n x groups (M tiles fastest), in a loop that is the one Triton
    warp-specializes: the producer then loads the next tile's K tiles while the consumers store this one's output.
    tiles_m, tiles_n, groups: the (non-persistent) grid's M tiles, N tiles (all siblings') and weight groups."""
    if TMA_WS:  # once per program (PERSIST: for all its tiles)
        xd = tl.make_tensor_descriptor(x_ptr, shape=[M, groups * K], strides=[sxm, 1], block_shape=[BM, BK])
        wd = tl.make_tensor_descriptor(w_ptr, shape=[groups * N, K], strides=[swn, 1], block_shape=[BN, BK])
    else:
        xd, wd = x_ptr, w_ptr  # (unused)
    if PERSIST:
        tl.static_assert(TMA_WS and SPLIT == 1, "PERSIST: the warp-specialized loop, without split-K")
        for t in tl.range(tl.program_id(0), tiles_m * tiles_n * groups, tl.num_programs(0), warp_specialize=True):
            _gemm_tile(t % tiles_m, (t // tiles_m) % tiles_n, t // (tiles_m * tiles_n), tiles_m, tiles_n, groups,
                       xd, wd, x_ptr, u_ptr, w_ptr, s_ptr, y_ptr, sx_ptr, p_ptr, cnt_ptr, M, N, K, GS,
                       spans_per_split, act_scale, limit, bo, bi, sxm, sxg, sxk, swn, swk, ssn, ssk, sym, syg, syn,
                       spp, spm, spg, spn, y1, y2, y3, y4, y5, y6, y7, e1, e2, e3, e4, e5, e6, e7, nw_ptr, eps, ACT,
                       ACT_UE8M0, W_SCALED, S_E8M0, FP8_DOT, NATIVE, FLAT, SPLIT, SUM_IN_KERNEL, SEGS, SWIGLU,
                       HAS_LIMIT, NORM, BM, BN, BK, TMA_WS, False)
    else:
        _gemm_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2), tiles_m, tiles_n, groups, xd, wd, x_ptr,
                   u_ptr, w_ptr, s_ptr, y_ptr, sx_ptr, p_ptr, cnt_ptr, M, N, K, GS, spans_per_split, act_scale,
                   limit, bo, bi, sxm, sxg, sxk, swn, swk, ssn, ssk, sym, syg, syn, spp, spm, spg, spn, y1, y2, y3,
                   y4, y5, y6, y7, e1, e2, e3, e4, e5, e6, e7, nw_ptr, eps, ACT, ACT_UE8M0, W_SCALED, S_E8M0,
                   FP8_DOT, NATIVE, FLAT, SPLIT, SUM_IN_KERNEL, SEGS, SWIGLU, HAS_LIMIT, NORM, BM, BN, BK, TMA_WS,
                   TMA_WS)
