"""Triton kernels for manifold-constrained hyper-connections (mHC); see runtime/kernels/hyper.py.

The residual is `hc` parallel streams per token: streams [B, S, hc, D]. Every launcher computes
in fp32 and returns fp32, like the reference. Tokens are flattened to T = B*S rows:

  hc_expand  grid (T, D tiles)  out[t, i, :] = x[t, :]
  hc_pre     grid (T, SPLIT)    per token: RMSNorm scale, the (2+hc)*hc projection, sigmoid / softmax,
                                Sinkhorn in registers, the pre-weighted collapse
  hc_post    grid (T, D tiles)  new[t, j, :] = post[t, j] * out[t, :] + sum_i comb[t, i, j] * streams[t, i, :]
  hc_post_pre grid (T, SPLIT)   hc_pre's kernel computing each K tile of its input as hc_post does (and storing it)
  hc_post_pre_quant             hc_post_pre whose token-finishing program then norms and quantizes the collapsed row
                                (norm.norm_quant_row, the rms_norm_quant kernel's row; launcher: hyper_quant.py)
  hc_head    grid (T, SPLIT)    the hc_pre collapse with an hc-row projection and one scale
  hc_post_head                  hc_head's kernel computing its input as hc_post_pre's does (launcher: hyper_head.py)

The projection reads all of fn ([(2+hc)*hc, hc*D] fp32, 1.5 MB at V4-Flash's hc 4, D 4096) for every token: with
one program a token, a decode step of a few tokens would read it on a few SMs. So where the tokens leave SMs idle
(SPLIT_K, 0 = auto: two programs per SM), the K span is cut into SPLIT runs: each program writes its partial
projection and sum of squares, and the last of a token's programs to arrive adds them in run order and finishes
the token (common.arrived_last / sum_runs, as the split-K GEMM).

hc is padded to the power of two HCP (masked); hc up to MAX_HC is supported.
"""

import torch
import triton
import triton.language as tl

from .common import (arrived_last, cdiv, check, check_tensor, launch_config, next_pow2, result, results, same_device,
                     sm_count, sum_runs, tile_counters)
from .norm import norm_quant_row, norm_row

MAX_HC = 8
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# --- device helpers ------------------------------------------------------------------------------
@triton.jit
def _rows_dot(fn_ptr, row0, x, offs_k, k_mask, K, HC: tl.constexpr, HCP: tl.constexpr):
    """One K tile of fn[row0 : row0+HC] @ x: acc[i] = sum_k fn[row0 + i, k] * x[k] -> [HCP]."""
    i = tl.arange(0, HCP)
    ptrs = fn_ptr + (row0 + i[:, None]) * K + offs_k[None, :]  # [HCP, BLOCK_K]
    w = tl.load(ptrs, mask=(i[:, None] < HC) & k_mask[None, :], other=0.0).to(tl.float32)
    return tl.sum(w * x[None, :], axis=1)


@triton.jit
def _square_dot(fn_ptr, row0, x, offs_k, k_mask, K, HC: tl.constexpr, HCP: tl.constexpr):
    """One K tile of the comb rows: acc[i, j] = sum_k fn[row0 + i*HC + j, k] * x[k] -> [HCP, HCP]."""
    i = tl.arange(0, HCP)[:, None, None]
    j = tl.arange(0, HCP)[None, :, None]
    ptrs = fn_ptr + (row0 + i * HC + j) * K + offs_k[None, None, :]  # [HCP, HCP, BLOCK_K]
    mask = (i < HC) & (j < HC) & k_mask[None, None, :]
    w = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return tl.sum(w * x[None, None, :], axis=2)


@triton.jit
def _collapse(x_ptr, out_ptr, pre, D, HC: tl.constexpr, HCP: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[d] = sum_i pre[i] * x[i, d] for one token; x: [HC, D] at x_ptr, pre: [HCP] (0 past HC)."""
    i = tl.arange(0, HCP)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = (i[:, None] < HC) & (d[None, :] < D)
        x = tl.load(x_ptr + i[:, None] * D + d[None, :], mask=mask, other=0.0,
                    cache_modifier=".cg").to(tl.float32)  # [HCP, BLOCK_D] (.cg: hc_post_pre's other SMs wrote x)
        tl.store(out_ptr + d, tl.sum(pre[:, None] * x, axis=0), mask=d < D)


@triton.jit
def _sinkhorn(logits, iters, eps, HC: tl.constexpr, HCP: tl.constexpr):
    """comb = softmax(logits, rows) + eps; c /= colsum + eps; then iters-1 x (rows, columns).
    logits: [HCP, HCP] (padding ignored) -> [HCP, HCP], zero outside [HC, HC]."""
    i = tl.arange(0, HCP)[:, None]
    j = tl.arange(0, HCP)[None, :]
    valid = (i < HC) & (j < HC)
    logits = tl.where(j < HC, logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    comb = tl.where(valid, p / tl.sum(p, axis=1)[:, None] + eps, 0.0)
    comb = comb / (tl.sum(comb, axis=0)[None, :] + eps)
    for _ in range(iters - 1):
        comb = comb / (tl.sum(comb, axis=1)[:, None] + eps)
        comb = comb / (tl.sum(comb, axis=0)[None, :] + eps)
    return comb


@triton.jit
def _run_bounds(part, per_split, K):
    """The K span [lo, hi) of run `part` (per_split: a multiple of the K tile)."""
    lo = part * per_split
    return lo, tl.minimum(lo + per_split, K)


# --- kernels ---------------------------------------------------------------------------------------
@triton.jit
def _hc_expand_kernel(x_ptr, out_ptr, D, HC: tl.constexpr, HCP: tl.constexpr, BLOCK_D: tl.constexpr):
    """x: [T, D] -> out: [T, HC, D]."""
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    i = tl.arange(0, HCP)
    x = tl.load(x_ptr + t * D + d, mask=d < D, other=0.0).to(tl.float32)  # [BLOCK_D]
    tile = tl.broadcast_to(x[None, :], (HCP, BLOCK_D))
    tl.store(out_ptr + t * HC * D + i[:, None] * D + d[None, :], tile, mask=(i[:, None] < HC) & (d[None, :] < D))


@triton.jit
def _post_tile(out_ptr, add_ptr, old_ptr, ppost_ptr, pcomb_ptr, new_ptr, t, offs_k, k_mask, D, HC: tl.constexpr,
               HCP: tl.constexpr, ADD: tl.constexpr):
    """K tile offs_k of token t's new streams (flat [HC*D]: channel d of stream j at j*D + d), computed as
    _hc_post_kernel does and stored: new[j, d] = post[j] * (out[d] (+ addend[d])) + sum_i comb[i, j] * old[i, d]."""
    j = offs_k // D
    d = offs_k - j * D
    out = tl.load(out_ptr + t * D + d, mask=k_mask, other=0.0).to(tl.float32)
    if ADD:
        out = out + tl.load(add_ptr + t * D + d, mask=k_mask, other=0.0).to(tl.float32)
    i = tl.arange(0, HCP)[:, None]
    mask = (i < HC) & k_mask[None, :]
    comb = tl.load(pcomb_ptr + t * HC * HC + i * HC + j[None, :], mask=mask, other=0.0).to(tl.float32)  # [HCP, BK]
    old = tl.load(old_ptr + t * HC * D + i * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    post = tl.load(ppost_ptr + t * HC + j, mask=k_mask, other=0.0).to(tl.float32)
    new = post * out + tl.sum(comb * old, axis=0)
    tl.store(new_ptr + t * HC * D + offs_k, new, mask=k_mask)
    return new


@triton.jit
def _hc_pre_kernel(x_ptr, fn_ptr, base_ptr, scale_ptr, col_ptr, post_ptr, comb_ptr, ws_ptr, cnt_ptr, out_ptr, add_ptr,
                   ppost_ptr, pcomb_ptr, new_ptr, nw_ptr, q_ptr, qs_ptr, y_ptr, D, iters, eps, norm_eps, per_split,
                   q_eps, NG, HC: tl.constexpr, HCP: tl.constexpr, SPLIT: tl.constexpr, POST: tl.constexpr,
                   ADD: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, UE8M0: tl.constexpr,
                   HAS_Y: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROW: tl.constexpr,
                   BLOCK_NG: tl.constexpr, BLOCK_G: tl.constexpr):
    """x: [T, HC*D], fn: [(2+HC)*HC, HC*D], base: [(2+HC)*HC], scale: [3]
    -> collapsed [T, D], post [T, HC], comb [T, HC, HC].
    mixes = rsqrt(mean(x^2) + norm_eps) * (fn @ x), then the gates, Sinkhorn and the collapse.
    POST (hc_post_pre): x is the previous block's hc_post of (out (+ addend), x_ptr's streams, ppost, pcomb),
    computed tile by tile (_post_tile) and stored to new_ptr, from which the collapse reads it.
    SPLIT > 1: program (t, p) projects K span p (per_split wide) into its record of ws [T, SPLIT, REC] (sum of
    squares, pre, post, comb; REC = 1 + (2 + HCP) * HCP); the last of token t's programs (cnt_ptr[t]) finishes.
    QUANT (hc_post_pre_quant): the finishing program then norms the collapsed row (weight nw_ptr, eps q_eps) and
    quantizes it in groups of GROUP (NG a row): codes to q_ptr [T, D], scales to qs_ptr [T, NG], HAS_Y: the
    normed row to y_ptr [T, D] (_finish_quant)."""
    t = tl.program_id(0).to(tl.int64)
    K = HC * D
    x_row = x_ptr + t * K
    lo, hi = _run_bounds(tl.program_id(1), per_split, K)
    sumsq = tl.zeros((BLOCK_K,), tl.float32)
    pre_acc = tl.zeros((HCP,), tl.float32)
    post_acc = tl.zeros((HCP,), tl.float32)
    comb_acc = tl.zeros((HCP, HCP), tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hi
        if POST:
            x = _post_tile(out_ptr, add_ptr, x_ptr, ppost_ptr, pcomb_ptr, new_ptr, t, offs_k, k_mask, D, HC, HCP, ADD)
        else:
            x = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)  # [BLOCK_K]
        sumsq += x * x
        pre_acc += _rows_dot(fn_ptr, 0, x, offs_k, k_mask, K, HC, HCP)
        post_acc += _rows_dot(fn_ptr, HC, x, offs_k, k_mask, K, HC, HCP)
        comb_acc += _square_dot(fn_ptr, 2 * HC, x, offs_k, k_mask, K, HC, HCP)
    ss = tl.sum(sumsq, axis=0)
    i = tl.arange(0, HCP)
    j = tl.arange(0, HCP)
    if POST:
        x_row = new_ptr + t * K  # the collapse reads the new streams, which other threads (SPLIT: programs) stored
    if SPLIT == 1:
        if POST:
            tl.debug_barrier()
        _hc_pre_finish(x_row, base_ptr, scale_ptr, col_ptr, post_ptr, comb_ptr, t, D, iters, eps, norm_eps, ss,
                       pre_acc, post_acc, comb_acc, HC, HCP, BLOCK_D)
        if QUANT:
            _finish_quant(col_ptr, nw_ptr, q_ptr, qs_ptr, y_ptr, t, D, NG, q_eps, GROUP, UE8M0, HAS_Y, BLOCK_ROW,
                          BLOCK_NG, BLOCK_G)
    else:
        REC: tl.constexpr = 1 + (2 + HCP) * HCP
        rec = ws_ptr + (t * SPLIT + tl.program_id(1)) * REC
        tl.store(rec, ss)
        tl.store(rec + 1 + i, pre_acc)
        tl.store(rec + 1 + HCP + i, post_acc)
        tl.store(rec + 1 + 2 * HCP + i[:, None] * HCP + j[None, :], comb_acc)
        if arrived_last(cnt_ptr + t, SPLIT):
            runs = ws_ptr + t * SPLIT * REC
            ss = tl.sum(sum_runs(runs + i, REC, i == 0, SPLIT), axis=0)
            pre_acc = sum_runs(runs + 1 + i, REC, i < HCP, SPLIT)
            post_acc = sum_runs(runs + 1 + HCP + i, REC, i < HCP, SPLIT)
            comb_acc = sum_runs(runs + 1 + 2 * HCP + i[:, None] * HCP + j[None, :], REC, (i < HCP)[:, None], SPLIT)
            _hc_pre_finish(x_row, base_ptr, scale_ptr, col_ptr, post_ptr, comb_ptr, t, D, iters, eps, norm_eps, ss,
                           pre_acc, post_acc, comb_acc, HC, HCP, BLOCK_D)
            if QUANT:
                _finish_quant(col_ptr, nw_ptr, q_ptr, qs_ptr, y_ptr, t, D, NG, q_eps, GROUP, UE8M0, HAS_Y, BLOCK_ROW,
                              BLOCK_NG, BLOCK_G)


@triton.jit
def _finish_quant(col_ptr, nw_ptr, q_ptr, qs_ptr, y_ptr, t, D, NG, q_eps, GROUP: tl.constexpr, UE8M0: tl.constexpr,
                  HAS_Y: tl.constexpr, BLOCK_ROW: tl.constexpr, BLOCK_NG: tl.constexpr, BLOCK_G: tl.constexpr):
    """Token t's collapsed row (just stored by the program's threads: a barrier, and loads that bypass L1) normed
    and quantized as the rms_norm_quant kernel does it (norm.norm_quant_row: the same bits)."""
    tl.debug_barrier()
    norm_quant_row(col_ptr + t * D, nw_ptr, q_ptr + t * D, qs_ptr + t * NG, y_ptr + t * D, D, NG, q_eps, GROUP, UE8M0,
                   True, HAS_Y, ".cg", BLOCK_ROW, BLOCK_NG, BLOCK_G)


@triton.jit
def _hc_pre_finish(x_row, base_ptr, scale_ptr, col_ptr, post_ptr, comb_ptr, t, D, iters, eps, norm_eps, ss,
                   pre_acc, post_acc, comb_acc, HC: tl.constexpr, HCP: tl.constexpr, BLOCK_D: tl.constexpr):
    """One token's gates, Sinkhorn and collapse from its projection (pre / post / comb) and sum of squares ss."""
    rs = tl.rsqrt(ss / (HC * D) + norm_eps)  # the unweighted RMSNorm, as one scalar
    i = tl.arange(0, HCP)
    j = tl.arange(0, HCP)
    valid = i < HC
    square = (i[:, None] < HC) & (j[None, :] < HC)
    pre_b = tl.load(base_ptr + i, mask=valid, other=0.0).to(tl.float32)
    post_b = tl.load(base_ptr + HC + i, mask=valid, other=0.0).to(tl.float32)
    comb_b = tl.load(base_ptr + 2 * HC + i[:, None] * HC + j[None, :], mask=square, other=0.0).to(tl.float32)
    pre_s = tl.load(scale_ptr).to(tl.float32)
    post_s = tl.load(scale_ptr + 1).to(tl.float32)
    comb_s = tl.load(scale_ptr + 2).to(tl.float32)

    pre = tl.where(valid, tl.sigmoid(pre_acc * rs * pre_s + pre_b) + eps, 0.0)  # [HCP]
    post = 2.0 * tl.sigmoid(post_acc * rs * post_s + post_b)  # [HCP]
    comb = _sinkhorn(comb_acc * rs * comb_s + comb_b, iters, eps, HC, HCP)  # [HCP, HCP]

    tl.store(post_ptr + t * HC + i, post, mask=valid)
    tl.store(comb_ptr + t * HC * HC + i[:, None] * HC + j[None, :], comb, mask=square)
    _collapse(x_row, col_ptr + t * D, pre, D, HC, HCP, BLOCK_D)


@triton.jit
def _hc_post_kernel(out_ptr, add_ptr, x_ptr, post_ptr, comb_ptr, new_ptr, D, HC: tl.constexpr, HCP: tl.constexpr,
                    ADD: tl.constexpr, BLOCK_D: tl.constexpr):
    """out: [T, D] (ADD: + addend [T, D]), x: [T, HC, D], post: [T, HC], comb: [T, HC, HC] -> new: [T, HC, D]."""
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    i = tl.arange(0, HCP)
    d_mask = d < D
    tile_mask = (i[:, None] < HC) & d_mask[None, :]
    out = tl.load(out_ptr + t * D + d, mask=d_mask, other=0.0).to(tl.float32)  # [BLOCK_D]
    if ADD:
        out = out + tl.load(add_ptr + t * D + d, mask=d_mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + t * HC * D + i[:, None] * D + d[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + t * HC + i, mask=i < HC, other=0.0).to(tl.float32)  # [HCP]
    comb = tl.load(comb_ptr + t * HC * HC + i[:, None] * HC + i[None, :],
                   mask=(i[:, None] < HC) & (i[None, :] < HC), other=0.0).to(tl.float32)  # [HCP(i), HCP(j)]
    mixed = tl.sum(comb[:, :, None] * x[:, None, :], axis=0)  # [HCP(j), BLOCK_D]
    new = post[:, None] * out[None, :] + mixed
    tl.store(new_ptr + t * HC * D + i[:, None] * D + d[None, :], new, mask=tile_mask)


@triton.jit
def _hc_head_kernel(x_ptr, fn_ptr, base_ptr, scale_ptr, col_ptr, ws_ptr, cnt_ptr, out_ptr, add_ptr, ppost_ptr,
                    pcomb_ptr, new_ptr, nw_ptr, y_ptr, D, eps, norm_eps, per_split, n_eps, HC: tl.constexpr,
                    HCP: tl.constexpr, SPLIT: tl.constexpr, POST: tl.constexpr, ADD: tl.constexpr, NORM: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ROW: tl.constexpr):
    """x: [T, HC*D], fn: [HC, HC*D], base: [HC], scale: [1] -> collapsed [T, D];
    pre = sigmoid(rsqrt(mean(x^2) + norm_eps) * (fn @ x) * scale + base) + eps. SPLIT as _hc_pre_kernel's
    (records of 1 + HCP: the sum of squares, the projection). POST (hc_post_head): x is the last block's hc_post,
    computed tile by tile into new_ptr (a scratch) as _hc_pre_kernel's POST does. NORM (hc_post_head_norm): the
    finishing program then norms the collapsed row it stored (weight nw_ptr, eps n_eps) into y_ptr [T, D], with
    the rms_norm kernel's row code (norm.norm_row)."""
    t = tl.program_id(0).to(tl.int64)
    K = HC * D
    x_row = x_ptr + t * K
    lo, hi = _run_bounds(tl.program_id(1), per_split, K)
    sumsq = tl.zeros((BLOCK_K,), tl.float32)
    acc = tl.zeros((HCP,), tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hi
        if POST:
            x = _post_tile(out_ptr, add_ptr, x_ptr, ppost_ptr, pcomb_ptr, new_ptr, t, offs_k, k_mask, D, HC, HCP, ADD)
        else:
            x = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)  # [BLOCK_K]
        sumsq += x * x
        acc += _rows_dot(fn_ptr, 0, x, offs_k, k_mask, K, HC, HCP)
    ss = tl.sum(sumsq, axis=0)
    i = tl.arange(0, HCP)
    if POST:
        x_row = new_ptr + t * K  # the collapse reads the new streams, which other threads (SPLIT: programs) stored
    if SPLIT == 1:
        if POST:
            tl.debug_barrier()
        _hc_head_finish(x_row, base_ptr, scale_ptr, col_ptr, t, D, eps, norm_eps, ss, acc, HC, HCP, BLOCK_D)
        if NORM:
            tl.debug_barrier()  # the row other threads stored; the loads bypass L1
            norm_row(col_ptr + t * D, nw_ptr, y_ptr + t * D, D, n_eps, True, ".cg", BLOCK_ROW)
    else:
        REC: tl.constexpr = 1 + HCP
        rec = ws_ptr + (t * SPLIT + tl.program_id(1)) * REC
        tl.store(rec, ss)
        tl.store(rec + 1 + i, acc)
        if arrived_last(cnt_ptr + t, SPLIT):
            runs = ws_ptr + t * SPLIT * REC
            ss = tl.sum(sum_runs(runs + i, REC, i == 0, SPLIT), axis=0)
            acc = sum_runs(runs + 1 + i, REC, i < HCP, SPLIT)
            _hc_head_finish(x_row, base_ptr, scale_ptr, col_ptr, t, D, eps, norm_eps, ss, acc, HC, HCP, BLOCK_D)
            if NORM:
                tl.debug_barrier()
                norm_row(col_ptr + t * D, nw_ptr, y_ptr + t * D, D, n_eps, True, ".cg", BLOCK_ROW)


@triton.jit
def _hc_head_finish(x_row, base_ptr, scale_ptr, col_ptr, t, D, eps, norm_eps, ss, acc, HC: tl.constexpr,
                    HCP: tl.constexpr, BLOCK_D: tl.constexpr):
    rs = tl.rsqrt(ss / (HC * D) + norm_eps)
    i = tl.arange(0, HCP)
    base = tl.load(base_ptr + i, mask=i < HC, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr).to(tl.float32)
    pre = tl.where(i < HC, tl.sigmoid(acc * rs * scale + base) + eps, 0.0)  # [HCP]
    _collapse(x_row, col_ptr + t * D, pre, D, HC, HCP, BLOCK_D)


# --- host side -------------------------------------------------------------------------------------
def _options(config, D, K, name, split: bool = False):
    """Launch parameters: BLOCK_D (collapse / elementwise tile), BLOCK_K (projection tile), num_warps; the
    projections' SPLIT_K (0: from the GPU's SM count)."""
    defaults = {"BLOCK_D": min(next_pow2(D), 256), "BLOCK_K": min(next_pow2(K), 512), "num_warps": 4}
    return launch_config(config, {**defaults, "SPLIT_K": 0} if split else defaults, name)


def _split(opts, tokens: int, k: int, device) -> tuple[int, int, torch.Tensor | None]:
    """-> (runs, K span of a run, the arrival counters or None): SPLIT_K if set, else enough runs for two programs
    per SM (1 off a GPU), at most one per K tile; 1 where the counters cannot be had (common.tile_counters)."""
    tiles = cdiv(k, opts["BLOCK_K"])
    split = min(opts["SPLIT_K"] or cdiv(2 * sm_count(device), tokens), tiles)
    counters = tile_counters(device, tokens) if split > 1 else None
    if counters is None:
        return 1, k, None
    per = cdiv(tiles, split) * opts["BLOCK_K"]
    return cdiv(k, per), per, counters


def _check_streams(streams):
    """streams: [B, S, hc, D] floating, 1 <= hc <= MAX_HC, D >= 1 -> (B, S, hc, D)."""
    check_tensor("streams", streams, dtypes=FLOATS, dim=4, contiguous=False)
    b, s, hc, d = streams.shape
    check(1 <= hc <= MAX_HC, f"streams: hc = {hc} is not supported; expected 1 <= hc <= {MAX_HC}")
    check(d >= 1, f"streams: hidden size D must be >= 1, got shape {list(streams.shape)}")
    return b, s, hc, d


def _check_post(out, streams, post, comb, addend):
    """hc_post's inputs -> (B, S, hc, D)."""
    b, s, hc, d = _check_streams(streams)
    _check_param("out", out, (b, s, d))
    if addend is not None:
        _check_param("addend", addend, (b, s, d))
    _check_param("post", post, (b, s, hc))
    _check_param("comb", comb, (b, s, hc, hc))
    same_device(out=out, streams=streams, post=post, comb=comb, addend=addend)
    return b, s, hc, d


def _check_param(name, t, shape):
    check_tensor(name, t, dtypes=FLOATS, contiguous=False)
    check(tuple(t.shape) == tuple(shape), f"{name}: expected shape {list(shape)}, got {list(t.shape)}")


def _check_float(name, value):
    check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{name}: expected a number, got {value!r}")


def hc_expand(x, *, hc, config=None, into=None):
    """x: [B, S, D] -> [B, S, hc, D] fp32 (the same stream hc times)."""
    check_tensor("x", x, dtypes=FLOATS, dim=3, contiguous=False)
    check(isinstance(hc, int) and not isinstance(hc, bool) and 1 <= hc <= MAX_HC,
          f"hc: expected an int with 1 <= hc <= {MAX_HC}, got {hc!r}")
    b, s, d = x.shape
    out = result(into, (b, s, hc, d), torch.float32, x.device)
    if out.numel() == 0:
        return out
    opts = _options(config, d, d, "hc_expand")
    grid = (b * s, cdiv(d, opts["BLOCK_D"]))
    _hc_expand_kernel[grid](x.contiguous(), out, d, HC=hc, HCP=next_pow2(hc), BLOCK_D=opts["BLOCK_D"],
                            num_warps=opts["num_warps"])
    return out


def hc_pre(streams, fn, base, scale, *, iters, eps, norm_eps, config=None, into=None):
    """streams: [B, S, hc, D], fn: [(2+hc)*hc, hc*D], base: [(2+hc)*hc], scale: [3]
    -> collapsed [B, S, D], post [B, S, hc], comb [B, S, hc, hc] (all fp32).
    mixes = fn @ rms_norm(streams.flatten), split [hc | hc | hc*hc];
    pre = sigmoid(mixes_pre * scale[0] + base_pre) + eps; post = 2 * sigmoid(mixes_post * scale[1] + base_post);
    comb = Sinkhorn(softmax(mixes_comb * scale[2] + base_comb, rows) + eps, iters);
    collapsed = sum_i pre[i] * streams[i]."""
    return _pre(streams, _check_streams(streams), fn, base, scale, None, iters, eps, norm_eps, config, into, "hc_pre")


def hc_post_pre(out, streams, post, comb, fn, base, scale, addend=None, *, iters, eps, norm_eps, config=None,
                into=None):
    """hc_post(out, streams, post, comb, addend) and hc_pre on its result in one launch (the fuse pass's post_pre)
    -> (new streams [B, S, hc, D], collapsed, post, comb as hc_pre's), the same bits as the two launches: each
    K tile of the new streams is computed as hc_post does, stored, and projected."""
    b, s, hc, d = _check_post(out, streams, post, comb, addend)
    into_n, *into_pre = results(into, 4)
    new = result(into_n, (b, s, hc, d), torch.float32, streams.device)
    addend = None if addend is None else addend.contiguous()
    prev = (out.contiguous(), addend, post.contiguous(), comb.contiguous(), new)
    return (new, *_pre(streams, (b, s, hc, d), fn, base, scale, prev, iters, eps, norm_eps, config, into_pre,
                       "hc_post_pre"))


def _pre(streams, dims, fn, base, scale, prev, iters, eps, norm_eps, config, into, name, norm=None):
    """The hc_pre launch on checked streams of `dims` (B, S, hc, D); prev: None, or hc_post_pre's (out, addend or
    None, post, comb, new streams); norm: None, or hc_post_pre_quant's (weight, eps, group, UE8M0 scales, codes,
    scales, normed row or None, norm_quant_row's tiles)."""
    b, s, hc, d = dims
    n = (2 + hc) * hc
    _check_param("fn", fn, (n, hc * d))
    _check_param("base", base, (n,))
    _check_param("scale", scale, (3,))
    check(isinstance(iters, int) and not isinstance(iters, bool), f"iters: expected an int, got {iters!r}")
    _check_float("eps", eps)
    _check_float("norm_eps", norm_eps)
    same_device(streams=streams, fn=fn, base=base, scale=scale)
    dev = streams.device
    into_c, into_p, into_m = results(into, 3)
    collapsed = result(into_c, (b, s, d), torch.float32, dev)
    post = result(into_p, (b, s, hc), torch.float32, dev)
    comb = result(into_m, (b, s, hc, hc), torch.float32, dev)
    if b * s == 0:
        return collapsed, post, comb
    opts = _options(config, d, hc * d, name, split=True)
    split, per, counters = _split(opts, b * s, hc * d, dev)
    hcp = next_pow2(hc)
    ws = torch.empty(b * s * split * (1 + (2 + hcp) * hcp), dtype=torch.float32, device=dev) if split > 1 else post
    p_out, p_add, p_post, p_comb, p_new = prev or (post,) * 5
    n_w, n_eps, group, ue8m0, codes, n_scales, normed, tiles = norm or (post, 0.0, 1, False, post, post, None, (1, 1, 1))
    codes = codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes
    _hc_pre_kernel[(b * s, split)](streams.contiguous(), fn.contiguous(), base.contiguous(), scale.contiguous(),
                                   collapsed, post, comb, ws, post if counters is None else counters, p_out,
                                   p_out if p_add is None else p_add, p_post, p_comb, p_new, n_w, codes, n_scales,
                                   n_scales if normed is None else normed, d, iters, float(eps), float(norm_eps), per,
                                   n_eps, cdiv(d, group), HC=hc, HCP=hcp, SPLIT=split, POST=prev is not None,
                                   ADD=p_add is not None, QUANT=norm is not None, GROUP=group, UE8M0=ue8m0,
                                   HAS_Y=normed is not None, BLOCK_K=opts["BLOCK_K"], BLOCK_D=opts["BLOCK_D"],
                                   BLOCK_ROW=tiles[0], BLOCK_NG=tiles[1], BLOCK_G=tiles[2],
                                   num_warps=opts["num_warps"])
    return collapsed, post, comb


def hc_post(out, streams, post, comb, addend=None, *, config=None, into=None):
    """out: [B, S, D], streams: [B, S, hc, D], post: [B, S, hc], comb: [B, S, hc, hc] -> [B, S, hc, D] fp32;
    new[j] = post[j] * out + sum_i comb[i, j] * streams[i]; addend [B, S, D] (the fuse pass's add_post): the
    block output is out + addend (in fp32, as `add`)."""
    b, s, hc, d = _check_post(out, streams, post, comb, addend)
    new = result(into, (b, s, hc, d), torch.float32, streams.device)
    if new.numel() == 0:
        return new
    opts = _options(config, d, d, "hc_post")
    grid = (b * s, cdiv(d, opts["BLOCK_D"]))
    out = out.contiguous()
    _hc_post_kernel[grid](out, out if addend is None else addend.contiguous(), streams.contiguous(), post.contiguous(),
                          comb.contiguous(), new, d, HC=hc, HCP=next_pow2(hc), ADD=addend is not None,
                          BLOCK_D=opts["BLOCK_D"], num_warps=opts["num_warps"])
    return new


def hc_head(streams, fn, base, scale, *, eps, norm_eps, config=None, into=None):
    """streams: [B, S, hc, D], fn: [hc, hc*D], base: [hc], scale: [1] -> [B, S, D] fp32;
    pre = sigmoid((fn @ rms_norm(streams.flatten)) * scale + base) + eps; out = sum_i pre[i] * streams[i]."""
    return head(streams, _check_streams(streams), fn, base, scale, None, eps, norm_eps, config, into, "hc_head")


def head(streams, dims, fn, base, scale, prev, eps, norm_eps, config, into, name, norm=None):
    """The hc_head launch on checked streams of `dims` (B, S, hc, D); prev: None, or hc_post_head's (out, addend or
    None, post, comb, a scratch for the new streams); norm: None, or hc_post_head_norm's (weight, eps, the normed
    rows, the row tile): the collapsed rows are then a scratch and the normed rows the result."""
    b, s, hc, d = dims
    _check_param("fn", fn, (hc, hc * d))
    _check_param("base", base, (hc,))
    _check_param("scale", scale, (1,))
    _check_float("eps", eps)
    _check_float("norm_eps", norm_eps)
    same_device(streams=streams, fn=fn, base=base, scale=scale)
    collapsed = result(into, (b, s, d), torch.float32, streams.device)
    if b * s == 0:
        return collapsed if norm is None else norm[2]
    opts = _options(config, d, hc * d, name, split=True)
    split, per, counters = _split(opts, b * s, hc * d, streams.device)
    hcp = next_pow2(hc)
    ws = torch.empty(b * s * split * (1 + hcp), dtype=torch.float32, device=streams.device) if split > 1 else collapsed
    p_out, p_add, p_post, p_comb, p_new = prev or (collapsed,) * 5
    n_w, n_eps, normed, row = norm or (collapsed, 0.0, collapsed, 1)
    _hc_head_kernel[(b * s, split)](streams.contiguous(), fn.contiguous(), base.contiguous(), scale.contiguous(),
                                    collapsed, ws, collapsed if counters is None else counters, p_out,
                                    p_out if p_add is None else p_add, p_post, p_comb, p_new, n_w, normed, d,
                                    float(eps), float(norm_eps), per, float(n_eps), HC=hc, HCP=hcp, SPLIT=split,
                                    POST=prev is not None, ADD=p_add is not None, NORM=norm is not None,
                                    BLOCK_K=opts["BLOCK_K"], BLOCK_D=opts["BLOCK_D"], BLOCK_ROW=row,
                                    num_warps=opts["num_warps"])
    return collapsed if norm is None else normed


LAUNCHERS = {"hc_expand": hc_expand, "hc_pre": hc_pre, "hc_post": hc_post, "hc_post_pre": hc_post_pre,
             "hc_head": hc_head}
