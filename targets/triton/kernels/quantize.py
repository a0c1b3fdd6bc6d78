"""Dynamic activation quantization once for a whole GEMM (`act_quant`), shared by the projections (gemm.py) and the
routed experts (moe.py), and the activation loads the fused path does in every tile (`load_act`).

Below QUANT_ONCE_MIN_TOKENS rows (a decode step) each GEMM tile quantizes its own activation tile in its K loop
(an amax pass per group, then the division and e4m3 rounding): one launch, and the tile is small. From there
on, the tiles would redo that work N / BLOCK_N times, so `_act_quant_kernel` does it once and the GEMM reads
1-byte codes and their group scales: the same codes and scales bit for bit (common.group_scale, e4m3_quant).

SwiGLU prologue (swiglu_linear_fp8, the fuse pass's `swiglu_linear`): the activation is swiglu(gate, up) of two
tensors of the same shape and strides, computed where it is loaded (common.swiglu_value: the swiglu kernel's
arithmetic, so the same fp32 values), in both paths; it never goes through memory.
"""

import torch
import triton
import triton.language as tl

from .common import E4M3_MAX, cdiv, config_switch, e4m3_quant, group_scale, next_pow2, swiglu_value


@triton.jit
def load_act(x_tile, u_tile, mask, limit, SWIGLU: tl.constexpr, HAS_LIMIT: tl.constexpr, rstd, w_cols, w_ok,
             NORM: tl.constexpr):
    """The fp32 activation tile [R, C] at the pointers x_tile (0 where masked); SWIGLU: swiglu(x, u), u loaded at
    the pointers u_tile (the up projection's output, at x's offsets); NORM: rms_norm(x), the rows' 1 / rms [R] in
    rstd and the norm weight of the tile's columns at the pointers w_cols [C] (w_ok: the columns inside the row), in
    the norm kernel's order (x * rstd, then the weight times that: norm.norm_quant_row)."""
    x = tl.load(x_tile, mask=mask, other=0.0).to(tl.float32)
    if SWIGLU:
        x = swiglu_value(x, tl.load(u_tile, mask=mask, other=0.0).to(tl.float32), limit, HAS_LIMIT)
    if NORM:
        x = tl.load(w_cols, mask=w_ok, other=0.0).to(tl.float32)[None, :] * (x * rstd[:, None])
    return x


@triton.jit
def _act_quant_kernel(x_ptr, u_ptr, q_ptr, s_ptr, M, K, GS, NG, sxm, sxg, sxk, limit, UE8M0: tl.constexpr,
                      SWIGLU: tl.constexpr, HAS_LIMIT: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr):
    """Dynamic activation quantization, once for all N tiles of a GEMM: for rows m < M (of group g) and
    activation group j (K span GS): s[m, g, j] = group_scale(amax x[m, g, j GS:(j+1) GS]) and
    q[m, g, k] = e4m3 code of clamp(x / s, +-448), exactly as the fused path (x: swiglu(x, u) with SWIGLU).
    Grid: (cdiv(M, BR), G * NG)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)  # [BR]
    g, j = tl.program_id(1) // NG, tl.program_id(1) % NG
    n_groups = tl.num_programs(1) // NG  # G
    c = tl.arange(0, BG)
    k = j * GS + c  # [BG]
    r_ok = rows < M
    ok = r_ok[:, None] & ((c < GS) & (k < K))[None, :]
    offs = rows.to(tl.int64)[:, None] * sxm + g * sxg + k[None, :] * sxk
    x = load_act(x_ptr + offs, u_ptr + offs, ok, limit, SWIGLU, HAS_LIMIT, limit, x_ptr, c < 0, False)
    s = group_scale(tl.max(tl.abs(x), axis=1), E4M3_MAX, UE8M0)  # [BR]
    out_row = rows.to(tl.int64) * n_groups + g  # [BR] rows of [M * G, K]
    tl.store(q_ptr + out_row[:, None] * K + k[None, :], e4m3_quant(x, s[:, None]).to(tl.uint8), mask=ok)
    tl.store(s_ptr + out_row * NG + j, s, mask=r_ok)


# Dynamic activations are quantized by a separate kernel, once, instead of inside every N tile's K loop, from
# this many tokens on (QUANT_ONCE "auto"). The fused path re-reads the fp32 activations and redoes the amax, the
# correctly rounded division and the e4m3 rounding N / BLOCK_N times: at prefill (M = 4096, N = 32768) that is
# ~1e9 divisions and 4 GB of activation reads per GEMM; once, the GEMM reads 1-byte codes. At decode sizes
# the fused path saves a launch and its activation tile is small.
QUANT_ONCE_MIN_TOKENS = 64


def quant_once(want, dynamic: bool, m: int, n_tiles: int, name: str) -> bool:
    """Whether to quantize the activations once (act_quant) rather than in every N tile: the QUANT_ONCE switch
    `want` ("auto": from QUANT_ONCE_MIN_TOKENS rows on, when there is more than one N tile). The MoE grouped
    GEMM decides the same way over its (token, expert) pairs."""
    return config_switch("QUANT_ONCE", want, [(dynamic, "dynamic activations (act mode 'dynamic')")],
                         name, auto=m >= QUANT_ONCE_MIN_TOKENS and n_tiles > 1)


def act_quant(x3: torch.Tensor, span: int, ue8m0: bool, up3: torch.Tensor | None = None,
              limit: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x3 [M, G, K] -> (e4m3 codes as uint8 [M, G, K], fp32 scales [M, G, cdiv(K, span)]) by _act_quant_kernel.
    up3: the activation is swiglu(x3, up3) (clamped at `limit`); up3 has x3's shape and strides."""
    m, groups, k = x3.shape
    assert up3 is None or (up3.shape == x3.shape and up3.stride() == x3.stride()), "up3: x3's shape and strides"
    n_groups = cdiv(k, span)
    codes = torch.empty(m, groups, k, dtype=torch.uint8, device=x3.device)
    scales = torch.empty(m, groups, n_groups, dtype=torch.float32, device=x3.device)
    block_g = next_pow2(span)
    block_r = max(1, min(next_pow2(m), 4096 // block_g))
    _act_quant_kernel[(cdiv(m, block_r), groups * n_groups)](
        x3, x3 if up3 is None else up3, codes, scales, m, k, span, n_groups, *x3.stride(),
        0.0 if limit is None else float(limit), UE8M0=ue8m0, SWIGLU=up3 is not None, HAS_LIMIT=limit is not None,
        BR=block_r, BG=block_g, num_warps=4)
    return codes, scales
