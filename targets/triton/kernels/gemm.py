"""Projections: plain and FP8 (e4m3, block-scaled) GEMMs and grouped (block-diagonal) GEMMs (embedding-row
gathers: embed.py; the GEMMs computing a SwiGLU or an RMSNorm of their input: gemm_fused.py).

One GEMM kernel serves all the projection launchers: x [M, G, K] times the weight rows of group g,
W_g = weight[g*R:(g+1)*R] ([R, K]), gives y [M, G, R] (G = 1 for a plain linear). FP8 weights are
dequantized in registers (e4m3 value * block scale). Activation quantization (`act`) is fused:
each K tile lies inside one activation group and one weight block column, the group's amax is
taken per token before its tiles are quantized (common.group_scale: UE8M0 scales are exact powers
of two), and e4m3 rounding is done with exact integer arithmetic (common.fake_quant) so it equals
torch's float8_e4m3fn cast (round to nearest, ties to even) both on a GPU and in the Triton
interpreter (whose own fp8 cast rounds ties away from zero).
"""

import math

import torch
import triton
import triton.language as tl

from .common import (E4M3_MAX, FP8_DOT_MIN_K, arrived_last, cdiv, check, check_tensor, config_switch, decode_scale,
                     fake_quant, fp8_dot_supported, group_scale, in_kernel_counters, launch_config, native_cvt,
                     next_pow2, result, results, same_device, set_tma_allocator, sm_count, sum_runs,
                     tma_supported, to_e4m3)
from .norm import rms_norm_quant, row_rstd
from .quantize import act_quant, load_act, quant_once

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu)
ACT_MODES = {"none": 0, "dynamic": 1, "static": 2}


# --- kernels -----------------------------------------------------------------------------------
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


# --- host-side checks and tiling ---------------------------------------------------------------
def _gemm_config(config, m: int, n: int, name: str) -> dict:
    defaults = {"BLOCK_M": min(64, max(16, next_pow2(m))), "BLOCK_N": min(64, max(16, next_pow2(n))),
                "BLOCK_K": 64, "num_warps": 4, "num_stages": 2, "SPLIT_K": 0, "FP8_DOT": "auto", "QUANT_ONCE": "auto",
                "SUM_IN_KERNEL": "auto", "WARP_SPEC": False,
                "PERSISTENT": False}
    return launch_config(config, defaults, name, at_least={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})  # tl.dot


def _use_warp_spec(cfg: dict, device, mode: int, fp8_dot: bool, k: int, bk: int, name: str) -> bool:
    """WARP_SPEC (off unless a config turns it on; the tuner times it at prefill): the warp-specialized K loop over
    TMA loads (_gemm_kernel's TMA_WS). It reads the activations as e4m3 codes, so it quantizes them once first."""
    needs = [(mode == 1, "dynamic activations (act mode 'dynamic')"), (fp8_dot, "the fp8 dot (FP8_DOT)"),
             (k % bk == 0, f"K ({k}) a multiple of the K tile ({bk})"), (tma_supported(device), "an sm_90+ GPU")]
    return config_switch("WARP_SPEC", cfg["WARP_SPEC"], needs, name, auto=False)


def _use_persistent(cfg: dict, ws: bool, name: str) -> bool:
    """PERSISTENT (off unless a config turns it on): WARP_SPEC's loop over the output tiles of a persistent grid,
    so a program's next tile loads while it stores this one (_gemm_kernel's PERSIST); no split-K."""
    needs = [(ws, "the warp-specialized K loop (WARP_SPEC)"), (cfg["SPLIT_K"] in (0, 1), "no split-K (SPLIT_K 0 or 1)")]
    return config_switch("PERSISTENT", cfg["PERSISTENT"], needs, name, auto=False)


def _persistent_programs(device, tiles: int) -> int:
    """PERSIST's grid: one program per SM, at most one per tile; in the interpreter (no SMs) 2, so its tile loop
    runs."""
    return max(1, min(tiles, sm_count(device) or 2))


def _tma_operands(codes: torch.Tensor, weight: torch.Tensor, name: str) -> torch.Tensor:
    """The e4m3 codes [M, G, K] as TMA_WS reads them: an e4m3 view, contiguous and 16-byte aligned as its tensor
    descriptor needs (codes that are not, say a view into a planned buffer, are copied: M x G x K bytes). The weight
    [G*R, K] must be so already (rows contiguous, 16-byte aligned, a row stride that is a multiple of 16)."""
    check(weight.stride(-1) == 1 and weight.stride(0) % 16 == 0 and weight.data_ptr() % 16 == 0,
          f"{name}: config['WARP_SPEC'] needs weight rows contiguous, 16-byte aligned, with a row stride that is a "
          f"multiple of 16 (strides {list(weight.stride())})")
    if not codes.is_contiguous() or codes.data_ptr() % 16:
        codes = codes.clone(memory_format=torch.contiguous_format)
    set_tma_allocator()
    return codes.view(torch.float8_e4m3fn)


def _use_fp8_dot(cfg: dict, device, mode: int, scaled: bool, bk: int, name: str) -> bool:
    """The fp8 dot applies to quantized activations times e4m3 weights, in K tiles of >= 32, on a GPU
    that has it (common.config_switch)."""
    needs = [(mode != 0, "quantized activations (act mode none)"), (scaled, "e4m3 weights"),
             (bk >= FP8_DOT_MIN_K, f"K tiles of >= {FP8_DOT_MIN_K} (BK is {bk})"),
             (fp8_dot_supported(device), "an sm_89+ GPU")]
    return config_switch("FP8_DOT", cfg["FP8_DOT"], needs, name)


def _split_k(cfg: dict, device, spans: int, tiles: int) -> int:
    """Split-K factor: SPLIT_K if set (at most the number of activation groups), else enough splits to
    give every SM of the GPU two programs when the M x N tiles alone do not (1 in the interpreter)."""
    if cfg["SPLIT_K"]:
        return min(cfg["SPLIT_K"], spans)
    return max(1, min(spans, -(-2 * sm_count(device) // tiles)))


def _counters(cfg: dict, device, split: int, tiles: int, name: str, ws: bool = False):
    """The arrival counters when the split-K sums are added in the GEMM kernel itself (common.in_kernel_counters),
    else None: a torch.sum adds them. With WARP_SPEC, 'auto' leaves them to the torch.sum: in the warp-specialized
    kernel the in-kernel sum spills (352 bytes a thread at 128 x 128 tiles on sm_90a,
    bench/results/sm90_ws_candidates.json)."""
    want = False if ws and cfg["SUM_IN_KERNEL"] == "auto" else cfg["SUM_IN_KERNEL"]
    return None if split == 1 else in_kernel_counters(want, device, tiles, name)


def _pick_block_k(k: int, bi: int, group, max_bk: int) -> int:
    """The largest power of two BK in [16, max_bk] such that every K tile lies inside one weight
    block column (BK divides bi, or bi >= K) and one activation group (BK divides it, or it >= K)."""
    bk = min(max_bk, max(16, next_pow2(k)))
    while bk >= 16:
        if (bi >= k or bi % bk == 0) and (group is None or group >= k or group % bk == 0):
            return bk
        bk //= 2
    raise ValueError(f"cannot tile K={k} exactly: block input size {bi} and activation group {group} need a "
                     f"common power-of-two K tile >= 16 (each tile must lie in one block column and one group); "
                     f"supported: block[1] and group multiples of 16 (or >= K)")


def _check_block(block, weight, scale) -> tuple[int, int]:
    check(isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b >= 1 for b in block),
          f"block: expected [bo, bi] positive ints, got {block!r}")
    (bo, bi), (o, i) = block, weight.shape
    need = (-(-o // bo), -(-i // bi))
    check(scale.dim() == 2 and scale.shape[0] >= need[0] and scale.shape[1] >= need[1],
          f"scale: shape {list(scale.shape)} does not cover weight {list(weight.shape)} in blocks {list(block)} "
          f"(expected {list(need)})")
    return bo, bi


def _scale_arg(scale: torch.Tensor):
    """-> (tensor for the kernel, is UE8M0): UE8M0 scales travel as their raw bytes."""
    if scale.dtype == torch.float8_e8m0fnu:
        return scale.view(torch.uint8), True
    return scale, False


def _check_act(act) -> tuple[int, int | None, bool, float]:
    """-> (mode code, group or None, UE8M0 scales, static scale)."""
    check(isinstance(act, dict) and act.get("mode") in ACT_MODES,
          f"act: expected a dict with mode in {list(ACT_MODES)}, got {act!r}")
    mode = ACT_MODES[act["mode"]]
    if mode == 1:
        group, fmt = act.get("group"), act.get("scale_format", "fp32")
        check(isinstance(group, int) and group >= 1, f"act: dynamic mode needs a positive int group, got {group!r}")
        check(fmt in ("fp32", "ue8m0"), f"act: scale_format {fmt!r} is not supported; expected fp32 or ue8m0")
        return mode, group, fmt == "ue8m0", 1.0
    if mode == 2:
        scale = act.get("scale")
        check(isinstance(scale, (int, float)) or (isinstance(scale, torch.Tensor) and scale.numel() == 1),
              f"act: static mode needs a scalar scale, got {scale!r}")
        return mode, None, False, float(scale)
    return mode, None, False, 1.0


MAX_SIBLINGS = 8  # outputs of one linear_cat launch (the kernel's y_ptr, y1 .. y7)


def _sibling_args(outs, sizes, r: int) -> tuple:
    """The kernel's y1 .. y7, e1 .. e7: the other siblings' outputs and where each sibling but the last ends (padded
    with the last output and r, empty siblings that no tile takes); None for a single output (SEGS 1 reads none of
    them, and a None argument costs the launch nothing)."""
    if len(outs) == 1:
        return (None,) * (2 * MAX_SIBLINGS - 2)
    ends = [sum(sizes[:i]) for i in range(1, len(sizes))]
    return (*outs[1:], *outs[-1:] * (MAX_SIBLINGS - len(outs)), *ends, *[r] * (MAX_SIBLINGS - 1 - len(ends)))


def _gemm(name, x3, weight, outs, scale=None, block=(1, 1), act=None, config=None, x_scale3=None, up3=None,
          limit=None, norm=None):
    """x3 [M, G, K] (any strides), weight [G*R, K] -> outs: [out], fp32 [M, G, R] (a contiguous view of the
    result); or, for siblings (linear_cat, G = 1), one fp32 [M, 1, R_i] per sibling, the weight their R_i rows
    one after another. x_scale3: x3 holds e4m3 codes already (rms_norm_quant), with these fp32 group scales
    [M, G, cdiv(K, group)]. up3: the activation is swiglu(x3, up3) (clamped at `limit`), up3 of x3's shape and
    strides (swiglu_linear_fp8). norm: (weight [K], eps): the activation is rms_norm(x3) (G = 1, x3 contiguous;
    norm_linear_fp8), normed in every tile, or with QUANT_ONCE by the rms_norm_quant kernel, once."""
    m, groups, k = x3.shape
    r = weight.shape[0] // groups
    mode, group, ue8m0, static = _check_act(act or {"mode": "none"})
    cfg = _gemm_config(config, m, r, name)
    if m == 0 or r == 0 or k == 0:
        for out in outs:
            out.zero_()
        return
    out, sizes = outs[0], [o.shape[-1] for o in outs]
    bo, bi = block
    bk = _pick_block_k(k, bi if scale is not None else k, group, cfg["BLOCK_K"])
    span = min(group, k) if mode == 1 else bk  # K span of one activation group (static / none: of one tile)
    spans = cdiv(k, span)
    grid_m, grid_n = cdiv(m, cfg["BLOCK_M"]), sum(cdiv(n, cfg["BLOCK_N"]) for n in sizes)
    fp8_dot = _use_fp8_dot(cfg, x3.device, mode, scale is not None, bk, name)
    flat = span == bk or bk >= k  # every activation group (or span) is one K tile: a single pipelined K loop
    ws = _use_warp_spec(cfg, x3.device, mode, fp8_dot, k, bk, name)
    persist = _use_persistent(cfg, ws, name)
    per_split = spans if persist else cdiv(spans, _split_k(cfg, x3.device, spans, grid_m * grid_n * groups))
    split = cdiv(spans, per_split)
    partials = out if split == 1 else torch.empty(split, m, groups, r, dtype=torch.float32, device=x3.device)
    counters = _counters(cfg, x3.device, split, grid_m * grid_n * groups, name, ws)
    s, s_e8m0 = _scale_arg(scale) if scale is not None else (weight, False)
    grid = (_persistent_programs(x3.device, grid_m * grid_n * groups),) if persist else (grid_m, grid_n, groups * split)
    x_arg, x_scales = x3, out  # (out: an unused pointer)
    if x_scale3 is not None:
        x_arg, x_scales = x3.view(torch.uint8), x_scale3.contiguous()
        mode, flat = 3, True
    elif quant_once(True if ws else cfg["QUANT_ONCE"], mode == 1, m, grid_n, name):
        if norm is None:
            x_arg, x_scales = act_quant(x3, span, ue8m0, up3, limit)
        else:  # the norm quantizes its output once (the fuse pass's rms_norm_quant, unfolded)
            codes, x_scales = rms_norm_quant(x3, norm[0], eps=norm[1], group=group,
                                             scale_format="ue8m0" if ue8m0 else "fp32")
            x_arg, norm = codes.view(torch.uint8), None
        mode, flat, up3 = 3, True, None  # every K tile lies in one group, whose scale is looked up
    if ws:
        x_arg = _tma_operands(x_arg, weight, name)
    _gemm_kernel[grid](x_arg, x_arg if up3 is None else up3, weight, s, out, x_scales, partials,
                       out if counters is None else counters, m, r, k, span, per_split, static,
                       0.0 if limit is None else float(limit), bo, bi, *x_arg.stride(), *weight.stride(), s.stride(0),
                       s.stride(-1), *out.stride(), *(partials.stride() if split > 1 else (0, 0, 0, 0)),
                       *_sibling_args(outs, sizes, r), x_arg if norm is None else norm[0],
                       0.0 if norm is None else float(norm[1]), grid_m, grid_n, groups, ACT=mode, ACT_UE8M0=ue8m0,
                       W_SCALED=scale is not None, S_E8M0=s_e8m0, FP8_DOT=fp8_dot, NATIVE=native_cvt(x3.device),
                       FLAT=flat, SPLIT=split, SUM_IN_KERNEL=counters is not None, SEGS=len(outs),
                       SWIGLU=up3 is not None, HAS_LIMIT=limit is not None, NORM=0 if norm is None else next_pow2(k),
                       BM=cfg["BLOCK_M"], BN=cfg["BLOCK_N"], BK=bk, TMA_WS=ws, PERSIST=persist,
                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if split > 1 and counters is None:
        if len(outs) == 1:
            torch.sum(partials, 0, out=out)
        else:
            for o, part in zip(outs, torch.sum(partials, 0).split(sizes, -1)):
                o.copy_(part)


def _check_gemm_inputs(x, weight, scale, groups: int, codes: bool = False, name: str = "x") -> None:
    """x (named `name` in the messages): the activations, e4m3 codes with `codes`."""
    check_tensor(name, x, dtypes=(torch.float8_e4m3fn,) if codes else FLOAT_DTYPES, contiguous=False)
    check(x.dim() >= 1, f"{name}: expected at least one dimension")
    if scale is None:
        check_tensor("weight", weight, dtypes=FLOAT_DTYPES, dim=2, contiguous=False)
    else:
        check_tensor("weight", weight, dtypes=(torch.float8_e4m3fn,), dim=2, contiguous=False)
        check_tensor("scale", scale, dtypes=SCALE_DTYPES, contiguous=False)
    same_device(**{name: x}, weight=weight, scale=scale)
    check(weight.shape[1] == x.shape[-1],
          f"weight: shape {list(weight.shape)} does not match {name}'s K = {x.shape[-1]}")
    check(isinstance(groups, int) and groups >= 1 and weight.shape[0] % groups == 0,
          f"groups: {groups!r} must be a positive int dividing weight rows {weight.shape[0]}")


def _check_grouped_x(x, groups: int) -> None:
    check(x.dim() >= 2 and x.shape[-2] == groups,
          f"x: expected shape [..., groups={groups}, K], got {list(x.shape)}")


# --- launchers -----------------------------------------------------------------------------------
def _result(into, shape, groups: int, device):
    """The launcher's fp32 result of `shape` [..., (G,) R] (common.result) and its [M, G, R] view for _gemm."""
    y = result(into, shape, torch.float32, device)
    return y, y.view(math.prod(shape[:-1]) // groups, groups, shape[-1])


def linear(x, weight, *, config=None, into=None):
    """x [..., K] (f32/bf16/f16), weight [N, K] (f32/bf16/f16) -> fp32 [..., N];  y = x W^T."""
    _check_gemm_inputs(x, weight, None, 1)
    lead, k = x.shape[:-1], x.shape[-1]
    y, y3 = _result(into, (*lead, weight.shape[0]), 1, x.device)
    _gemm("linear", x.reshape(-1, 1, k), weight, [y3], config=config)
    return y


def grouped_linear(x, weight, *, groups, config=None, into=None):
    """Block-diagonal projection. x [..., G, K], weight [G*R, K] -> fp32 [..., G, R];
    y[..., g, :] = x[..., g, :] W_g^T with W_g = weight[g*R:(g+1)*R]."""
    _check_gemm_inputs(x, weight, None, groups)
    _check_grouped_x(x, groups)
    lead, k = x.shape[:-2], x.shape[-1]
    y, y3 = _result(into, (*lead, groups, weight.shape[0] // groups), groups, x.device)
    _gemm("grouped_linear", x.reshape(-1, groups, k), weight, [y3], config=config)
    return y


def check_x_scale(x, x_scale, act, act_name: str) -> int:
    """x_scale: the fp32 group scales [..., cdiv(K, group)] of x's e4m3 codes (rms_norm_quant's) over x's leading
    dims, for `act` (the reader's activation quantization, named act_name) in mode dynamic. -> the group count."""
    group = act.get("group") if isinstance(act, dict) and act.get("mode") == "dynamic" else None
    n_groups = cdiv(x.shape[-1], group) if isinstance(group, int) and group >= 1 else None
    check_tensor("x_scale", x_scale, dtypes=(torch.float32,), contiguous=False)
    same_device(x=x, x_scale=x_scale)
    if n_groups is None or tuple(x_scale.shape) != (*x.shape[:-1], n_groups):
        raise ValueError(f"x_scale: expected fp32 {[*x.shape[:-1], n_groups]} (x's rows, one scale per {act_name} "
                         f"group) with {act_name} mode dynamic, got shape {list(x_scale.shape)} and {act_name} {act!r}")
    return n_groups


def linear_fp8(x, weight, scale, x_scale=None, *, block, act, config=None, into=None):
    """x [..., K], weight e4m3 [N, K] with block scales [ceil(N/bo), ceil(K/bi)] (fp32 or UE8M0)
    -> fp32 [..., N] = q(x) dq(W)^T, dq(W)[n, k] = W[n, k] * scale[n // bo, k // bi], q = `act`.
    With x_scale (fp32 [..., ceil(K/group)], act dynamic), x is q(x) already: e4m3 codes, as rms_norm_quant
    writes them; the kernel reads the codes and their scales instead of quantizing x."""
    _check_gemm_inputs(x, weight, scale, 1, codes=x_scale is not None)
    bo_bi = _check_block(block, weight, scale)
    lead, k = x.shape[:-1], x.shape[-1]
    x_scale3 = None
    if x_scale is not None:  # (act itself is checked by _gemm)
        x_scale3 = x_scale.reshape(-1, 1, check_x_scale(x, x_scale, act, "act"))
    y, y3 = _result(into, (*lead, weight.shape[0]), 1, x.device)
    _gemm("linear_fp8", x.reshape(-1, 1, k), weight, [y3], scale, bo_bi, act, config, x_scale3)
    return y


def grouped_linear_fp8(x, weight, scale, *, groups, block, act, config=None, into=None):
    """grouped_linear over q(x) (`act`) and the dequantized e4m3 weight [G*R, K] (block scales as in
    linear_fp8; blocks may straddle groups). x [..., G, K] -> fp32 [..., G, R]."""
    _check_gemm_inputs(x, weight, scale, groups)
    _check_grouped_x(x, groups)
    bo_bi = _check_block(block, weight, scale)
    lead, k = x.shape[:-2], x.shape[-1]
    y, y3 = _result(into, (*lead, groups, weight.shape[0] // groups), groups, x.device)
    _gemm("grouped_linear_fp8", x.reshape(-1, groups, k), weight, [y3], scale, bo_bi, act, config)
    return y


def _check_sizes(sizes, weight, bo: int | None) -> list[int]:
    """sizes: the siblings' output widths, 2 to MAX_SIBLINGS positive ints adding up to the weight's rows; with FP8
    block scales, each but the last a multiple of the block's rows bo (so no scale block spans two siblings)."""
    check(isinstance(sizes, (list, tuple)) and 2 <= len(sizes) <= MAX_SIBLINGS
          and all(isinstance(n, int) and n >= 1 for n in sizes),
          f"sizes: expected 2 to {MAX_SIBLINGS} positive ints (one output width per sibling), got {sizes!r}")
    check(sum(sizes) == weight.shape[0],
          f"sizes: {list(sizes)} add up to {sum(sizes)}, but the weight has {weight.shape[0]} rows")
    check(bo is None or all(n % bo == 0 for n in sizes[:-1]),
          f"sizes: {list(sizes)}: every sibling but the last must have a multiple of the block's {bo} rows, so that "
          f"no scale block spans two siblings")
    return list(sizes)


def _cat_results(into, lead, sizes, device) -> tuple[list, list]:
    """The results of a linear_cat launcher, fp32 [*lead, n] per sibling (common.result), and their [M, 1, n] views."""
    ys = [result(o, (*lead, n), torch.float32, device) for o, n in zip(results(into, len(sizes)), sizes)]
    return ys, [y.view(-1, 1, n) for y, n in zip(ys, sizes)]


def linear_cat(x, weight, *, sizes, config=None, into=None):
    """Sibling projections of one x in one launch: weight [sum(sizes), K] (their weights one after another)
    -> one fp32 [..., n] per n in sizes; result i is x W_i^T, W_i = weight's rows of sibling i."""
    _check_gemm_inputs(x, weight, None, 1)
    sizes = _check_sizes(sizes, weight, None)
    ys, y3s = _cat_results(into, x.shape[:-1], sizes, x.device)
    _gemm("linear_cat", x.reshape(-1, 1, x.shape[-1]), weight, y3s, config=config)
    return tuple(ys)


def linear_fp8_cat(x, weight, scale, x_scale=None, *, sizes, block, act, config=None, into=None):
    """linear_cat over an e4m3 weight with block scales, as linear_fp8 (x_scale: x is e4m3 codes already)."""
    _check_gemm_inputs(x, weight, scale, 1, codes=x_scale is not None)
    bo_bi = _check_block(block, weight, scale)
    sizes = _check_sizes(sizes, weight, bo_bi[0])
    k = x.shape[-1]
    x_scale3 = None if x_scale is None else x_scale.reshape(-1, 1, check_x_scale(x, x_scale, act, "act"))
    ys, y3s = _cat_results(into, x.shape[:-1], sizes, x.device)
    _gemm("linear_fp8_cat", x.reshape(-1, 1, k), weight, y3s, scale, bo_bi, act, config, x_scale3)
    return tuple(ys)


LAUNCHERS = {
    "linear": linear,
    "grouped_linear": grouped_linear,
    "linear_fp8": linear_fp8,
    "grouped_linear_fp8": grouped_linear_fp8,
    "linear_cat": linear_cat,
    "linear_fp8_cat": linear_fp8_cat,
}
